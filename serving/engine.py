"""Generation engines behind one small protocol.

The HTTP layer (`serving.service`, `serving.app`) only knows :class:`Engine`; `TorchEngine` runs a
Hugging Face checkpoint with torch on CPU or one GPU, and a vLLM-backed engine for GPU clusters can slot
in beside it without touching the API code. torch and transformers are imported inside `TorchEngine` so
that importing this module (and validating configs) stays fast.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import shutil
import tempfile
import threading
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from serving.detokenizer import IncrementalDetokenizer

if TYPE_CHECKING:
    from serving.config import FaultInjection

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]

# ChatML end-of-turn marker, the chat format raytrain exports its tokenizers with.
IM_END = "<|im_end|>"


# Log-probabilities below this are reported as this value: JSON cannot carry -inf (OpenAI and vLLM clip the same way).
MIN_LOGPROB = -9999.0


# Prompts whose token ids the engine keeps (see TorchEngine._encode).
_RECENT_PROMPTS = 64


@dataclass(frozen=True)
class TokenLogprob:
    """One position of a sequence: the token there, its log-probability given what precedes it, and the most likely
    tokens at that position (the k asked for, then the token itself if it is not among them)."""

    token_id: int
    token: str  # the token's text on its own, special tokens shown
    logprob: float | None  # None for a prompt's first token: nothing precedes it
    top: tuple[tuple[str, float], ...] | None  # (text, logprob), most likely first; None where logprob is None


@dataclass(frozen=True)
class GenerationResult:
    """One completion: the text returned to the client and the token counts billed for it."""

    text: str
    prompt_tokens: int
    # Every token the model produced, including an end-of-text token or the tokens of a stop sequence
    # that were cut from `text`: that is the work done, and what usage reports.
    completion_tokens: int
    finish_reason: FinishReason
    # With `logprobs`: one entry per produced token (the same tokens as completion_tokens counts).
    logprobs: tuple[TokenLogprob, ...] | None = None
    # With `prompt_logprobs`: one entry per prompt token, the first without a log-probability.
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
    # The ids `completion_tokens` counts, in order (an end-of-text token included), as vLLM's `token_ids`.
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class TextDelta:
    """A piece of a completion's text, streamed as soon as it can no longer turn into a stop sequence.

    With `logprobs`, it carries the entries of the tokens produced since the previous delta: a token's entry travels
    with the first text that includes it, and entries whose text never appears (an end-of-text token, a cut stop
    sequence) come in a last delta with empty text.
    """

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class PromptLogprobs:
    """With `prompt_logprobs`: the prompt's entries, streamed once before any text, as soon as the prompt is read."""

    logprobs: tuple[TokenLogprob, ...]


StreamItem = TextDelta | PromptLogprobs | GenerationResult


class NoChatTemplateError(ValueError):
    """The model's tokenizer carries no chat template, so a conversation cannot be rendered for it."""


class InjectedFault(RuntimeError):
    """The failure a test asked for with :class:`~serving.config.FaultInjection`; never raised otherwise."""


class TokenIdError(ValueError):
    """A token-id prompt holds an id outside the model's vocabulary."""

    def __init__(self, index: int, token: int, vocab_size: int) -> None:
        self.index = index
        super().__init__(f"token id {token} at index {index} is outside the vocabulary (ids 0 to {vocab_size - 1})")


class ContextWindowError(ValueError):
    """Prompt plus requested completion do not fit the model's context window."""

    def __init__(self, prompt_tokens: int, max_tokens: int, context_length: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context_length = context_length
        super().__init__(
            f"This model's maximum context length is {context_length} tokens, however you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in your prompt; {max_tokens} for the "
            "completion). Please reduce your prompt or completion length."
        )


@runtime_checkable
class Engine(Protocol):
    """What the API layer needs from a model backend.

    `stream` is the serving path: an async iterator of :class:`TextDelta` ending with one
    :class:`GenerationResult` (and, when prompt log-probabilities are asked for, one :class:`PromptLogprobs`
    first), safe to run for many requests at once (the engine batches them). `generate` is the same work, blocking,
    for callers without an event loop; it is safe to call from several threads at once.

    A prompt is text or token ids. `logprobs=k` reports, for every produced token, its log-probability and the k
    most likely tokens at its position; `prompt_logprobs=k` does the same for the prompt's tokens. Both are the
    model's log-softmax in float32, before temperature and top-p. `max_tokens=0` reads the prompt and produces
    nothing (finish reason `length`): with `prompt_logprobs`, that scores a text.
    """

    @property
    def context_length(self) -> int:
        """Most tokens (prompt + completion) one sequence may hold."""
        ...

    @property
    def vocab_size(self) -> int:
        """Token ids a prompt may hold are 0 … vocab_size - 1."""
        ...

    def count_tokens(self, text: str) -> int:
        """Prompt tokens `generate` would feed the model for `text` (same special tokens)."""
        ...

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, exactly what a text prompt is fed to the model as."""
        ...

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """The text of `token_ids`, special tokens kept (what echoing a token-id prompt shows)."""
        ...

    def token_strs(self, token_ids: Sequence[int]) -> list[str]:
        """Each id's string in the vocabulary (e.g. `Ġcat` for byte-level BPE)."""
        ...

    def tokenizer_info(self) -> dict[str, Any]:
        """The tokenizer's configuration (its tokenizer_config.json, JSON-safe, no file paths) and class name."""
        ...

    def apply_chat_template(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation (`[{role, content}]`), ending where the assistant's turn starts
        (unless `add_generation_prompt` is false).

        Raises :class:`NoChatTemplateError` when the model has none.
        """
        ...

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
    ) -> GenerationResult:
        """Complete `prompt`. temperature 0 is greedy; with a seed, sampling is reproducible.

        The returned text ends before the first stop sequence. Raises :class:`ContextWindowError` when
        prompt tokens + max_tokens exceed `context_length`, :class:`TokenIdError` for an id outside the vocabulary.
        """
        ...

    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
    ) -> AsyncIterator[StreamItem]:
        """`generate` as it happens: prompt log-probabilities if asked for, text deltas, then the final result (whose
        text is the whole completion).

        Raises :class:`ContextWindowError` before yielding anything when the request does not fit. Closing the
        iterator early cancels the generation.
        """
        ...

    def queue_depth(self) -> int:
        """Requests accepted but not yet generating (waiting for a batch slot)."""
        ...


def load_engine(
    path: str, device: str = "auto", max_batch_size: int = 16, fault_injection: FaultInjection | None = None
) -> Engine:
    """The engine for a model directory; the one place that chooses a backend."""
    return TorchEngine(path, device=device, max_batch_size=max_batch_size, fault_injection=fault_injection)


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop sequence in `text` begins, or None."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _is_uri(path: str) -> bool:
    return "://" in path


def _copy_to_local(uri: str, dest: Path) -> None:
    """Copy an object-store (or file://) directory to `dest` with pyarrow.fs, which speaks s3/gs/abfs/hdfs."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    info = fs.get_file_info(root)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"model directory not found: {uri}")
    pafs.copy_files(root, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


# A request's whole state inside the engine: what to generate, how, and where its output goes.
@dataclass(eq=False)
class _Sequence:
    prompt_ids: list[int]
    max_tokens: int
    warpers: Any  # LogitsProcessorList, or None for greedy decoding
    generator: Any  # torch.Generator: each request samples from its own, so seeds never interfere
    stops: list[str]
    emit: Callable[[StreamItem | BaseException], None]
    detokenizer: IncrementalDetokenizer
    logprobs: int | None = None  # top-k to report for each produced token; None: no log-probabilities
    prompt_logprobs: int | None = None  # the same for the prompt's tokens
    prompt_lps: tuple[TokenLogprob, ...] | None = None
    lps: list[TokenLogprob] = field(default_factory=list)  # one per produced token, with `logprobs`
    lps_sent: int = 0  # entries of `lps` already attached to a streamed delta
    produced: list[int] = field(default_factory=list)  # every sampled id, end-of-text included
    sent: list[str] = field(default_factory=list)  # text pieces already emitted as deltas, in order
    # Decoded text not yet emitted: at most the longest stop sequence minus one character, which could still turn
    # into a stop sequence with the next token.
    pending: str = ""
    cancelled: bool = False  # set by the consumer (client went away); the engine drops the row
    faulty: bool = False  # test-only: its prompt carries the FaultInjection marker
    stream_text: bool = True  # False (batch generation): no per-token text, the result's text decoded once
    # Streams consumed on an event loop: what the scheduler emits waits in `outbox` and reaches `loop` with the rest
    # of its forward pass's output, in one hand-off (see TorchEngine._flush_outbox); `emit` then runs on that loop.
    loop: asyncio.AbstractEventLoop | None = None
    outbox: list[tuple[_Sequence, StreamItem | BaseException]] | None = None

    @property
    def hold(self) -> int:
        """Characters held back from streaming while the next token might complete a stop sequence."""
        return max((len(s) for s in self.stops), default=1) - 1


@dataclass(eq=False)
class _Batch:
    """Sequences decoding together: a shared KV cache, left-padded, and what each row feeds next.

    Row i of every tensor belongs to `seqs[i]`. The cache holds everything but the last sampled token of each
    row (`next_ids`), which the next step feeds. Padding columns are masked out in `mask`.
    """

    seqs: list[_Sequence]
    cache: Any  # transformers DynamicCache: per layer keys/values of shape (batch, heads, cached_len, head_dim)
    mask: Any  # (batch, cached_len) 1 = real token, 0 = left padding
    next_ids: Any  # (batch, 1)
    positions: Any  # (batch, 1) position id of next_ids in each row's own sequence


class TorchEngine:
    """A transformers causal LM served with torch, batching concurrent requests.

    One scheduler thread owns the model. Requests queue up; at every decode step the scheduler admits waiting
    requests into the running batch (up to `max_batch_size` rows), prefilling the newcomers together and
    splicing their KV caches into the batch's cache (left-padded to a common length, padding masked out), then
    runs one forward pass for all rows. Finished rows leave the batch at once, so a short request never waits
    for a long one: continuous batching, in the spirit of vLLM's scheduler but over transformers' own
    `DynamicCache`. On CPU the win is that one matrix multiply over B rows costs far less than B of them; on GPU
    it is the difference between a busy and an idle device.

    The decode loop is our own rather than `model.generate` because each request keeps its own sampling
    parameters and `torch.Generator` (a seeded request gives the same text alone or in a batch, up to float
    rounding), and because tokens stream out as they are sampled. Sampling uses transformers' logits warpers.

    A failure belongs to the requests it came from. A forward pass that raises has sampled and sent nothing yet,
    so it is retried one request at a time: a failed prefill re-runs each newcomer alone; a failed decode step first
    restores the shared KV cache (DynamicCache appends by concatenation, so the tensors from before the step are
    intact) and then runs each row alone from its own slice of it. Rows that fail alone are failed; the others
    carry on, batched again. An error while sampling or detokenizing one row fails that row only. Detokenization
    is incremental (:mod:`serving.detokenizer`), so the work per token does not grow with the completion.

    `fault_injection` is test-only (see :class:`~serving.config.FaultInjection`).
    """

    def __init__(
        self,
        path: str,
        device: Literal["auto", "cpu", "cuda"] | str = "auto",
        max_batch_size: int = 16,
        fault_injection: FaultInjection | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.path = path
        self.device = self._resolve_device(device)
        self.max_batch_size = max_batch_size
        self._fault = fault_injection
        if fault_injection is not None:
            logger.warning("TEST-ONLY fault injection is on: prompts containing its marker fail (%s)", fault_injection)
        tmp: str | None = None
        try:
            if _is_uri(path):
                tmp = tempfile.mkdtemp(prefix="raytrain-serve-")
                logger.info("copying model %s to %s", path, tmp)
                _copy_to_local(path, Path(tmp))
                local = Path(tmp)
            else:
                local = Path(path).expanduser()
            if not (local / "config.json").is_file():
                raise FileNotFoundError(f"not a Hugging Face model directory (no config.json): {path}")
            self._tokenizer = AutoTokenizer.from_pretrained(str(local))
            # float32 on CPU: bf16 matmuls are slow on most CPUs; on GPU keep the dtype the checkpoint was saved in.
            dtype: Any = torch.float32 if self.device.type == "cpu" else "auto"
            self._model = AutoModelForCausalLM.from_pretrained(str(local), dtype=dtype).to(self.device).eval()
        finally:
            if tmp is not None:
                # Weights are in memory now; a replica should not keep a second copy on its disk.
                shutil.rmtree(tmp, ignore_errors=True)

        self._context_length = self._find_context_length()
        self._eos_ids = self._find_eos_ids()
        pad = self._tokenizer.pad_token_id
        self._pad_id = int(pad) if pad is not None else min(self._eos_ids, default=0)
        # Fast tokenizers may mutate their padding/truncation state per call: one caller at a time.
        self._tok_lock = threading.Lock()
        # The Rust tokenizer under a fast tokenizer (None for a Python one): what `_ids` encodes with directly.
        self._backend: Any = getattr(self._tokenizer, "backend_tokenizer", None) if self._tokenizer.is_fast else None
        # The last prompts' token ids: the server counts a prompt's tokens to check its limits, then submits the same
        # text; both read this instead of running the tokenizer twice per request.
        self._recent_ids: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._detok_decode = self._make_detok_decode()
        self._token_text_decode = self._make_detok_decode(skip_special_tokens=False)
        self._token_texts: dict[int, str] = {}  # id -> its text alone, filled as log-probabilities need them
        # Ids the model can read and the tokenizer can write: an embedding padded beyond the tokenizer has rows
        # no text maps to, and a tokenizer larger than the embedding would index past it.
        self._vocab_size = min(len(self._tokenizer), int(self._model.get_input_embeddings().weight.shape[0]))
        self._cv = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        # Output of the current forward pass for streams consumed on event loops; only the scheduler thread touches it.
        self._outbox: list[tuple[_Sequence, StreamItem | BaseException]] = []
        self._scheduler = threading.Thread(target=self._run, name="torch-engine-scheduler", daemon=True)
        self._scheduler.start()
        logger.info(
            "loaded %s on %s (%d parameters, context %d, batches of up to %d)",
            path,
            self.device,
            sum(p.numel() for p in self._model.parameters()),
            self._context_length,
            max_batch_size,
        )

    @staticmethod
    def _resolve_device(device: str) -> Any:
        import torch

        if device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but this process sees no GPU (did the replica reserve one?)")
        return torch.device(device)

    def _find_context_length(self) -> int:
        config = self._model.config
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(config, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        # Tokenizers without a limit report a huge sentinel (int(1e30)); only trust a plausible value.
        limit = getattr(self._tokenizer, "model_max_length", None)
        if isinstance(limit, int) and 0 < limit < 10_000_000:
            return limit
        raise ValueError(f"cannot tell the context length of {self.path}: config has no max_position_embeddings")

    def _find_eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for source in (self._tokenizer.eos_token_id, getattr(self._model.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(int(i) for i in source)
        # ChatML's end-of-turn token ends a generation too: an assistant turn is over when the model closes it.
        im_end = self._tokenizer.get_vocab().get(IM_END)
        if im_end is not None:
            ids.add(int(im_end))
        return frozenset(ids)

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def count_tokens(self, text: str) -> int:
        return len(self._encode(text))

    def _encode(self, text: str) -> list[int]:
        with self._tok_lock:
            ids = self._recent_ids.get(text)
            if ids is None:
                ids = tuple(self._ids(text, add_special_tokens=True))
                self._recent_ids[text] = ids
                if len(self._recent_ids) > _RECENT_PROMPTS:
                    self._recent_ids.popitem(last=False)
            return list(ids)

    def _ids(self, text: str, add_special_tokens: bool) -> list[int]:
        """Token ids of `text` (the caller holds `_tok_lock`).

        A fast tokenizer's `__call__` sets the Rust tokenizer's truncation, padding and special-token splitting for
        the call, encodes, then builds a `BatchEncoding`: at 16 concurrent streams that wrapper was a fifth of the
        replica event loop's own work, holding the interpreter lock the engine's scheduler thread needs. When the Rust
        tokenizer is already in the state a plain call would set (no truncation, no padding, the wrapper's
        special-token splitting), it encodes the text itself, to the same ids; otherwise the wrapper runs.
        """
        backend = self._backend
        if (
            backend is not None
            and backend.truncation is None
            and backend.padding is None
            and backend.encode_special_tokens == bool(getattr(self._tokenizer, "split_special_tokens", False))
        ):
            return list(backend.encode(text, add_special_tokens=add_special_tokens).ids)
        return list(self._tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        with self._tok_lock:
            return self._ids(text, add_special_tokens)

    def _check_ids(self, token_ids: Sequence[int]) -> list[int]:
        ids = [int(t) for t in token_ids]
        for i, token in enumerate(ids):
            if not 0 <= token < self._vocab_size:
                raise TokenIdError(i, token, self._vocab_size)
        return ids

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return self._token_text_decode(self._check_ids(token_ids))

    def token_strs(self, token_ids: Sequence[int]) -> list[str]:
        ids = self._check_ids(token_ids)
        with self._tok_lock:
            return [str(t) for t in self._tokenizer.convert_ids_to_tokens(ids)]

    def tokenizer_info(self) -> dict[str, Any]:
        from transformers import AddedToken

        def json_safe(value: Any) -> Any:
            if isinstance(value, AddedToken):
                return value.content
            if isinstance(value, dict):
                return {str(k): json_safe(v) for k, v in value.items() if _is_json_safe_or_container(v)}
            if isinstance(value, (list, tuple)):
                return [json_safe(v) for v in value if _is_json_safe_or_container(v)]
            return value

        config = dict(getattr(self._tokenizer, "init_kwargs", None) or {})
        # File paths say where the replica keeps its copy (often a temp dir): no use to a client, and internal.
        for key in ("vocab_file", "merges_file", "tokenizer_file", "name_or_path"):
            config.pop(key, None)
        info = {k: json_safe(v) for k, v in config.items() if _is_json_safe_or_container(v)}
        info["tokenizer_class"] = type(self._tokenizer).__name__
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            # From the loaded tokenizer: a config may spell these as {"content": ...} objects, and clients want text.
            value = getattr(self._tokenizer, name, None)
            if value is not None:
                info[name] = str(value)
        template = getattr(self._tokenizer, "chat_template", None)
        if isinstance(template, str):
            info["chat_template"] = template
        limit = info.get("model_max_length")
        # Tokenizers without a limit carry a huge sentinel (int(1e30)) that many JSON readers cannot hold.
        if not isinstance(limit, int) or not 0 < limit < 10_000_000:
            info["model_max_length"] = self._context_length
        return info

    def _token_text(self, token: int) -> str:
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self._token_text_decode([token])
        return text

    def _entries(self, logprobs: Any, tokens: Sequence[int], k: int) -> list[TokenLogprob]:
        """Reports for positions whose float32 log-softmax rows are `logprobs` (positions, vocab) and whose tokens
        are `tokens`: one batched gather and top-k, then plain Python."""
        import torch

        index = torch.tensor(list(tokens), device=logprobs.device).unsqueeze(-1)  # (positions, 1)
        chosen = logprobs.gather(-1, index).squeeze(-1).tolist()
        if k > 0:
            values, ids = logprobs.topk(k, dim=-1)  # (positions, k), most likely first
            top_values, top_ids = values.tolist(), ids.tolist()
        else:
            top_values, top_ids = [[] for _ in tokens], [[] for _ in tokens]
        out = []
        for token, lp, values_i, ids_i in zip(tokens, chosen, top_values, top_ids, strict=True):
            lp = max(lp, MIN_LOGPROB)
            top = [(self._token_text(t), max(v, MIN_LOGPROB)) for t, v in zip(ids_i, values_i, strict=True)]
            if token not in ids_i:
                top.append((self._token_text(token), lp))  # OpenAI always reports the chosen token too
            out.append(TokenLogprob(token, self._token_text(token), lp, tuple(top)))
        return out

    def _prompt_entries(self, logits: Any, ids: Sequence[int], k: int) -> tuple[TokenLogprob, ...]:
        """Entries for a prompt from the logits over it, (len(ids), vocab): position i predicts token i + 1."""
        import torch

        logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)  # (len(ids) - 1, vocab)
        first = TokenLogprob(ids[0], self._token_text(ids[0]), None, None)
        return (first, *self._entries(logprobs, ids[1:], k))

    def _new_detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self._detok_decode)

    def _make_detok_decode(self, skip_special_tokens: bool = True) -> Callable[[Sequence[int]], str]:
        """The decode function of the scheduler thread's detokenizers.

        A private copy of the Rust tokenizer: the scheduler decodes every step without waiting for (or blocking) the
        request threads that encode prompts under `_tok_lock`. Special tokens are skipped, as in the API's output
        (kept with `skip_special_tokens=False`: the texts of single tokens in log-probability reports).
        """
        backend = getattr(self._tokenizer, "backend_tokenizer", None)
        if backend is not None:
            from tokenizers import Tokenizer

            private = Tokenizer.from_str(backend.to_str())
            return lambda ids: private.decode(list(ids), skip_special_tokens=skip_special_tokens)

        def decode(ids: Sequence[int]) -> str:  # a slow (Python) tokenizer: shared, so under the lock
            with self._tok_lock:
                return str(self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))

        return decode

    def apply_chat_template(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not getattr(self._tokenizer, "chat_template", None):
            raise NoChatTemplateError(f"the tokenizer of {self.path} has no chat template")
        with self._tok_lock:
            return str(
                self._tokenizer.apply_chat_template(
                    list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
                )
            )

    def queue_depth(self) -> int:
        return len(self._waiting)

    # ------------------------------------------------------------------------------------------ requests

    def _submit(
        self,
        prompt: str | Sequence[int],
        emit: Callable[[StreamItem | BaseException], None],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop: Sequence[str],
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        stream_text: bool = True,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> _Sequence:
        import torch
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopPLogitsWarper,
        )

        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        for name, k in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if k is not None and not 0 <= k <= self._vocab_size:
                raise ValueError(f"{name} must be between 0 and the vocabulary size, got {k}")
        ids = self._encode(prompt) if isinstance(prompt, str) else self._check_ids(prompt)
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
        if len(ids) + max_tokens > self._context_length:
            raise ContextWindowError(len(ids), max_tokens, self._context_length)
        warpers = None
        if temperature != 0:
            warpers = LogitsProcessorList()
            if temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(temperature))
            if top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p))
        generator = torch.Generator(device=self.device)
        if seed is not None:
            generator.manual_seed(seed % 2**64)  # manual_seed takes an unsigned 64-bit value
        else:
            generator.seed()
        seq = _Sequence(
            ids,
            max_tokens,
            warpers,
            generator,
            [s for s in stop if s],
            emit,
            self._new_detokenizer(),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            stream_text=stream_text,
            loop=loop,
            outbox=self._outbox if loop is not None else None,
        )
        if self._fault is not None:
            text = prompt if isinstance(prompt, str) else self._detok_decode(ids)
            seq.faulty = self._fault.prompt_marker in text
        with self._cv:
            self._waiting.append(seq)
            self._cv.notify()
        return seq

    def generate(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
    ) -> GenerationResult:
        out: queue.SimpleQueue[StreamItem | BaseException] = queue.SimpleQueue()
        self._submit(
            prompt,
            out.put,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
        while True:
            item = out.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, GenerationResult):
                return item

    async def stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
    ) -> AsyncIterator[StreamItem]:
        out: asyncio.Queue[StreamItem | BaseException] = asyncio.Queue()
        seq = self._submit(
            prompt,
            out.put_nowait,  # runs on this loop: the scheduler hands items over in batches (_flush_outbox)
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            loop=asyncio.get_running_loop(),
        )
        try:
            while True:
                item = await out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, GenerationResult):
                    return
        finally:
            # The consumer stopped early (client disconnected, error upstream): free the batch slot.
            seq.cancelled = True

    def generate_many(
        self,
        prompts: Sequence[str | Sequence[int]],
        *,
        max_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seeds: Sequence[int | None],
    ) -> list[GenerationResult]:
        """Complete every prompt as one batch (prompt i seeded with `seeds[i]`): every sequence is queued before the
        scheduler admits any, so the batch's make-up, and its float rounding, is the same on every call, and no text
        streams (each result's text is decoded once). What RL rollouts need; `generate` is the per-request path."""
        out: queue.SimpleQueue[tuple[int, StreamItem | BaseException]] = queue.SimpleQueue()
        with self._cv:  # reentrant: _submit takes it again
            for k, prompt in enumerate(prompts):
                self._submit(prompt, lambda item, k=k: out.put((k, item)), max_tokens=max_tokens,
                             temperature=temperature, top_p=top_p, seed=seeds[k], stop=(), stream_text=False)
        results: dict[int, GenerationResult] = {}
        while len(results) < len(prompts):
            k, item = out.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, GenerationResult):
                results[k] = item
        return [results[k] for k in range(len(prompts))]

    def update_weights(self, weights: dict[str, Any]) -> int:
        """Copy `weights` (name -> tensor, this model's state-dict names) into the model in place; returns the bytes
        read. Holds the scheduler off while it copies (RL syncs weights between batches, never during one)."""
        import torch

        with self._cv, torch.no_grad():
            own = self._model.state_dict()
            missing = [k for k in own if k not in weights and not k.endswith("rotary_emb.inv_freq")]
            if missing:
                raise KeyError(f"the new weights lack {len(missing)} tensors of the model, e.g. {missing[:3]}")
            n = 0
            for name, tensor in own.items():
                if name in weights:
                    tensor.copy_(weights[name].to(tensor.device, tensor.dtype))
                    n += weights[name].numel() * weights[name].element_size()
        return n

    def eos_token_ids(self) -> list[int]:
        """Ids that end a completion."""
        return sorted(self._eos_ids)

    # ----------------------------------------------------------------------------------------- scheduler

    def _run(self) -> None:
        batch: _Batch | None = None
        while True:
            with self._cv:
                while not self._waiting and batch is None:
                    self._cv.wait()
                room = self.max_batch_size - (len(batch.seqs) if batch else 0)
                newcomers = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            newcomers = [s for s in newcomers if not s.cancelled]
            try:
                batch = self._step(batch, newcomers)
            finally:
                self._flush_outbox()

    def _step(self, batch: _Batch | None, newcomers: list[_Sequence]) -> _Batch | None:
        """One scheduler iteration: a decode step for the running batch, then the newcomers' prefill joining it."""
        import torch

        try:
            with torch.inference_mode():
                if batch is not None:
                    batch = self._decode_isolating(batch)
                    self._flush_outbox()  # this step's tokens leave before the newcomers' prefill runs
                if newcomers:
                    fresh = self._prefill_isolating(newcomers)
                    if batch is None:
                        batch = fresh
                    elif fresh is not None:
                        batch = self._merge(batch, fresh)
        except Exception as exc:
            # Only what cannot be pinned on a request gets here (reshaping the batch after rows were sampled):
            # it fails the requests in the batch, never the scheduler.
            failed = [s for s in (batch.seqs if batch else []) + newcomers if not s.cancelled]
            logger.exception("batch bookkeeping failed; failing %d request(s)", len(failed))
            for seq in failed:
                _safe_emit(seq, exc)
            batch = None
        return batch

    def _flush_outbox(self) -> None:
        """Hand what the last forward pass produced for streams to their event loops: one wake-up per loop per step
        instead of one per token, so a loop serving many streams runs once per step and leaves the scheduler thread
        the interpreter (GIL) for the rest of it."""
        if not self._outbox:
            return
        items = self._outbox[:]
        self._outbox.clear()
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Sequence, StreamItem | BaseException]]] = {}
        for seq, item in items:
            assert seq.loop is not None  # only streams consumed on a loop have an outbox
            by_loop.setdefault(seq.loop, []).append((seq, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # the consumer's loop is closed (the client hung up and the replica moved on)
                for seq, _ in batch:
                    seq.cancelled = True

    def _fail(self, seqs: Sequence[_Sequence], exc: BaseException) -> None:
        for seq in seqs:
            if not seq.cancelled:
                _safe_emit(seq, exc)
            seq.cancelled = True

    def _forward(self, seqs: Sequence[_Sequence], **inputs: Any) -> tuple[Any, Any, list[int]]:
        """One forward pass for `seqs`: (model output, last-position logits as float, greedy ids).

        Any failure is raised as :class:`_ForwardFailed`: nothing was sampled or sent for these rows yet, so the
        caller may retry them.
        """
        try:
            if self._fault is not None:
                hit = [s for s in seqs if s.faulty and len(s.produced) == self._fault.at_token]
                if hit:
                    raise InjectedFault(
                        f"injected fault (test-only) in a forward pass of {len(seqs)} row(s), "
                        f"{len(hit)} of them marked, after {self._fault.at_token} token(s)"
                    )
            out = self._model(**inputs, use_cache=True)
            logits = out.logits[:, -1, :].float()  # (batch, vocab)
            return out, logits, logits.argmax(dim=-1).tolist()
        except Exception as exc:
            raise _ForwardFailed() from exc

    def _prefill_isolating(self, seqs: list[_Sequence]) -> _Batch | None:
        """Prefill newcomers together; if that fails, each alone, failing only those that fail alone."""
        try:
            return self._prefill(seqs)
        except _ForwardFailed as failed:
            cause = failed.__cause__ or failed
            if len(seqs) == 1:
                logger.error("prefill failed; failing its request: %r", cause, exc_info=cause)
                self._fail(seqs, cause)
                return None
            logger.warning("prefill of %d requests failed (%r); retrying each alone", len(seqs), cause)
        batch: _Batch | None = None
        for seq in seqs:
            try:
                alone = self._prefill([seq])
            except _ForwardFailed as failed:
                cause = failed.__cause__ or failed
                logger.error("prefill failed for one request alone; failing it: %r", cause, exc_info=cause)
                self._fail([seq], cause)
                continue
            if alone is not None:
                batch = alone if batch is None else self._merge(batch, alone)
        return batch

    def _decode_isolating(self, batch: _Batch) -> _Batch | None:
        """One decode step for the batch; if the forward pass fails, one step per row, failing only rows that fail."""
        # DynamicCache grows by concatenation: keeping these references is keeping the cache as it was.
        before = [(layer.keys, layer.values) for layer in batch.cache.layers]
        try:
            return self._decode_step(batch)
        except _ForwardFailed as failed:
            cause = failed.__cause__ or failed
            # Layers before the failing one already appended this step's keys/values: put the cache back.
            for layer, (keys, values) in zip(batch.cache.layers, before, strict=True):
                layer.keys, layer.values = keys, values
            if len(batch.seqs) == 1:
                logger.error("decode step failed; failing its request: %r", cause, exc_info=cause)
                self._fail(batch.seqs, cause)
                return None
            logger.warning("decode step of %d rows failed (%r); retrying each row alone", len(batch.seqs), cause)
        survivors: _Batch | None = None
        for row in self._split(batch, before):
            try:
                alone = self._decode_step(row)
            except _ForwardFailed as failed:
                cause = failed.__cause__ or failed
                logger.error("decode step failed for one request alone; failing it: %r", cause, exc_info=cause)
                self._fail(row.seqs, cause)
                continue
            if alone is not None:
                survivors = alone if survivors is None else self._merge(survivors, alone)
        return survivors

    def _split(self, batch: _Batch, layers: Sequence[tuple[Any, Any]]) -> list[_Batch]:
        """One single-row batch per live row, each with its own slice of the cache."""
        from transformers import DynamicCache

        rows = []
        for i, seq in enumerate(batch.seqs):
            if seq.cancelled:
                continue
            cache = DynamicCache([(k[i : i + 1], v[i : i + 1]) for k, v in layers], config=self._model.config)
            rows.append(
                _Batch([seq], cache, batch.mask[i : i + 1], batch.next_ids[i : i + 1], batch.positions[i : i + 1])
            )
        return rows

    def _prefill(self, seqs: list[_Sequence]) -> _Batch | None:
        import torch

        longest = max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), longest), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), longest), dtype=torch.long)
        for row, seq in enumerate(seqs):
            n = len(seq.prompt_ids)
            ids[row, longest - n :] = torch.tensor(seq.prompt_ids)
            mask[row, longest - n :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)  # (batch, longest)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each row counts from its first real token
        out, logits, greedy = self._forward(seqs, input_ids=ids, attention_mask=mask, position_ids=positions)
        for row, seq in enumerate(seqs):
            if seq.prompt_logprobs is None or seq.cancelled:
                continue
            try:
                own = out.logits[row, longest - len(seq.prompt_ids) :]  # (prompt, vocab): this row, padding dropped
                seq.prompt_lps = self._prompt_entries(own, seq.prompt_ids, seq.prompt_logprobs)
                _safe_emit(seq, PromptLogprobs(seq.prompt_lps))
            except Exception as exc:  # this row's report: its own failure, not its neighbours'
                logger.exception("prompt log-probabilities failed for one request; failing it alone")
                self._fail([seq], exc)
        batch = _Batch(seqs, out.past_key_values, mask, None, mask.sum(-1, keepdim=True))
        return self._sample_and_prune(batch, logits, greedy)

    def _decode_step(self, batch: _Batch) -> _Batch | None:
        import torch

        mask = torch.cat([batch.mask, torch.ones_like(batch.next_ids)], dim=-1)  # (batch, cached_len + 1)
        out, logits, greedy = self._forward(
            batch.seqs,
            input_ids=batch.next_ids,
            attention_mask=mask,
            position_ids=batch.positions,
            past_key_values=batch.cache,
        )
        batch.mask, batch.cache, batch.positions = mask, out.past_key_values, batch.positions + 1
        return self._sample_and_prune(batch, logits, greedy)

    def _sample_and_prune(self, batch: _Batch, logits: Any, greedy: list[int]) -> _Batch | None:
        """Sample each row's next token (logits: (batch, vocab)), stream it, and drop rows that are done or failed."""
        import torch

        next_ids: list[int] = []
        keep: list[int] = []
        for row, seq in enumerate(batch.seqs):
            token = self._pad_id  # what a failed row feeds until it is dropped below
            try:
                if seq.max_tokens == 0:  # only the prompt was wanted (scored at prefill): done without sampling
                    if not seq.cancelled:
                        self._finish(seq, "length")
                    next_ids.append(token)
                    continue
                if seq.warpers is None:
                    token = greedy[row]
                else:
                    scores = seq.warpers(_NO_INPUT_IDS, logits[row : row + 1])  # (1, vocab), filtered at -inf
                    token = int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=seq.generator).item())
                if seq.logprobs is not None:
                    # The raw distribution (before temperature / top-p), as OpenAI and vLLM report it.
                    row_logprobs = torch.log_softmax(logits[row : row + 1], dim=-1)  # (1, vocab)
                    seq.lps.extend(self._entries(row_logprobs, [token], seq.logprobs))
                if not seq.cancelled and not self._advance(seq, token):
                    keep.append(row)
            except Exception as exc:  # this row's sampling or text: its own failure, not its neighbours'
                logger.exception("sampling or detokenizing failed for one request; failing it alone")
                self._fail([seq], exc)
            next_ids.append(token)
        if not keep:
            return None
        batch.next_ids = torch.tensor(next_ids, device=self.device).unsqueeze(-1)  # (batch, 1)
        if len(keep) < len(batch.seqs):
            index = torch.tensor(keep, device=self.device)
            batch.seqs = [batch.seqs[i] for i in keep]
            batch.cache.batch_select_indices(index)
            batch.mask, batch.next_ids = batch.mask[index], batch.next_ids[index]
            batch.positions = batch.positions[index]
            # Columns that are padding in every remaining row are dead weight in every later step.
            first = int(batch.mask.any(dim=0).nonzero()[0])
            if first:
                batch.mask = batch.mask[:, first:]
                for layer in batch.cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, first:, :], layer.values[:, :, first:, :]
        return batch

    @staticmethod
    def _merge(a: _Batch, b: _Batch) -> _Batch:
        """One batch from two: left-pad the shorter cache (and mask) to the longer, then stack the rows."""
        import torch
        import torch.nn.functional as F

        length = max(a.mask.shape[1], b.mask.shape[1])

        def pad(t: Any, dim_from_end: int) -> Any:
            missing = length - t.shape[-dim_from_end]
            if not missing:
                return t
            spec = [0, 0] * (dim_from_end - 1) + [missing, 0]  # F.pad counts dimensions from the last one
            return F.pad(t, spec)

        for la, lb in zip(a.cache.layers, b.cache.layers, strict=True):
            la.keys = torch.cat([pad(la.keys, 2), pad(lb.keys, 2)], dim=0)  # (batch, heads, length, head_dim)
            la.values = torch.cat([pad(la.values, 2), pad(lb.values, 2)], dim=0)
        a.mask = torch.cat([pad(a.mask, 1), pad(b.mask, 1)], dim=0)  # (batch, length)
        a.next_ids = torch.cat([a.next_ids, b.next_ids], dim=0)
        a.positions = torch.cat([a.positions, b.positions], dim=0)
        a.seqs = a.seqs + b.seqs
        return a

    def _advance(self, seq: _Sequence, token: int) -> bool:
        """Record `token` for `seq`, stream what text is now final, and say whether the sequence is finished.

        Constant work per token: the detokenizer decodes a short window, and stop sequences are searched for only in
        the text not yet streamed (shorter than the longest stop sequence, plus this token's text). A stop sequence
        cannot start in text already streamed, since the last `hold` characters are always kept back.
        """
        seq.produced.append(token)
        eos = token in self._eos_ids
        if not seq.stream_text:  # batch generation: nothing streams, so no per-token text work
            if eos or len(seq.produced) >= seq.max_tokens:
                self._finish(seq, "stop" if eos else "length")
                return True
            return False
        piece = "" if eos else seq.detokenizer.push(token)  # end-of-text tokens are not part of the text
        last = eos or len(seq.produced) >= seq.max_tokens
        if last:
            piece += seq.detokenizer.flush()
        pending = seq.pending + piece
        finish: FinishReason | None = None
        cut = find_stop(pending, seq.stops) if seq.stops else None
        if cut is not None:
            pending, finish = pending[:cut], "stop"
        elif eos:
            finish = "stop"
        elif last:
            finish = "length"
        if finish is None:
            safe = len(pending) - seq.hold
            if safe > 0:
                self._send(seq, pending[:safe])
                pending = pending[safe:]
            seq.pending = pending
            return False
        if pending:
            self._send(seq, pending)
        seq.pending = ""
        self._finish(seq, finish)
        return True

    def _finish(self, seq: _Sequence, finish: FinishReason) -> None:
        if seq.lps_sent < len(seq.lps) and seq.stream_text:  # tokens whose text never showed: end-of-text, a cut stop
            self._send(seq, "")
        if seq.stream_text:
            text = "".join(seq.sent)
        else:
            with self._tok_lock:
                text = self._tokenizer.decode([t for t in seq.produced if t not in self._eos_ids],
                                              skip_special_tokens=True)
        _safe_emit(
            seq,
            GenerationResult(
                text=text,
                prompt_tokens=len(seq.prompt_ids),
                completion_tokens=len(seq.produced),
                finish_reason=finish,
                logprobs=tuple(seq.lps) if seq.logprobs is not None else None,
                prompt_logprobs=seq.prompt_lps,
                token_ids=tuple(seq.produced),
            ),
        )

    @staticmethod
    def _send(seq: _Sequence, text: str) -> None:
        seq.sent.append(text)
        entries = tuple(seq.lps[seq.lps_sent :])
        seq.lps_sent = len(seq.lps)
        _safe_emit(seq, TextDelta(text, entries))


class _ForwardFailed(Exception):
    """A forward pass raised (the cause is chained); nothing was sampled or streamed for its rows yet."""


def _safe_emit(seq: _Sequence, item: StreamItem | BaseException) -> None:
    if seq.outbox is not None:  # delivered with the rest of this forward pass's output (TorchEngine._flush_outbox)
        seq.outbox.append((seq, item))
        return
    # The consumer's event loop may be gone (the client hung up and the replica moved on): drop the row, not the
    # scheduler.
    try:
        seq.emit(item)
    except RuntimeError:
        seq.cancelled = True


def _deliver(items: Sequence[tuple[_Sequence, StreamItem | BaseException]]) -> None:
    """On a stream consumer's event loop: pass each item to its stream, in the order the scheduler produced them."""
    for seq, item in items:
        seq.emit(item)


def _is_json_safe_or_container(value: Any) -> bool:
    from transformers import AddedToken

    return value is None or isinstance(value, (str, int, float, bool, list, tuple, dict, AddedToken))


# Stands in for `input_ids` in the warpers used here (temperature, top-p), which never read it.
_NO_INPUT_IDS: Any = None
