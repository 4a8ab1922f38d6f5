"""The vLLM path renders a Ray Serve LLM config; only the rendering is tested (vLLM cannot be installed on CPU
machines). Field names are checked by Ray's own models: `LLMConfig` from Ray's source (importable without vLLM),
Serve's `AutoscalingConfig`, and the serve-config schema `serve deploy` validates with.
"""

from __future__ import annotations

import yaml

from serving.vllm import BUILDER, render_serve_config, render_serve_config_yaml

SPEC = {
    "models": [{"name": "tiny", "path": "s3://bucket/models/tiny/v3"}, {"name": "big", "path": "/models/big"}],
    "min_replicas": 1,
    "max_replicas": 6,
    "target_ongoing_requests": 8,
    "max_ongoing_requests": 32,
    "auth": {"enabled": True},
}


def test_rendered_llm_configs_are_valid_ray_llm_configs() -> None:
    from ray.llm._internal.serve.core.configs.llm_config import LLMConfig
    from ray.serve.config import AutoscalingConfig

    doc = yaml.safe_load(render_serve_config_yaml(SPEC, engine_kwargs={"max_model_len": 2048}, accelerator_type="L4"))
    (app,) = doc["applications"]
    assert app["import_path"] == BUILDER == "ray.serve.llm:build_openai_app"
    configs = app["args"]["llm_configs"]
    assert [c["model_loading_config"]["model_id"] for c in configs] == ["tiny", "big"]
    for raw in configs:
        llm = LLMConfig.model_validate(raw)  # extra="forbid": a misspelt field fails here
        assert llm.accelerator_type == "L4" and llm.engine_kwargs["max_model_len"] == 2048
        auto = AutoscalingConfig(**raw["deployment_config"]["autoscaling_config"])
        # Explicit autoscaling: build_openai_app's defaults would pin one replica.
        assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 6, 8)
        assert raw["deployment_config"]["max_ongoing_requests"] == 32 > auto.target_ongoing_requests
    assert configs[0]["model_loading_config"]["model_source"] == "s3://bucket/models/tiny/v3"


def test_rendered_file_is_a_valid_serve_deploy_config() -> None:
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(render_serve_config(SPEC, app_name="chat", route_prefix="/llm"))
    assert schema.applications[0].import_path == BUILDER
    assert schema.applications[0].route_prefix == "/llm"
