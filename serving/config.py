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
    version: str | None = Field(
        None,
        min_length=1,
        description="The model registry version served under this name (e.g. `v3`), reported by `GET /v1/models` so "
        "clients and evaluations can tell exactly which weights answered. Informational: `path` is what is loaded.",
    )
    alias: str | None = Field(
        None,
        min_length=1,
        description="The registry alias this version was resolved from (e.g. `champion`), reported by "
        "`GET /v1/models` beside `version`.",
    )


class AuthConfig(BaseModel):
    """API keys (OpenAI-style `Authorization: Bearer <key>`). Off by default, for the laptop demo.

    Keys are read on each replica, from its environment and filesystem, never from this config: a serve
    config file or RayService spec is not a place for secrets. On Kubernetes mount a Secret as a file (or
    as an env var on the Ray pods); on a laptop export the variable before `ray start`.
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Require a valid API key on every route but /health.")
    keys_env: str = Field(
        "RAYTRAIN_API_KEYS", min_length=1, description="Environment variable holding comma-separated keys."
    )
    keys_file: str | None = Field(
        None,
        description="File with one key per line (blank lines and # comments ignored), e.g. a mounted Kubernetes "
        "Secret. Re-read when it changes. When null, the file named by `keys_file_env` is used, if set.",
    )
    keys_file_env: str = Field(
        "RAYTRAIN_API_KEYS_FILE", min_length=1, description="Environment variable naming the keys file."
    )


class FaultInjection(BaseModel):
    """Test-only: make the engine fail chosen requests, to check that one request's failure stays its own.

    A request whose prompt contains `prompt_marker` makes the forward pass it takes part in raise — the batched one
    first, as a real kernel or memory fault would, and then the one it runs alone when the engine isolates the
    fault. Never set in production: it exists so that tests can fail one request among many over real HTTP.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt_marker: str = Field(min_length=1, description="A request whose prompt contains this text fails.")
    at_token: int = Field(
        0,
        ge=0,
        description="0: its prefill fails; k > 0: the decode step that would sample its token k+1 fails, after k "
        "tokens were generated (and streamed).",
    )


# How often a streamed response sends text after its first chunk (seconds); see ServeAppConfig.stream_interval_s.
DEFAULT_STREAM_INTERVAL_S = 0.1


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
    upscale_delay_s: float = Field(
        10.0,
        ge=0,
        description="How long demand must stay above target before replicas are added (Serve's default is 30).",
    )
    downscale_delay_s: float = Field(
        60.0,
        ge=0,
        description="How long demand must stay below target before replicas are removed (Serve's default is 600, "
        "which keeps idle replicas for ten minutes).",
    )
    look_back_period_s: float = Field(
        30.0,
        gt=0,
        description="Window over which the autoscaler averages ongoing requests. Keep it above the replicas' "
        "metrics push interval (10 s unless RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S says otherwise).",
    )
    graceful_shutdown_timeout_s: float = Field(
        30.0,
        ge=0,
        description="How long a replica being replaced (new version, downscale) may finish requests in flight.",
    )
    max_batch_size: int = Field(
        16,
        ge=1,
        description="Most sequences the torch engine decodes together; concurrent requests join the running batch.",
    )
    stream_interval_s: float = Field(
        DEFAULT_STREAM_INTERVAL_S,
        ge=0,
        le=5,
        description="Streamed responses: after the first chunk, text is sent at most this often (seconds), several "
        "tokens of a choice merged into one chunk; the first text and the end of a stream go out at once. Each "
        "chunk costs a trip through the replica, the proxy and the client, so this bounds that cost per request "
        "rather than per token. 0 sends every token as soon as it is ready.",
    )
    auth: AuthConfig = Field(default_factory=AuthConfig, description="API-key authentication (off by default).")
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
    fault_injection: FaultInjection | None = Field(
        None, description="Test-only (see FaultInjection): fail the requests whose prompt carries a marker."
    )

    @field_validator("models", "auth", "fault_injection", mode="before")
    @classmethod
    def _models_from_json(cls, value: Any) -> Any:
        # `serve run serving.app:build_app models=...` hands every argument over as a string.
        if isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"must be a JSON value or an object, not an unparsable string ({exc})") from None
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> ServeAppConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})")
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"models: duplicate model name(s) {duplicates}; each name must be unique")
        if self.max_ongoing_requests <= self.target_ongoing_requests:
            raise ValueError(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be above target_ongoing_requests "
                f"({self.target_ongoing_requests}), or the autoscaler never sees demand above its target"
            )
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
