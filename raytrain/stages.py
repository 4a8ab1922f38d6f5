"""Stage runners shared by the `raytrain` CLI and the `jobs.*` entry points.

Order of work in every stage: load and validate the spec (no Ray yet, so a bad spec fails in
milliseconds with a readable message), connect to Ray, run, print a short JSON summary.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from raytrain.config import ConfigError, JobSpec, load_spec
from raytrain.errors import StageInputError

log = logging.getLogger(__name__)

STAGES = ("data", "pretrain", "eval", "serve", "pipeline")


def _data(spec: JobSpec, started_local: bool) -> dict[str, Any]:
    from raytrain.data.pipeline import run_data

    m = run_data(spec)
    return {"dataset": m["dataset"], "counts": m["counts"],
            "tokens": {k: v["tokens"] for k, v in m["splits"].items()}}


def _pretrain(spec: JobSpec, started_local: bool) -> dict[str, Any]:
    from raytrain.train.trainer import run_pretrain

    return run_pretrain(spec)


def _eval(spec: JobSpec, started_local: bool) -> dict[str, Any]:
    from raytrain.eval.perplexity import run_eval

    return run_eval(spec)


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


def _pipeline(spec: JobSpec, started_local: bool) -> dict[str, Any]:
    from raytrain.deploy import complete, deploy

    summary: dict[str, Any] = {}
    for name, fn in (("data", _data), ("pretrain", _pretrain), ("eval", _eval)):
        t0 = time.time()
        summary[name] = fn(spec, started_local)
        summary[name]["seconds"] = round(time.time() - t0, 1)
    url = deploy(spec)
    reply = complete(url, spec.served_model_name, spec.serve.demo_prompt, spec.serve.demo_max_tokens)
    text = reply["choices"][0]["text"]
    summary["serve"] = {"url": f"{url}/v1", "model": spec.served_model_name, "prompt": spec.serve.demo_prompt,
                        "completion": text}
    print(f"\ncompletion from {url}/v1/completions:\n  {spec.serve.demo_prompt}{text}\n", flush=True)
    if started_local:
        from ray import serve

        serve.shutdown()
        print("(the local Ray instance stops with this process; `raytrain serve --config …` keeps a model up)")
    return summary


RUNNERS: dict[str, Callable[[JobSpec, bool], dict[str, Any]]] = {
    "data": _data, "pretrain": _pretrain, "eval": _eval, "serve": _serve, "pipeline": _pipeline,
}


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
    from raytrain.cluster import connect

    started_local = connect(spec.cluster)
    try:
        summary = RUNNERS[stage](spec, started_local)
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
