"""`raytrain ops ...`: run stages as RayJobs and roll the serving models, on a KubeRay cluster."""

from __future__ import annotations

from typing import Annotated, Any

import typer
import yaml

from raytrain.ops import manifests
from raytrain.ops.client import RayOps, custom_objects_api

ops_app = typer.Typer(
    help="Operate raytrain on Kubernetes (KubeRay): submit stages as RayJobs, list them, roll models.",
    no_args_is_help=True,
)

Namespace = Annotated[str, typer.Option("--namespace", "-n", help="Kubernetes namespace of the release.")]
Context = Annotated[str | None, typer.Option("--context", help="kubeconfig context (default: current).")]
Service = Annotated[
    str, typer.Option("--service", help="RayService name (the chart's is <release>-raytrain-llm).")
]
AppName = Annotated[str | None, typer.Option("--app", help="Serve application (default: the only one).")]


def make_ops(namespace: str, context: str | None) -> RayOps:
    """Overridden in tests: no API server runs there."""
    return RayOps(custom_objects_api(context), namespace)


def _fail(error: Exception) -> None:
    typer.echo(f"error: {error}", err=True)
    raise typer.Exit(2)


def _api_error(error: Exception) -> None:
    status, reason = getattr(error, "status", None), getattr(error, "reason", None)
    _fail(RuntimeError(f"Kubernetes API: {status} {reason}" if status else str(error)))


@ops_app.command()
def submit(
    stage: Annotated[str, typer.Argument(help=f"Stage to run: {', '.join(manifests.STAGES)}.")],
    config: Annotated[str, typer.Option("--config", "-c", help="Recipe name (jobs/configs) or path in the image.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="Spec overrides, section.key=value.")] = None,
    cluster: Annotated[str, typer.Option("--cluster", help="RayCluster to run on.")] = "raytrain",
    name: Annotated[str | None, typer.Option("--name", help="RayJob name (default from stage and run).")] = None,
    run_name: Annotated[str | None, typer.Option("--run-name", help="train.run_name; reuse it to resume.")] = None,
    storage_root: Annotated[str | None, typer.Option("--storage-root", help="storage.root for the job.")] = None,
    backoff_limit: Annotated[int, typer.Option("--backoff-limit", help="Retries; each resumes.")] = 2,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the RayJob instead of creating it.")] = False,
    namespace: Namespace = "default",
    context: Context = None,
) -> None:
    """Submit a stage as a RayJob on an existing RayCluster (the chart's, by default)."""
    try:
        job = manifests.rayjob(
            stage, config, cluster=cluster, name=name, overrides=overrides or [], run_name=run_name,
            storage_root=storage_root, backoff_limit=backoff_limit,
        )  # fmt: skip
    except manifests.OpsError as e:
        _fail(e)
    if dry_run:
        typer.echo(yaml.safe_dump(job, sort_keys=False), nl=False)
        return
    try:
        make_ops(namespace, context).submit(job)
    except Exception as e:  # kubernetes.client.ApiException and connection errors
        _api_error(e)
    typer.echo(f"rayjob/{job['metadata']['name']} created in {namespace}: {job['spec']['entrypoint']}")
    typer.echo(f"follow it: kubectl -n {namespace} logs -f job/{job['metadata']['name']}")


@ops_app.command()
def jobs(namespace: Namespace = "default", context: Context = None) -> None:
    """List raytrain's RayJobs with their status."""
    try:
        rows = [manifests.job_row(o) for o in make_ops(namespace, context).jobs()]
    except Exception as e:
        _api_error(e)
    columns = ["name", "stage", "job", "deployment", "cluster", "failed", "started"]
    widths = {c: max([len(c), *(len(r[c]) for r in rows)]) for c in columns}
    typer.echo("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for row in rows:
        typer.echo("  ".join(row[c].ljust(widths[c]) for c in columns).rstrip())


def _report(service: dict[str, Any] | None, name: str, app: str | None) -> None:
    models = manifests.served_models(service, app) if service else []
    typer.echo(f"rayservice/{name} now serves: " + ", ".join(
        f"{m['name']}={m['path']}" + (f" (version {m['version']}" + (f", {m['alias']})" if m.get("alias") else ")")
                                      if m.get("version") else "") for m in models))


@ops_app.command()
def rollout(
    model: Annotated[str, typer.Option("--model", help="Model id clients pass as `model`.")],
    path: Annotated[str | None, typer.Option("--path", help="Model directory: path in the pods or s3:// URI.")] = None,
    alias: Annotated[str | None, typer.Option(
        "--alias", help="Serve the registry version this alias names now (instead of --path).")] = None,
    registry_root: Annotated[str | None, typer.Option(
        "--registry-root", help="Storage root of the registry (s3://… as the pods see it), with --alias.")] = None,
    registry_model: Annotated[str | None, typer.Option(
        "--registry-model", help="Registry model name, with --alias (default: --model).")] = None,
    service: Service = "raytrain-llm",
    app: AppName = None,
    namespace: Namespace = "default",
    context: Context = None,
) -> None:
    """Point a served model at a new version (patches the RayService's serveConfigV2): a path, or an alias."""
    try:
        registry = None
        if (path is None) == (alias is None):
            raise manifests.OpsError("give exactly one of --path and --alias")
        if alias is not None:
            if registry_root is None:
                raise manifests.OpsError("--alias needs --registry-root (the storage root holding models/)")
            from raytrain.errors import StageInputError
            from raytrain.registry import served_entry

            try:
                registry = served_entry(registry_root, registry_model or model, alias, model)
            except StageInputError as e:
                raise manifests.OpsError(str(e)) from None
            path = registry["path"]
        assert path is not None
        updated = make_ops(namespace, context).rollout(service, model, path, app, registry)
    except manifests.OpsError as e:
        _fail(e)
    except Exception as e:
        _api_error(e)
    _report(updated, service, app)


@ops_app.command()
def rollback(
    service: Service = "raytrain-llm",
    app: AppName = None,
    namespace: Namespace = "default",
    context: Context = None,
) -> None:
    """Restore the models the last rollout replaced."""
    try:
        updated = make_ops(namespace, context).rollback(service, app)
    except manifests.OpsError as e:
        _fail(e)
    except Exception as e:
        _api_error(e)
    _report(updated, service, app)
