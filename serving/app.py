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

Routes: `GET /v1/models`, `POST /v1/completions`, `GET /health`. Every error leaves in OpenAI's shape
(`{"error": {...}}`) so the `openai` client raises its typed exceptions; FastAPI's 422 for an invalid
body becomes OpenAI's 400.
"""

# No `from __future__ import annotations` here: Serve rebuilds route signatures for the class-based view,
# and FastAPI must see real classes (not strings) to know `body` is a JSON body, not a query parameter.
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.api import (
    APIError,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelList,
    from_validation_errors,
    server_error,
)
from serving.config import ServeAppConfig
from serving.service import OpenAIService

logger = logging.getLogger(__name__)

api = FastAPI(
    title="raytrain OpenAI-compatible API",
    description="Completions from models trained with raytrain, served by Ray Serve.",
    version="1",
)

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request; `error.param` names the parameter."},
    404: {"model": ErrorResponse, "description": "Unknown model."},
    500: {"model": ErrorResponse, "description": "Server error."},
}


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
        self._service = OpenAIService.from_config(ServeAppConfig.load(config))

    def check_health(self) -> None:
        """Serve's periodic replica health check: raising marks the replica unhealthy and replaces it."""
        if not self._service.is_healthy():
            raise RuntimeError("no engines loaded")

    @api.get("/health")
    async def health(self) -> JSONResponse:
        body = self._service.health()
        return JSONResponse(status_code=200 if body["status"] == "ok" else 503, content=body)

    @api.get("/v1/models", response_model=ModelList, responses=_ERROR_RESPONSES)
    async def list_models(self) -> ModelList:
        return self._service.list_models()

    @api.post("/v1/completions", response_model=CompletionResponse, responses=_ERROR_RESPONSES)
    async def completions(self, body: CompletionRequest) -> CompletionResponse:
        return await self._service.complete(body)


def deployment_options(config: ServeAppConfig) -> dict[str, Any]:
    """The Serve deployment options a config implies (a serve config's `deployments:` can still override them)."""
    return {
        "autoscaling_config": {
            "min_replicas": config.min_replicas,
            "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.target_ongoing_requests,
        },
        "max_ongoing_requests": config.max_ongoing_requests,
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
