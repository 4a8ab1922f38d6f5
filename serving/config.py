"""Typed configuration of the serving application.

`ServeAppConfig` is what `serving.app:build_app` receives as `args`, whether from `serve run
serving.app:build_app models='[...]'` (every value arrives as a string), from a Serve config file /
RayService `serveConfigV2` (`import_path: serving.app:build_app` with `args:`), or from Python. It is
validated before any replica starts, so a typo fails at deploy time with the dotted key that is wrong
rather than as a replica crash loop. Importing this module is cheap: no torch, no Ray.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ServeConfigError(ValueError):
    """An application config that cannot be deployed; the message names each bad key and is meant for a person."""


class ModelEntry(BaseModel):
    """One model the application serves under a public name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        min_length=1,
        description="Public model id: what clients pass as `model` and what `GET /v1/models` lists.",
    )
    path: str = Field(
        min_length=1,
        description=(
            "Local directory or object-store URI (s3://, gs://, abfs:// …) of a Hugging Face model directory as "
            "exported by training: config.json, *.safetensors and the tokenizer files "
            "(tokenizer.json / tokenizer_config.json). URIs are copied to a local temp dir on each replica."
        ),
    )


class ServeAppConfig(BaseModel):
    """Everything `build_app` needs: which models to serve, request limits and how replicas scale."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelEntry] = Field(
        min_length=1,
        description=(
            "Models served by every replica, e.g. `[{name: tiny, path: s3://bucket/models/tiny/v3}]`. "
            'On the `serve run` command line pass a JSON list: models=\'[{"name": "tiny", "path": "/m"}]\'.'
        ),
    )
    max_tokens_limit: int = Field(
        512,
        ge=1,
        description="Largest `max_tokens` a request may ask for; larger requests get a 400, not a long wait.",
    )
    min_replicas: int = Field(
        1,
        ge=0,
        description="Autoscaling floor. 0 lets Serve scale the app to zero replicas when idle (cold starts follow).",
    )
    max_replicas: int = Field(1, ge=1, description="Autoscaling ceiling; must be >= min_replicas.")
    target_ongoing_requests: float = Field(
        2.0,
        gt=0,
        description="Ongoing requests per replica that the autoscaler aims for; lower scales out sooner.",
    )
    max_ongoing_requests: int = Field(
        16,
        ge=1,
        description=(
            "Requests a single replica accepts at once; further requests queue in Serve's router. "
            "Should be above target_ongoing_requests or the autoscaler never sees demand above its target."
        ),
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Where the engine runs: `auto` picks CUDA when the replica can see a GPU, else CPU.",
    )
    num_cpus_per_replica: float = Field(
        1.0,
        ge=0,
        description="CPUs Ray reserves for each replica (`ray_actor_options.num_cpus`).",
    )
    num_gpus_per_replica: float = Field(
        0.0,
        ge=0,
        description=(
            "GPUs Ray reserves for each replica (`ray_actor_options.num_gpus`). A replica sees no GPU unless it "
            "reserves one, so `device: cuda` needs this > 0."
        ),
    )

    @field_validator("models", mode="before")
    @classmethod
    def _models_from_json(cls, value: Any) -> Any:
        # `serve run serving.app:build_app models=...` hands every argument over as a string.
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"must be a list of {{name, path}} objects or a JSON string of one ({exc})") from None
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> ServeAppConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"models: duplicate model name(s) {duplicates}; each name must be unique")
        if self.device == "cuda" and self.num_gpus_per_replica <= 0:
            raise ValueError("device is 'cuda' but num_gpus_per_replica is 0: the replica would see no GPU")
        return self

    @classmethod
    def load(cls, args: dict[str, Any] | ServeAppConfig) -> ServeAppConfig:
        """Validate builder args, turning pydantic's error into one naming every bad dotted key and value."""
        if isinstance(args, ServeAppConfig):
            return args
        try:
            return cls.model_validate(args)
        except ValidationError as exc:
            raise ServeConfigError(format_validation_error(exc)) from None


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem, e.g. `models.0.path: Field required (got {...})`, under a heading."""
    lines = ["invalid serving application config:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        got = err.get("input")
        shown = repr(got)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"  {key}: {err['msg']} (got {shown})")
    return "\n".join(lines)
