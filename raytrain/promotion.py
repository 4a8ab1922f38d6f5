"""The promotion gate: a candidate version takes an alias only if its eval.json passes the spec's checks.

Every decision (promoted or refused) is recorded in the model's history with its evidence: each check, the value
read, the bound, and the eval.json it was read from.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

from raytrain import storage
from raytrain.config.schema import GateCheck, PromoteSpec
from raytrain.registry import Registry, RegistryError

log = logging.getLogger(__name__)

_MISSING = object()


@dataclass
class CheckResult:
    metric: str
    bound: str
    value: Any
    passed: bool
    reason: str


class PromotionRefused(RegistryError):
    """The candidate failed the gate; `results` holds every check."""

    def __init__(self, message: str, results: list[CheckResult]) -> None:
        super().__init__(message)
        self.results = results


def lookup(doc: dict[str, Any], dotted: str) -> Any:
    """`doc["a"]["b"]` for "a.b"; keys may themselves contain dots (lm-eval metric names like "acc,none" do not,
    but task names may), so the longest matching key wins at each level."""
    node: Any = doc
    parts = dotted.split(".")
    i = 0
    while i < len(parts):
        if not isinstance(node, dict):
            return _MISSING
        for j in range(len(parts), i, -1):
            key = ".".join(parts[i:j])
            if key in node:
                node, i = node[key], j
                break
        else:
            return _MISSING
    return node


def _bound(check: GateCheck) -> str:
    if check.equals is not None:
        return f"== {check.equals!r}"
    parts = []
    if check.min is not None:
        parts.append(f">= {check.min:g}")
    if check.max is not None:
        parts.append(f"<= {check.max:g}")
    return " and ".join(parts)


def evaluate(eval_doc: dict[str, Any], gate: PromoteSpec) -> list[CheckResult]:
    """Each check of `gate` against `eval_doc` (a missing metric fails, or is skipped with on_missing: skip)."""
    results = []
    for check in gate.checks:
        value = lookup(eval_doc, check.metric)
        bound = _bound(check)
        if value is _MISSING or value is None:
            skip = gate.on_missing == "skip"
            results.append(CheckResult(check.metric, bound, None, skip,
                                       "not measured (skipped)" if skip else "not measured: eval.json has no "
                                       f"{check.metric} (run `raytrain eval` with that suite enabled)"))
            continue
        if check.equals is not None:
            ok = value == check.equals
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            results.append(CheckResult(check.metric, bound, value, False, f"{value!r} is not a number"))
            continue
        else:
            ok = not math.isnan(value) and (check.min is None or value >= check.min) and (
                check.max is None or value <= check.max)
        results.append(CheckResult(check.metric, bound, value, ok,
                                   "passed" if ok else f"{check.metric} = {_fmt(value)}, required {bound}"))
    return results


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else repr(value)


def promote(registry: Registry, name: str, version: int, gate: PromoteSpec, alias: str | None = None,
            force: bool = False) -> dict[str, Any]:
    """Move `alias` (default: the gate's) to `version` if its eval.json passes the gate; returns the event.

    Raises PromotionRefused naming each failing check (the refusal is recorded too). `force` records the failing
    checks and promotes anyway (an operator's override, visible in the history).
    """
    alias = alias or gate.alias
    info = registry.version_info(name, version)
    eval_path = storage.join(info["path"], "eval.json")
    results = evaluate(info["eval"] or {}, gate)
    failed = [r for r in results if not r.passed]
    evidence = {"checks": [asdict(r) for r in results], "eval": eval_path if info["eval"] is not None else None,
                "passed": not failed, "forced": bool(failed and force)}
    if failed and not force:
        registry.record(name, {"action": "refused", "alias": alias, "version": version, **evidence})
        lines = "; ".join(r.reason for r in failed)
        raise PromotionRefused(f"{name} version {version} does not pass the promotion gate for {alias!r}: {lines}",
                               results)
    event = registry.set_alias(name, alias, version, action="promote", evidence=evidence)
    log.info("promoted %s version %d to %s (%d checks passed%s)", name, version, alias, len(results) - len(failed),
             ", forced" if failed else "")
    return event


def verdict_lines(results: list[CheckResult]) -> list[str]:
    """One line per check, for people: PASS/FAIL, metric, value, bound."""
    return [f"{'PASS' if r.passed else 'FAIL'}  {r.metric:40s} {_fmt(r.value) if r.value is not None else '—':>10s}"
            f"  (required {r.bound}){'' if r.passed else '  ' + r.reason}" for r in results]
