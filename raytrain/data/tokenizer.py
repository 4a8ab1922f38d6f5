"""Tokenizer training (byte-level BPE via `tokenizers`) and tokenize + pack as a Ray Data UDF."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
PAD = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]

# ChatML, the format the chat special tokens above exist for; stored with the tokenizer so
# `apply_chat_template` works on every exported model.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int, out_dir: str | Path) -> Path:
    """Train a byte-level BPE on `texts`; save `tokenizer.json` and the transformers files in `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD)
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(out))
    log.info("trained a byte-level BPE with %d tokens", tok.get_vocab_size())
    return out


class TokenizePack:
    """Ray Data UDF: documents in, fixed-length token sequences out.

    Documents are joined with an end-of-text separator and cut into `seq_len` windows. The last
    window of a batch is padded and carries `num_tokens < seq_len`, so no token is dropped and
    training masks the padding out of the loss.
    """

    def __init__(self, tokenizer_json: str, seq_len: int) -> None:
        from tokenizers import Tokenizer

        # The serialized tokenizer travels with the task: no shared filesystem needed on workers.
        self.tok = Tokenizer.from_str(tokenizer_json)
        self.eos = self.tok.token_to_id(EOS)
        self.pad = self.tok.token_to_id(PAD)
        self.seq_len = seq_len

    def __call__(self, batch: Any) -> dict[str, np.ndarray]:
        """`batch`: a pyarrow Table or a dict of columns with `text` and, optionally, `split`."""
        if hasattr(batch, "column_names"):
            texts = batch.column("text").to_pylist()
            splits = batch.column("split").to_pylist() if "split" in batch.column_names else None
        else:
            texts = [str(t) for t in batch["text"]]
            splits = [str(s) for s in batch["split"]] if "split" in batch else None
        if splits is None or len(set(splits)) <= 1:
            return self._with_split(self._pack(texts), splits[0] if splits else "")
        # A batch can mix splits; pack each on its own so no sequence straddles two splits.
        by_split: dict[str, list[str]] = {}
        for text, split in zip(texts, splits, strict=True):
            by_split.setdefault(split, []).append(text)
        parts = [self._with_split(self._pack(group), split) for split, group in by_split.items()]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    @staticmethod
    def _with_split(packed: dict[str, np.ndarray], split: str) -> dict[str, np.ndarray]:
        return packed | {"split": np.full(len(packed["num_tokens"]), split, dtype=object)}

    def _pack(self, texts: list[str]) -> dict[str, np.ndarray]:
        docs = [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)] if texts else []
        # Every document ends with end-of-text: one flat array, filled per document with its ids.
        ids = np.full(sum(len(d) for d in docs) + len(docs), self.eos, dtype=np.int32)
        start = 0
        for d in docs:
            ids[start:start + len(d)] = d
            start += len(d) + 1
        n_full, rem = divmod(len(ids), self.seq_len)
        rows = n_full + (1 if rem else 0)
        out = np.full((rows, self.seq_len), self.pad, dtype=np.int32)  # (rows, seq_len)
        out.reshape(-1)[: len(ids)] = ids
        num_tokens = np.full(rows, self.seq_len, dtype=np.int32)
        if rem:
            num_tokens[-1] = rem
        return {"input_ids": out, "num_tokens": num_tokens, "num_docs": _docs_per_row(len(texts), rows)}


def _docs_per_row(n_docs: int, rows: int) -> np.ndarray:
    # Document counts are attributed to the first row of the batch so that sums stay exact.
    counts = np.zeros(rows, dtype=np.int32)
    if rows:
        counts[0] = n_docs
    return counts
