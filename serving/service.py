"""Request handling for the OpenAI-compatible API, independent of HTTP and of Ray Serve.

`OpenAIService` turns validated request models into responses using :class:`~serving.engine.Engine`s and
raises :class:`~serving.api.APIError` for anything the client should hear about. Keeping it free of
FastAPI and Serve lets it be tested with a real engine in-process, and lets chat completions, streaming,
auth and metrics be added as methods and middleware without touching the deployment wiring in
`serving.app`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from serving.api import (
    APIError,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
    invalid_request,
    model_not_found,
    server_error,
)
from serving.config import ServeAppConfig
from serving.engine import ContextWindowError, Engine, load_engine

logger = logging.getLogger(__name__)


class OpenAIService:
    """The models one replica serves and the rules a request must pass before it reaches an engine."""

    def __init__(self, engines: Mapping[str, Engine], *, max_tokens_limit: int, created: int | None = None) -> None:
        if not engines:
            raise ValueError("OpenAIService needs at least one engine")
        self._engines = dict(engines)
        self._max_tokens_limit = max_tokens_limit
        self._created = int(time.time()) if created is None else created

    @classmethod
    def from_config(cls, config: ServeAppConfig) -> OpenAIService:
        """Load every configured model; slow (weights are read), so called once per replica."""
        engines: dict[str, Engine] = {}
        for entry in config.models:
            started = time.monotonic()
            engines[entry.name] = load_engine(entry.path, device=config.device)
            logger.info("model %s ready from %s in %.1fs", entry.name, entry.path, time.monotonic() - started)
        return cls(engines, max_tokens_limit=config.max_tokens_limit)

    @property
    def model_names(self) -> list[str]:
        return list(self._engines)

    def is_healthy(self) -> bool:
        return bool(self._engines)

    def list_models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=name, created=self._created) for name in self._engines])

    def engine_for(self, model: str) -> Engine:
        engine = self._engines.get(model)
        if engine is None:
            raise model_not_found(model)
        return engine

    def check_limits(self, engine: Engine, prompts: list[str], max_tokens: int) -> list[int]:
        """Reject what cannot run before any work starts; returns each prompt's token count."""
        if max_tokens > self._max_tokens_limit:
            raise invalid_request(
                f"max_tokens is {max_tokens}, above this server's limit of {self._max_tokens_limit}.",
                param="max_tokens",
            )
        counts = []
        for prompt in prompts:
            n_tokens = engine.count_tokens(prompt)
            if n_tokens + max_tokens > engine.context_length:
                # Name the prompt when it alone leaves no room; otherwise asking for fewer tokens would fix it.
                param = "prompt" if n_tokens >= engine.context_length else "max_tokens"
                raise invalid_request(
                    str(ContextWindowError(n_tokens, max_tokens, engine.context_length)),
                    param=param,
                    code="context_length_exceeded",
                )
            counts.append(n_tokens)
        return counts

    async def complete(self, request: CompletionRequest) -> CompletionResponse:
        """`POST /v1/completions`: n choices per prompt, generated off the event loop one after another."""
        engine = self.engine_for(request.model)
        prompts = request.prompts
        prompt_counts = self.check_limits(engine, prompts, request.max_tokens)
        stop = request.stop_sequences

        choices: list[CompletionChoice] = []
        completion_tokens = 0
        for prompt in prompts:
            for i in range(request.n):
                seed = None if request.seed is None else request.seed + i
                try:
                    result = await asyncio.to_thread(
                        engine.generate,
                        prompt,
                        max_tokens=request.max_tokens,
                        temperature=request.temperature,
                        top_p=request.top_p,
                        seed=seed,
                        stop=stop,
                    )
                except ContextWindowError as exc:
                    # count_tokens and generate disagreed; still the client's limit, not a server fault.
                    raise invalid_request(str(exc), param="prompt", code="context_length_exceeded") from exc
                except APIError:
                    raise
                except Exception as exc:
                    logger.exception("generation failed for model %s", request.model)
                    raise server_error() from exc
                completion_tokens += result.completion_tokens
                choices.append(
                    CompletionChoice(
                        # OpenAI numbers choices across prompts: prompt k's choices are k*n … k*n+n-1.
                        index=len(choices),
                        text=prompt + result.text if request.echo else result.text,
                        finish_reason=result.finish_reason,
                    )
                )
        prompt_tokens = sum(prompt_counts)
        return CompletionResponse(
            model=request.model,
            choices=choices,
            usage=Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
            ),
        )

    def health(self) -> dict[str, Any]:
        return {"status": "ok" if self.is_healthy() else "loading", "models": self.model_names}
