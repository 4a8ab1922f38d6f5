"""The data stage: raw corpus -> curated, split, tokenized, packed Parquet shards + manifest.

Everything heavy is a Ray Data operation that streams across the cluster; the driver only sees
counts, a tokenizer-training sample and a few example documents per removal reason. Intermediate
results are written to the storage root (``_stage/``) rather than held in memory, so a corpus larger
than the cluster's memory passes through, and each step re-reads instead of re-computing.
"""

from __future__ import annotations

import hashlib
import json
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
        ("split", pa.string()),
    ]
)


def annotate_batch(batch: pa.Table, spec_json: dict[str, Any], kind: str) -> pa.Table:
    """Ray Data UDF: raw rows (JSONL bytes or Parquet records) -> one annotated row each."""
    from raytrain.config.schema import DataSpec

    spec = DataSpec.model_validate(spec_json)
    src = spec.source
    out: dict[str, list[Any]] = {c: [] for c in docs.COLUMNS}
    if kind == "jsonl":
        rows = zip(batch.column("raw").to_pylist(), batch.column("source").to_pylist(),
                   batch.column("line").to_pylist(), strict=True)
        items = ((raw, source, line, *docs.parse_jsonl_line(raw, spec.filters.max_doc_bytes))
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
            filters=spec.filters, extract=spec.extract_html,
            quarantine_sample_bytes=spec.quarantine_sample_bytes,
        )
        for c in docs.COLUMNS:
            out[c].append(getattr(a, c))
    out["split"] = [""] * len(out["doc_id"])  # set for kept documents after dedup
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
    split = pa.array([docs.split_of(k, val, test, salt) for k in keys], pa.string())
    return batch.set_column(batch.schema.get_field_index("split"), "split", split)


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
    # The shards only: planted.json (the ground truth for benchmarks) is not corpus.
    planted = storage.read_json(storage.join(raw, "planted.json"))
    return [storage.join(raw, name) for name in planted["files"]]


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


def _move_partition(parent: str, partition: str, dest: str) -> None:
    """Move the files of a Hive partition dir (e.g. `status=removed`) into `dest`, then drop it."""
    import pyarrow.fs as pafs

    fs, p = storage.filesystem(storage.join(parent, partition))
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        return
    _, d = storage.filesystem(dest)
    fs.create_dir(d, recursive=True)
    for info in fs.get_file_info(pafs.FileSelector(p, recursive=True)):
        if info.type == pafs.FileType.File:
            fs.move(info.path, d + "/" + info.path[len(p):].lstrip("/").replace("/", "_"))
    fs.delete_dir(p)


def summarize_block(batch: pa.Table, status: str, body: str, per_reason: int = 3) -> pa.Table:
    """Partial accounting of one block: (status, reason, count, a few samples) per reason.

    A map, not a shuffle: the driver merges the few rows per block that come back.
    """
    reasons = batch.column("reason").to_pylist()
    ids = batch.column("doc_id").to_pylist()
    bodies = batch.column(body).to_pylist()
    counts: dict[str, int] = defaultdict(int)
    samples: dict[str, list[dict[str, str]]] = defaultdict(list)
    for reason, doc_id, b in zip(reasons, ids, bodies, strict=True):
        counts[reason] += 1
        if len(samples[reason]) < per_reason:
            samples[reason].append({"doc_id": doc_id, "snippet": _snippet(b or "")})
    keys = sorted(counts)
    return pa.table({"status": [status] * len(keys), "reason": keys, "count": [counts[k] for k in keys],
                     "samples": [json.dumps(samples[k]) for k in keys]})


def split_sums(batch: pa.Table) -> pa.Table:
    """Partial per-split sums of one block of packed sequences (merged on the driver)."""
    names = [p.rstrip("/").rsplit("/", 2)[-2] for p in batch.column("path").to_pylist()]
    tokens = batch.column("num_tokens").to_pylist()
    ndocs = batch.column("num_docs").to_pylist()
    acc: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for name, t, n in zip(names, tokens, ndocs, strict=True):
        a = acc[name]
        a[0] += 1
        a[1] += t
        a[2] += n
    keys = sorted(acc)
    return pa.table({"split": keys, "sequences": [acc[k][0] for k in keys], "tokens": [acc[k][1] for k in keys],
                     "documents": [acc[k][2] for k in keys]})


def run_data(spec: JobSpec) -> dict[str, Any]:
    """Run the data stage; returns the manifest (also written to datasets/<name>/manifest.json).

    Six streaming passes, each ending in files on the storage root: annotate, dedup + split,
    accounting, tokenizer sample, tokenize + pack, split statistics.
    """
    import ray.data
    from ray.data.expressions import col

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

    # 1. Annotate every row (kept / removed / quarantined), partitioned by status.
    raw, kind = _read_raw(spec, paths)
    annotated = raw.map_batches(annotate_batch, fn_args=(d.model_dump(mode="json"), kind),
                                batch_format="pyarrow", batch_size=256)
    annotated.write_parquet(storage.join(stage, "annotated"), partition_cols=["status"])
    _move_partition(storage.join(stage, "annotated"), "status=removed", storage.join(out, "removed"))
    _move_partition(storage.join(stage, "annotated"), "status=quarantined", storage.join(out, "quarantine"))

    # 2. Exact dedup (a distributed shuffle on the text hash) and the stable split.
    kept = ray.data.read_parquet(storage.join(stage, "annotated", "status=kept"))
    kept = kept.map_batches(_with_status, fn_args=(docs.KEPT,), batch_format="pyarrow")
    if d.exact_dedup:
        kept = kept.groupby("hash", num_partitions=_shuffle_partitions()).map_groups(
            mark_exact_duplicates, batch_format="pyarrow")
    kept = kept.map_batches(add_split, fn_args=(d.split.val_fraction, d.split.test_fraction, d.split.salt),
                            batch_format="pyarrow")
    kept.write_parquet(storage.join(stage, "curated"), partition_cols=["status"])
    _move_partition(storage.join(stage, "curated"), "status=kept", storage.join(out, "documents"))
    _move_partition(storage.join(stage, "curated"), "status=removed", storage.join(out, "removed"))

    # 3. Accounting: every row read is exactly one of kept / removed (by reason) / quarantined (by reason).
    counts: dict[str, dict[str, int]] = {docs.REMOVED: defaultdict(int), docs.QUARANTINED: defaultdict(int)}
    samples: dict[str, list[dict[str, str]]] = defaultdict(list)
    for sub, status, body in (("removed", docs.REMOVED, "text"), ("quarantine", docs.QUARANTINED, "raw")):
        if not storage.exists(storage.join(out, sub)):
            continue
        partial = ray.data.read_parquet(storage.join(out, sub)).select_columns(["doc_id", "reason", body])
        for row in partial.map_batches(summarize_block, fn_args=(status, body), batch_format="pyarrow").take_all():
            counts[status][row["reason"]] += int(row["count"])
            key = f"{status}:{row['reason']}"
            samples[key] = (samples[key] + json.loads(row["samples"]))[:3]
    documents = ray.data.read_parquet(storage.join(out, "documents"))
    n_kept = documents.count()  # from Parquet metadata: no pass over the data
    n_removed = sum(counts[docs.REMOVED].values())
    n_quarantined = sum(counts[docs.QUARANTINED].values())
    n_read = n_kept + n_removed + n_quarantined

    # 4. Tokenizer on a sample of the training split only (val/test stay unseen).
    train_docs = documents.filter(expr=col("split") == "train").select_columns(["text"])
    sample = [r["text"] for r in train_docs.limit(d.tokenizer.sample_docs).take_all()]
    if not sample:
        raise StageInputError(f"data stage kept no training documents (read {n_read}); see {out}/report.json")
    tok_dir = layout.tokenizer(d.name)
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer(sample, d.tokenizer.vocab_size, d.tokenizer.min_frequency, tmp)
        tok_bytes = (Path(tmp) / "tokenizer.json").read_bytes()
        storage.upload_dir(tmp, tok_dir)

    # 5. Tokenize + pack every split in one pass; 6. per-split statistics.
    packed = documents.select_columns(["text", "split"]).map_batches(
        TokenizePack, fn_constructor_args=(tok_bytes.decode(), d.seq_len), batch_size=256,
        batch_format="numpy", concurrency=(1, 8))
    packed.write_parquet(storage.join(stage, "packed"), partition_cols=["split"])
    for split in SPLITS:
        _move_partition(storage.join(stage, "packed"), f"split={split}", storage.join(out, split))
    split_stats: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    written = [storage.join(out, sp) for sp in SPLITS if storage.exists(storage.join(out, sp))]
    for row in (ray.data.read_parquet(written, include_paths=True).select_columns(["path", "num_tokens", "num_docs"])
                .map_batches(split_sums, batch_format="pyarrow").take_all()):
        for k in ("sequences", "tokens", "documents"):
            split_stats[row["split"]][k] += int(row[k])
    splits = {
        split: {
            "documents": split_stats[split]["documents"],
            "sequences": split_stats[split]["sequences"],
            "tokens": split_stats[split]["tokens"],
            "files": _file_entries(storage.join(out, split)) if storage.exists(storage.join(out, split)) else [],
        }
        for split in SPLITS
    }
    storage.remove_tree(stage)

    report = {
        "dataset": d.name,
        "inputs": paths,
        "read": n_read,
        "kept": n_kept,
        "removed": dict(sorted(counts[docs.REMOVED].items())),
        "quarantined": dict(sorted(counts[docs.QUARANTINED].items())),
        "removed_total": n_removed,
        "quarantined_total": n_quarantined,
        "samples": samples,
        "seconds": round(time.time() - t0, 1),
    }
    storage.write_json(storage.join(out, "report.json"), report)
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
    storage.write_json(storage.join(out, "manifest.json"), manifest)
    log.info("data stage done in %.0fs: read %d, kept %d, removed %d, quarantined %d; train tokens %d",
             time.time() - t0, n_read, n_kept, n_removed, n_quarantined, splits["train"]["tokens"])
    return manifest


def _shuffle_partitions() -> int:
    """Hash-shuffle partitions: one per cluster CPU (Ray's default of 200 drowns a small cluster)."""
    import ray

    return max(2, int(ray.cluster_resources().get("CPU", 2)))


def _with_status(batch: pa.Table, status: str) -> pa.Table:
    # Hive partition columns are not stored in the files; put the status back.
    if "status" in batch.column_names:
        batch = batch.drop_columns(["status"])
    return batch.append_column("status", pa.array([status] * batch.num_rows, pa.string()))


def _vocab_size(tok_bytes: bytes) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tok_bytes.decode()).get_vocab_size()


def _snippet(body: Any, n: int = 200) -> str:
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else str(body)
    return text[:n]
