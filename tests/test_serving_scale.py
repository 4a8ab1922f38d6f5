"""Serving under load: autoscaling up and back down, promoting and rolling back a registry alias, losing a replica.

One local Ray + Serve for the module, apps with short autoscaling delays and replicas that reserve a quarter CPU
each, so three of them fit the 4 logical CPUs. A thread pool of HTTP clients is the load generator.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from serving_fixtures import build_tiny_model_dir, serve_session

pytestmark = pytest.mark.slow

MODEL = "tiny"
# Replicas push their ongoing-request counts every 10 s by default; the autoscaling test needs faster feedback.
PUSH_ENV = {
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {v: build_tiny_model_dir(root / v, seed=i) for i, v in enumerate(("v1", "v2"))}


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    before = {k: os.environ.get(k) for k in PUSH_ENV}
    os.environ.update(PUSH_ENV)  # read by the Serve controller and replicas that Ray starts below
    try:
        with serve_session(num_cpus=4) as p:
            yield p
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _deploy(name: str, model: Path | dict[str, str], **options: Any) -> None:
    """Deploy (or update in place) app `name` serving a model directory, or a serving config entry."""
    from ray import serve

    from serving.app import build_app

    entry = model if isinstance(model, dict) else {"name": MODEL, "path": str(model)}
    args = {"models": [entry], "num_cpus_per_replica": 0.25, **options}
    serve.run(build_app(args), name=name, route_prefix=f"/{name}", blocking=False)


def _running_replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return 0
    states = status.deployments["OpenAIServer"].replica_states
    return int(states.get("RUNNING", 0))


def _wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.5)
    return time.monotonic() - started


class Load:
    """`workers` clients sending completions back to back until stopped; counts outcomes by status."""

    def __init__(self, url: str, workers: int, max_tokens: int) -> None:
        self.url, self.workers, self.max_tokens = url, workers, max_tokens
        self.statuses: dict[int, int] = {}
        self.texts: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers)

    def _client(self) -> None:
        body = {"model": MODEL, "prompt": "The cat reads", "max_tokens": self.max_tokens, "temperature": 0}
        with httpx.Client(timeout=60) as c:
            while not self._stop.is_set():
                try:
                    r = c.post(f"{self.url}/v1/completions", json=body)
                    status, text = r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else ""
                except (httpx.HTTPError, ValueError):
                    status, text = -1, ""
                with self._lock:
                    self.statuses[status] = self.statuses.get(status, 0) + 1
                    if text:
                        self.texts.append(text)

    def __enter__(self) -> Load:
        for _ in range(self.workers):
            self._pool.submit(self._client)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True)

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    @property
    def errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if s != 200)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_scales_up_under_load_and_back_down(port: int, models: dict[str, Path]) -> None:
    from ray import serve

    app, url = "scale", f"http://127.0.0.1:{port}/scale"
    _deploy(
        app,
        models["v1"],
        min_replicas=1,
        max_replicas=3,
        target_ongoing_requests=1,
        max_ongoing_requests=4,
        upscale_delay_s=1,
        downscale_delay_s=2,
        look_back_period_s=2,
    )
    _wait_for(lambda: _healthy(url), 120, "the app to answer")
    try:
        with Load(url, workers=6, max_tokens=48) as load:
            up = _wait_for(lambda: _running_replicas(app) > 1, 90, "a second replica under load")
        assert load.errors == 0, load.statuses
        down = _wait_for(lambda: _running_replicas(app) == 1, 90, "scaling back to one replica after load")
        print(f"scaled up after {up:.1f}s of load, back down {down:.1f}s after it stopped")
    finally:
        serve.delete(app)


def test_promote_and_rollback_move_the_endpoint_under_load_losing_no_request(
        port: int, models: dict[str, Path], tmp_path: Path) -> None:
    """The endpoint follows the registry's `champion` alias: promote v2, then roll back to v1, each a redeploy of the
    alias (an in-place Serve update) under load; no request fails and /v1/models names the version serving."""
    from ray import serve

    from raytrain.config.schema import PromoteSpec
    from raytrain.promotion import promote
    from raytrain.registry import Registry, served_entry
    from serving.engine import TorchEngine

    expected = {
        v: TorchEngine(str(p), "cpu").generate("The cat reads", max_tokens=6, temperature=0).text
        for v, p in models.items()
    }
    assert expected["v1"] != expected["v2"]
    registry = Registry(str(tmp_path / "root"))
    versions = {label: registry.publish("tiny", models[label]) for label in ("v1", "v2")}
    promote(registry, "tiny", versions["v1"], PromoteSpec())

    def serving() -> dict[str, Any]:
        return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]

    app, url = "rollout", f"http://127.0.0.1:{port}/rollout"
    _deploy(app, served_entry(registry.root, "tiny", "champion", MODEL), min_replicas=1, max_replicas=1)
    _wait_for(lambda: _healthy(url), 120, "v1 to answer")
    assert (serving()["version"], serving()["alias"]) == (str(versions["v1"]), "champion")
    try:
        with Load(url, workers=3, max_tokens=6) as load:
            _wait_for(lambda: load.total >= 10, 60, "steady load")
            promote(registry, "tiny", versions["v2"], PromoteSpec())
            _deploy(app, served_entry(registry.root, "tiny", "champion", MODEL), min_replicas=1, max_replicas=1)
            _wait_for(lambda: expected["v2"] in load.texts[-3:], 180, "answers from v2")
            assert serving()["version"] == str(versions["v2"])
            registry.rollback("tiny", "champion")
            _deploy(app, served_entry(registry.root, "tiny", "champion", MODEL), min_replicas=1, max_replicas=1)
            _wait_for(lambda: expected["v1"] in load.texts[-3:], 180, "answers from v1 again")
            settled = load.total
            _wait_for(lambda: load.total >= settled + 10, 60, "more load on v1")
        assert serving()["version"] == str(versions["v1"])
        assert load.errors == 0, load.statuses
        assert set(load.texts) == {expected["v1"], expected["v2"]}  # every answer came from one version or the other
    finally:
        serve.delete(app)


def test_killing_a_replica_under_load_keeps_errors_under_one_percent(port: int, models: dict[str, Path]) -> None:
    import ray
    from ray import serve

    app, url = "chaos", f"http://127.0.0.1:{port}/chaos"
    _deploy(app, models["v1"], min_replicas=2, max_replicas=2, max_ongoing_requests=2, target_ongoing_requests=1)
    _wait_for(lambda: _running_replicas(app) == 2, 120, "two replicas")
    try:
        with Load(url, workers=3, max_tokens=2) as load:
            _wait_for(lambda: load.total >= 100, 120, "load before the kill")
            victim = next(
                a
                for a in ray.util.list_named_actors(all_namespaces=True)
                if f"SERVE_REPLICA::{app}#OpenAIServer" in a["name"]
            )
            ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
            killed_at = load.total
            _wait_for(
                lambda: _running_replicas(app) == 2 and load.total >= killed_at + 200,
                180,
                "the deployment to recover and serve 200 more requests",
            )
        rate = load.errors / load.total
        print(f"{load.errors} errors in {load.total} requests ({rate:.2%}) with one replica killed")
        assert rate < 0.01, load.statuses
    finally:
        serve.delete(app)
