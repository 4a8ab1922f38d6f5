"""Plain manifests in k8s/: valid against the KubeRay CRDs / core schemas, and wired together."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import pytest
import yaml

try:  # tests/ as a package (python -m pytest) or on sys.path (pytest's rootdir-less import mode)
    from tests import k8s_schemas
except ImportError:
    import k8s_schemas

REPO_ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = REPO_ROOT / "k8s"


def load_manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


MANIFESTS = load_manifests()


@pytest.fixture(scope="module")
def kuberay() -> k8s_schemas.KubeRaySchemas:
    if not k8s_schemas.KUBERAY_SCHEMA_DIR.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {k8s_schemas.KUBERAY_SCHEMA_DIR} (test data outside the repo)")
    return k8s_schemas.kuberay_schemas()


@pytest.fixture
def rayjob() -> dict:
    (job,) = [doc for name, doc in MANIFESTS if name == "rayjob-pipeline.yaml"]
    return copy.deepcopy(job)


def test_manifests_present():
    assert sorted({name for name, _ in MANIFESTS}) == ["pvc-artifacts.yaml", "rayjob-pipeline.yaml"]


@pytest.mark.parametrize(("name", "obj"), MANIFESTS, ids=[f"{n}:{d['kind']}" for n, d in MANIFESTS])
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
        volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert volumes == {"artifacts": "raytrain-artifacts"}
        assert mounts == {"artifacts": "/data"}


def test_rayjob_pods_run_as_non_root(rayjob):
    for where, template in k8s_schemas.pod_templates(rayjob):
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, where
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], where
