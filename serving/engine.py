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
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]

# ChatML end-of-turn marker, the chat format raytrain exports its tokenizers with.
IM_END = "<|im_end|>"


@dataclass(frozen=True)
class GenerationResult:
    """One completion: the text returned to the client and the token counts billed for it."""

    text: str
    prompt_tokens: int
    # Every token the model produced, including an end-of-text token or the tokens of a stop sequence
    # that were cut from `text`: that is the work done, and what usage reports.
    completion_tokens: int
    finish_reason: FinishReason


@dataclass(frozen=True)
class TextDelta:
    """A piece of a completion's text, streamed as soon as it can no longer turn into a stop sequence."""

    text: str


class NoChatTemplateError(ValueError):
    """The model's tokenizer carries no chat template, so a conversation cannot be rendered for it."""


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
    :class:`GenerationResult`, safe to run for many requests at once (the engine batches them).
    `generate` is the same work, blocking, for callers without an event loop; it is safe to call from
    several threads at once.
    """

    @property
    def context_length(self) -> int:
        """Most tokens (prompt + completion) one sequence may hold."""
        ...

    def count_tokens(self, text: str) -> int:
        """Prompt tokens `generate` would feed the model for `text` (same special tokens)."""
        ...

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        """The prompt text for a conversation (`[{role, content}]`), ending where the assistant's turn starts.

        Raises :class:`NoChatTemplateError` when the model has none.
        """
        ...

    def generate(
        self,
        prompt: str,
        *,
        max_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> GenerationResult:
        """Complete `prompt`. temperature 0 is greedy; with a seed, sampling is reproducible.

        The returned text ends before the first stop sequence. Raises :class:`ContextWindowError` when
        prompt tokens + max_tokens exceed `context_length`.
        """
        ...

    def stream(
        self,
        prompt: str,
        *,
        max_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> AsyncIterator[TextDelta | GenerationResult]:
        """`generate` as it happens: text deltas, then the final result (whose text is the whole completion).

        Raises :class:`ContextWindowError` before yielding anything when the request does not fit. Closing the
        iterator early cancels the generation.
        """
        ...

    def queue_depth(self) -> int:
        """Requests accepted but not yet generating (waiting for a batch slot)."""
        ...


def load_engine(path: str, device: str = "auto", max_batch_size: int = 16) -> Engine:
    """The engine for a model directory; the one place that chooses a backend."""
    return TorchEngine(path, device=device, max_batch_size=max_batch_size)


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
    emit: Callable[[TextDelta | GenerationResult | BaseException], None]
    produced: list[int] = field(default_factory=list)  # every sampled id, end-of-text included
    sent: int = 0  # characters of the completion already emitted as deltas
    cancelled: bool = False  # set by the consumer (client went away); the engine drops the row


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
    """

    def __init__(
        self, path: str, device: Literal["auto", "cpu", "cuda"] | str = "auto", max_batch_size: int = 16
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.path = path
        self.device = self._resolve_device(device)
        self.max_batch_size = max_batch_size
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
        self._cv = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
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

    def count_tokens(self, text: str) -> int:
        return len(self._encode(text))

    def _encode(self, text: str) -> list[int]:
        with self._tok_lock:
            return list(self._tokenizer(text)["input_ids"])

    def _decode(self, ids: Sequence[int]) -> str:
        with self._tok_lock:
            return self._tokenizer.decode([i for i in ids if i not in self._eos_ids], skip_special_tokens=True)

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        if not getattr(self._tokenizer, "chat_template", None):
            raise NoChatTemplateError(f"the tokenizer of {self.path} has no chat template")
        with self._tok_lock:
            return str(self._tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True))

    def queue_depth(self) -> int:
        return len(self._waiting)

    # ------------------------------------------------------------------------------------------ requests

    def _submit(
        self,
        prompt: str,
        emit: Callable[[TextDelta | GenerationResult | BaseException], None],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop: Sequence[str],
    ) -> _Sequence:
        import torch
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopPLogitsWarper,
        )

        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        ids = self._encode(prompt)
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
        seq = _Sequence(ids, max_tokens, warpers, generator, [s for s in stop if s], emit)
        with self._cv:
            self._waiting.append(seq)
            self._cv.notify()
        return seq

    def generate(
        self,
        prompt: str,
        *,
        max_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> GenerationResult:
        out: queue.SimpleQueue[TextDelta | GenerationResult | BaseException] = queue.SimpleQueue()
        self._submit(prompt, out.put, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop)
        while True:
            item = out.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, GenerationResult):
                return item

    async def stream(
        self,
        prompt: str,
        *,
        max_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> AsyncIterator[TextDelta | GenerationResult]:
        loop = asyncio.get_running_loop()
        out: asyncio.Queue[TextDelta | GenerationResult | BaseException] = asyncio.Queue()

        def emit(item: TextDelta | GenerationResult | BaseException) -> None:
            loop.call_soon_threadsafe(out.put_nowait, item)

        seq = self._submit(
            prompt, emit, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop
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

    # ----------------------------------------------------------------------------------------- scheduler

    def _run(self) -> None:
        import torch

        batch: _Batch | None = None
        while True:
            with self._cv:
                while not self._waiting and batch is None:
                    self._cv.wait()
                room = self.max_batch_size - (len(batch.seqs) if batch else 0)
                newcomers = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            newcomers = [s for s in newcomers if not s.cancelled]
            try:
                with torch.inference_mode():
                    if batch is not None:
                        batch = self._decode_step(batch)
                    if newcomers:
                        fresh = self._prefill(newcomers)
                        if batch is None:
                            batch = fresh
                        elif fresh is not None:
                            batch = self._merge(batch, fresh)
            except Exception as exc:  # a failed forward pass fails its requests, never the scheduler
                failed = (batch.seqs if batch else []) + newcomers
                logger.exception("generation step failed; failing %d request(s)", len(failed))
                for seq in failed:
                    _safe_emit(seq, exc)
                batch = None

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
        out = self._model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        batch = _Batch(seqs, out.past_key_values, mask, None, mask.sum(-1, keepdim=True))
        return self._sample_and_prune(batch, out.logits[:, -1, :])

    def _decode_step(self, batch: _Batch) -> _Batch | None:
        import torch

        mask = torch.cat([batch.mask, torch.ones_like(batch.next_ids)], dim=-1)  # (batch, cached_len + 1)
        out = self._model(
            input_ids=batch.next_ids,
            attention_mask=mask,
            position_ids=batch.positions,
            past_key_values=batch.cache,
            use_cache=True,
        )
        batch.mask, batch.cache, batch.positions = mask, out.past_key_values, batch.positions + 1
        return self._sample_and_prune(batch, out.logits[:, -1, :])

    def _sample_and_prune(self, batch: _Batch, logits: Any) -> _Batch | None:
        """Sample each row's next token (logits: (batch, vocab)), stream it, and drop rows that are done."""
        import torch

        logits = logits.float()
        greedy = logits.argmax(dim=-1).tolist()  # (batch,)
        next_ids: list[int] = []
        keep: list[int] = []
        for row, seq in enumerate(batch.seqs):
            if seq.warpers is None:
                token = greedy[row]
            else:
                scores = seq.warpers(_NO_INPUT_IDS, logits[row : row + 1])  # (1, vocab), filtered at -inf
                token = int(torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=seq.generator).item())
            next_ids.append(token)
            if not seq.cancelled and not self._advance(seq, token):
                keep.append(row)
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
        """Record `token` for `seq`, stream what text is now final, and say whether the sequence is finished."""
        seq.produced.append(token)
        finish: FinishReason | None = None
        text = self._decode(seq.produced)
        if token in self._eos_ids:
            finish = "stop"
        elif seq.stops:
            # Decode the whole completion each step: a stop sequence may span token boundaries.
            cut = find_stop(text, seq.stops)
            if cut is not None:
                text, finish = text[:cut], "stop"
        if finish is None and len(seq.produced) >= seq.max_tokens:
            finish = "length"
        if finish is None:
            # Hold back what could still become a stop sequence, and a trailing partial UTF-8 character.
            safe = len(text.rstrip("\ufffd"))
            if seq.stops:
                safe = min(safe, len(text) - max(len(s) for s in seq.stops) + 1)
            if safe > seq.sent:
                _safe_emit(seq, TextDelta(text[seq.sent : safe]))
                seq.sent = safe
            return False
        if len(text) > seq.sent:
            _safe_emit(seq, TextDelta(text[seq.sent :]))
        _safe_emit(
            seq,
            GenerationResult(
                text=text,
                prompt_tokens=len(seq.prompt_ids),
                completion_tokens=len(seq.produced),
                finish_reason=finish,
            ),
        )
        return True


def _safe_emit(seq: _Sequence, item: TextDelta | GenerationResult | BaseException) -> None:
    # The consumer's event loop may be gone (the client hung up and the replica moved on): drop the row, not the
    # scheduler.
    try:
        seq.emit(item)
    except RuntimeError:
        seq.cancelled = True


# Stands in for `input_ids` in the warpers used here (temperature, top-p), which never read it.
_NO_INPUT_IDS: Any = None
