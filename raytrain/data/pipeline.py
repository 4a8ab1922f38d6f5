"""The data stage: raw corpus -> curated, split, tokenized, packed Parquet shards + manifest.

Everything heavy is a Ray Data operation that streams across the cluster; the driver only sees
counts, a tokenizer-training sample and a few example documents per removal reason. Intermediate
results are written to the storage root (``_stage/``) rather than held in memory, so a corpus larger
than the cluster's memory passes through, and each step re-reads instead of re-computing.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa

from raytrain import storage
from raytrain.config.loader import dump_spec
from raytrain.config.schema import JobSpec
from raytrain.data import documents as docs
from raytrain.data.readers import read_jsonl_lines
from raytrain.errors import StageInputError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
ANNOTATED_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("url", pa.string()),
        ("text", pa.large_string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
        ("hash", pa.string()),
        ("raw", pa.large_binary()),
    ]
)


class Annotate:
    """Ray Data UDF: raw rows (JSONL bytes or Parquet records) -> one annotated row each."""

    def __init__(self, spec_json: dict[str, Any], kind: str) -> None:
        from raytrain.config.schema import DataSpec

        self.spec = DataSpec.model_validate(spec_json)
        self.kind = kind

    def __call__(self, batch: pa.Table) -> pa.Table:
        src = self.spec.source
        out: dict[str, list[Any]] = {c: [] for c in docs.COLUMNS}
        if self.kind == "jsonl":
            rows = zip(batch.column("raw").to_pylist(), batch.column("source").to_pylist(),
                       batch.column("line").to_pylist(), strict=True)
            items = ((raw, source, line, *docs.parse_jsonl_line(raw, self.spec.filters.max_doc_bytes))
                     for raw, source, line in rows)
        else:
            paths = batch.column("path").to_pylist() if "path" in batch.column_names else ["?"] * batch.num_rows
            records = batch.drop_columns([c for c in ("path",) if c in batch.column_names]).to_pylist()
            items = ((b"", p, -1, rec, "") for rec, p in zip(records, paths, strict=True))
        for raw, source, line, record, error in items:
            if record is not None and not raw:
                raw = repr(record).encode("utf-8", errors="replace")
            a = docs.annotate(
                record, error, raw=raw, source=source, line=line,
                text_field=src.text_field, id_field=src.id_field, url_field=src.url_field,
                filters=self.spec.filters, extract=self.spec.extract_html,
                quarantine_sample_bytes=self.spec.quarantine_sample_bytes,
            )
            for c in docs.COLUMNS:
                out[c].append(getattr(a, c))
        return pa.table(out, schema=ANNOTATED_SCHEMA)


def mark_exact_duplicates(group: pa.Table) -> pa.Table:
    """map_groups UDF over one dedup hash: keep the first (source, line), mark the rest removed."""
    keys = zip(group["source"].to_pylist(), group["line"].to_pylist(), group["doc_id"].to_pylist(), strict=True)
    order = [i for _, i in sorted((k, i) for i, k in enumerate(keys))]
    status = group.column("status").to_pylist()
    reason = group.column("reason").to_pylist()
    for i in order[1:]:
        status[i] = docs.REMOVED
        reason[i] = "exact_duplicate"
    group = group.set_column(group.schema.get_field_index("status"), "status", pa.array(status, pa.string()))
    return group.set_column(group.schema.get_field_index("reason"), "reason", pa.array(reason, pa.string()))


def add_split(batch: pa.Table, val: float, test: float, salt: str) -> pa.Table:
    keys = batch.column("hash").to_pylist()
    return batch.append_column("split", pa.array([docs.split_of(k, val, test, salt) for k in keys], pa.string()))


def _input_paths(spec: JobSpec, layout: storage.Layout) -> list[str]:
    src = spec.data.source
    if src.kind == "files":
        return [storage.normalize_root(p) for p in src.paths]
    from raytrain.data.demo import generate_demo_corpus

    raw = layout.raw(f"demo-{src.demo.num_docs}-{src.demo.seed}")
    if not storage.exists(storage.join(raw, "planted.json")):
        log.info("generating the demo corpus (%d documents) at %s", src.demo.num_docs, raw)
        with tempfile.TemporaryDirectory() as tmp:
            generate_demo_corpus(tmp, num_docs=src.demo.num_docs, seed=src.demo.seed)
            storage.upload_dir(tmp, raw)
    return [raw]


def _read_raw(spec: JobSpec, paths: list[str]):
    import ray.data

    fmt = spec.data.source.format
    files_are_jsonl = fmt == "jsonl" or (fmt == "auto" and not any(p.endswith(".parquet") for p in paths))
    if files_are_jsonl:
        return read_jsonl_lines(paths), "jsonl"
    # Parquet rows have no line number; `source` (the file) identifies them, `line` is -1.
    return ray.data.read_parquet(paths, include_paths=True), "parquet"


def _file_entries(path: str) -> list[dict[str, Any]]:
    import pyarrow.fs as pafs

    fs, p = storage.filesystem(path)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True))
    entries = []
    for info in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path):
        h = hashlib.sha256()
        with fs.open_input_stream(info.path) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        entries.append({"path": info.path[len(p):].lstrip("/"), "bytes": info.size, "sha256": h.hexdigest()})
    return entries


def run_data(spec: JobSpec) -> dict[str, Any]:
    """Run the data stage; returns the manifest (also written to datasets/<name>/manifest.json)."""
    import ray.data

    from raytrain.data.tokenizer import TokenizePack, train_tokenizer

    t0 = time.time()
    d = spec.data
    layout = storage.Layout(spec.storage.root)
    out = layout.dataset(d.name)
    stage = storage.join(out, "_stage")
    for sub in (*SPLITS, "removed", "quarantine", "documents", "_stage"):
        storage.remove_tree(storage.join(out, sub))
    paths = _input_paths(spec, layout)
    log.info("data stage: reading %s", paths)

    raw, kind = _read_raw(spec, paths)
    annotated = raw.map_batches(Annotate, fn_constructor_args=(d.model_dump(mode="json"), kind),
                                batch_format="pyarrow", batch_size=256, concurrency=(1, 64))
    annotated.write_parquet(storage.join(stage, "annotated"))
    annotated = ray.data.read_parquet(storage.join(stage, "annotated"))

    kept = annotated.filter(expr="status == 'kept'")
    if d.exact_dedup:
        kept = kept.groupby("hash").map_groups(mark_exact_duplicates, batch_format="pyarrow")
    kept = kept.map_batches(add_split, fn_args=(d.split.val_fraction, d.split.test_fraction, d.split.salt),
                            batch_format="pyarrow")
    kept.write_parquet(storage.join(stage, "curated"))
    curated = ray.data.read_parquet(storage.join(stage, "curated"))

    # Accounting: every row read is exactly one of kept / removed (by reason) / quarantined (by reason).
    not_kept = annotated.filter(expr="status != 'kept'")
    dup_removed = curated.filter(expr="status != 'kept'").drop_columns(["split"])
    rejected = not_kept.union(dup_removed)
    rejected.filter(expr="status == 'removed'").drop_columns(["raw"]).write_parquet(storage.join(out, "removed"))
    rejected.filter(expr="status == 'quarantined'").drop_columns(["text"]).write_parquet(
        storage.join(out, "quarantine"))
    final_docs = curated.filter(expr="status == 'kept'").drop_columns(["raw", "status", "reason"])
    final_docs.write_parquet(storage.join(out, "documents"))

    counts: dict[str, dict[str, int]] = defaultdict(dict)
    status_reason = annotated.select_columns(["status", "reason"]).filter(expr="status != 'kept'").union(
        curated.select_columns(["status", "reason"]))
    for row in status_reason.groupby(["status", "reason"]).count().take_all():
        counts[row["status"]][row["reason"]] = int(row["count()"])
    n_read = annotated.count()
    n_kept = sum(counts[docs.KEPT].values())
    n_removed = sum(counts[docs.REMOVED].values())
    n_quarantined = sum(counts[docs.QUARANTINED].values())

    # Tokenizer on a sample of the training split only (val/test stay unseen).
    documents = ray.data.read_parquet(storage.join(out, "documents"))
    train_docs = documents.filter(expr="split == 'train'")
    sample = [r["text"] for r in train_docs.select_columns(["text"]).limit(d.tokenizer.sample_docs).take_all()]
    if not sample:
        raise StageInputError(f"data stage kept no training documents (read {n_read}); see {out}/report.json")
    tok_dir = layout.tokenizer(d.name)
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer(sample, d.tokenizer.vocab_size, d.tokenizer.min_frequency, tmp)
        tok_bytes = (Path(tmp) / "tokenizer.json").read_bytes()
        storage.upload_dir(tmp, tok_dir)

    tok_json = tok_bytes.decode()
    splits: dict[str, Any] = {}
    for split in SPLITS:
        part = documents.filter(expr=f"split == '{split}'").select_columns(["text"])
        packed = part.map_batches(TokenizePack, fn_constructor_args=(tok_json, d.seq_len),
                                  batch_size=256, concurrency=(1, 8))
        packed.write_parquet(storage.join(out, split))
        written = ray.data.read_parquet(storage.join(out, split))
        n_seq = written.count()
        stats = written.select_columns(["num_tokens", "num_docs"]).sum(["num_tokens", "num_docs"]) if n_seq else {}
        splits[split] = {
            "documents": int(stats.get("sum(num_docs)", 0) or 0),
            "sequences": n_seq,
            "tokens": int(stats.get("sum(num_tokens)", 0) or 0),
            "files": _file_entries(storage.join(out, split)),
        }
    storage.remove_tree(stage)

    identity = n_read == n_kept + n_removed + n_quarantined
    report = {
        "dataset": d.name,
        "inputs": paths,
        "read": n_read,
        "kept": n_kept,
        "removed": dict(sorted(counts[docs.REMOVED].items())),
        "quarantined": dict(sorted(counts[docs.QUARANTINED].items())),
        "removed_total": n_removed,
        "quarantined_total": n_quarantined,
        "accounting_ok": identity,
        "samples": _samples(out, counts),
        "seconds": round(time.time() - t0, 1),
    }
    storage.write_json(storage.join(out, "report.json"), report)
    if not identity:
        raise RuntimeError(f"accounting identity failed: read {n_read} != kept {n_kept} + removed {n_removed} "
                           f"+ quarantined {n_quarantined}; see {out}/report.json")
    manifest = {
        "manifest_version": 1,
        "dataset": d.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": paths,
        "seq_len": d.seq_len,
        "tokenizer": {
            "path": tok_dir,
            "sha256": hashlib.sha256(tok_bytes).hexdigest(),
            "vocab_size": _vocab_size(tok_bytes),
        },
        "counts": {k: report[k] for k in ("read", "kept", "removed", "quarantined")},
        "splits": splits,
        "spec_sha256": hashlib.sha256(dump_spec(spec).encode()).hexdigest(),
        "data_spec": d.model_dump(mode="json"),
    }
    manifest_bytes = storage_json_bytes(manifest)
    storage.write_bytes(storage.join(out, "manifest.json"), manifest_bytes)
    log.info("data stage done in %.0fs: read %d, kept %d, removed %d, quarantined %d; train tokens %d",
             time.time() - t0, n_read, n_kept, n_removed, n_quarantined, splits["train"]["tokens"])
    return manifest


def _vocab_size(tok_bytes: bytes) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tok_bytes.decode()).get_vocab_size()


def storage_json_bytes(obj: Any) -> bytes:
    import json

    return (json.dumps(obj, indent=2, default=str) + "\n").encode()


def _samples(out: str, counts: dict[str, dict[str, int]], per_reason: int = 3) -> dict[str, list[dict[str, Any]]]:
    """A few example documents per removal / quarantine reason, for the report."""
    import ray.data

    samples: dict[str, list[dict[str, Any]]] = {}
    for status, sub, col in ((docs.REMOVED, "removed", "text"), (docs.QUARANTINED, "quarantine", "raw")):
        if not counts.get(status):
            continue
        ds = ray.data.read_parquet(storage.join(out, sub)).select_columns(["doc_id", "reason", col])
        for reason in sorted(counts[status]):
            rows = ds.filter(expr=f"reason == {reason!r}").limit(per_reason).take_all()
            samples[f"{sub}:{reason}"] = [
                {"doc_id": r["doc_id"], "snippet": _snippet(r[col])} for r in rows
            ]
    return samples


def _snippet(body: Any, n: int = 200) -> str:
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else str(body)
    return text[:n]
