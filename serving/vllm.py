"""The vLLM path: render a serve spec as a Ray Serve LLM application for GPU clusters.

`ray.serve.llm:build_openai_app` is Ray's own vLLM-backed OpenAI server (`/v1/models`, `/v1/completions`,
`/v1/chat/completions`, streaming, continuous batching, paged attention). The same :class:`ServeAppConfig` that
drives the torch app renders here as a Serve config file (`serve deploy FILE`) or the `serveConfigV2` of a KubeRay
RayService: one `LLMConfig` per model, with autoscaling spelled out, because `build_openai_app`'s defaults never
scale (a single replica, whatever the load).

What does not carry over: `max_tokens_limit` (vLLM bounds requests by `max_model_len` instead), `auth` (Ray
Serve LLM has no API keys: put an authenticating gateway or ingress in front), and `max_batch_size` (vLLM sizes
its batches from GPU memory). Importing this module needs neither vLLM nor Ray.
"""

from __future__ import annotations

from typing import Any

from serving.config import ServeAppConfig

BUILDER = "ray.serve.llm:build_openai_app"


def llm_configs(
    config: ServeAppConfig,
    *,
    engine_kwargs: dict[str, Any] | None = None,
    accelerator_type: str | None = None,
) -> list[dict[str, Any]]:
    """One `LLMConfig` (as a plain dict, the form a serve config holds) per served model."""
    autoscaling = {
        "min_replicas": config.min_replicas,
        "max_replicas": config.max_replicas,
        "target_ongoing_requests": config.target_ongoing_requests,
        "upscale_delay_s": config.upscale_delay_s,
        "downscale_delay_s": config.downscale_delay_s,
        "look_back_period_s": config.look_back_period_s,
    }
    out = []
    for model in config.models:
        entry: dict[str, Any] = {
            # model_source: an HF directory on local disk or an object store (vLLM reads s3:// and gs:// itself).
            "model_loading_config": {"model_id": model.name, "model_source": model.path},
            "engine_kwargs": {"tensor_parallel_size": 1, **(engine_kwargs or {})},
            "deployment_config": {
                "autoscaling_config": dict(autoscaling),
                "max_ongoing_requests": config.max_ongoing_requests,
                "graceful_shutdown_timeout_s": config.graceful_shutdown_timeout_s,
            },
        }
        if accelerator_type:
            entry["accelerator_type"] = accelerator_type
        out.append(entry)
    return out


def render_serve_config(
    config: ServeAppConfig | dict[str, Any],
    *,
    app_name: str = "llm",
    route_prefix: str = "/",
    engine_kwargs: dict[str, Any] | None = None,
    accelerator_type: str | None = None,
) -> dict[str, Any]:
    """A complete Serve config (the document `serve deploy` reads and RayService embeds as `serveConfigV2`)."""
    cfg = ServeAppConfig.load(config)
    return {
        "applications": [
            {
                "name": app_name,
                "route_prefix": route_prefix,
                "import_path": BUILDER,
                "args": {
                    "llm_configs": llm_configs(cfg, engine_kwargs=engine_kwargs, accelerator_type=accelerator_type)
                },
            }
        ]
    }


def render_serve_config_yaml(config: ServeAppConfig | dict[str, Any], **kwargs: Any) -> str:
    import yaml

    return yaml.safe_dump(render_serve_config(config, **kwargs), sort_keys=False)
