"""The Ray Serve application: an OpenAI-compatible FastAPI ingress in front of the engines.

Deploy it with any of::

    serve run serving.app:build_app models='[{"name": "tiny", "path": "s3://bucket/models/tiny/v3"}]'

    # serve config file or RayService serveConfigV2
    applications:
      - name: llm
        route_prefix: /
        import_path: serving.app:build_app
        args: {models: [{name: tiny, path: s3://bucket/models/tiny/v3}], max_replicas: 4}

    serve.run(build_app({"models": [...]}))  # from Python

Routes: `GET /v1/models`, `POST /v1/completions`, `POST /v1/chat/completions` (both stream server-sent events
with `stream: true`), the tokenizer routes `GET /tokenizer_info`, `POST /tokenize` and `POST /detokenize` (vLLM's
shapes, which lm-evaluation-harness's `tokenizer_backend=remote` reads), `GET /health` (liveness) and `GET /ready`
(readiness), and the OpenAPI document at `/openapi.json`. Every error leaves in OpenAI's shape
(`{"error": {...}}`) so the `openai` client raises its typed exceptions; FastAPI's 422 for an invalid body becomes
OpenAI's 400 (and the OpenAPI document declares that 400, not FastAPI's 422).

Every request passes one ASGI middleware first: it checks the API key (when `auth.enabled`) before the body is
read, and records the request count and latency metrics (see `serving.metrics`) once the last byte is sent. A
stream that fails after its 200 status line is counted with the status of its error (the `status` label says how
the request ended, not what the status line said).

The OpenAPI document declares the Bearer scheme, on every route that needs a key, exactly when the replica
requires keys: a schema-driven client (an SDK generator, schemathesis) then knows to send one.
"""

# No `from __future__ import annotations` here: Serve rebuilds route signatures for the class-based view,
# and FastAPI must see real classes (not strings) to know `body` is a JSON body, not a query parameter.
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic.json_schema import models_json_schema
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.api import (
    APIError,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
    from_validation_errors,
    server_error,
)
from serving.auth import APIKeyAuth
from serving.config import ServeAppConfig
from serving.metrics import Metrics, NullMetrics
from serving.service import CHAT_ROUTE, COMPLETIONS_ROUTE, OpenAIService

TOKENIZE_ROUTES = ("/tokenize", "/detokenize", "/tokenizer_info")

logger = logging.getLogger(__name__)


class _API(FastAPI):
    """FastAPI whose OpenAPI document follows the replica's auth settings (read when first requested)."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            doc = super().openapi()
            _declare_validation_errors_as_400(doc)
            _apply_auth_to_openapi(doc, _replica.auth.enabled)
        return self.openapi_schema  # type: ignore[return-value]  # set by super().openapi()


api = _API(
    title="raytrain OpenAI-compatible API",
    description="Completions from models trained with raytrain, served by Ray Serve.",
    version="1",
)

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request; `error.param` names the parameter."},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key (when the server requires one)."},
    404: {"model": ErrorResponse, "description": "Unknown model."},
    500: {"model": ErrorResponse, "description": "Server error."},
}
_STREAM_RESPONSES: dict[int | str, dict[str, Any]] = {
    **_ERROR_RESPONSES,
    200: {
        "description": "The response, or with `stream: true` server-sent events: one chunk object per "
        "`data:` line, ending with `data: [DONE]`.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
}

# Paths that answer without an API key: probes (kubelet, load balancers) and the API description.
OPEN_PATHS = frozenset({"/health", "/ready", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
# Route label values; anything else is counted as "other" so that random URLs cannot grow the series count.
METRIC_ROUTES = frozenset({COMPLETIONS_ROUTE, CHAT_ROUTE, "/v1/models", "/health", "/ready", *TOKENIZE_ROUTES})


BEARER_SCHEME = "HTTPBearer"
# What FastAPI adds to every operation that validates its input, and never answers here (see below).
_FASTAPI_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def _declare_validation_errors_as_400(doc: dict[str, Any]) -> None:
    """Replace FastAPI's default 422 responses with the 400 this server really answers invalid input with.

    FastAPI declares `422` (body `HTTPValidationError`) on every operation that has parameters or a body, but
    `_validation_error_handler` answers those errors with 400 and an `ErrorResponse`: a client generated from the
    document would expect a status and a body it never gets.
    """
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for operations in doc.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            if responses.pop("422", None) is not None and "400" not in responses:
                responses["400"] = {
                    "description": _ERROR_RESPONSES[400]["description"],
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
                }
                _, defs = models_json_schema(
                    [(ErrorResponse, "serialization")], ref_template="#/components/schemas/{model}"
                )
                for name, schema in defs.get("$defs", {}).items():
                    schemas.setdefault(name, schema)
    # FastAPI's validation-error schemas are referenced by nothing now (an SDK generator would still emit them).
    text = json.dumps({key: value for key, value in doc.items() if key != "components"})
    text += json.dumps({name: schema for name, schema in schemas.items() if name not in _FASTAPI_VALIDATION_SCHEMAS})
    if not any(f'"#/components/schemas/{name}"' in text for name in _FASTAPI_VALIDATION_SCHEMAS):
        for name in _FASTAPI_VALIDATION_SCHEMAS:
            schemas.pop(name, None)


def _apply_auth_to_openapi(doc: dict[str, Any], auth_enabled: bool) -> None:
    """Declare the Bearer scheme on every route outside OPEN_PATHS when keys are required; otherwise drop the 401s."""
    for path, operations in doc.get("paths", {}).items():
        for operation in operations.values():
            if path in OPEN_PATHS:
                continue
            if auth_enabled:
                operation["security"] = [{BEARER_SCHEME: []}]
            else:
                operation.get("responses", {}).pop("401", None)
    if auth_enabled:
        doc.setdefault("components", {}).setdefault("securitySchemes", {})[BEARER_SCHEME] = {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key: `Authorization: Bearer <key>`.",
        }


class _ReplicaState:
    """What the ingress middleware needs from the replica it runs in; set by `OpenAIServer.__init__`."""

    auth: APIKeyAuth = APIKeyAuth(enabled=False)
    metrics: Metrics = NullMetrics()


_replica = _ReplicaState()


class EdgeMiddleware:
    """API-key check and request metrics around every HTTP request (pure ASGI, so streams are timed to the end)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        status = 500  # what is recorded when the app fails before starting a response

        async def send_and_watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if path not in OPEN_PATHS:
                try:
                    _replica.auth.check(_header(scope, b"authorization"))
                except APIError as exc:
                    response = _error_response(exc)
                    response.headers["WWW-Authenticate"] = "Bearer"
                    await response(scope, receive, send_and_watch)
                    return
            await self.app(scope, receive, send_and_watch)
        finally:
            state = scope.get("state", {})
            model = state.get("model", "")
            status = state.get(FAILED_STATUS, status)  # a stream that failed after its 200 status line
            route = path if path in METRIC_ROUTES else "other"
            _replica.metrics.request(model=model, route=route, status=status, latency_s=time.monotonic() - started)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


api.add_middleware(EdgeMiddleware)

# Request state key under which a stream that fails mid-way leaves its error status for EdgeMiddleware.
FAILED_STATUS = "failed_status"


def _stream_failed(request: Request) -> Callable[[APIError], None]:
    def record(error: APIError) -> None:
        setattr(request.state, FAILED_STATUS, error.status_code)

    return record


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(status_code=error.status_code, content=error.to_response().model_dump())


@api.exception_handler(APIError)
async def _api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    return _error_response(exc)


@api.exception_handler(RequestValidationError)
async def _validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI would answer 422 with its own body; OpenAI clients expect 400 naming the parameter.
    return _error_response(from_validation_errors(exc.errors()))


@api.exception_handler(StarletteHTTPException)
async def _http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown routes and wrong methods, in the same error shape as everything else.
    if exc.status_code == 404:
        message = f"Unknown request URL: {request.method} {request.url.path}."
        error = APIError(404, message, code="unknown_url")
    else:
        error = APIError(
            exc.status_code, str(exc.detail), type="invalid_request_error" if exc.status_code < 500 else "server_error"
        )
    response = _error_response(error)
    if exc.headers:
        response.headers.update(exc.headers)
    return response


@api.exception_handler(Exception)
async def _unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    # Last resort: the traceback goes to the replica log, the client gets OpenAI's 500 shape.
    logger.exception("unhandled error for %s %s", request.method, request.url.path)
    return _error_response(server_error())


def _event_stream(events: Any) -> StreamingResponse:
    # X-Accel-Buffering: nginx-style ingresses would otherwise buffer the stream and deliver it at the end.
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def _ray_metrics() -> Metrics:
    import ray

    from serving.metrics import RayMetrics

    # Inside a replica Ray is always initialised; the guard keeps the class usable in a plain process.
    return RayMetrics() if ray.is_initialized() else NullMetrics()


def _init_replica(config: dict[str, Any]) -> OpenAIService:
    """Set up one replica process: auth and metrics for the middleware, then the models.

    A module-level function on purpose: Serve ships the ingress class to replicas by value, and state it set
    directly would land in a copy of this module's globals that the middleware never sees.
    """
    cfg = ServeAppConfig.load(config)
    # Auth first: a replica configured for keys but given none must fail to start, not serve openly.
    _replica.auth = APIKeyAuth.from_config(cfg.auth)
    _replica.metrics = _ray_metrics()
    service = OpenAIService.from_config(cfg, metrics=_replica.metrics)
    service.report_queue_depth_every(1.0)
    return service


# `serve.ingress(api)` freezes a copy of `api` when the class is decorated: every exception handler and
# middleware must be registered above this line to reach the replicas.
@serve.deployment(name="OpenAIServer")
@serve.ingress(api)
class OpenAIServer:
    """One replica: every configured model loaded in-process, answering the OpenAI routes.

    Serve routes no traffic to a replica until `__init__` returns, so the models are loaded by the time
    any route, `/health` included, can be reached.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self._service = _init_replica(config)

    def check_health(self) -> None:
        """Serve's periodic replica health check: raising marks the replica unhealthy and replaces it."""
        if not self._service.is_healthy():
            raise RuntimeError("no engines loaded")

    @api.get("/health")
    async def health(self) -> JSONResponse:
        """Liveness: the replica process answers."""
        return JSONResponse(status_code=200, content={"status": "ok"} | {"models": self._service.model_names})

    @api.get("/ready")
    async def ready(self) -> JSONResponse:
        """Readiness: every configured model is loaded and can take requests."""
        body = self._service.health()
        return JSONResponse(status_code=200 if body["status"] == "ok" else 503, content=body)

    @api.get("/v1/models", response_model=ModelList, response_model_exclude_none=True, responses=_ERROR_RESPONSES)
    async def list_models(self) -> ModelList:
        """The served models; each card has `max_model_len`, and `version` / `alias` when the config names them."""
        return self._service.list_models()

    @api.post("/v1/completions", response_model=CompletionResponse, responses=_STREAM_RESPONSES)
    async def completions(self, body: CompletionRequest, request: Request) -> Any:
        """OpenAI's legacy completions. Beyond text prompts: token-id prompts (a list, or a list of lists),
        `logprobs` (top-k per position, up to 20), `echo` (with `logprobs`, the prompt's tokens are scored too) and
        `max_tokens: 0` with `echo` (score a text without generating): what evaluation harnesses send to compute
        log-likelihoods."""
        self._label(request, body.model)
        if body.stream:
            return _event_stream(self._service.complete_stream(body, on_error=_stream_failed(request)))
        return await self._service.complete(body)

    @api.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses=_STREAM_RESPONSES,
    )
    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Any:
        self._label(request, body.model)
        if body.stream:
            return _event_stream(self._service.chat_stream(body, on_error=_stream_failed(request)))
        return await self._service.chat(body)

    @api.get("/tokenizer_info", response_model=TokenizerInfoResponse, responses=_ERROR_RESPONSES)
    async def tokenizer_info(self, request: Request, model: str | None = None) -> TokenizerInfoResponse:
        """The tokenizer's configuration (special tokens, chat template, length limit), as vLLM serves it.

        `model` may be left out when the server serves one model."""
        if model is not None:
            self._label(request, model)
        return self._service.tokenizer_info(model)

    @api.post("/tokenize", response_model=TokenizeResponse, responses=_ERROR_RESPONSES)
    async def tokenize(self, body: TokenizeRequest, request: Request) -> TokenizeResponse:
        """Token ids of a `prompt`, or of chat `messages` rendered with the model's chat template (vLLM's shape):
        exactly what a completion or chat completion would feed the model."""
        if body.model is not None:
            self._label(request, body.model)
        return self._service.tokenize(body)

    @api.post("/detokenize", response_model=DetokenizeResponse, responses=_ERROR_RESPONSES)
    async def detokenize(self, body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
        """The text of token ids (special tokens kept), as vLLM serves it."""
        if body.model is not None:
            self._label(request, body.model)
        return self._service.detokenize(body)

    def _label(self, request: Request, model: str) -> None:
        # The metrics middleware reads this; only served names, so clients cannot mint new series.
        if model in self._service.model_names:
            request.state.model = model


def deployment_options(config: ServeAppConfig) -> dict[str, Any]:
    """The Serve deployment options a config implies (a serve config's `deployments:` can still override them)."""
    return {
        "autoscaling_config": {
            "min_replicas": config.min_replicas,
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.target_ongoing_requests,
            "upscale_delay_s": config.upscale_delay_s,
            "downscale_delay_s": config.downscale_delay_s,
            "look_back_period_s": config.look_back_period_s,
        },
        "max_ongoing_requests": config.max_ongoing_requests,
        "graceful_shutdown_timeout_s": config.graceful_shutdown_timeout_s,
        "ray_actor_options": {"num_cpus": config.num_cpus_per_replica, "num_gpus": config.num_gpus_per_replica},
    }


def build_app(args: dict[str, Any] | ServeAppConfig) -> Application:
    """Ray Serve application builder: validate `args` as :class:`ServeAppConfig` and bind the ingress.

    Validation happens here, in the process that deploys, so a bad config fails `serve run` / `serve deploy`
    with a message naming the key instead of sending replicas into a crash loop.
    """
    config = ServeAppConfig.load(args)
    # A plain dict crosses to the replicas: it does not depend on pickling this process's pydantic classes.
    return OpenAIServer.options(**deployment_options(config)).bind(config.model_dump(mode="json"))
