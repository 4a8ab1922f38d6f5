"""Small post-training inputs built directly by tests: a tiny parent model and prepared Parquet in the format
`raytrain.posttrain.data` writes (right-padded id rows, response masks, lengths), with a learnable signal.

Used where a test is about the training loop, not about data preparation (which tests/test_posttrain_data.py
covers through Ray Data).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

VOCAB, SEQ, PAD, EOS = 128, 48, 1, 0
GOOD, BAD = range(10, 40), range(40, 70)  # preferred responses draw from GOOD, dispreferred from BAD


def build_chat_parent(root: Path, vocab_size: int = 512, seed: int = 5) -> Path:
    """A parent model under `root`/models/parent/v1: a byte-level BPE tokenizer with the ChatML template, trained on
    the alignment demo's demonstrations, and a randomly initialised tiny Llama of that vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raytrain.config.schema import AlignmentDemoSpec
    from raytrain.data.tokenizer import train_tokenizer
    from raytrain.models.presets import build_config
    from raytrain.posttrain.demo import write_alignment_demo

    demo = write_alignment_demo(str(root / "scratch"), AlignmentDemoSpec(num_sft=300, num_pairs=10, seed=seed))
    texts = list(Path(demo["sft"]).read_text().splitlines())
    parent = root / "models" / "parent" / "v1"
    train_tokenizer(texts, vocab_size=vocab_size, min_frequency=2, out_dir=parent)
    tok = AutoTokenizer.from_pretrained(str(parent))
    torch.manual_seed(0)
    cfg = build_config("tiny", vocab_size=len(tok), max_position_embeddings=128, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(parent))
    return parent


def build_parent(path: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny Llama saved as a Hugging Face directory (no tokenizer: the loop needs none)."""
    import torch
    from transformers import AutoModelForCausalLM

    from raytrain.models.presets import build_config

    torch.manual_seed(seed)
    cfg = build_config("tiny", vocab_size=VOCAB, max_position_embeddings=SEQ, eos_token_id=EOS, pad_token_id=PAD,
                       bos_token_id=EOS)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return path


def _row(prompt: list[int], response: list[int]) -> tuple[np.ndarray, np.ndarray, int]:
    ids = np.full(SEQ, PAD, dtype=np.int32)
    mask = np.zeros(SEQ, dtype=np.int8)
    seq = prompt + response + [EOS]
    ids[: len(seq)] = seq
    mask[len(prompt): len(seq)] = 1
    return ids, mask, len(seq)


def _write(columns: dict[str, list], out: Path, files: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    n = len(next(iter(columns.values())))
    bounds = np.linspace(0, n, files + 1).astype(int)
    for i in range(files):
        part = {k: v[bounds[i]:bounds[i + 1]] for k, v in columns.items()}
        table = pa.table({k: pa.array([x.tolist() if isinstance(x, np.ndarray) else x for x in v])
                          for k, v in part.items()})
        pq.write_table(table, out / f"part-{i:03d}.parquet")


def build_sft(out: Path, rows: int = 96, seed: int = 0) -> Path:
    """Prompts of random tokens; the response repeats the prompt backwards (learnable, prompt-dependent)."""
    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {"input_ids": [], "loss_mask": [], "num_tokens": [], "row_id": []}
    for i in range(rows):
        prompt = rng.integers(10, 70, size=int(rng.integers(4, 12))).tolist()
        ids, mask, n = _row(prompt, prompt[::-1])
        for k, v in zip(cols, (ids, mask, n, f"sft-{i}"), strict=True):
            cols[k].append(v)
    _write(cols, out, files=4)
    return out


def build_pairs(out: Path, rows: int = 96, seed: int = 0) -> Path:
    """Chosen responses from GOOD tokens, rejected from BAD tokens, lengths independent of the label."""
    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {k: [] for k in ("chosen_ids", "chosen_mask", "chosen_len", "rejected_ids",
                                              "rejected_mask", "rejected_len", "prompt_len", "row_id")}
    for i in range(rows):
        prompt = rng.integers(70, 120, size=int(rng.integers(3, 8))).tolist()
        good = rng.choice(GOOD, size=int(rng.integers(3, 10))).tolist()
        bad = rng.choice(BAD, size=int(rng.integers(3, 10))).tolist()
        c, r = _row(prompt, good), _row(prompt, bad)
        for k, v in zip(cols, (*c, *r, len(prompt), f"pair-{i}"), strict=True):
            cols[k].append(v)
    _write(cols, out, files=4)
    return out


def add_reference_logps(src: Path, parent: Path, out: Path) -> Path:
    """The precomputed-reference columns, by the same scorer the DPO stage runs through Ray Data."""
    import pyarrow.parquet as pq

    from raytrain.posttrain.scoring import PairLogps

    scorer = PairLogps(str(parent), prefix="ref")
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*.parquet")):
        table = pq.read_table(f)
        batch = {c: np.array(table.column(c).to_pylist(), dtype=np.int64 if c != "row_id" else object)
                 for c in table.column_names}
        scored = scorer(batch)
        table = table.append_column("ref_chosen_logp", [scored["ref_chosen_logp"].astype(np.float32)])
        table = table.append_column("ref_rejected_logp", [scored["ref_rejected_logp"].astype(np.float32)])
        pq.write_table(table, out / f.name)
    return out
