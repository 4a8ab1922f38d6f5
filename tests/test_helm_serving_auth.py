"""The chart's API-key Secret turns auth on: the app the rendered RayService deploys answers 401 / 401 / 200.

Behaviour, not configuration: `helm template` renders the chart with `serving.apiKeys.existingSecret`, and the
RayService's own `serveConfigV2` is deployed the way KubeRay deploys it (Serve's declarative `deploy_apps`,
which imports `serving.app:build_app` and calls it with the rendered `args`) on a local Ray + Serve. Real HTTP
then checks that a request without a key, or with a wrong one, is refused and one with a key from the Secret
is served.

What stands in for the cluster, and nothing else:
- the model path is replaced by a tiny local model (same model name);
- the Secret: a keys file in a tmp dir, with the content the Secret's key would hold (one key per line);
- the serving pods' environment: the rendered `RAYTRAIN_API_KEYS_FILE` (asserted to be exactly the chart's
  mount path of the Secret + the key) is given to the app as a Serve `runtime_env` env var, pointing at the
  tmp file instead of the mount path. The rendered `args.auth` is used as rendered, so auth must come from the
  chart's args and the env var it sets, not from anything this test adds;
- the HTTP proxy is the test session's (127.0.0.1 on a free port) instead of the rendered 0.0.0.0:8000.
"""

from __future__ import annotations

import copy
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import tool_path
from serving_fixtures import build_tiny_model_dir, serve_session

REPO_ROOT = Path(__file__).resolve().parents[1]
CHART = REPO_ROOT / "helm" / "raytrain"
SECRET = "raytrain-api-keys"
SECRET_KEY = "api-keys"
API_KEY = "sk-chart-" + "0123456789abcdef" * 2
OTHER_KEY = "sk-chart-second-key"


def _serving_pods(service: dict) -> Iterator[dict]:
    cluster = service["spec"]["rayClusterConfig"]
    yield cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster["workerGroupSpecs"]:
        yield group["template"]["spec"]


@pytest.fixture(scope="module")
def rendered_service(tmp_path_factory: pytest.TempPathFactory) -> dict:
    values = tmp_path_factory.mktemp("values") / "values.yaml"
    values.write_text(yaml.safe_dump({"serving": {"apiKeys": {"existingSecret": SECRET, "key": SECRET_KEY}}}))
    result = subprocess.run(
        [tool_path("helm"), "template", "rt", str(CHART), "--values", str(values),
         "--show-only", "templates/rayservice.yaml"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (service,) = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert service["kind"] == "RayService"
    return service


def _rendered_keys_file_env(service: dict) -> str:
    """The keys-file path the chart gives the serving pods, checked against where it mounts the Secret."""
    values = set()
    for pod in _serving_pods(service):
        (volume,) = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == SECRET]
        assert "items" not in volume["secret"]  # every key of the Secret is a file named after the key
        ray = pod["containers"][0]
        (mount,) = [m for m in ray["volumeMounts"] if m["name"] == volume["name"]]
        env = {e["name"]: e.get("value") for e in ray["env"]}
        assert env["RAYTRAIN_API_KEYS_FILE"] == f"{mount['mountPath']}/{SECRET_KEY}"
        values.add(env["RAYTRAIN_API_KEYS_FILE"])
    (path,) = values
    return path


@pytest.fixture(scope="module")
def base_url(rendered_service: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    mounted_at = _rendered_keys_file_env(rendered_service)
    keys_file = tmp_path_factory.mktemp("secret") / Path(mounted_at).name
    keys_file.write_text(f"{API_KEY}\n{OTHER_KEY}\n")
    model_dir = build_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))

    config = yaml.safe_load(rendered_service["spec"]["serveConfigV2"])
    deploy = copy.deepcopy(config)
    (app,) = deploy["applications"]
    assert app["import_path"] == "serving.app:build_app"
    for model in app["args"]["models"]:
        model["path"] = str(model_dir)
    app["runtime_env"] = {"env_vars": {"RAYTRAIN_API_KEYS_FILE": str(keys_file)}}
    # Everything but the model path and the environment is as rendered.
    assert {k: v for k, v in app["args"].items() if k != "models"} == {
        k: v for k, v in config["applications"][0]["args"].items() if k != "models"
    }

    with serve_session(num_cpus=4) as port:
        client = _get_global_client()
        client.deploy_apps(ServeDeploySchema.model_validate(deploy))
        name = app["name"]
        try:
            deadline = time.monotonic() + 180
            while True:
                status = serve.status().applications.get(name)
                if status is not None and status.status == "RUNNING":
                    break
                if status is not None and status.status in ("DEPLOY_FAILED", "UNHEALTHY"):
                    pytest.fail(f"application {name} {status.status}: {status.message}")
                assert time.monotonic() < deadline, f"application {name} not running after 180 s: {status}"
                time.sleep(0.5)
            yield f"http://127.0.0.1:{port}"
        finally:
            serve.delete(name)


def test_rendered_args_turn_auth_on(rendered_service: dict) -> None:
    (app,) = yaml.safe_load(rendered_service["spec"]["serveConfigV2"])["applications"]
    assert app["args"]["auth"]["enabled"] is True


def test_chart_secret_requires_a_key_over_http(base_url: str) -> None:
    body = {"model": "demo-lm", "prompt": "The cat reads", "max_tokens": 4, "temperature": 0}
    with httpx.Client(base_url=base_url, timeout=60) as http:
        missing = http.post("/v1/completions", json=body)
        assert missing.status_code == 401, missing.text
        assert missing.json()["error"]["code"] == "invalid_api_key"

        wrong = http.post("/v1/completions", json=body, headers={"Authorization": "Bearer sk-not-in-the-secret"})
        assert wrong.status_code == 401, wrong.text

        for key in (API_KEY, OTHER_KEY):
            ok = http.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200, ok.text
            assert ok.json()["choices"][0]["text"] is not None
