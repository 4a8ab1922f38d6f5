"""KubeRay objects `raytrain ops` creates or changes, as plain dicts (no Kubernetes client needed)."""

from __future__ import annotations

import copy
import json
import re
import shlex
from typing import Any

import yaml

from raytrain.stages import BATCH_STAGES

GROUP, VERSION = "ray.io", "v1"
# Stages that run to completion (RayJobs); `serve` is the RayService's business. From the one stage table.
STAGES = BATCH_STAGES
SERVE_IMPORT_PATH = "serving.app:build_app"
# Where rollout keeps the models list it replaced, so rollback can restore it.
PREVIOUS_ANNOTATION = "raytrain.io/previous-models"
_OVERRIDE = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)+=.*$")
_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class OpsError(ValueError):
    """A request `raytrain ops` refuses, with a message for the operator."""


def job_name(stage: str, recipe: str, run_name: str | None = None) -> str:
    """A RayJob name (DNS-1035, <= 47 characters) from the stage and the recipe or run."""
    base = f"raytrain-{stage}-{run_name or recipe}".lower()
    base = re.sub(r"[^-a-z0-9]+", "-", base).strip("-")
    return base[:47].rstrip("-")


def rayjob(
    stage: str,
    recipe: str,
    *,
    cluster: str,
    name: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    run_name: str | None = None,
    storage_root: str | None = None,
    backoff_limit: int = 2,
    active_deadline_seconds: int | None = None,
) -> dict[str, Any]:
    """A RayJob that runs `python -m jobs.<stage> --config <recipe> ...` on an existing RayCluster.

    A retry (backoffLimit) resubmits the same entrypoint: same spec, same run name, same storage root,
    so training resumes from the run's latest checkpoint.
    """
    if stage not in STAGES:
        raise OpsError(f"stage {stage!r} is not one of {', '.join(STAGES)}")
    bad = [o for o in overrides if not _OVERRIDE.match(o)]
    if bad:
        raise OpsError(f"overrides must look like section.key=value; got {', '.join(map(repr, bad))}")
    if backoff_limit < 0:
        raise OpsError(f"backoff limit must be >= 0; got {backoff_limit}")
    name = name or job_name(stage, recipe, run_name)
    if not _NAME.match(name) or len(name) > 47:
        raise OpsError(f"job name {name!r} must be a DNS-1035 label of at most 47 characters")
    argv = ["python", "-m", f"jobs.{stage}", "--config", recipe]
    if storage_root:
        argv.append(f"storage.root={storage_root}")
    if run_name and stage == "tune":
        argv.append(f"tune.name={run_name}")  # a sweep's name is its experiment's (tune/<name>/)
    elif run_name:
        # Post-training stages keep their run in their own section (sft.train.run_name …).
        section = stage if stage in ("sft", "reward", "dpo", "rl") else "train"
        argv.append(f"{section}.train.run_name={run_name}" if section != "train" else f"train.run_name={run_name}")
    argv += list(overrides)
    spec: dict[str, Any] = {
        "entrypoint": shlex.join(argv),
        "submissionMode": "K8sJobMode",
        # The cluster is not the job's own: it stays up when the job ends.
        "clusterSelector": {"ray.io/cluster": cluster},
        "shutdownAfterJobFinishes": False,
        "backoffLimit": backoff_limit,
    }
    if active_deadline_seconds is not None:
        spec["activeDeadlineSeconds"] = active_deadline_seconds
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RayJob",
        "metadata": {
            "name": name,
            "labels": {
                "app.kubernetes.io/part-of": "raytrain",
                "app.kubernetes.io/managed-by": "raytrain-ops",
                "raytrain.io/stage": stage,
            },
        },
        "spec": spec,
    }


def job_row(obj: dict[str, Any]) -> dict[str, str]:
    """What `raytrain ops jobs` prints for one RayJob."""
    status = obj.get("status") or {}
    labels = obj.get("metadata", {}).get("labels") or {}
    return {
        "name": obj["metadata"]["name"],
        "stage": labels.get("raytrain.io/stage", "-"),
        "job": status.get("jobStatus") or "-",
        "deployment": status.get("jobDeploymentStatus") or "-",
        "cluster": status.get("rayClusterName") or (obj.get("spec", {}).get("clusterSelector") or {}).get(
            "ray.io/cluster", "-"
        ),
        "failed": str(status.get("failed", 0)),
        "started": status.get("startTime") or "-",
    }


def _serve_app(config: dict[str, Any], app_name: str | None) -> dict[str, Any]:
    apps = [a for a in config.get("applications") or [] if a.get("import_path") == SERVE_IMPORT_PATH]
    if app_name:
        apps = [a for a in apps if a.get("name") == app_name]
    if len(apps) != 1:
        raise OpsError(f"expected one Serve application built by {SERVE_IMPORT_PATH}, found {len(apps)}")
    return apps[0]


def rollout_patch(service: dict[str, Any], model: str, path: str, app_name: str | None = None,
                  registry: dict[str, str] | None = None) -> dict[str, Any]:
    """Merge patch that points `model` at `path` in the RayService's serveConfigV2 (adding it if new).

    `registry` ({"version", "alias"}) records which registry version the path is, so /v1/models reports it; a
    plain path clears them. The models list it replaces goes into an annotation, for `rollback_patch`.
    """
    if not path:
        raise OpsError("model path must not be empty")
    config = yaml.safe_load(service["spec"]["serveConfigV2"]) or {}
    app = _serve_app(config, app_name)
    models = app.setdefault("args", {}).setdefault("models", [])
    previous = copy.deepcopy(models)
    for entry in models:
        if entry["name"] == model:
            if entry["path"] == path:
                raise OpsError(f"model {model!r} already serves {path}")
            entry["path"] = path
            break
    else:
        entry = {"name": model, "path": path}
        models.append(entry)
    for key in ("version", "alias"):
        entry.pop(key, None)
        if registry and registry.get(key):
            entry[key] = registry[key]
    return _patch(config, previous)


def rollback_patch(service: dict[str, Any], app_name: str | None = None) -> dict[str, Any]:
    """Merge patch that restores the models list the last rollout replaced (a second rollback redoes it)."""
    annotations = service.get("metadata", {}).get("annotations") or {}
    if PREVIOUS_ANNOTATION not in annotations:
        raise OpsError(f"nothing to roll back: annotation {PREVIOUS_ANNOTATION} is not set (no rollout yet)")
    config = yaml.safe_load(service["spec"]["serveConfigV2"]) or {}
    app = _serve_app(config, app_name)
    current = copy.deepcopy(app.get("args", {}).get("models", []))
    app.setdefault("args", {})["models"] = json.loads(annotations[PREVIOUS_ANNOTATION])
    return _patch(config, current)


def _patch(config: dict[str, Any], previous: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "metadata": {"annotations": {PREVIOUS_ANNOTATION: json.dumps(previous, sort_keys=True)}},
        "spec": {"serveConfigV2": yaml.safe_dump(config, sort_keys=False)},
    }


def served_models(service: dict[str, Any], app_name: str | None = None) -> list[dict[str, Any]]:
    config = yaml.safe_load(service["spec"]["serveConfigV2"]) or {}
    return _serve_app(config, app_name).get("args", {}).get("models", [])
