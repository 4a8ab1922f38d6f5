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
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# Upper bounds that keep one request from monopolising a replica.
MAX_PROMPTS_PER_REQUEST = 32
MAX_CHOICES_PER_PROMPT = 8
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
MAX_PROMPT_CHARS = 200_000  # characters per prompt (or per chat conversation), checked before tokenizing
MAX_MESSAGES = 256
# Top alternatives per position a completion may ask for with `logprobs` (OpenAI allows 5, vLLM 20 by default).
MAX_LOGPROBS = 20
# Log-probabilities below this are reported as this value: JSON has no -Infinity (OpenAI and vLLM do the same).
MIN_LOGPROB = -9999.0


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


# A prompt given as token ids: each id must be a token of the model's vocabulary (checked against the model).
TokenIds = list[Annotated[int, Field(ge=0)]]


def _check_token_ids(value: list[Any], what: str) -> list[int]:
    if not value:
        raise ValueError(f"{what} must not be an empty list of token ids")
    if len(value) > MAX_PROMPT_CHARS:
        raise ValueError(f"{what} has {len(value)} token ids, above this server's limit of {MAX_PROMPT_CHARS}")
    for i, token in enumerate(value):
        # bool is an int in Python, and JSON true/false are no token ids.
        if type(token) is not int or token < 0:
            raise ValueError(f"{what}[{i}] is {token!r}; token ids are non-negative integers")
    return value


class CompletionRequest(SamplingRequest):
    """`POST /v1/completions` body.

    Besides text, `prompt` may be token ids (one list, or a list of lists for a batch), as vLLM and the OpenAI API
    accept them; with `echo` and `logprobs` the response scores the prompt itself, which is how evaluation
    harnesses (lm-evaluation-harness `local-completions`) compute log-likelihoods: `max_tokens: 0, echo: true,
    logprobs: 1` returns every prompt token with its log-probability under the model.
    """

    prompt: str | list[str] | TokenIds | list[TokenIds] = Field(
        description=f"A prompt, or a batch of up to {MAX_PROMPTS_PER_REQUEST} prompts: a string, a list of strings, "
        "a list of token ids, or a list of lists of token ids. Each prompt gets `n` choices; choice `k*n + i` is "
        "choice i of prompt k. Token ids must be below the model's vocabulary size (see `GET /tokenizer_info`, "
        "`POST /tokenize`); an id out of range is a 400 naming its index."
    )
    max_tokens: int = Field(
        16, ge=0, description="Most tokens to generate per choice. 0 is allowed only with `echo` (scores the prompt)."
    )
    echo: bool = Field(
        False,
        description="Return the prompt in front of the completion; with `logprobs`, the prompt's tokens and their "
        "log-probabilities come first in `logprobs` (the first prompt token has none: null).",
    )
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        description=f"Report log-probabilities: for every token the model produced (and with `echo`, every prompt "
        f"token), its log-probability and the `logprobs` most likely tokens at that position, plus the chosen one "
        f"(so up to logprobs+1 entries). 0 to {MAX_LOGPROBS}. Values are the model's own log-softmax in float32, "
        f"before temperature or top_p; below {MIN_LOGPROB} they are reported as {MIN_LOGPROB}.",
    )
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
        if not isinstance(value, list) or not value:
            raise ValueError(
                "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids "
                "(and not empty)"
            )
        if all(isinstance(p, list) for p in value) or all(isinstance(p, str) for p in value):
            if len(value) > MAX_PROMPTS_PER_REQUEST:
                raise ValueError(f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request, got {len(value)}")
            for k, p in enumerate(value):
                if isinstance(p, list):
                    _check_token_ids(p, f"prompt[{k}]")
                elif not p:
                    raise ValueError("prompt must not contain empty strings")
                else:
                    _check_prompt_text(p, "a prompt")
            return value
        if all(isinstance(p, int) for p in value):
            return _check_token_ids(value, "prompt")
        raise ValueError(
            "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids, not a mix"
        )

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
    def prompts(self) -> list[str | list[int]]:
        """The batch: each prompt as text or as token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [list(self.prompt)]  # type: ignore[arg-type]  # one token-id prompt
        return list(self.prompt)  # type: ignore[arg-type]


class CompletionLogprobs(BaseModel):
    """`choices[].logprobs` of a completion (OpenAI's legacy shape): four lists, one entry per token.

    With `echo` the prompt's tokens come first. `text_offset[i]` is where token i starts, counted as the summed
    lengths of the `tokens` strings before it in this choice (vLLM's convention; special tokens count with their
    own text).
    """

    tokens: list[str] = Field(description="Each token's text on its own.")
    token_logprobs: list[float | None] = Field(
        description="Each token's log-probability given everything before it; null for the first prompt token."
    )
    top_logprobs: list[dict[str, float] | None] = Field(
        description="Per position, the `logprobs` most likely tokens and the chosen one, {token text: logprob}; "
        "null for the first prompt token."
    )
    text_offset: list[int] = Field(description="Character offset of each token (see above).")


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] = Field(
        description="`stop`: end-of-text token or a stop sequence; `length`: hit max_tokens."
    )
    logprobs: CompletionLogprobs | None = Field(None, description="Set when the request asked for `logprobs`.")


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
    id: str = Field(description="The public model id, what requests pass as `model`.")
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "raytrain"
    max_model_len: int | None = Field(None, description="Most tokens (prompt + completion) one sequence may hold.")
    version: str | None = Field(None, description="The registry version served under this id, when configured.")
    alias: str | None = Field(None, description="The registry alias (e.g. `champion`) it was resolved from.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionStreamChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: CompletionLogprobs | None = Field(
        None, description="The tokens this chunk covers; concatenated over a choice's chunks, the same as unstreamed."
    )


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


# ------------------------------------------------------------------------------------------ tokenization
# The shapes of vLLM's `/tokenize`, `/detokenize` and `/tokenizer_info` (same field names), which clients such as
# lm-evaluation-harness (`tokenizer_backend=remote`) use to tokenize exactly as the server does.


class TokenizeRequest(BaseModel):
    """`POST /tokenize` body: a text `prompt`, or chat `messages` rendered with the model's chat template first."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, max_length=256, description="A model id; may be left out when the server serves one model."
    )
    prompt: str | None = Field(
        None, max_length=MAX_PROMPT_CHARS, description="Text to tokenize (send this or `messages`)."
    )
    messages: list[ChatMessage] | None = Field(
        None,
        min_length=1,
        max_length=MAX_MESSAGES,
        validate_default=True,
        description="A conversation to render with the chat template, then tokenize (send this or `prompt`).",
    )
    add_special_tokens: bool | None = Field(
        None,
        description="Add the tokenizer's special tokens (e.g. BOS) as a completion would. Default: true for "
        "`prompt`, false for `messages` (the chat template already writes them), as vLLM.",
    )
    add_generation_prompt: bool = Field(
        True, description="With `messages`: end with the opening of the assistant's turn, as chat completions do."
    )
    return_token_strs: bool = Field(False, description="Also return each token's vocabulary string (`token_strs`).")

    @field_validator("messages")
    @classmethod
    def _exactly_one_input(cls, value: list[ChatMessage] | None, info: ValidationInfo) -> list[ChatMessage] | None:
        # `prompt` is declared first; it is absent from `data` only when it was itself invalid (already reported).
        if "prompt" not in info.data:
            return value
        has_prompt = info.data["prompt"] is not None
        if has_prompt == (value is not None):
            raise ValueError("send exactly one of `prompt` and `messages`")
        return value


class TokenizeResponse(BaseModel):
    count: int = Field(description="Number of tokens.")
    max_model_len: int = Field(description="The model's context window in tokens.")
    tokens: list[int] = Field(description="The token ids.")
    token_strs: list[str] | None = Field(None, description="Each token's vocabulary string, if asked for.")


class DetokenizeRequest(BaseModel):
    """`POST /detokenize` body."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, max_length=256, description="A model id; may be left out when the server serves one model."
    )
    tokens: TokenIds = Field(
        max_length=MAX_PROMPT_CHARS, description="Token ids to turn into text (special tokens are kept)."
    )


class DetokenizeResponse(BaseModel):
    prompt: str = Field(description="The text of the tokens.")


class TokenizerInfoResponse(BaseModel):
    """`GET /tokenizer_info`: the tokenizer's configuration, as its `tokenizer_config.json` holds it (file paths
    left out), plus `tokenizer_class`. Fields beyond those listed come through as the tokenizer has them."""

    model_config = ConfigDict(extra="allow")

    tokenizer_class: str = Field(description="The transformers tokenizer class.")
    eos_token: str | None = Field(None, description="End-of-text token.")
    bos_token: str | None = Field(None, description="Beginning-of-text token, if the tokenizer has one.")
    pad_token: str | None = Field(None, description="Padding token.")
    chat_template: str | None = Field(None, description="The Jinja chat template, if the model has one.")
    model_max_length: int | None = Field(
        None, description="The tokenizer's length limit; the model's context window when the tokenizer sets none."
    )
