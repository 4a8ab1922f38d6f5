"""Streamed responses send text at most every `stream_interval_s`, merging a choice's tokens into one chunk.

In-process (no Ray): the service over the real torch engine, read the way the HTTP layer reads it (each yielded
string is one write to the client). What must hold whatever the interval: the text, finish reasons, usage and
log-probabilities add up to the unstreamed answer; the first text is not held back; the end of a stream never waits
for the interval.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from serving.api import ChatCompletionRequest, CompletionRequest
from serving.engine import TorchEngine
from serving.service import OpenAIService
from serving_fixtures import build_tiny_model_dir

MODEL = "tiny"
LONG = 30.0  # far longer than any generation here: only the first text and the end may be sent


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> TorchEngine:
    return TorchEngine(str(build_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))), device="cpu")


def _writes(service: OpenAIService, request: Any) -> list[str]:
    stream = service.complete_stream if isinstance(request, CompletionRequest) else service.chat_stream

    async def collect() -> list[str]:
        return [w async for w in stream(request)]

    return asyncio.run(collect())


def _events(writes: list[str], complete: bool = True) -> list[Any]:
    lines = [line[6:] for line in "".join(writes).split("\n") if line.startswith("data: ")]
    if complete:
        assert lines.pop() == "[DONE]"
    return [json.loads(line) for line in lines]


def test_long_interval_sends_first_text_at_once_and_the_rest_with_the_end(engine: TorchEngine) -> None:
    body = {"model": MODEL, "prompt": ["The cat", "A dog reads"], "n": 2, "max_tokens": 24, "temperature": 0,
            "logprobs": 2, "stream_options": {"include_usage": True}}
    full = asyncio.run(OpenAIService({MODEL: engine}, max_tokens_limit=64).complete(CompletionRequest(**body)))
    service = OpenAIService({MODEL: engine}, max_tokens_limit=64, stream_interval_s=LONG)
    started = time.monotonic()
    writes = _writes(service, CompletionRequest(**body, stream=True))
    assert time.monotonic() - started < LONG / 2  # the end of the stream did not wait for the interval
    # The first write carries generated text (not held back); everything after it comes in the last write.
    assert len(writes) == 2, writes
    assert any(c["text"] for e in _events(writes[:1], complete=False) for c in e["choices"])
    events = _events(writes)
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    logprobs: dict[int, dict[str, list[Any]]] = {}
    for event in events:
        for c in event["choices"]:
            texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            if c["finish_reason"]:
                finish[c["index"]] = c["finish_reason"]
            if c["logprobs"]:
                mine = logprobs.setdefault(c["index"], {k: [] for k in c["logprobs"]})
                for key, values in c["logprobs"].items():
                    mine[key].extend(values)
    assert texts == {c.index: c.text for c in full.choices}
    assert finish == {c.index: c.finish_reason for c in full.choices}
    # Log-probabilities: the same tokens and offsets; values up to float rounding (the batch around a request changes
    # with timing, and with it the rounding of the matrix products).
    want = {c.index: c.logprobs.model_dump() for c in full.choices if c.logprobs}
    assert {i: (lp["tokens"], lp["text_offset"]) for i, lp in logprobs.items()} == {
        i: (lp["tokens"], lp["text_offset"]) for i, lp in want.items()
    }
    for i, lp in logprobs.items():
        assert lp["token_logprobs"] == pytest.approx(want[i]["token_logprobs"], abs=1e-3)
        assert [len(top) for top in lp["top_logprobs"]] == [len(top) for top in want[i]["top_logprobs"]]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == full.usage.model_dump()
    # Tokens that waited for the same write became one chunk per choice, not one per token.
    tokens = full.usage.completion_tokens
    assert len(events) < tokens / 2, (len(events), tokens)


def test_chat_role_once_per_choice_whatever_the_interval(engine: TorchEngine) -> None:
    messages = [{"role": "user", "content": "A dog reads"}]
    body = {"model": MODEL, "messages": messages, "n": 2, "max_tokens": 16, "temperature": 0}
    full = asyncio.run(OpenAIService({MODEL: engine}, max_tokens_limit=64).chat(ChatCompletionRequest(**body)))
    for interval in (0.0, LONG):
        service = OpenAIService({MODEL: engine}, max_tokens_limit=64, stream_interval_s=interval)
        events = _events(_writes(service, ChatCompletionRequest(**body, stream=True)))
        roles: dict[int, int] = {}
        texts: dict[int, str] = {}
        for event in events:
            for c in event["choices"]:
                roles[c["index"]] = roles.get(c["index"], 0) + (c["delta"].get("role") == "assistant")
                texts[c["index"]] = texts.get(c["index"], "") + (c["delta"].get("content") or "")
        assert roles == {0: 1, 1: 1}, interval
        assert texts == {c.index: c.message.content for c in full.choices}, interval


class _LateSecondChoice:
    """The real engine, with the second stream it is asked for held back a moment: the first write then carries only
    the first choice's text, and the second choice's text and end wait for the same later write."""

    def __init__(self, engine: TorchEngine) -> None:
        self._engine = engine
        self._calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def stream(self, *args: Any, **kwargs: Any) -> Any:
        call, self._calls = self._calls, self._calls + 1
        if call == 1:
            await asyncio.sleep(0.3)
        async for item in self._engine.stream(*args, **kwargs):
            yield item


def test_a_choice_that_starts_after_the_first_write_names_its_role_once(engine: TorchEngine) -> None:
    messages = [{"role": "user", "content": "A dog reads"}]
    body = {"model": MODEL, "messages": messages, "n": 2, "max_tokens": 16, "temperature": 0}
    service = OpenAIService({MODEL: _LateSecondChoice(engine)}, max_tokens_limit=64, stream_interval_s=LONG)
    writes = _writes(service, ChatCompletionRequest(**body, stream=True))
    assert {c["index"] for e in _events(writes[:1], complete=False) for c in e["choices"]} == {0}
    roles: dict[int, int] = {}
    for event in _events(writes):
        for c in event["choices"]:
            roles[c["index"]] = roles.get(c["index"], 0) + (c["delta"].get("role") == "assistant")
    assert roles == {0: 1, 1: 1}


def test_interval_zero_streams_as_tokens_come(engine: TorchEngine) -> None:
    body = {"model": MODEL, "prompt": "The cat", "max_tokens": 24, "temperature": 0}
    full = asyncio.run(OpenAIService({MODEL: engine}, max_tokens_limit=64).complete(CompletionRequest(**body)))
    service = OpenAIService({MODEL: engine}, max_tokens_limit=64, stream_interval_s=0.0)
    writes = _writes(service, CompletionRequest(**body, stream=True))
    assert "".join(c["text"] for e in _events(writes) for c in e["choices"]) == full.choices[0].text
    assert len(writes) > 2  # not held back to the end


def test_config_passes_the_interval(tmp_path: Path) -> None:
    from serving.config import ServeAppConfig

    cfg = ServeAppConfig.load({"models": [{"name": "a", "path": "s3://b/m"}], "stream_interval_s": 0})
    assert cfg.stream_interval_s == 0
    with pytest.raises(Exception, match="stream_interval_s"):
        ServeAppConfig.load({"models": [{"name": "a", "path": "s3://b/m"}], "stream_interval_s": -1})
