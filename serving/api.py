"""Wire models for the OpenAI-compatible HTTP API (the subset this server implements).

Requests are strict (`extra="forbid"`): a misspelt parameter is a 400 naming it, as the OpenAI API does,
instead of being silently ignored. Parameters that OpenAI clients commonly send with neutral values
(`logprobs: null`, `presence_penalty: 0`, `echo: false` …) are declared so those clients work; a
non-neutral value the server cannot honour yet is rejected with a 400 naming the parameter rather than
ignored. `null` for a parameter with a default means the default, as in the OpenAI API.

Errors travel as :class:`APIError` and leave the server in OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, which the `openai` client turns into typed exceptions.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# Upper bounds that keep one request from monopolising a replica.
MAX_PROMPTS_PER_REQUEST = 32
MAX_CHOICES_PER_PROMPT = 8
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
MAX_PROMPT_CHARS = 200_000  # characters per prompt (or per chat conversation), checked before tokenizing
MAX_MESSAGES = 256


class APIError(Exception):
    """An error with an HTTP status and an OpenAI-shaped body; raised anywhere in request handling."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def to_response(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code))


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 for a request the server understood but will not run."""
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    """A 404 worded like OpenAI's, so clients that match on `code` behave the same against this server."""
    return APIError(
        404,
        f"The model '{model}' does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def server_error(message: str = "The server had an error while processing your request.") -> APIError:
    """A 500 that hides internals from the client; the details go to the replica's log."""
    return APIError(500, message, type="server_error")


def from_validation_errors(errors: Sequence[dict[str, Any]]) -> APIError:
    """Turn FastAPI/pydantic request-validation errors into one 400 naming the offending parameter.

    FastAPI answers these with a 422 and its own body; OpenAI clients expect a 400 with `error.param`.
    """
    if not errors:
        return invalid_request("Invalid request.")
    err = errors[0]
    loc = [p for p in err.get("loc", ()) if p != "body"]
    kind = err.get("type", "")
    if kind == "json_invalid":
        return invalid_request(
            "We could not parse the JSON body of your request: expected a JSON object. "
            f"({err.get('ctx', {}).get('error', 'invalid JSON')})",
            code="invalid_json",
        )
    if not loc:
        if kind == "missing":
            return invalid_request("The request body is missing; send a JSON object.")
        return invalid_request(f"The request body must be a JSON object: {_clean_msg(err)}.")
    param = str(loc[0])
    where = ".".join(str(p) for p in loc)
    if kind == "extra_forbidden":
        return invalid_request(f"Unrecognized request argument supplied: {where}", param=param)
    if kind == "missing":
        return invalid_request(f"Missing required parameter: '{where}'.", param=param)
    return invalid_request(f"Invalid value for '{where}': {_clean_msg(err)}.", param=param)


def _clean_msg(err: dict[str, Any]) -> str:
    msg = str(err.get("msg", "invalid value"))
    # Our own validators raise ValueError; pydantic prefixes those with "Value error, ".
    return msg.removeprefix("Value error, ")


# --------------------------------------------------------------------------------------------- errors


class ErrorDetail(BaseModel):
    message: str = Field(description="What was wrong, for a person.")
    type: str = Field(description="`invalid_request_error` for 4xx caused by the request, `server_error` for 5xx.")
    param: str | None = Field(None, description="The request parameter at fault, when there is one.")
    code: str | None = Field(None, description="A machine-readable code, e.g. `model_not_found`.")


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ----------------------------------------------------------------------------------------- completions


# Parameters where JSON `null` means "use the default" (the OpenAI API treats them that way).
_NULL_MEANS_DEFAULT = (
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "echo",
    "stream",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
)

# Seeds are handed to torch.Generator.manual_seed, which takes a 64-bit value.
_SEED_MIN, _SEED_MAX = -(2**63), 2**63 - 1


class StreamOptions(BaseModel):
    """`stream_options`: only meaningful with `stream: true`."""

    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(
        False, description="Send one last chunk, before `data: [DONE]`, whose `usage` holds the token counts."
    )


class SamplingRequest(BaseModel):
    """What completions and chat completions share: the model, sampling, stop sequences and streaming."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256, description="A model id from `GET /v1/models`.")
    max_tokens: int = Field(16, ge=1, description="Most tokens to generate per choice.")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 decodes greedily; higher samples more freely.")
    top_p: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="Nucleus sampling: keep the smallest set of tokens with this much probability mass.",
    )
    n: int = Field(1, ge=1, le=MAX_CHOICES_PER_PROMPT, description="Choices to generate per prompt.")
    seed: int | None = Field(
        None, ge=_SEED_MIN, le=_SEED_MAX, description="Makes sampling reproducible; choice i uses seed + i."
    )
    stop: str | list[str] | None = Field(
        None, description=f"Up to {MAX_STOP_SEQUENCES} sequences; generation stops before the first one produced."
    )
    stream: bool = Field(False, description="Send the output as server-sent events, chunk by chunk.")
    stream_options: StreamOptions | None = Field(None, description="Only meaningful with `stream`.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Not supported yet; only 0 is accepted.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Not supported yet; only 0 is accepted.")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported yet; only null or {} is accepted.")
    user: str | None = Field(
        None, max_length=256, description="End-user id, recorded for abuse monitoring; does not change output."
    )

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if not (v is None and k in _NULL_MEANS_DEFAULT)}
        return data

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            if isinstance(value, str) and len(value) > MAX_STOP_CHARS:
                raise ValueError(f"a stop sequence may be at most {MAX_STOP_CHARS} characters")
            return value
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            if len(value) > MAX_STOP_SEQUENCES:
                raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(value)}")
            if any(len(s) > MAX_STOP_CHARS for s in value):
                raise ValueError(f"a stop sequence may be at most {MAX_STOP_CHARS} characters")
            return value
        raise ValueError("stop must be a string, a list of strings or null")

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties_yet(cls, value: float) -> float:
        if value != 0:
            raise ValueError("penalties are not supported by this server yet; send 0")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias_yet(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported by this server yet; send null")
        return value

    @property
    def stop_sequences(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return [s for s in stops if s]

    @property
    def include_usage_chunk(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage


def _check_prompt_text(text: str, what: str) -> str:
    if len(text) > MAX_PROMPT_CHARS:
        # Checked before tokenizing: a multi-megabyte body would otherwise cost a replica seconds of CPU.
        raise ValueError(f"{what} is {len(text)} characters, above this server's limit of {MAX_PROMPT_CHARS}")
    return text


class CompletionRequest(SamplingRequest):
    """`POST /v1/completions` body."""

    prompt: str | list[str] = Field(
        description=f"A prompt, or a list of up to {MAX_PROMPTS_PER_REQUEST} prompts; token-id prompts are not "
        "supported."
    )
    echo: bool = Field(False, description="Return the prompt in front of the completion.")
    logprobs: int | None = Field(None, description="Not supported yet; only null is accepted.")
    best_of: int | None = Field(None, ge=1, description="Only null or a value equal to `n` is accepted.")
    suffix: str | None = Field(None, description="Not supported yet; only null or '' is accepted.")

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        # Checked before pydantic's union matching so the message is one clear sentence, not one per branch.
        if isinstance(value, str):
            if not value:
                raise ValueError("prompt must not be empty")
            return _check_prompt_text(value, "prompt")
        if isinstance(value, list) and all(isinstance(p, str) for p in value):
            if not value:
                raise ValueError("prompt must not be an empty list")
            if len(value) > MAX_PROMPTS_PER_REQUEST:
                raise ValueError(f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request, got {len(value)}")
            if any(not p for p in value):
                raise ValueError("prompt must not contain empty strings")
            for p in value:
                _check_prompt_text(p, "a prompt")
            return value
        raise ValueError("prompt must be a string or a list of strings (token-id prompts are not supported)")

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs_yet(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError("logprobs are not supported by this server yet; send null")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix_yet(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix is not supported by this server yet; send null")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_matches_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        # `n` is declared before `best_of`, so it is already validated (absent if it was invalid).
        n = info.data.get("n", 1)
        if value is not None and value != n:
            raise ValueError(f"only null or a value equal to n ({n}) is supported")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] = Field(
        description="`stop`: end-of-text token or a stop sequence; `length`: hit max_tokens."
    )
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage


# ----------------------------------------------------------------------------------------------- models


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "raytrain"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionStreamChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class CompletionChunk(BaseModel):
    """One server-sent event of a streamed completion (same `object` as the non-streamed response, as OpenAI)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    usage: Usage | None = None


# ------------------------------------------------------------------------------------------------- chat


class TextContentPart(BaseModel):
    """`{"type": "text", "text": ...}`: the only content part a text model can take."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One turn of the conversation. Content may be a string or a list of text parts (joined)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextContentPart] = Field(description="The message text, or a list of text parts.")
    name: str | None = Field(None, max_length=64, description="Accepted and ignored, as by most open servers.")

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    """`POST /v1/chat/completions` body. The conversation is rendered with the model's own chat template."""

    messages: list[ChatMessage] = Field(
        min_length=1, max_length=MAX_MESSAGES, description="The conversation so far, oldest first."
    )
    max_completion_tokens: int | None = Field(
        None, ge=1, description="Newer name for `max_tokens`; when both are given this one wins."
    )
    logprobs: bool = Field(False, description="Not supported yet; only false is accepted.")
    top_logprobs: int | None = Field(None, description="Not supported yet; only null is accepted.")

    @field_validator("messages")
    @classmethod
    def _check_messages(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        total = sum(len(m.text) for m in value)
        if total > MAX_PROMPT_CHARS:
            raise ValueError(f"the messages hold {total} characters, above this server's limit of {MAX_PROMPT_CHARS}")
        if not any(m.text for m in value):
            raise ValueError("at least one message must have non-empty content")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs_yet(cls, value: bool) -> bool:
        if value:
            raise ValueError("logprobs are not supported by this server yet; send false")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs_yet(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError("top_logprobs are not supported by this server yet; send null")
        return value

    @model_validator(mode="after")
    def _max_completion_tokens_wins(self) -> ChatCompletionRequest:
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: Usage | None = None
