"""Stage runners shared by the `raytrain` CLI and the `jobs.*` entry points.

Order of work in every stage: load and validate the spec (no Ray yet, so a bad spec fails in
milliseconds with a readable message), connect to Ray, run, print a short JSON summary.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from raytrain.config import ConfigError, JobSpec, load_spec
from raytrain.errors import StageInputError

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Stage:
    """One entry of the stage table: the CLI command, `python -m jobs.<name>`, and `raytrain ops submit` follow."""

    name: str
    runner: Callable[[JobSpec, bool], dict[str, Any]]
    section: str
    doc: str
    batch: bool = True  # runs to completion as a job (RayJob); `serve` keeps running instead


def _data(spec: JobSpec, started_local: bool) -> dict[str, Any]:
    from raytrain.data.pipeline import run_data

    m = run_data(spec)
    return {"dataset": m["dataset"], "counts": m["counts"],
            "tokens": {k: v["tokens"] for k, v in m["splits"].items()}}


def _pretrain(spec: JobSpec, started_local: bool) -> dict[str, Any]:
    from raytrain.train.trainer import run_pretrain

    return run_pretrain(spec)


def _posttrain(stage: str) -> Callable[[JobSpec, bool], dict[str, Any]]:
    def run(spec: JobSpec, started_local: bool) -> dict[str, Any]:
        from raytrain.posttrain.stage import run_posttrain

        return run_posttrain(spec, stage)

    return run


def _rl(spec: JobSpec, started_local: bool) -> dict[str, Any]:
    from raytrain.rl.stage import run_rl

    out = run_rl(spec)
    its = out.pop("iterations")
    # The summary keeps the first and last iterations' figures; every one is in runs/<run>/rl/iterations/.
    out["iterations"] = {"count": len(its), "first": its[0] if its else None, "last": its[-1] if its else None}
    return out


def _tune(spec: JobSpec, started_local: bool) -> dict[str, Any]:
    from raytrain.tune.sweep import run_tune

    return run_tune(spec)


def _eval(spec: JobSpec, started_local: bool) -> dict[str, Any]:
    from raytrain.eval.suites import print_summary, run_eval

    doc = run_eval(spec)
    print_summary(doc)
    return doc


def _serve(spec: JobSpec, started_local: bool) -> dict[str, Any]:
    from raytrain.deploy import deploy

    url = deploy(spec)
    if started_local:
        # The embedded Ray instance lives as long as this process: keep serving until interrupted.
        print(f"serving {spec.served_model_name} at {url}/v1 — Ctrl-C to stop", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return {"url": f"{url}/v1", "model": spec.served_model_name}


def _gate(spec: JobSpec) -> dict[str, Any]:
    """Run the promotion gate on the candidate this spec exported and promote it when it passes; print the verdict.

    A refused candidate leaves the alias where it was: the pipeline then serves that earlier version (when serving
    follows the alias), and stops with the failing checks when there is none.
    """
    from raytrain.promotion import PromotionRefused, evaluate, promote, verdict_lines
    from raytrain.registry import Registry, candidate_dir, version_of_dir

    gate = spec.promote
    found = version_of_dir(candidate_dir(spec))
    if found is None:
        raise StageInputError(f"the candidate {candidate_dir(spec)} is not a registry version: nothing to promote")
    name, version = found
    registry = Registry(spec.storage.root)
    results = evaluate(registry.version_info(name, version)["eval"] or {}, gate)
    out: dict[str, Any] = {"model": name, "version": version, "alias": gate.alias,
                           "checks": {r.metric: {"value": r.value, "passed": r.passed, "required": r.bound}
                                      for r in results}}
    try:
        promote(registry, name, version, gate)
        out["verdict"] = "promoted"
    except PromotionRefused as exc:
        out["verdict"] = "refused"
        out["reason"] = str(exc)
    print(f"\npromotion gate for {name} version {version} -> {gate.alias}: {out['verdict'].upper()}\n  "
          + "\n  ".join(verdict_lines(results) or ["(no checks in promote.checks: always passes)"]) + "\n", flush=True)
    if out["verdict"] == "refused" and spec.serve.alias == gate.alias and not spec.serve.model_path:
        try:
            out["serving_instead"] = registry.alias_version(name, gate.alias)
        except StageInputError:
            raise StageInputError(f"{out['reason']}; and no earlier {gate.alias!r} version exists to serve") from None
    return out


def pipeline_steps(spec: JobSpec) -> list[tuple[str, Callable[[JobSpec, bool], dict[str, Any]]]]:
    """What `raytrain pipeline` runs for this spec, in order (serving comes after)."""
    steps: list[tuple[str, Callable[[JobSpec, bool], dict[str, Any]]]] = [("data", _data), ("pretrain", _pretrain)]
    steps += [(name, _posttrain(name)) for name in ("sft", "reward") if getattr(spec, name) is not None]
    if spec.rl is not None:  # online RL takes DPO's place when the recipe has it
        steps.append(("rl", _rl))
    elif spec.dpo is not None:
        steps.append(("dpo", _posttrain("dpo")))
    steps.append(("eval", _eval))
    if spec.promote.enabled:
        steps.append(("promote", lambda s, _: _gate(s)))
    return steps


def _pipeline(spec: JobSpec, started_local: bool) -> dict[str, Any]:
    from raytrain.deploy import client_api_key, complete, deploy, served_entry

    api_key = client_api_key(spec)  # before training: the demo request at the end needs a key when serve.auth is on
    summary: dict[str, Any] = {}
    for name, fn in pipeline_steps(spec):
        t0 = time.time()
        summary[name] = fn(spec, started_local)
        summary[name]["seconds"] = round(time.time() - t0, 1)
    url = deploy(spec)
    reply = complete(url, spec.served_model_name, spec.serve.demo_prompt, spec.serve.demo_max_tokens, api_key=api_key)
    text = reply["choices"][0]["text"]
    entry = served_entry(spec)
    summary["serve"] = {"url": f"{url}/v1", "model": spec.served_model_name, "model_dir": entry["path"],
                        "version": entry.get("version"), "alias": entry.get("alias"),
                        "prompt": spec.serve.demo_prompt, "completion": text}
    served = f" (version {entry['version']}" + (f", {entry['alias']})" if entry.get("alias") else ")") \
        if entry.get("version") else ""
    print(f"\ncompletion from {url}/v1/completions{served}:\n  {spec.serve.demo_prompt}{text}\n", flush=True)
    if started_local:
        from ray import serve

        serve.shutdown()
        print("(the local Ray instance stops with this process; `raytrain serve --config …` keeps a model up)")
    return summary


STAGE_TABLE: dict[str, Stage] = {s.name: s for s in (
    Stage("data", _data, "data", "Curate a corpus into tokenized, packed Parquet shards with a manifest."),
    Stage("pretrain", _pretrain, "train", "Pretrain with Ray Train + DeepSpeed and export a Hugging Face model."),
    Stage("sft", _posttrain("sft"), "sft", "Supervised fine-tuning of a parent model on demonstrations."),
    Stage("reward", _posttrain("reward"), "reward", "Train a reward model on preference pairs (Bradley-Terry)."),
    Stage("dpo", _posttrain("dpo"), "dpo", "Align a parent model on preference pairs with DPO or IPO."),
    Stage("rl", _rl, "rl", "Online RL (PPO or GRPO) of a policy against a reward model and/or reward functions."),
    Stage("tune", _tune, "tune", "Sweep a training stage's hyperparameters with Ray Tune (ASHA, random or Optuna "
          "TPE), resumably; export the best trial as a registry version."),
    Stage("eval", _eval, "eval", "Evaluate the candidate (perplexity, lm-eval, win rate, overfitting, safety) "
          "into its eval.json and eval.md."),
    Stage("serve", _serve, "serve", "Serve the exported model behind OpenAI-compatible HTTP endpoints.",
          batch=False),
    Stage("pipeline", _pipeline, "*", "Run data -> pretrain -> sft -> reward -> dpo or rl (those the spec has; rl "
          "when both) -> eval -> promotion gate -> serve and print a completion fetched over HTTP."),
)}
"""The one place a stage is declared."""

STAGES = tuple(STAGE_TABLE)
BATCH_STAGES = tuple(name for name, s in STAGE_TABLE.items() if s.batch)


def relative_root_problem(root: str, cwd: str | None = None, env: dict[str, str] | None = None) -> str | None:
    """Why a relative storage root cannot work here, or None.

    A job submitted with `ray job submit --working-dir .` runs in Ray's temporary copy of that directory
    (under the Ray session's runtime_resources/): a relative root would put every artifact there, where the
    user never looks, that vanishes with the session, and that a re-submission replaces with a new copy.
    """
    env = os.environ if env is None else env
    cwd = cwd or os.getcwd()
    path = root.removeprefix("file://")
    if "://" in path or os.path.isabs(os.path.expanduser(path)):
        return None
    submitted = "RAY_JOB_CONFIG_JSON_ENV_VAR" in env  # set by Ray's job supervisor for the job's driver
    in_runtime_dir = f"{os.sep}runtime_resources{os.sep}" in cwd + os.sep
    if not (submitted or in_runtime_dir):
        return None
    return (f"storage.root is the relative path {root!r}, but this stage runs as a Ray job in {cwd} "
            "(Ray's temporary copy of the job's working directory): the artifacts would land there and be lost. "
            "Set an absolute path on a one-machine cluster (e.g. storage.root=$PWD/artifacts on the "
            "`ray job submit` line) or an object-store URI (storage.root=s3://bucket/prefix) on a remote one.")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def run_stage(stage: str, config: str | None, overrides: list[str]) -> int:
    """Validate, connect, run one stage, print its summary. Returns a process exit code."""
    try:
        spec = load_spec(config, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    problem = relative_root_problem(spec.storage.root)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    section = STAGE_TABLE[stage].section
    if section in JobSpec.model_fields and getattr(spec, section) is None:
        # An optional section the stage needs (sft, reward, dpo, rl, tune): say so before starting Ray.
        print(f"error: the spec {spec.name!r} has no `{section}` section, which `{stage}` runs; add one (see "
              f"jobs/configs/{section}.yaml)", file=sys.stderr)
        return 2
    from raytrain.cluster import connect

    started_local = connect(spec.cluster)
    try:
        summary = STAGE_TABLE[stage].runner(spec, started_local)
    except StageInputError as exc:
        # Missing inputs and impossible settings are a person's problem to fix, not a traceback.
        print(f"error: {stage} stage: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"stage": stage, "spec": spec.name, **summary}, indent=2, default=str), flush=True)
    return 0


def stage_main(stage: str, argv: list[str] | None = None) -> int:
    """`python -m jobs.<stage> --config FILE [section.key=value …]`."""
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m jobs.{stage}", description=f"raytrain {stage} stage")
    parser.add_argument("--config", "-c", required=True, help="recipe file, or a name in jobs/configs/")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("--verbose", "-v", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return run_stage(stage, args.config, args.overrides)
