"""The serve stage (driver side): deploy an exported model with the `serving` app and talk to it."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from raytrain import storage
from raytrain.config.schema import JobSpec
from raytrain.errors import StageInputError

log = logging.getLogger(__name__)


def served_model_dir(spec: JobSpec) -> str:
    """serve.model_path, else the version serve.alias names, else the last model this spec trains."""
    return served_entry(spec)["path"]


def served_entry(spec: JobSpec) -> dict[str, Any]:
    """The serving config's model entry: {name, path} (+ version, alias when it comes from the registry)."""
    from raytrain import registry

    name = spec.served_model_name
    if spec.serve.model_path:
        return {"name": name, "path": spec.serve.model_path}
    if spec.serve.alias:
        model = spec.serve.registry_model or registry.candidate_model_name(spec)
        return registry.served_entry(spec.storage.root, model, spec.serve.alias, name)
    path = registry.candidate_dir(spec)
    found = registry.version_of_dir(path)
    return {"name": name, "path": path, **({"version": str(found[1])} if found else {})}


def app_args(spec: JobSpec) -> dict[str, Any]:
    """The `serving.app:build_app` args this spec describes (also what a RayService serve config holds)."""
    s = spec.serve
    return {
        "models": [served_entry(spec)],
        "max_tokens_limit": s.max_tokens_limit,
        "min_replicas": s.min_replicas,
        "max_replicas": s.max_replicas,
        "target_ongoing_requests": s.target_ongoing_requests,
        # Where each replica finds its keys (serving.config.AuthConfig); the keys never travel in the config.
        "auth": s.auth.model_dump(exclude={"allow_unauthenticated"}),
    }


def client_api_key(spec: JobSpec, environ: Mapping[str, str] | None = None) -> str | None:
    """The key this process sends to the app it deployed: None when `serve.auth` is off.

    Read from the same sources the replicas use (first key of the env var, else of the keys file), so on one machine
    the pipeline's demo request authenticates with the key the user exported. Raises StageInputError when auth is on
    and this process has no key: called before the pipeline trains, so that the demo request cannot fail hours later.
    """
    from serving.auth import parse_keys

    auth = spec.serve.auth
    if not auth.enabled:
        return None
    env = os.environ if environ is None else environ
    keys = parse_keys(env.get(auth.keys_env, ""), ",")
    keys_file = auth.keys_file or env.get(auth.keys_file_env)
    if not keys and keys_file:
        try:
            keys = parse_keys(Path(keys_file).read_text(encoding="utf-8"), None)
        except OSError as exc:
            raise StageInputError(f"serve.auth.keys_file {keys_file} cannot be read: {exc}") from None
    if not keys:
        raise StageInputError(
            f"serve.auth is enabled but this process has no API key to send: export ${auth.keys_env} "
            f"(comma-separated keys) or point serve.auth.keys_file (or ${auth.keys_file_env}) at a file of keys"
        )
    return keys[0]


def base_url(spec: JobSpec) -> str:
    host = "127.0.0.1" if spec.serve.host in ("0.0.0.0", "::") else spec.serve.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal in a URL
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
            # /ready needs no key and answers 200 once every model is loaded.
            r = httpx.get(f"{url}/ready", timeout=10)
            if r.status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise TimeoutError(f"the serving app did not answer at {url}/ready within {timeout_s:.0f}s")
        time.sleep(1)
    keys = " (API key required)" if args["auth"]["enabled"] else ""
    log.info("serving %s at %s/v1%s", spec.served_model_name, url, keys)
    return url


def complete(
    url: str, model: str, prompt: str, max_tokens: int, timeout_s: float = 120.0, api_key: str | None = None
) -> dict[str, Any]:
    """One OpenAI-style completion over HTTP (with `api_key` as Bearer when given); raises on a non-200."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
    r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=timeout_s)
    if r.status_code != 200:
        raise RuntimeError(f"completion request failed with HTTP {r.status_code}: {r.text}")
    return r.json()
