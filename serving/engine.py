"""Generation engines behind one small protocol.

The HTTP layer (`serving.service`, `serving.app`) only knows :class:`Engine`; `TorchEngine` runs a
Hugging Face checkpoint with torch on CPU or one GPU, and a vLLM-backed engine for GPU clusters can slot
in beside it without touching the API code. torch and transformers are imported inside `TorchEngine` so
that importing this module (and validating configs) stays fast.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenerationResult:
    """One completion: the text returned to the client and the token counts billed for it."""

    text: str
    prompt_tokens: int
    # Every token the model produced, including an end-of-text token or the tokens of a stop sequence
    # that were cut from `text`: that is the work done, and what usage reports.
    completion_tokens: int
    finish_reason: FinishReason


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

    `generate` is blocking; callers run it off the event loop (`asyncio.to_thread`). Implementations
    must be safe to call from several threads at once (they may serialise internally).
    """

    @property
    def context_length(self) -> int:
        """Most tokens (prompt + completion) one sequence may hold."""
        ...

    def count_tokens(self, text: str) -> int:
        """Prompt tokens `generate` would feed the model for `text` (same special tokens)."""
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


def load_engine(path: str, device: str = "auto") -> Engine:
    """The engine for a model directory; the one place that chooses a backend."""
    return TorchEngine(path, device=device)


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


class TorchEngine:
    """A transformers causal LM run token by token with torch.

    The decode loop is our own rather than `model.generate` because each request needs its own
    `torch.Generator` (a global `torch.manual_seed` would make concurrent seeded requests interfere) and
    because a per-token loop is what streaming will yield from. Sampling itself uses transformers'
    logits warpers. One generation runs at a time per engine: on CPU, parallel forward passes only
    fight over the same cores, and on GPU batching belongs to a batching engine (vLLM), not to threads.
    """

    def __init__(self, path: str, device: Literal["auto", "cpu", "cuda"] | str = "auto") -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = path
        self.device = self._resolve_device(device)
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
        self._lock = threading.Lock()
        logger.info(
            "loaded %s on %s (%d parameters, context %d)",
            path,
            self.device,
            sum(p.numel() for p in self._model.parameters()),
            self._context_length,
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
        return frozenset(ids)

    @property
    def context_length(self) -> int:
        return self._context_length

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer(text)["input_ids"])

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
        import torch
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopPLogitsWarper,
        )

        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        stops = [s for s in stop if s]
        input_ids = self._tokenizer(prompt, return_tensors="pt")["input_ids"].to(self.device)  # (1, prompt_len)
        prompt_tokens = int(input_ids.shape[1])
        if prompt_tokens + max_tokens > self._context_length:
            raise ContextWindowError(prompt_tokens, max_tokens, self._context_length)

        greedy = temperature == 0
        warpers = LogitsProcessorList()
        if not greedy:
            if temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(temperature))
            if top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p))
        generator = torch.Generator(device=self.device)
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()

        produced: list[int] = []  # every sampled token id, end-of-text included
        truncated: str | None = None  # the completion cut before a stop sequence, once one appears
        finish: FinishReason = "length"
        with self._lock, torch.inference_mode():
            past: Any = None
            step_input = input_ids  # the whole prompt first, then one token per step against the KV cache
            seen = input_ids  # (1, prompt_len + step); warpers get the history they may consult
            for _ in range(max_tokens):
                out = self._model(input_ids=step_input, past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[:, -1, :].float()  # (1, vocab)
                if greedy:
                    next_id = logits.argmax(dim=-1, keepdim=True)  # (1, 1)
                else:
                    scores = warpers(seen, logits)  # (1, vocab), filtered entries at -inf
                    probs = torch.softmax(scores, dim=-1)
                    next_id = torch.multinomial(probs, num_samples=1, generator=generator)  # (1, 1)
                token = int(next_id.item())
                produced.append(token)
                if token in self._eos_ids:
                    finish = "stop"
                    break
                if stops:
                    # Decode the whole completion each step: a stop sequence may span token boundaries.
                    text = self._decode(produced)
                    cut = find_stop(text, stops)
                    if cut is not None:
                        truncated = text[:cut]
                        finish = "stop"
                        break
                step_input = next_id
                seen = torch.cat([seen, next_id], dim=-1)
        text = truncated if truncated is not None else self._decode(produced)
        return GenerationResult(
            text=text, prompt_tokens=prompt_tokens, completion_tokens=len(produced), finish_reason=finish
        )

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([i for i in ids if i not in self._eos_ids], skip_special_tokens=True)
