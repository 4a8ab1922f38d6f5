"""`raytrain ops`: the RayJob / RayService objects it builds and the Kubernetes API calls it makes.

No Kubernetes API server can run here, so the calls go to `FakeCustomObjectsApi`, a recorded fake with
the signatures of kubernetes.client.CustomObjectsApi that keeps objects in memory and applies merge
patches like the API server does. What the commands send is validated against the KubeRay CRD schemas
(../shared/k8s-schemas) and, for serveConfigV2, against Ray Serve's own config schema.
"""

from __future__ import annotations

import copy
import inspect
import json
import shlex

import pytest
import yaml
from typer.testing import CliRunner

from raytrain.ops import cli, manifests
from raytrain.ops.client import RayOps

try:  # tests/ as a package (python -m pytest) or on sys.path (pytest's rootdir-less import mode)
    from tests import k8s_schemas
except ImportError:
    import k8s_schemas

NS = "ml"


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch, as the API server applies `application/merge-patch+json`."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


class ApiException(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status, self.reason = status, reason


class FakeCustomObjectsApi:
    """Records every call; stores objects by (plural, namespace, name)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.objects: dict[tuple[str, str, str], dict] = {}

    def _check(self, group, version):
        assert (group, version) == ("ray.io", "v1")

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kwargs):
        self._check(group, version)
        self.calls.append(("create", {"namespace": namespace, "plural": plural, "body": copy.deepcopy(body)}))
        key = (plural, namespace, body["metadata"]["name"])
        if key in self.objects:
            raise ApiException(409, "AlreadyExists")
        self.objects[key] = copy.deepcopy(body)
        return copy.deepcopy(body)

    def list_namespaced_custom_object(self, group, version, namespace, plural, **kwargs):
        self._check(group, version)
        self.calls.append(("list", {"namespace": namespace, "plural": plural, **kwargs}))
        wanted = dict(p.split("=") for p in kwargs.get("label_selector", "").split(",") if p)
        items = [
            copy.deepcopy(o)
            for (p, ns, _), o in self.objects.items()
            if p == plural and ns == namespace and wanted.items() <= (o["metadata"].get("labels") or {}).items()
        ]
        return {"apiVersion": "ray.io/v1", "kind": "RayJobList", "items": items}

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        self._check(group, version)
        self.calls.append(("get", {"namespace": namespace, "plural": plural, "name": name}))
        if (plural, namespace, name) not in self.objects:
            raise ApiException(404, "NotFound")
        return copy.deepcopy(self.objects[(plural, namespace, name)])

    def patch_namespaced_custom_object(self, group, version, namespace, plural, name, body, **kwargs):
        self._check(group, version)
        self.calls.append(("patch", {"namespace": namespace, "plural": plural, "name": name, "body": body}))
        key = (plural, namespace, name)
        self.objects[key] = merge_patch(self.objects[key], body)
        return copy.deepcopy(self.objects[key])


def required(fn) -> list[str]:
    """Positional parameters without a default: what a call must pass."""
    params = inspect.signature(fn).parameters.values()
    return [p.name for p in params if p.name != "self" and p.default is p.empty and p.kind == p.POSITIONAL_OR_KEYWORD]


def test_fake_matches_the_real_client_signatures():
    kubernetes = pytest.importorskip("kubernetes", reason="kubernetes client is not installed")
    real = kubernetes.client.CustomObjectsApi
    for name in ("create_namespaced_custom_object", "list_namespaced_custom_object",
                 "get_namespaced_custom_object", "patch_namespaced_custom_object"):  # fmt: skip
        assert required(getattr(FakeCustomObjectsApi, name)) == required(getattr(real, name)), name


@pytest.fixture
def kuberay() -> k8s_schemas.KubeRaySchemas:
    if not k8s_schemas.KUBERAY_SCHEMA_DIR.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {k8s_schemas.KUBERAY_SCHEMA_DIR} (test data outside the repo)")
    return k8s_schemas.kuberay_schemas()


@pytest.fixture
def api(monkeypatch) -> FakeCustomObjectsApi:
    fake = FakeCustomObjectsApi()
    monkeypatch.setattr(cli, "make_ops", lambda namespace, context: RayOps(fake, namespace))
    return fake


def invoke(*args: str):
    return CliRunner().invoke(cli.ops_app, list(args))


def rayservice() -> dict:
    config = {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": 8000},
        "applications": [
            {
                "name": "llm",
                "import_path": "serving.app:build_app",
                "route_prefix": "/",
                "args": {"models": [{"name": "demo-lm", "path": "s3://models/demo-lm/1"}], "max_tokens_limit": 512},
            }
        ],
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": "raytrain-llm", "namespace": NS},
        "spec": {"serveConfigV2": yaml.safe_dump(config), "rayClusterConfig": {"headGroupSpec": {}}},
    }


# --- submit ---------------------------------------------------------------------------------------


def test_submit_creates_a_valid_rayjob(api, kuberay):
    result = invoke("submit", "pretrain", "--config", "125m", "--run-name", "125m-a", "-n", NS,
                    "--storage-root", "s3://ml/raytrain", "--backoff-limit", "4", "train.lr=3e-4")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "rayjob/raytrain-pretrain-125m-a created in ml" in result.output
    ((verb, call),) = api.calls
    assert (verb, call["namespace"], call["plural"]) == ("create", NS, "rayjobs")
    job = call["body"]
    assert not k8s_schemas.object_errors(job, kuberay)
    spec = job["spec"]
    assert shlex.split(spec["entrypoint"]) == [
        "python", "-m", "jobs.pretrain", "--config", "125m", "storage.root=s3://ml/raytrain",
        "train.run_name=125m-a", "train.lr=3e-4",
    ]  # fmt: skip
    assert spec["clusterSelector"] == {"ray.io/cluster": "raytrain"}
    assert spec["backoffLimit"] == 4 and spec["shutdownAfterJobFinishes"] is False


def test_submit_entrypoint_is_a_valid_job_spec():
    loader = pytest.importorskip("raytrain.config.loader", reason="raytrain.config is not importable")
    job = manifests.rayjob("pretrain", "demo", cluster="c", run_name="r1", overrides=["train.max_steps=500"])
    argv = shlex.split(job["spec"]["entrypoint"])
    spec = loader.load_spec(argv[4], argv[5:])
    assert (spec.run_name, spec.train.max_steps) == ("r1", 500)
    sweep = manifests.rayjob("tune", "tune", cluster="c", run_name="sweep-1")
    assert loader.load_spec("tune", shlex.split(sweep["spec"]["entrypoint"])[5:]).tune_name == "sweep-1"


def test_submit_dry_run_calls_nothing(api):
    result = invoke("submit", "data", "-c", "demo", "--dry-run")
    assert result.exit_code == 0
    assert yaml.safe_load(result.output)["kind"] == "RayJob"
    assert api.calls == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["submit", "train", "-c", "demo"],
         "stage 'train' is not one of data, pretrain, sft, reward, dpo, rl, tune, eval, pipeline"),
        (["submit", "data", "-c", "demo", "max_steps"], "overrides must look like section.key=value"),
        (["submit", "data", "-c", "demo", "--name", "Bad_Name"], "must be a DNS-1035 label"),
    ],
)
def test_submit_rejects_bad_requests_before_calling_the_api(api, args, message):
    result = invoke(*args)
    assert result.exit_code == 2
    assert message in result.output
    assert api.calls == []


def test_submit_reports_api_errors(api):
    assert invoke("submit", "data", "-c", "demo").exit_code == 0
    again = invoke("submit", "data", "-c", "demo")
    assert again.exit_code == 2 and "Kubernetes API: 409 AlreadyExists" in again.output


# --- jobs -----------------------------------------------------------------------------------------


def test_jobs_lists_status(api):
    ops = RayOps(api, NS)
    ops.submit(manifests.rayjob("data", "demo", cluster="raytrain"))
    ops.submit(manifests.rayjob("pretrain", "demo", cluster="raytrain", run_name="r1"))
    api.objects[("rayjobs", NS, "raytrain-pretrain-r1")]["status"] = {
        "jobStatus": "RUNNING", "jobDeploymentStatus": "Running", "rayClusterName": "raytrain", "failed": 1,
        "startTime": "2026-01-01T00:00:00Z",
    }  # fmt: skip
    api.calls.clear()
    result = invoke("jobs", "-n", NS)
    assert result.exit_code == 0, result.output
    assert api.calls == [("list", {"namespace": NS, "plural": "rayjobs",
                                   "label_selector": "app.kubernetes.io/part-of=raytrain"})]  # fmt: skip
    header, *rows = result.output.splitlines()
    assert header.split() == ["NAME", "STAGE", "JOB", "DEPLOYMENT", "CLUSTER", "FAILED", "STARTED"]
    table = {r.split()[0]: r.split() for r in rows}
    assert table["raytrain-pretrain-r1"] == [
        "raytrain-pretrain-r1", "pretrain", "RUNNING", "Running", "raytrain", "1", "2026-01-01T00:00:00Z"
    ]  # fmt: skip
    assert table["raytrain-data-demo"][1:4] == ["data", "-", "-"]


# --- rollout / rollback ---------------------------------------------------------------------------


def test_rollout_and_rollback(api, kuberay):
    api.objects[("rayservices", NS, "raytrain-llm")] = rayservice()
    result = invoke("rollout", "--model", "demo-lm", "--path", "s3://models/demo-lm/2", "-n", NS)
    assert result.exit_code == 0, result.output
    assert "now serves: demo-lm=s3://models/demo-lm/2" in result.output
    assert [c[0] for c in api.calls] == ["get", "patch"]
    patch = api.calls[1][1]["body"]
    assert set(patch) == {"metadata", "spec"} and set(patch["spec"]) == {"serveConfigV2"}  # nothing else changes
    service = api.objects[("rayservices", NS, "raytrain-llm")]
    assert manifests.served_models(service) == [{"name": "demo-lm", "path": "s3://models/demo-lm/2"}]
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert config["applications"][0]["args"]["max_tokens_limit"] == 512  # other args kept
    assert json.loads(service["metadata"]["annotations"][manifests.PREVIOUS_ANNOTATION]) == [
        {"name": "demo-lm", "path": "s3://models/demo-lm/1"}
    ]
    # A second model is added next to the first.
    assert invoke("rollout", "--model", "chat", "--path", "/data/chat/1", "-n", NS).exit_code == 0
    assert [m["name"] for m in manifests.served_models(api.objects[("rayservices", NS, "raytrain-llm")])] == [
        "demo-lm",
        "chat",
    ]
    # Rollback restores the list before the last rollout; a second rollback redoes it.
    assert invoke("rollback", "-n", NS).exit_code == 0
    assert manifests.served_models(api.objects[("rayservices", NS, "raytrain-llm")]) == [
        {"name": "demo-lm", "path": "s3://models/demo-lm/2"}
    ]
    assert invoke("rollback", "-n", NS).exit_code == 0
    assert len(manifests.served_models(api.objects[("rayservices", NS, "raytrain-llm")])) == 2

    schema = pytest.importorskip("ray.serve.schema", reason="ray[serve] is not installed")
    final = api.objects[("rayservices", NS, "raytrain-llm")]
    schema.ServeDeploySchema.model_validate(yaml.safe_load(final["spec"]["serveConfigV2"]))


def test_rollout_patch_applies_to_the_charts_rayservice(kuberay):
    """The patch keeps a real chart-shaped RayService valid against the CRD."""
    service = rayservice()
    service["spec"]["rayClusterConfig"] = {
        "rayVersion": "2.60.0",
        "headGroupSpec": {
            "rayStartParams": {},
            "template": {"spec": {"containers": [{"name": "ray-head", "image": "r:1"}]}},
        },
    }
    patched = merge_patch(service, manifests.rollout_patch(service, "demo-lm", "s3://models/demo-lm/3"))
    assert not kuberay.errors(patched)


def test_rollout_follows_a_registry_alias(api, tmp_path):
    """`--alias` resolves the alias in the registry now and records version and alias in the served entry; after a
    registry rollback, the same command moves the RayService back. (The Kubernetes API is the in-process fake.)"""
    from raytrain.registry import Registry

    registry = Registry(str(tmp_path))
    for label in ("a", "b"):
        src = tmp_path / f"src-{label}"
        src.mkdir()
        (src / "config.json").write_text("{}")
        registry.publish("demo-lm-dpo", src)
    registry.set_alias("demo-lm-dpo", "champion", 1)
    registry.set_alias("demo-lm-dpo", "champion", 2)
    api.objects[("rayservices", NS, "raytrain-llm")] = rayservice()
    args = ["rollout", "--model", "demo-lm", "--alias", "champion", "--registry-root", str(tmp_path),
            "--registry-model", "demo-lm-dpo", "-n", NS]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "(version 2, champion)" in result.output
    served = manifests.served_models(api.objects[("rayservices", NS, "raytrain-llm")])
    assert served == [{"name": "demo-lm", "path": registry.version_path("demo-lm-dpo", 2), "version": "2",
                       "alias": "champion"}]
    registry.rollback("demo-lm-dpo", "champion")
    assert invoke(*args).exit_code == 0
    served = manifests.served_models(api.objects[("rayservices", NS, "raytrain-llm")])
    assert served[0]["path"] == registry.version_path("demo-lm-dpo", 1) and served[0]["version"] == "1"
    unknown = invoke(*args[:4], "nope", *args[5:])
    assert unknown.exit_code == 2 and "no alias 'nope'" in unknown.output
    both = invoke("rollout", "--model", "demo-lm", "--path", "/p", "--alias", "champion", "-n", NS)
    assert both.exit_code == 2 and "exactly one of --path and --alias" in both.output


def test_rollout_refusals(api):
    api.objects[("rayservices", NS, "raytrain-llm")] = rayservice()
    same = invoke("rollout", "--model", "demo-lm", "--path", "s3://models/demo-lm/1", "-n", NS)
    assert same.exit_code == 2 and "already serves" in same.output
    nothing = invoke("rollback", "-n", NS)
    assert nothing.exit_code == 2 and "nothing to roll back" in nothing.output
    missing = invoke("rollout", "--model", "x", "--path", "/p", "--service", "nope", "-n", NS)
    assert missing.exit_code == 2 and "404 NotFound" in missing.output
    assert not [c for c in api.calls if c[0] == "patch"]
