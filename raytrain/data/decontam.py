"""Decontamination: drop training documents sharing a long word n-gram (default 13) with evaluation sets.

The eval n-grams are kept as a set of 64-bit hashes (8 bytes each, plus set overhead): a few
benchmarks of a few MB of text make a few million n-grams, loaded once per worker process.
"""

from __future__ import annotations

import functools
import json
import re

import xxhash

_WORD = re.compile(r"\w+")


def ngram_hashes(text: str, n: int) -> set[int]:
    """64-bit hashes of the lower-cased word n-grams (punctuation ignored) of `text`."""
    words = _WORD.findall(text.lower())
    return {xxhash.xxh64_intdigest(" ".join(words[i:i + n]).encode()) for i in range(len(words) - n + 1)}


def read_eval_texts(path: str) -> list[str]:
    """Examples of one eval file: JSONL rows with a 'text' field (else every string value), or text lines."""
    from raytrain import storage

    fs, p = storage.filesystem(path)
    with fs.open_input_stream(p) as f:
        data = f.read().decode("utf-8", errors="replace")
    if path.endswith((".jsonl", ".json", ".ndjson")):
        texts = []
        for line in data.splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            if isinstance(row, dict):
                texts.append(row["text"] if isinstance(row.get("text"), str) else
                             " ".join(v for v in row.values() if isinstance(v, str)))
            elif isinstance(row, str):
                texts.append(row)
        return texts
    return [ln for ln in data.splitlines() if ln.strip()]


@functools.lru_cache(maxsize=4)
def eval_ngrams(paths: tuple[str, ...], n: int) -> frozenset[int]:
    grams: set[int] = set()
    for path in paths:
        for text in read_eval_texts(path):
            grams |= ngram_hashes(text, n)
    return frozenset(grams)


def contaminated(text: str, grams: frozenset[int], n: int) -> bool:
    if not grams:
        return False
    words = _WORD.findall(text.lower())
    return any(xxhash.xxh64_intdigest(" ".join(words[i:i + n]).encode()) in grams
               for i in range(len(words) - n + 1))
