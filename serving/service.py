"""Request handling for the OpenAI-compatible API, independent of HTTP and of Ray Serve.

`OpenAIService` turns validated request models into responses (or server-sent event streams) using
:class:`~serving.engine.Engine`s, and raises :class:`~serving.api.APIError` for anything the client should hear
about. Keeping it free of FastAPI and Serve lets it be tested and benchmarked with a real engine in-process.

Every check that can fail a request (model, limits, context window, chat template) runs before a stream starts,
so a bad streamed request still gets its 4xx status; a failure after the first byte is sent as a final
`data: {"error": …}` event, as vLLM does, logged, and reported through the stream's `on_error` callback so that
the HTTP layer can count the request as failed although its status line said 200. When one choice of a request
fails, its sibling choices are cancelled: the client gets an error for the whole request, so their work is waste.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from serving.api import (
    APIError,
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatDelta,
    ChatMessage,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamChoice,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    SamplingRequest,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfoResponse,
    Usage,
    invalid_request,
    model_not_found,
    server_error,
)
from serving.config import DEFAULT_STREAM_INTERVAL_S, ModelEntry, ServeAppConfig
from serving.engine import (
    ContextWindowError,
    Engine,
    GenerationResult,
    NoChatTemplateError,
    PromptLogprobs,
    TextDelta,
    TokenIdError,
    TokenLogprob,
    load_engine,
)
from serving.metrics import Metrics, NullMetrics

logger = logging.getLogger(__name__)

COMPLETIONS_ROUTE = "/v1/completions"
CHAT_ROUTE = "/v1/chat/completions"


@dataclass(frozen=True)
class _Job:
    """One choice to generate: which prompt, which choice number, and its seed."""

    index: int  # the choice's index in the response
    prompt: str | list[int]  # text, or token ids
    prefix: str  # text put in front of the completion (the prompt, for echo)
    seed: int | None


class _LogprobsWriter:
    """Turns one choice's :class:`TokenLogprob` entries into OpenAI's `logprobs` lists, chunk after chunk.

    `text_offset` counts the lengths of the token strings before each token in the choice (vLLM's convention), so it
    runs on across the chunks of a stream.
    """

    def __init__(self) -> None:
        self.offset = 0

    def write(self, entries: Sequence[TokenLogprob]) -> CompletionLogprobs:
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for entry in entries:
            out.tokens.append(entry.token)
            out.token_logprobs.append(entry.logprob)
            # Two ids may share a text (e.g. halves of one UTF-8 character): the dict keeps the first, most likely.
            out.top_logprobs.append(None if entry.top is None else dict(reversed(entry.top)))
            out.text_offset.append(self.offset)
            self.offset += len(entry.token)
        return out


def sse(payload: str) -> str:
    """One server-sent event carrying `payload` (JSON or the `[DONE]` sentinel)."""
    return f"data: {payload}\n\n"


def _merge(a: TextDelta, b: TextDelta) -> TextDelta:
    """One delta for two consecutive deltas of a choice (text and log-probability entries concatenated)."""
    return TextDelta(a.text + b.text, a.logprobs + b.logprobs)


class OpenAIService:
    """The models one replica serves and the rules a request must pass before it reaches an engine."""

    def __init__(
        self,
        engines: Mapping[str, Engine],
        *,
        max_tokens_limit: int,
        created: int | None = None,
        metrics: Metrics | None = None,
        entries: Mapping[str, ModelEntry] | None = None,
        stream_interval_s: float = DEFAULT_STREAM_INTERVAL_S,
    ) -> None:
        if not engines:
            raise ValueError("OpenAIService needs at least one engine")
        self._engines = dict(engines)
        self._entries = dict(entries or {})  # where /v1/models finds each model's version and alias
        self._max_tokens_limit = max_tokens_limit
        self._created = int(time.time()) if created is None else created
        self.metrics: Metrics = metrics or NullMetrics()
        self._stream_interval_s = stream_interval_s

    @classmethod
    def from_config(cls, config: ServeAppConfig, metrics: Metrics | None = None) -> OpenAIService:
        """Load every configured model; slow (weights are read), so called once per replica."""
        engines: dict[str, Engine] = {}
        for entry in config.models:
            started = time.monotonic()
            engines[entry.name] = load_engine(
                entry.path,
                device=config.device,
                max_batch_size=config.max_batch_size,
                fault_injection=config.fault_injection,
            )
            logger.info("model %s ready from %s in %.1fs", entry.name, entry.path, time.monotonic() - started)
        entries = {entry.name: entry for entry in config.models}
        return cls(
            engines,
            max_tokens_limit=config.max_tokens_limit,
            metrics=metrics,
            entries=entries,
            stream_interval_s=config.stream_interval_s,
        )

    def report_queue_depth_every(self, interval_s: float) -> threading.Thread:
        """Keep the queue-depth gauge fresh from a daemon thread.

        Ray exports a gauge only in the report intervals where it was set, so an idle replica must keep setting it
        (to 0) or its series goes stale in Prometheus just when someone looks at a quiet deployment.
        """

        def loop() -> None:
            while True:
                for name, engine in self._engines.items():
                    self.metrics.queue_depth(model=name, depth=engine.queue_depth())
                time.sleep(interval_s)

        thread = threading.Thread(target=loop, name="queue-depth-gauge", daemon=True)
        thread.start()
        return thread

    @property
    def model_names(self) -> list[str]:
        return list(self._engines)

    def is_healthy(self) -> bool:
        return bool(self._engines)

    def health(self) -> dict[str, Any]:
        return {"status": "ok" if self.is_healthy() else "loading", "models": self.model_names}

    def list_models(self) -> ModelList:
        cards = []
        for name, engine in self._engines.items():
            entry = self._entries.get(name)
            cards.append(
                ModelCard(
                    id=name,
                    created=self._created,
                    max_model_len=engine.context_length,
                    version=entry.version if entry else None,
                    alias=entry.alias if entry else None,
                )
            )
        return ModelList(data=cards)

    def engine_for(self, model: str) -> Engine:
        engine = self._engines.get(model)
        if engine is None:
            raise model_not_found(model)
        return engine

    def check_limits(self, engine: Engine, prompts: Sequence[str | Sequence[int]], max_tokens: int) -> list[int]:
        """Reject what cannot run before any work starts; returns each prompt's token count."""
        if max_tokens > self._max_tokens_limit:
            raise invalid_request(
                f"max_tokens is {max_tokens}, above this server's limit of {self._max_tokens_limit}.",
                param="max_tokens",
            )
        counts = []
        for prompt in prompts:
            n_tokens = engine.count_tokens(prompt) if isinstance(prompt, str) else len(prompt)
            if n_tokens + max_tokens > engine.context_length:
                # Name the prompt when it alone leaves no room; otherwise asking for fewer tokens would fix it.
                param = "prompt" if n_tokens >= engine.context_length else "max_tokens"
                raise invalid_request(
                    str(ContextWindowError(n_tokens, max_tokens, engine.context_length)),
                    param=param,
                    code="context_length_exceeded",
                )
            if n_tokens == 0:
                raise invalid_request("The prompt encodes to no tokens.", param="prompt")
            counts.append(n_tokens)
        return counts

    # -------------------------------------------------------------------------------------- tokenization

    def _engine_or_only(self, model: str | None) -> Engine:
        """The named model's engine; with no name, the only one served (vLLM's endpoints take no model either)."""
        if model is not None:
            return self.engine_for(model)
        if len(self._engines) == 1:
            return next(iter(self._engines.values()))
        raise invalid_request(
            f"This server serves several models ({', '.join(self._engines)}); name one with `model`.", param="model"
        )

    def tokenizer_info(self, model: str | None = None) -> TokenizerInfoResponse:
        """`GET /tokenizer_info`."""
        return TokenizerInfoResponse.model_validate(self._engine_or_only(model).tokenizer_info())

    def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        """`POST /tokenize`: the ids a completion (`prompt`) or a chat completion (`messages`) would be fed."""
        engine = self._engine_or_only(request.model)
        if request.messages is not None:
            text = self._render_chat(engine, request.model, request.messages, request.add_generation_prompt)
            add_special = bool(request.add_special_tokens)  # default false: the template writes its own
        else:
            text = request.prompt or ""
            add_special = request.add_special_tokens is not False
        ids = engine.tokenize(text, add_special_tokens=add_special)
        strs = engine.token_strs(ids) if request.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=engine.context_length, tokens=ids, token_strs=strs)

    def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        """`POST /detokenize`."""
        engine = self._engine_or_only(request.model)
        self._check_token_ids(engine, request.tokens, "tokens", "tokens")
        return DetokenizeResponse(prompt=engine.detokenize(request.tokens))

    @staticmethod
    def _render_chat(
        engine: Engine, model: str | None, messages: Sequence[ChatMessage], add_generation_prompt: bool = True
    ) -> str:
        turns = [{"role": m.role, "content": m.text} for m in messages]
        try:
            if add_generation_prompt:  # the chat completions call, which every engine answers
                return engine.apply_chat_template(turns)
            return engine.apply_chat_template(turns, add_generation_prompt=False)
        except NoChatTemplateError:
            name = f"The model '{model}'" if model else "This model"
            raise invalid_request(
                f"{name} has no chat template; use /v1/completions with it.",
                param="model",
                code="chat_template_missing",
            ) from None

    # ------------------------------------------------------------------------------------ preparing work

    @staticmethod
    def _check_token_ids(engine: Engine, ids: Sequence[int], param: str, where: str) -> None:
        vocab = engine.vocab_size
        for i, token in enumerate(ids):
            if token >= vocab:
                raise invalid_request(
                    f"Invalid token id {token} at {where}[{i}]: this model's vocabulary has ids 0 to {vocab - 1}.",
                    param=param,
                    code="invalid_token_id",
                )

    def _completion_jobs(self, request: CompletionRequest) -> tuple[Engine, list[_Job], int]:
        engine = self.engine_for(request.model)
        if request.max_tokens == 0 and not request.echo:
            # Nothing would come back: 0 is for scoring a prompt, which echo returns (OpenAI and vLLM agree).
            raise invalid_request("max_tokens may be 0 only with echo: true (to score the prompt).", param="max_tokens")
        prompts = request.prompts
        single = isinstance(request.prompt, list) and isinstance(request.prompt[0], int)  # one token-id prompt
        for k, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                self._check_token_ids(engine, prompt, "prompt", "prompt" if single else f"prompt[{k}]")
        counts = self.check_limits(engine, prompts, request.max_tokens)
        jobs = []
        for prompt in prompts:
            prefix = ""
            if request.echo:
                # A token-id prompt is echoed as its text, special tokens included, as vLLM does.
                prefix = prompt if isinstance(prompt, str) else engine.detokenize(prompt)
            for i in range(request.n):
                # OpenAI numbers choices across prompts: prompt k's choices are k*n … k*n+n-1.
                seed = None if request.seed is None else request.seed + i
                jobs.append(_Job(len(jobs), prompt, prefix, seed))
        return engine, jobs, sum(counts)

    def _chat_jobs(self, request: ChatCompletionRequest) -> tuple[Engine, list[_Job], int]:
        engine = self.engine_for(request.model)
        prompt = self._render_chat(engine, request.model, request.messages)
        (count,) = self.check_limits(engine, [prompt], request.max_tokens)
        seeds = [None if request.seed is None else request.seed + i for i in range(request.n)]
        return engine, [_Job(i, prompt, "", seed) for i, seed in enumerate(seeds)], count

    # --------------------------------------------------------------------------------------- generation

    async def _run(
        self,
        engine: Engine,
        request: SamplingRequest,
        route: str,
        jobs: Sequence[_Job],
        on_delta: Callable[[int, TextDelta], None] | None = None,
        on_prompt: Callable[[int, PromptLogprobs], None] | None = None,
    ) -> list[GenerationResult]:
        """Generate every job at once (the engine batches them); `on_delta(index, delta)` sees text as it comes, and
        `on_prompt(index, prompt_logprobs)` the scored prompt (completions with echo and logprobs).

        If one job fails, the others are cancelled (their engine rows freed) before the error is raised.
        """
        started = time.monotonic()
        first = True
        extra: dict[str, Any] = {}
        if isinstance(request, CompletionRequest) and request.logprobs is not None:
            # Passed only when asked for, so that engines without log-probabilities serve everything else.
            extra["logprobs"] = request.logprobs
            if request.echo:
                extra["prompt_logprobs"] = request.logprobs

        async def one(job: _Job) -> GenerationResult:
            nonlocal first
            try:
                async for item in engine.stream(
                    job.prompt,
                    max_tokens=request.max_tokens,
                    temperature=request.temperature,
                    top_p=request.top_p,
                    seed=job.seed,
                    stop=request.stop_sequences,
                    **extra,
                ):
                    if isinstance(item, PromptLogprobs):  # read the prompt; nothing generated yet
                        if on_prompt is not None:
                            on_prompt(job.index, item)
                        continue
                    if first:  # first output of any choice, even an empty completion's final result
                        first = False
                        ttft = time.monotonic() - started
                        self.metrics.first_token(model=request.model, route=route, ttft_s=ttft)
                    if isinstance(item, TextDelta):
                        if on_delta is not None:
                            on_delta(job.index, item)
                    else:
                        return item
            except ContextWindowError as exc:
                # count_tokens and generate disagreed; still the client's limit, not a server fault.
                raise invalid_request(str(exc), param="prompt", code="context_length_exceeded") from exc
            except TokenIdError as exc:  # checked before; an engine with a smaller vocabulary than it reported
                raise invalid_request(str(exc), param="prompt", code="invalid_token_id") from exc
            except (APIError, asyncio.CancelledError):
                raise
            except Exception as exc:
                logger.exception("generation failed for model %s", request.model)
                raise server_error() from exc
            raise server_error("The generation ended without a result.")

        tasks = [asyncio.ensure_future(one(job)) for job in jobs]
        try:
            results = await asyncio.gather(*tasks)
        except BaseException:
            # gather raises the first failure but leaves the other choices generating; stop them and wait until they
            # have let go of their engine rows, so the batch slots are free when the error reaches the client.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        self.metrics.generated(model=request.model, route=route, tokens=sum(r.completion_tokens for r in results))
        return list(results)

    @staticmethod
    def _usage(prompt_tokens: int, results: Sequence[GenerationResult]) -> Usage:
        completion = sum(r.completion_tokens for r in results)
        return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)

    async def complete(self, request: CompletionRequest) -> CompletionResponse:
        """`POST /v1/completions` without streaming: every choice of every prompt generated together."""
        engine, jobs, prompt_tokens = self._completion_jobs(request)
        results = await self._run(engine, request, COMPLETIONS_ROUTE, jobs)
        choices = []
        for job, r in zip(jobs, results, strict=True):
            logprobs = None
            if request.logprobs is not None:
                logprobs = _LogprobsWriter().write([*(r.prompt_logprobs or ()), *(r.logprobs or ())])
            choices.append(
                CompletionChoice(
                    index=job.index, text=job.prefix + r.text, finish_reason=r.finish_reason, logprobs=logprobs
                )
            )
        return CompletionResponse(model=request.model, choices=choices, usage=self._usage(prompt_tokens, results))

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletionResponse:
        """`POST /v1/chat/completions` without streaming."""
        engine, jobs, prompt_tokens = self._chat_jobs(request)
        results = await self._run(engine, request, CHAT_ROUTE, jobs)
        choices = [
            ChatCompletionChoice(
                index=job.index, message=AssistantMessage(content=r.text), finish_reason=r.finish_reason
            )
            for job, r in zip(jobs, results, strict=True)
        ]
        return ChatCompletionResponse(model=request.model, choices=choices, usage=self._usage(prompt_tokens, results))

    # ---------------------------------------------------------------------------------------- streaming

    def complete_stream(
        self, request: CompletionRequest, on_error: Callable[[APIError], None] | None = None
    ) -> AsyncIterator[str]:
        """Validate now (raising APIError), then return the SSE stream of a completion.

        `on_error` hears of a failure after the stream started (sent to the client as the last event).
        """
        engine, jobs, prompt_tokens = self._completion_jobs(request)
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        with_logprobs = request.logprobs is not None
        writers = {job.index: _LogprobsWriter() for job in jobs}
        prefix_of = {job.index: job.prefix for job in jobs}

        def chunk(choices: list[CompletionStreamChoice], usage: Usage | None = None) -> str:
            body = CompletionChunk(id=cid, created=created, model=request.model, choices=choices, usage=usage)
            return body.model_dump_json(exclude_none=not request.include_usage_chunk)

        def on_text(index: int, delta: TextDelta) -> str:
            logprobs = writers[index].write(delta.logprobs) if with_logprobs else None
            return chunk([CompletionStreamChoice(index=index, text=delta.text, logprobs=logprobs)])

        def on_prompt(index: int, prompt: PromptLogprobs) -> TextDelta:
            # The echoed prompt goes out with its log-probabilities, once the engine has read it.
            return TextDelta(prefix_of[index], prompt.logprobs)

        def on_done(job: _Job, result: GenerationResult) -> str:
            return chunk([CompletionStreamChoice(index=job.index, text="", finish_reason=result.finish_reason)])

        def on_usage(results: Sequence[GenerationResult]) -> str:
            return chunk([], self._usage(prompt_tokens, results))

        # Without log-probabilities the echoed prompt needs nothing from the engine: send it at once.
        prefixes = {} if with_logprobs else {job.index: job.prefix for job in jobs if job.prefix}
        return self._stream(
            engine,
            request,
            COMPLETIONS_ROUTE,
            jobs,
            on_text,
            on_done,
            on_usage,
            prefixes,
            on_error,
            on_prompt=on_prompt if with_logprobs and request.echo else None,
        )

    def chat_stream(
        self, request: ChatCompletionRequest, on_error: Callable[[APIError], None] | None = None
    ) -> AsyncIterator[str]:
        """Validate now (raising APIError), then return the SSE stream of a chat completion (`on_error`: as for
        :meth:`complete_stream`)."""
        engine, jobs, prompt_tokens = self._chat_jobs(request)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        started: set[int] = set()

        def chunk(choices: list[ChatCompletionStreamChoice], usage: Usage | None = None) -> str:
            body = ChatCompletionChunk(id=cid, created=created, model=request.model, choices=choices, usage=usage)
            data = body.model_dump(mode="json")
            for choice in data["choices"]:
                # OpenAI sends only the delta fields that are set: role once, then content.
                choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
            if not request.include_usage_chunk:
                data.pop("usage")
            return json.dumps(data, ensure_ascii=False)

        def on_text(index: int, delta: TextDelta) -> str:
            # The first chunk of each choice names the role, as OpenAI's do.
            role = None if index in started else "assistant"
            started.add(index)
            return chunk([ChatCompletionStreamChoice(index=index, delta=ChatDelta(role=role, content=delta.text))])

        def on_done(job: _Job, result: GenerationResult) -> str:
            role = None if job.index in started else "assistant"
            delta = ChatDelta(role=role, content="" if role else None)
            return chunk([ChatCompletionStreamChoice(index=job.index, delta=delta, finish_reason=result.finish_reason)])

        def on_usage(results: Sequence[GenerationResult]) -> str:
            return chunk([], self._usage(prompt_tokens, results))

        return self._stream(engine, request, CHAT_ROUTE, jobs, on_text, on_done, on_usage, {}, on_error)

    async def _stream(
        self,
        engine: Engine,
        request: SamplingRequest,
        route: str,
        jobs: Sequence[_Job],
        on_text: Callable[[int, TextDelta], str],
        on_done: Callable[[_Job, GenerationResult], str],
        on_usage: Callable[[Sequence[GenerationResult]], str],
        prefixes: Mapping[int, str],
        on_error: Callable[[APIError], None] | None = None,
        on_prompt: Callable[[int, PromptLogprobs], TextDelta] | None = None,
    ) -> AsyncIterator[str]:
        # Queued: (choice index, text delta) as generation produces them, events to render (a choice's end, usage),
        # and None once generation is over. Everything is rendered only when sent, in queue order: a choice's deltas
        # that wait for the same write become one chunk, and an end event sees the text chunks rendered before it
        # (a chat choice names its role once, in whichever chunk of it goes out first).
        events: asyncio.Queue[tuple[int, TextDelta] | Callable[[], str] | None] = asyncio.Queue()
        generated = asyncio.Event()  # set once generation is over (its None is queued by then)
        for index, prefix in prefixes.items():
            events.put_nowait((index, TextDelta(prefix)))

        def prompt_event(index: int, prompt: PromptLogprobs) -> None:
            if on_prompt is not None:
                events.put_nowait((index, on_prompt(index, prompt)))

        async def produce() -> list[GenerationResult]:
            try:
                results = await self._run(
                    engine,
                    request,
                    route,
                    jobs,
                    lambda i, delta: events.put_nowait((i, delta)),
                    prompt_event if on_prompt is not None else None,
                )
                for job, result in zip(jobs, results, strict=True):
                    events.put_nowait(functools.partial(on_done, job, result))
                if request.include_usage_chunk:
                    events.put_nowait(functools.partial(on_usage, results))
                return results
            finally:
                events.put_nowait(None)
                generated.set()

        def render(batch: list[tuple[int, TextDelta] | Callable[[], str] | None]) -> str:
            # Consecutive deltas of a choice merge into one chunk; rendered events keep their place.
            parts: list[str] = []
            run: dict[int, TextDelta] = {}
            for item in batch:
                if item is None:
                    continue
                if callable(item):
                    parts.extend(sse(on_text(i, d)) for i, d in run.items())
                    run.clear()
                    parts.append(sse(item()))
                    continue
                index, delta = item
                before = run.get(index)
                run[index] = delta if before is None else _merge(before, delta)
            parts.extend(sse(on_text(i, d)) for i, d in run.items())
            return "".join(parts)

        loop = asyncio.get_running_loop()
        interval = self._stream_interval_s
        task = asyncio.create_task(produce())
        try:
            last_write: float | None = None
            while True:
                # Everything already queued goes out as one write. After the first write, text waits until
                # `interval` has passed since the previous one (the end of the stream never waits): each write is a
                # trip through the replica, the proxy, the socket and the client's parser, so this bounds that cost
                # per second of generation instead of paying it per token. While it waits, this task sleeps until
                # the deadline or the end of generation: tokens queue up without waking it once per forward pass.
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                wait = 0.0 if last_write is None else last_write + interval - loop.time()
                if batch[-1] is not None and wait > 0:
                    if not generated.is_set():
                        try:
                            async with asyncio.timeout(wait):
                                await generated.wait()
                        except TimeoutError:
                            pass
                    while not events.empty():
                        batch.append(events.get_nowait())
                text = render(batch)
                if batch[-1] is None:
                    break
                if text:
                    last_write = loop.time()
                    yield text
            try:
                await task  # raises what generation raised
            except Exception:
                if text:
                    yield text  # what was generated before the failure, then the error event below
                raise
            yield text + sse("[DONE]")  # the last text, the end chunks and the sentinel: one write
        except Exception as exc:
            # Headers (200) are already sent: the error travels as the stream's last event, and the caller is told so
            # that the request is not counted as a success.
            error = exc if isinstance(exc, APIError) else server_error()
            if not isinstance(exc, APIError):
                logger.exception("stream for model %s failed", request.model)
            logger.error(
                "stream for model %s failed after it started (status line 200 already sent): HTTP %d %s",
                request.model,
                error.status_code,
                error.message,
            )
            if on_error is not None:
                on_error(error)
            yield sse(error.to_response().model_dump_json())
        finally:
            if not task.done():
                task.cancel()  # the client went away: stop generating for it
