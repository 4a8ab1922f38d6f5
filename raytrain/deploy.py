"""The serve stage (driver side): deploy an exported model with the `serving` app and talk to it."""

from __future__ import annotations

import logging
import time
from typing import Any

from raytrain import storage
from raytrain.config.schema import JobSpec
from raytrain.errors import StageInputError

log = logging.getLogger(__name__)


def app_args(spec: JobSpec) -> dict[str, Any]:
    """The `serving.app:build_app` args this spec describes (also what a RayService serve config holds)."""
    s = spec.serve
    model_path = s.model_path or storage.Layout(spec.storage.root).model(spec.model.name, spec.run_name)
    return {
        "models": [{"name": spec.served_model_name, "path": model_path}],
        "max_tokens_limit": s.max_tokens_limit,
        "min_replicas": s.min_replicas,
        "max_replicas": s.max_replicas,
        "target_ongoing_requests": s.target_ongoing_requests,
    }


def base_url(spec: JobSpec) -> str:
    host = "127.0.0.1" if spec.serve.host in ("0.0.0.0", "::") else spec.serve.host
    return f"http://{host}:{spec.serve.port}{spec.serve.route_prefix.rstrip('/')}"


def deploy(spec: JobSpec, timeout_s: float = 300.0) -> str:
    """Deploy (or update) the application and wait until it answers; returns its base URL."""
    import httpx
    from ray import serve

    from serving.app import build_app

    args = app_args(spec)
    model_path = args["models"][0]["path"]
    if not storage.exists(storage.join(model_path, "config.json")):
        raise StageInputError(f"no exported model at {model_path}: run the pretrain stage first")
    serve.start(http_options={"host": spec.serve.host, "port": spec.serve.port})
    serve.run(build_app(args), name=spec.serve.app_name, route_prefix=spec.serve.route_prefix, blocking=False)
    url = base_url(spec)
    deadline = time.time() + timeout_s
    while True:
        try:
            r = httpx.get(f"{url}/v1/models", timeout=10)
            if r.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise TimeoutError(f"the serving app did not answer at {url}/v1/models within {timeout_s:.0f}s")
        time.sleep(1)
    log.info("serving %s at %s/v1", spec.served_model_name, url)
    return url


def complete(url: str, model: str, prompt: str, max_tokens: int, timeout_s: float = 120.0) -> dict[str, Any]:
    """One OpenAI-style completion over HTTP; raises with the server's error body on a non-200."""
    import httpx

    r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                  "temperature": 0.0}, timeout=timeout_s)
    if r.status_code != 200:
        raise RuntimeError(f"completion request failed with HTTP {r.status_code}: {r.text}")
    return r.json()
