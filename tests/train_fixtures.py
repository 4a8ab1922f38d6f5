"""A small packed dataset for training tests, built without the data stage (seconds, no Ray).

It has the same artifacts the trainer reads: Parquet shards of packed sequences, a tokenizer
directory and a manifest.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def build_packed_dataset(root: Path, name: str = "tiny", seq_len: int = 64, files: int = 4, seed: int = 0,
                         val_sequences: int = 0) -> dict:
    """`val_sequences` > 0: the last that many packed sequences form a val split (one Parquet file) instead."""
    from raytrain.data.demo import generate_demo_corpus
    from raytrain.data.tokenizer import TokenizePack, train_tokenizer

    corpus = root / "_corpus"
    planted = generate_demo_corpus(corpus, num_docs=150, seed=seed)
    texts = []
    for fname in planted["files"]:
        if fname.endswith(".gz"):
            continue
        for line in (corpus / fname).read_bytes().splitlines():
            try:
                row = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue
            text = row.get("text") if isinstance(row, dict) else None
            if isinstance(text, str) and not text.lstrip().startswith("<") and len(text) < 20_000:
                texts.append(text)
    tok_dir = root / "tokenizers" / name
    train_tokenizer(texts, vocab_size=400, min_frequency=2, out_dir=tok_dir)
    packed = TokenizePack((tok_dir / "tokenizer.json").read_text(), seq_len)({"text": np.array(texts, dtype=object)})
    base = root / "datasets" / name / "test"
    out = base / "train"
    out.mkdir(parents=True)
    n = len(packed["num_tokens"]) - val_sequences

    def table(rows: np.ndarray) -> pa.Table:
        return pa.table({"input_ids": pa.array(list(packed["input_ids"][rows]), pa.list_(pa.int32())),
                         "num_tokens": pa.array(packed["num_tokens"][rows])})

    for i, part in enumerate(np.array_split(np.arange(n), files)):
        pq.write_table(table(part), out / f"part-{i}.parquet")
    splits = {"train": {"sequences": n, "tokens": int(packed["num_tokens"][:n].sum())}}
    if val_sequences:
        (base / "val").mkdir()
        pq.write_table(table(np.arange(n, n + val_sequences)), base / "val" / "part-0.parquet")
        splits["val"] = {"sequences": val_sequences, "tokens": int(packed["num_tokens"][n:].sum())}
    manifest = {"dataset": name, "seq_len": seq_len,
                "tokenizer": {"path": str(tok_dir), "sha256": "test", "vocab_size": 400}, "splits": splits}
    (base / "manifest.json").write_text(json.dumps(manifest))
    (root / "datasets" / name / "latest.json").write_text(json.dumps({"version": "test"}))
    return manifest


def samples_by_step(root: Path, run: str) -> dict[int, list[str]]:
    """Fingerprints trained at each step of a run with `train.sample_log`, both ranks together (rank 0 first)."""
    out: dict[int, list[str]] = {}
    for f in sorted((root / "runs" / run / "samples").glob("step-*.json")):
        rec = json.loads(f.read_text())
        out.setdefault(rec["step"], []).extend(rec["samples"])
    return out
