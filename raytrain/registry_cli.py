"""`raytrain models …`: list, show, alias, promote (through the gate), rollback — on a local or object-store root."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from raytrain.errors import StageInputError

app = typer.Typer(no_args_is_help=True, help="The model registry: versions, lineage, aliases, the promotion gate.")

Root = Annotated[str | None, typer.Option("--root", help="Storage root (local path or s3://…). Or give --config.")]
Config = Annotated[str | None, typer.Option("--config", "-c", help="Recipe: its storage.root (and promote gate).")]
Overrides = Annotated[list[str] | None, typer.Option("--set", help="Spec override section.key=value (repeatable).")]


def _spec(config: str | None, overrides: list[str] | None) -> Any:
    from raytrain.config import ConfigError, load_spec

    if config is None:
        return None
    try:
        return load_spec(config, overrides or [])
    except ConfigError as exc:
        _fail(str(exc), 2)


def _registry(root: str | None, spec: Any) -> Any:
    from raytrain.registry import Registry

    if root is None and spec is None:
        _fail("give --root (the storage root) or --config (a recipe whose storage.root to use)", 2)
    return Registry(root or spec.storage.root)


def _fail(message: str, code: int = 1) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


@app.command("list")
def list_models(root: Root = None, config: Config = None, overrides: Overrides = None,
                as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """Every model under the root with its versions and aliases."""
    reg = _registry(root, _spec(config, overrides))
    rows = [{"model": n, "versions": reg.versions(n), "aliases": {a: r["version"] for a, r in reg.aliases(n).items()}}
            for n in reg.names()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print(f"no models under {reg.root}/models")
    for r in rows:
        aliases = ", ".join(f"{a} -> {v}" for a, v in r["aliases"].items()) or "no aliases"
        print(f"{r['model']:32s} versions {', '.join(map(str, r['versions']))}   ({aliases})")


@app.command()
def show(name: Annotated[str, typer.Argument(help="Model name.")],
         version: Annotated[str | None, typer.Argument(help="Version number or alias (default: all).")] = None,
         root: Root = None, config: Config = None, overrides: Overrides = None,
         as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """A model's versions (or one version): lineage, evaluation, aliases, history."""
    reg = _registry(root, _spec(config, overrides))
    try:
        versions = [_version(reg, name, version)] if version else reg.versions(name)
        if not versions:
            _fail(f"model {name!r} has no versions under {reg.root}/models")
        infos = [{**reg.version_info(name, v), "history": reg.history(name, v)} for v in versions]
    except (StageInputError, OSError) as exc:  # OSError: the storage root (permissions, object store) refused
        _fail(str(exc))
    if as_json:
        print(json.dumps(infos if version is None else infos[0], indent=2, default=str))
        return
    for info in infos:
        lineage, ev = info["lineage"] or {}, info["eval"] or {}
        parent = lineage.get("parent") or {}
        dataset = lineage.get("dataset") or {}
        print(f"{name} version {info['version']}  {info['path']}")
        print(f"  aliases   {', '.join(info['aliases']) or '—'}")
        print(f"  created   {info['published'].get('created', '—')} by {info['published'].get('by', '?')}")
        print(f"  task      {(lineage.get('task') or {}).get('type', '—')}   run {lineage.get('run', '—')}   "
              f"code {str(lineage.get('git_revision') or '—')[:12]}")
        print(f"  parent    {parent.get('model') or '—'} version {parent.get('version') or '—'}  ({parent.get('path')})"
              if parent else "  parent    —")
        print(f"  dataset   {dataset.get('name', '—')} version {dataset.get('version') or dataset.get('key', '—')}")
        figures = _eval_summary(ev)
        print(f"  eval      {figures or '— (run raytrain eval)'}")
        for e in info["history"]:
            extra = f" {e.get('from')} -> {e['version']}" if e.get("alias") else ""
            print(f"  {e['time']}  {e['action']:9s} {e.get('alias') or ''}{extra}  by {e.get('by', '?')}")


def _eval_summary(ev: dict[str, Any]) -> str:
    from raytrain.promotion import lookup

    keys = ("perplexity.perplexity", "perplexity.change_vs_parent", "win_rate.win_rate", "safety.unsafe_rate",
            "overfitting.flagged")
    parts = []
    for k in keys:
        v = lookup(ev, k)
        if isinstance(v, (int, float)):
            parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return "  ".join(parts)


def _version(reg: Any, name: str, ref: str) -> int:
    return int(ref) if ref.isdigit() else reg.alias_version(name, ref)


@app.command()
def alias(name: Annotated[str, typer.Argument(help="Model name.")],
          alias_name: Annotated[str, typer.Argument(metavar="ALIAS", help="Alias to set (e.g. challenger).")],
          version: Annotated[str, typer.Argument(help="Version number, or another alias to copy.")],
          root: Root = None, config: Config = None, overrides: Overrides = None) -> None:
    """Point an alias at a version, without the gate (recorded in the history)."""
    reg = _registry(root, _spec(config, overrides))
    try:
        event = reg.set_alias(name, alias_name, _version(reg, name, version))
    except (StageInputError, OSError) as exc:  # OSError: the storage root (permissions, object store) refused
        _fail(str(exc))
    print(f"{name}@{alias_name} -> version {event['version']} (was {event['from']})")


@app.command()
def promote(name: Annotated[str | None, typer.Argument(help="Model (default: the spec's candidate model).")] = None,
            version: Annotated[str | None, typer.Argument(help="Version (default: the spec's candidate).")] = None,
            config: Config = None, overrides: Overrides = None, root: Root = None,
            alias_name: Annotated[str | None, typer.Option("--alias", help="Alias (default: promote.alias).")] = None,
            force: Annotated[bool, typer.Option("--force", help="Promote despite failing checks (recorded).")] = False,
            ) -> None:
    """Move an alias to a version if its eval.json passes the spec's promotion gate (promote.checks)."""
    from raytrain.config.schema import PromoteSpec
    from raytrain.promotion import PromotionRefused, evaluate, verdict_lines
    from raytrain.promotion import promote as do_promote
    from raytrain.registry import candidate_model_name, exported_version, last_stage

    for arg in (name, version):
        if arg and "=" in arg:
            _fail(f"{arg!r} looks like a spec override: give overrides with --set {arg}", 2)
    spec = _spec(config, overrides)
    reg = _registry(root, spec)
    gate = spec.promote if spec is not None else PromoteSpec()
    if spec is None and not force:
        _fail("give --config: the promotion gate's checks come from the spec's `promote` section "
              "(or --force to move the alias without a gate)", 2)
    try:
        if name is None:
            if spec is None:
                _fail("give the model name (or --config to promote the spec's candidate)", 2)
            name = candidate_model_name(spec)
        if version is None:
            if spec is None:
                _fail("give the version (or --config to promote the spec's candidate)", 2)
            stage = last_stage(spec)
            done = exported_version(spec.storage.root, spec.run_name if stage == "pretrain"
                                    else spec.stage_run_name(stage))
            if done is None or done["model"] != name:
                _fail(f"the spec's {stage} run has not exported {name!r} yet: give the version explicitly", 2)
            v = int(done["version"])
        else:
            v = _version(reg, name, version)
        for line in verdict_lines(evaluate(reg.version_info(name, v)["eval"] or {}, gate)):
            print("  " + line)
        event = do_promote(reg, name, v, gate, alias=alias_name, force=force)
    except PromotionRefused as exc:
        _fail(f"refused: {exc}")
    except (StageInputError, OSError) as exc:  # OSError: the storage root (permissions, object store) refused
        _fail(str(exc))
    print(f"promoted {name} version {event['version']} to {event['alias']} (was {event['from']})")


@app.command()
def rollback(name: Annotated[str, typer.Argument(help="Model name.")],
             alias_name: Annotated[str, typer.Option("--alias", help="Alias to move back.")] = "champion",
             root: Root = None, config: Config = None, overrides: Overrides = None) -> None:
    """Move an alias back to the version it named before its last move."""
    reg = _registry(root, _spec(config, overrides))
    try:
        event = reg.rollback(name, alias_name)
    except (StageInputError, OSError) as exc:  # OSError: the storage root (permissions, object store) refused
        _fail(str(exc))
    print(f"{name}@{alias_name} rolled back: version {event['from']} -> {event['version']}")
