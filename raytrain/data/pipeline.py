"""The data stage: raw corpus -> curated, split, tokenized, packed Parquet shards + manifest.

Everything heavy is a Ray Data operation that runs across the cluster; the driver only sees counts,
a tokenizer-training sample and a few example documents per removal reason. Rows are read and annotated
once and held in Ray's object store (which spills to local disk, so a corpus larger than the cluster's
memory still passes); the dedup steps shuffle only hashes and ids; every output is written once, from
the rows in the store, with the counts the accounting needs computed on the way.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raytrain import storage
from raytrain.config.loader import dump_spec
from raytrain.config.schema import DataSpec, JobSpec
from raytrain.data import documents as docs
from raytrain.data import minhash
from raytrain.data.pii import KINDS as PII_KINDS
from raytrain.data.readers import (
    format_of,
    parquet_files,
    parquet_rows,
    read_raw_rows,
    read_tasks,
    reported_rows,
)
from raytrain.data.report import write_report_md
from raytrain.errors import StageInputError

log = logging.getLogger(__name__)


class AccountingError(RuntimeError):
    """Rows read at the source != kept + removed + quarantined: a row was lost or counted twice (a bug)."""

SPLITS = ("train", "val", "test")
TOKENIZE_BATCH = 1024  # documents per encode_batch call in tokenize + pack
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
        ("uid", pa.int64()),
        ("dup_of", pa.int64()),
        *[(f"pii_{k}", pa.int32()) for k in PII_KINDS],
        ("node", pa.string()),  # the Ray node that annotated the row (provenance, work per node)
    ]
)


def current_node() -> str:
    """The id of the Ray node running this task ("local" outside Ray)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def doc_uid(source: str, line: int, doc_id: str, text_hash: str, rank: int | None) -> int:
    """A 64-bit id of one row, the key of fuzzy dedup's clusters, whose smallest member is kept.

    Rows with a line number (JSONL, text, HTML, WARC) get (rank of their file << 40) | line: unique,
    and in input order, so a cluster keeps its earliest document as exact dedup does. Parquet rows
    (no row number) get a hash above every such id.
    """
    if rank is not None and line >= 0:
        return (rank << 40) | line
    h = hashlib.blake2b(f"{source}\0{line}\0{doc_id}\0{text_hash}".encode(), digest_size=8).digest()
    return (1 << 62) | (int.from_bytes(h, "big") & ((1 << 62) - 1))


def annotate_batch(batch: pa.Table, spec_json: dict[str, Any], kind: str,
                   ranks: dict[str, int] | None = None) -> pa.Table:
    """Ray Data UDF: raw rows -> exactly one annotated row each.

    `kind`: 'jsonl' (the user's JSON lines, fields as `data.source` names them), 'doc' (rows the text,
    HTML and WARC readers made: fields id, url, text; a WARC row may carry the reader's removal reason)
    or 'parquet' (records). A row whose curation raises is quarantined ('annotate_error:<exception>'),
    never allowed to fail the task and the job with it.
    """
    spec = _spec_of(json.dumps(spec_json, sort_keys=True))
    curator = docs.curator_for(spec.filters.model_dump_json(), spec.pii.model_dump_json(),
                               spec.decontamination.model_dump_json())
    src = spec.source
    fields = ("text", "id", "url") if kind == "doc" else (src.text_field, src.id_field, src.url_field)
    out: dict[str, list[Any]] = {c: [] for c in docs.COLUMNS} | {f"pii_{k}": [] for k in PII_KINDS} | {"uid": []}
    if kind in ("jsonl", "doc"):
        reasons = batch.column("reason").to_pylist() if "reason" in batch.column_names else [""] * batch.num_rows
        rows = zip(batch.column("raw").to_pylist(), batch.column("source").to_pylist(),
                   batch.column("line").to_pylist(), reasons, strict=True)
        items = ((raw, source, line, reason, *docs.parse_jsonl_line(raw, spec.filters.max_doc_bytes))
                 for raw, source, line, reason in rows)
    else:
        paths = batch.column("path").to_pylist() if "path" in batch.column_names else ["?"] * batch.num_rows
        records = batch.drop_columns([c for c in ("path",) if c in batch.column_names]).to_pylist()
        items = ((b"", p, -1, "", rec, "") for rec, p in zip(records, paths, strict=True))
    annotated: list[docs.Annotated] = []
    raws: list[bytes] = []
    for raw, source, line, reason, record, error in items:
        if record is not None and not raw:
            raw = repr(record).encode("utf-8", errors="replace")
        if reason:  # the reader knows this row is no document (a WARC request, metadata … record)
            rec = record or {}
            a = docs.Annotated(str(rec.get("id") or f"{source}:{line}"), str(rec.get("url") or ""), "", docs.REMOVED,
                               reason, source, line, "", b"")
        else:
            try:
                a = docs.annotate(
                    record, error, raw=raw, source=source, line=line,
                    text_field=fields[0], id_field=fields[1], url_field=fields[2],
                    filters=spec.filters, extract=spec.extract_html,
                    quarantine_sample_bytes=spec.quarantine_sample_bytes, curator=curator, defer_toxicity=True,
                )
            except Exception as exc:  # a bug on one row quarantines that row; the stage goes on
                log.warning("quarantined %s:%s: annotate raised %r", source, line, exc)
                a = docs.Annotated(f"{source}:{line}", "", "", docs.QUARANTINED,
                                   f"annotate_error:{type(exc).__name__}", source, line, "",
                                   raw[:spec.quarantine_sample_bytes])
        annotated.append(a)
        raws.append(raw)
    # A toxicity classifier call costs ~8 ms however few texts it gets: one call for the batch's kept rows.
    for a in docs.screen_toxicity(annotated, raws, curator, spec.quarantine_sample_bytes):
        for c in docs.COLUMNS:
            out[c].append(getattr(a, c))
        for k, v in zip(PII_KINDS, a.pii, strict=True):
            out[f"pii_{k}"].append(v)
        out["uid"].append(doc_uid(a.source, a.line, a.doc_id, a.hash, (ranks or {}).get(a.source)))
    out["split"] = [""] * len(out["doc_id"])  # set for kept documents after dedup
    out["dup_of"] = [0] * len(out["doc_id"])
    out["node"] = [current_node()] * len(out["doc_id"])
    return pa.table(out, schema=ANNOTATED_SCHEMA)


@functools.lru_cache(maxsize=4)
def _spec_of(spec_json: str) -> DataSpec:
    return DataSpec.model_validate_json(spec_json)


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


def expand_inputs(paths: list[str], fmt: str) -> tuple[dict[str, list[str]], list[str]]:
    """Files per format under `paths` (directories walked recursively) and the files of unknown type."""
    import pyarrow.fs as pafs

    by_kind: dict[str, list[str]] = defaultdict(list)
    skipped: list[str] = []
    seen: set[str] = set()
    for path in paths:
        fs, p = storage.filesystem(path)
        info = fs.get_file_info(p)
        if info.type == pafs.FileType.Directory:
            files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(p, recursive=True))
                           if i.type == pafs.FileType.File and not i.base_name.startswith((".", "_")))
            files = [_with_scheme(path, p, f) for f in files]
        else:
            files = [path]
        for f in files:
            kind = fmt if fmt != "auto" else format_of(f)
            if kind is None:
                skipped.append(f)
            elif f not in seen:  # a file named twice (itself and its directory) is read once
                seen.add(f)
                by_kind[kind].append(f)
    return dict(by_kind), skipped


def _source_name(path: str) -> str:
    """The path as Ray's file datasources report it in rows (no URI scheme)."""
    return storage.filesystem(path)[1]


def _with_scheme(original: str, stripped: str, found: str) -> str:
    """A path found under a directory, in the form the user gave the directory (keeps s3:// etc.)."""
    return original.rstrip("/") + found[len(stripped.rstrip("/")):] if original != stripped else found


def _annotated(spec: JobSpec, by_kind: dict[str, list[str]], count_dir: str | None = None):
    """All inputs as one dataset of annotated rows: one map per input format, then a union.

    The JSONL and WARC readers report the rows of each file they read under `count_dir` (see `source_rows`).
    """
    spec_json = spec.data.model_dump(mode="json")
    all_files = sorted(f for files in by_kind.values() for f in files)
    parts = []
    for kind, files in sorted(by_kind.items()):
        if kind == "parquet":
            import ray.data

            raw = ray.data.read_parquet(files, include_paths=True, override_num_blocks=read_tasks(len(files)))
            mode = "parquet"
        else:
            raw, mode = read_raw_rows(kind, files, count_dir), "jsonl" if kind == "jsonl" else "doc"
        ranks = {_source_name(f): i for i, f in enumerate(all_files) if f in files}
        parts.append(raw.map_batches(annotate_batch, fn_args=(spec_json, mode, ranks), batch_format="pyarrow",
                                     batch_size=256))
    if not parts:
        raise StageInputError(f"no readable input files in {spec.data.source.paths}")
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def source_rows(by_kind: dict[str, list[str]], count_dir: str, parquet: dict[str, int]) -> dict[str, int]:
    """Rows of each input file as counted at the source, keyed as rows name their `source`.

    JSONL lines and WARC records: what the read tasks reported (`count_dir`); Parquet rows: the files'
    footers (`parquet`, read before the stage); text and HTML: one document per file.
    """
    reported = reported_rows(count_dir)
    rows: dict[str, int] = {}
    for kind, files in by_kind.items():
        for f in files:
            name = _source_name(f)
            if kind == "parquet":
                rows[name] = parquet[name]
            elif kind in ("text", "html"):
                rows[name] = 1
            elif name in reported:
                rows[name] = reported[name]
            else:
                raise AccountingError(f"the read step reported no row count for {f}: the file was not read to its "
                                      "end, so its rows cannot be accounted for")
    return rows


def check_accounting(read: dict[str, int], accounted: dict[str, int], kept: int, removed: int, quarantined: int,
                     where: str = "") -> None:
    """Fail unless every row read is exactly one of kept / removed / quarantined, file by file and in total.

    `read`: rows per input file counted at the source; `accounted`: output rows per input file; `kept`,
    `removed`, `quarantined`: the totals the report gives.
    """
    n_read, n_out = sum(read.values()), kept + removed + quarantined
    files = [(f, read.get(f, 0), accounted.get(f, 0)) for f in sorted(set(read) | set(accounted))
             if read.get(f, 0) != accounted.get(f, 0)]
    if n_read == n_out == sum(accounted.values()) and not files:
        return
    diff = n_read - n_out
    what = f"{diff} rows lost" if diff > 0 else f"{-diff} rows counted more than once" if diff else "rows moved"
    detail = "; ".join(f"{f}: read {r}, accounted {a}" for f, r, a in files[:5])
    more = f" (and {len(files) - 5} more files)" if len(files) > 5 else ""
    raise AccountingError(
        f"data stage accounting failed: read {n_read} rows at the source, but kept {kept} + removed {removed} + "
        f"quarantined {quarantined} = {n_out} ({what}). Files that differ: {detail or 'none'}{more}."
        + (f" The outputs are left under {where} for inspection." if where else ""))


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


def outcome_stats(batch: pa.Table, per_reason: int = 3) -> pa.Table:
    """Partial accounting of one block of final rows, merged on the driver (`merge_outcomes`).

    One row: a JSON document with the rows per (status, reason), per input file, per Ray node that annotated
    them and per split of the kept ones, a few samples per removal or quarantine reason, and the PII
    redactions in kept documents. A map over the rows the stage writes, not a shuffle and not a re-read.
    """
    status = batch.column("status").to_pylist()
    reason = batch.column("reason").to_pylist()
    acc: dict[str, Any] = {"reasons": defaultdict(int), "sources": defaultdict(int), "nodes": defaultdict(int),
                           "splits": defaultdict(int), "samples": defaultdict(list), "pii": {}}
    for s, r in zip(status, reason, strict=True):
        acc["reasons"][f"{s}\0{r}"] += 1
    keys = pa.table({"node": batch.column("node").fill_null("unknown"), "source": batch.column("source")})
    for by, into in (("source", "sources"), ("node", "nodes")):
        counted = keys.group_by([by]).aggregate([([], "count_all")])
        for k, n in zip(counted[by].to_pylist(), counted["count_all"].to_pylist(), strict=True):
            acc[into][k] += n
    kept = pc.equal(batch.column("status"), docs.KEPT)
    kept_rows = batch.filter(kept)
    for sp in kept_rows.column("split").to_pylist():
        acc["splits"][sp] += 1
    acc["pii"] = {k: int(pc.sum(kept_rows.column(f"pii_{k}")).as_py() or 0) for k in PII_KINDS}
    for st, body in ((docs.REMOVED, "text"), (docs.QUARANTINED, "raw")):
        idx = [i for i, s in enumerate(status) if s == st]
        if not idx:
            continue
        rows = batch.take(pa.array(idx)).select(["doc_id", "reason", body]).to_pylist()
        for row in rows:
            key = f"{st}:{row['reason']}"
            if len(acc["samples"][key]) < per_reason:
                acc["samples"][key].append({"doc_id": row["doc_id"], "snippet": _snippet(row[body] or "")})
    return pa.table({"stats": [json.dumps(acc)]})


def merge_outcomes(partials: list[dict[str, Any]], per_reason: int) -> dict[str, Any]:
    """The stage's accounting from the partials of every block (see `outcome_stats`)."""
    counts: dict[str, dict[str, int]] = {docs.KEPT: defaultdict(int), docs.REMOVED: defaultdict(int),
                                         docs.QUARANTINED: defaultdict(int)}
    sources: dict[str, int] = defaultdict(int)
    nodes: dict[str, int] = defaultdict(int)
    splits: dict[str, int] = defaultdict(int)
    samples: dict[str, list[dict[str, str]]] = defaultdict(list)
    pii = dict.fromkeys(PII_KINDS, 0)
    for p in partials:
        for key, n in p["reasons"].items():
            status, reason = key.split("\0", 1)
            counts[status][reason] += n
        for into, part in ((sources, p["sources"]), (nodes, p["nodes"]), (splits, p["splits"])):
            for k, n in part.items():
                into[k] += n
        for key, found in p["samples"].items():
            samples[key] = (samples[key] + found)[:per_reason]
        for k in PII_KINDS:
            pii[k] += p["pii"].get(k, 0)
    return {"counts": counts, "sources": dict(sorted(sources.items())), "nodes": dict(sorted(nodes.items())),
            "splits": dict(splits), "samples": samples, "pii": pii,
            "kept": sum(counts[docs.KEPT].values()), "removed": sum(counts[docs.REMOVED].values()),
            "quarantined": sum(counts[docs.QUARANTINED].values())}


def packed_sums(batch: pa.Table) -> pa.Table:
    """Partial per-split sums of one block of packed sequences (merged on the driver)."""
    acc: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for name, t, n in zip(batch.column("split").to_pylist(), batch.column("num_tokens").to_pylist(),
                          batch.column("num_docs").to_pylist(), strict=True):
        a = acc[name]
        a[0] += 1
        a[1] += t
        a[2] += n
    keys = sorted(acc)
    return pa.table({"split": keys, "sequences": [acc[k][0] for k in keys], "tokens": [acc[k][1] for k in keys],
                     "documents": [acc[k][2] for k in keys]})


STAGE_ORDER = ("warc_record", "url_blocklist", "html_no_content", "empty_text", "language", "gopher_repetition",
               "gopher_quality", "c4", "fineweb", "bad_words", "decontaminated", "toxicity", "exact_duplicate",
               "fuzzy_duplicate")


def removed_by_stage(removed: dict[str, int]) -> dict[str, int]:
    """Removal counts per stage (the part of a reason before ':'), in pipeline order."""
    by_stage: dict[str, int] = defaultdict(int)
    for reason, n in removed.items():
        by_stage[reason.split(":", 1)[0]] += n
    order = {s: i for i, s in enumerate(STAGE_ORDER)}
    return dict(sorted(by_stage.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


@functools.lru_cache(maxsize=4)
def _hasher(num_bands: int, rows_per_band: int, ngram: int, seed: int) -> minhash.MinHasher:
    return minhash.MinHasher(num_bands, rows_per_band, ngram, seed)


def band_rows(batch: pa.Table, fz: dict[str, Any], parts: int) -> pa.Table:
    """map_batches UDF: one row per (document, band): the band's bucket key, the document uid and a partition."""
    hasher = _hasher(fz["num_bands"], fz["rows_per_band"], fz["ngram"], fz["seed"])
    uids = batch.column("uid").to_numpy()
    keys = hasher.band_keys(hasher.signatures(batch.column("text").to_pylist()))  # (docs, bands)
    flat = keys.reshape(-1)
    return pa.table({"key": flat, "uid": np.repeat(uids, hasher.num_bands),
                     "part": (flat.view(np.uint64) % np.uint64(parts)).astype(np.int32)})


def partition_edges(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """map_groups UDF over one hash partition of band rows: candidate pairs of every bucket in it."""
    keys, uids = np.asarray(group["key"], dtype=np.int64), np.asarray(group["uid"], dtype=np.int64)
    a, b = minhash.bucket_edges(keys, uids)
    return {"a": a, "b": b}


def join_clusters(max_pairs: int, *tables: pa.Table) -> tuple[Any, dict[str, Any]]:
    """Ray task: candidate-pair blocks -> (sorted uids to remove, the uid each one's cluster keeps), stats.

    Runs on a cluster node, not the driver: the pairs and the cluster arrays stay in the object store,
    and only the statistics come back. Memory is bounded by the number of pairs (`max_pairs`, 16 bytes
    each), never by the corpus; beyond it the stage stops with a clear error.
    """
    n_pairs = sum(t.num_rows for t in tables)
    if n_pairs > max_pairs:
        return None, {"error": f"fuzzy dedup found {n_pairs} candidate pairs, more than "
                               f"data.fuzzy_dedup.max_pairs={max_pairs}; raise it (16 bytes each) or check the corpus"}
    cols = [(t.column("a").to_numpy(), t.column("b").to_numpy()) for t in tables if t.num_rows]
    a = np.concatenate([c[0] for c in cols]).astype(np.int64) if cols else np.empty(0, np.int64)
    b = np.concatenate([c[1] for c in cols]).astype(np.int64) if cols else np.empty(0, np.int64)
    # A pair found in several bands (or buckets) counts once: the count then does not depend on how the
    # bucket join was partitioned, i.e. on the cluster's size.
    pairs = np.unique(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1), axis=0) if len(a) else \
        np.empty((0, 2), np.int64)
    removed, keep = minhash.duplicates_to_remove(pairs[:, 0], pairs[:, 1])
    order = np.argsort(removed)
    removed, keep = removed[order], keep[order]
    return (removed, keep), {"candidate_pairs": len(pairs), "clusters": len(np.unique(keep)),
                             "removed": len(removed)}


def exact_key_rows(batch: pa.Table, parts: int) -> pa.Table:
    """map_batches UDF: the small columns exact dedup needs (no text), with a partition of the text hash."""
    part = [int(h[:8], 16) % parts for h in batch.column("hash").to_pylist()]
    return pa.table({"hash": batch.column("hash"), "source": batch.column("source"), "line": batch.column("line"),
                     "doc_id": batch.column("doc_id"), "uid": batch.column("uid"),
                     "part": pa.array(part, pa.int32())})


def partition_exact(group: pa.Table) -> pa.Table:
    """map_groups UDF over one hash partition: (uid, kept uid) of every exact duplicate in it.

    Vectorized: sort by (hash, source, line, doc_id); the first row of each run of equal hashes is kept
    (the earliest document of the input), every later row is a duplicate of it.
    """
    order = pc.sort_indices(group, sort_keys=[("hash", "ascending"), ("source", "ascending"),
                                              ("line", "ascending"), ("doc_id", "ascending")])
    hashes = np.asarray(group.column("hash").take(order).to_pylist(), dtype=object)
    uids = group.column("uid").take(order).to_numpy()
    if len(uids) < 2:
        return pa.table({"uid": pa.array([], pa.int64()), "keep": pa.array([], pa.int64())})
    new_run = np.ones(len(uids), dtype=bool)
    new_run[1:] = hashes[1:] != hashes[:-1]
    first = uids[np.flatnonzero(new_run)[np.cumsum(new_run) - 1]]
    return pa.table({"uid": pa.array(uids[~new_run], pa.int64()), "keep": pa.array(first[~new_run], pa.int64())})


def collect_marks(*tables: pa.Table) -> tuple[tuple[np.ndarray, np.ndarray], int]:
    """Ray task: (uid, keep) blocks -> ((uids sorted, the uid kept for each), count); stays in the object store."""
    cols = [(t.column("uid").to_numpy(), t.column("keep").to_numpy()) for t in tables if t.num_rows]
    uid = np.concatenate([c[0] for c in cols]).astype(np.int64) if cols else np.empty(0, np.int64)
    keep = np.concatenate([c[1] for c in cols]).astype(np.int64) if cols else np.empty(0, np.int64)
    order = np.argsort(uid, kind="stable")
    return (uid[order], keep[order]), len(uid)


def exact_dedup(kept, n_docs: int):
    """Exact duplicates among `kept` (annotated rows with status kept): an ObjectRef to (removed uids, kept uids)
    and the number removed.

    A hash shuffle of the small columns only (hash, source, line, doc_id, uid; never the text); each partition
    finds its duplicates in one vectorized sort, and one task collects the (uid, kept uid) pairs.
    """
    import ray

    parts = max(_shuffle_partitions(), n_docs // 1_000_000 + 1)
    marks = (kept.map_batches(exact_key_rows, fn_args=(parts,), batch_format="pyarrow")
             .groupby("part", num_partitions=min(parts, _shuffle_partitions() * 4))
             .map_groups(partition_exact, batch_format="pyarrow"))
    collect = ray.remote(collect_marks).options(num_returns=2, num_cpus=1)
    ref, n_ref = collect.remote(*marks.to_arrow_refs())
    return ref, int(ray.get(n_ref))


def _lookup(marks: tuple[np.ndarray, np.ndarray], uids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hit per uid, the kept uid for each hit) against sorted `marks`."""
    removed, keep = marks
    if not len(removed) or not len(uids):
        return np.zeros(len(uids), dtype=bool), np.zeros(len(uids), dtype=np.int64)
    pos = np.clip(np.searchsorted(removed, uids), 0, len(removed) - 1)
    return removed[pos] == uids, keep[pos]


def without_exact(batch: pa.Table, exact: Any) -> pa.Table:
    """map_batches UDF: the rows that are not exact duplicates (the documents fuzzy dedup compares)."""
    hit, _ = _lookup(_resolve(exact), batch.column("uid").to_numpy())
    return batch.filter(pa.array(~hit, pa.bool_())) if hit.any() else batch


def finalize(batch: pa.Table, exact: Any, fuzzy: Any, val: float, test: float, salt: str) -> pa.Table:
    """map_batches UDF: each annotated row's final outcome.

    A kept row found among the exact duplicates becomes removed ('exact_duplicate'); one found among the
    near duplicates becomes removed ('fuzzy_duplicate', `dup_of` the uid its cluster keeps). Every row that
    survived exact dedup gets its split, a stable hash of its text.
    """
    status = np.asarray(batch.column("status").to_pylist(), dtype=object)
    kept = status == docs.KEPT
    if not kept.any():
        return batch
    uids = batch.column("uid").to_numpy()
    reason = np.asarray(batch.column("reason").to_pylist(), dtype=object)
    dup_of = batch.column("dup_of").to_numpy().copy()
    ex_hit, _ = _lookup(_resolve(exact), uids)
    ex_hit &= kept
    fz_hit, fz_keep = _lookup(_resolve(fuzzy), uids)
    fz_hit &= kept & ~ex_hit
    status[ex_hit | fz_hit] = docs.REMOVED
    reason[ex_hit] = "exact_duplicate"
    reason[fz_hit] = "fuzzy_duplicate"
    dup_of[fz_hit] = fz_keep[fz_hit]
    hashes = batch.column("hash").to_pylist()
    split = [docs.split_of(h, val, test, salt) if k else "" for h, k in zip(hashes, kept & ~ex_hit, strict=True)]
    for name, values, typ in (("status", status.tolist(), pa.string()), ("reason", reason.tolist(), pa.string()),
                              ("dup_of", dup_of, pa.int64()), ("split", split, pa.string())):
        batch = batch.set_column(batch.schema.get_field_index(name), name, pa.array(values, typ))
    return batch


_EMPTY_MARKS = (np.empty(0, np.int64), np.empty(0, np.int64))


def _resolve(marks: Any) -> tuple[np.ndarray, np.ndarray]:
    import ray

    if marks is None:
        return _EMPTY_MARKS
    return ray.get(marks) if isinstance(marks, ray.ObjectRef) else marks


def fuzzy_dedup(ds, d: DataSpec, n_docs: int) -> tuple[Any, dict[str, Any]]:
    """MinHash LSH over `ds` (`n_docs` documents) as Ray Data operations; returns (an ObjectRef to the near
    duplicates: sorted uids to remove and the uid each one's cluster keeps, statistics).

    Signatures and band keys: map_batches. Bucket join: a hash shuffle (groupby) on a partition of the
    band key; every partition groups its rows by key in one vectorized sort and emits candidate pairs
    (16 bytes each). Clusters: one Ray task joins the pairs (union-find) from the object store and hands
    its result, by reference, to the pass that marks documents (`finalize`). The driver sees counts only. Each
    cluster keeps its smallest uid (the earliest document of the input).
    """
    import ray

    fz = d.fuzzy_dedup
    parts = max(_shuffle_partitions(), n_docs * fz.num_bands // 500_000 + 1)
    rows = ds.select_columns(["uid", "text"]).map_batches(band_rows, fn_args=(fz.model_dump(), parts),
                                                          batch_format="pyarrow", batch_size=256)
    edges = rows.groupby("part", num_partitions=min(parts, _shuffle_partitions() * 4)).map_groups(
        partition_edges, batch_format="numpy")
    join = ray.remote(join_clusters).options(num_returns=2, num_cpus=1)
    clusters, stats_ref = join.remote(fz.max_pairs, *edges.to_arrow_refs())
    joined = ray.get(stats_ref)
    if "error" in joined:
        raise StageInputError(joined["error"])
    stats = {"enabled": True, "documents": n_docs, **joined, "bands": fz.num_bands,
             "rows_per_band": fz.rows_per_band, "ngram": fz.ngram, "shuffle_partitions": parts}
    log.info("fuzzy dedup: %d documents, %d candidate pairs, %d clusters, %d near duplicates removed",
             n_docs, stats["candidate_pairs"], stats["clusters"], stats["removed"])
    return clusters, stats


def below_hash_threshold(batch: pa.Table, threshold: int) -> pa.Table:
    """map_batches UDF: the rows whose text hash, read as a 32-bit prefix, is below `threshold`."""
    keep = [int(h[:8], 16) < threshold for h in batch.column("hash").to_pylist()]
    return batch.filter(pa.array(keep, pa.bool_()))


def tokenizer_sample(train_docs, n: int, total: int | None = None) -> list[str]:
    """Up to `n` training texts for the tokenizer, chosen and ordered by text hash.

    The same documents in the same order whatever the cluster's shape or the order blocks finish in,
    so the trained tokenizer (and every token id downstream) is the same on 1 node or 10. Only about
    1.5 x n texts reach the driver: a hash-prefix filter runs first on the cluster. `total`: the number of
    training documents, when the caller knows it (counted otherwise).
    """
    rows = train_docs.select_columns(["hash", "text"])
    total = rows.count() if total is None else total
    if total > n:
        threshold = int(min(1.0, 1.5 * n / total) * (1 << 32))
        rows = rows.map_batches(below_hash_threshold, fn_args=(threshold,), batch_format="pyarrow")
    picked = sorted((r["hash"], r["text"]) for r in rows.take_all())
    return [text for _, text in picked[:n]]


def dataset_version(spec: JobSpec) -> tuple[str, list[str]]:
    """(version, input paths) of the dataset this spec's data stage makes: a hash of the data spec and of each input
    file's path, size and modification time, so another corpus under the same name is another version."""
    import pyarrow.fs as pafs

    from raytrain.registry import dataset_key

    d = spec.data
    paths = _input_paths(spec, storage.Layout(spec.storage.root))
    by_kind, _ = expand_inputs(paths, d.source.format if d.source.kind == "files" else "auto")
    files = []
    for f in sorted(f for fs in by_kind.values() for f in fs):
        fs, p = storage.filesystem(f)
        info = fs.get_file_info(p)
        files.append([f, info.size, info.mtime_ns if info.type == pafs.FileType.File else None])
    return dataset_key({"data": d.model_dump(mode="json", exclude={"version"}), "inputs": files,
                        "manifest_version": 1}), paths


def curate(spec: JobSpec, out: str | None = None) -> dict[str, Any]:
    """Curation, the part of the data stage before the tokenizer: read + annotate, exact and near dedup, split,
    accounting. Writes documents/, removed/, quarantine/ under `out` (default: this spec's dataset version)
    and returns the counts and the kept documents as a dataset (the benchmark times this part alone).

    One pass reads and annotates every row into Ray's object store (spilled to disk when the corpus does not
    fit); the two dedup steps shuffle small columns of it (hash and ids; band keys and ids), never the text;
    one more pass gives every row its final outcome, and the outputs are written once, from that, with the
    counts the accounting needs taken on the way (no file is read back but Parquet footers).
    """
    import ray
    from ray.data.expressions import col

    t0 = time.time()
    steps: dict[str, float] = {}
    d = spec.data
    layout = storage.Layout(spec.storage.root)
    version, paths = dataset_version(spec)
    out = out or storage.join(layout.dataset(d.name), version)
    stage = storage.join(out, "_stage")
    for sub in (*SPLITS, "removed", "quarantine", "documents", "_stage"):
        storage.remove_tree(storage.join(out, sub))
    by_kind, skipped = expand_inputs(paths, d.source.format if d.source.kind == "files" else "auto")
    log.info("data stage: reading %s (%s)", paths, {k: len(v) for k, v in by_kind.items()})
    if skipped:
        log.warning("skipping %d files of unknown type, e.g. %s", len(skipped), skipped[:3])
    parquet = parquet_rows(by_kind.get("parquet", []))

    # 1. Annotate every row (kept / removed / quarantined); the readers count rows read at the source.
    count_dir = storage.join(stage, "read")
    t = time.time()
    annotated = _annotated(spec, by_kind, count_dir).materialize()
    read_by_source = source_rows(by_kind, count_dir, parquet)
    kept = annotated.filter(expr=col("status") == docs.KEPT)
    n_candidates = kept.count()
    steps["read_annotate"] = time.time() - t

    # 2. Exact dedup (a shuffle of hashes and ids), fuzzy dedup (MinHash LSH) on what exact dedup left.
    t = time.time()
    exact_ref, n_exact = None, 0
    if d.exact_dedup and n_candidates:
        exact_ref, n_exact = exact_dedup(kept, n_candidates)
    steps["exact_dedup"] = time.time() - t
    t = time.time()
    fuzzy_stats: dict[str, Any] = {"enabled": d.fuzzy_dedup.enabled}
    fuzzy_ref = None
    if d.fuzzy_dedup.enabled and n_candidates > n_exact:
        unique = kept.map_batches(without_exact, fn_args=(exact_ref,), batch_format="pyarrow") if n_exact else kept
        fuzzy_ref, fuzzy_stats = fuzzy_dedup(unique, d, n_candidates - n_exact)
    steps["fuzzy_dedup"] = time.time() - t

    # 3. Every row's outcome and split, the accounting over those rows, then the outputs, each written once.
    t = time.time()
    sp = d.split
    final = annotated.map_batches(finalize, fn_args=(exact_ref, fuzzy_ref, sp.val_fraction, sp.test_fraction,
                                                     sp.salt), batch_format="pyarrow").materialize()
    del annotated, kept
    partials = final.map_batches(outcome_stats, fn_args=(d.report_samples,), batch_format="pyarrow").take_all()
    acc = merge_outcomes([json.loads(r["stats"]) for r in partials], d.report_samples)
    steps["outcomes"] = time.time() - t
    t = time.time()
    outputs = (("documents", docs.KEPT, acc["kept"]), ("removed", docs.REMOVED, acc["removed"]),
               ("quarantine", docs.QUARANTINED, acc["quarantined"]))
    written: dict[str, int] = {}
    for sub, status, n in outputs:
        if n:
            final.filter(expr=col("status") == status).drop_columns(["status"]).write_parquet(storage.join(out, sub))
            written[sub] = sum(parquet_rows(parquet_files(storage.join(out, sub))).values())  # footers: no data pass
    steps["write"] = time.time() - t
    if not acc["kept"]:
        raise StageInputError(f"data stage kept no documents from {paths}; see {out}/removed and {out}/quarantine")

    # Every row read is exactly one output row, file by file; what was written is what was counted. Also the
    # work per node: which node annotated each row (the pass that touches every byte; reads are separate tasks).
    check_accounting(read_by_source, acc["sources"], acc["kept"], acc["removed"], acc["quarantined"], where=out)
    for sub, _, n in outputs:
        if written.get(sub, 0) != n:
            raise AccountingError(f"data stage accounting failed: {written.get(sub, 0)} rows written to {out}/{sub}, "
                                  f"but {n} were counted for it")
    nodes = {"cluster_nodes": sum(1 for n in ray.nodes() if n.get("Alive")), "rows_annotated": acc["nodes"]}
    counts = {docs.REMOVED: acc["counts"][docs.REMOVED], docs.QUARANTINED: acc["counts"][docs.QUARANTINED]}
    log.info("curation steps (s): %s", {k: round(v, 1) for k, v in steps.items()})
    return {"t0": t0, "out": out, "stage": stage, "layout": layout, "paths": paths, "by_kind": by_kind,
            "nodes": nodes, "skipped": skipped, "counts": counts, "samples": acc["samples"], "n_kept": acc["kept"],
            "n_removed": acc["removed"], "n_quarantined": acc["quarantined"], "n_read": sum(read_by_source.values()),
            "pii_counts": acc["pii"], "fuzzy_stats": fuzzy_stats, "splits": acc["splits"], "steps": steps,
            "documents": final.filter(expr=col("status") == docs.KEPT)}


def tokenize_pack(documents, tokenizer_json: str, seq_len: int):
    """Kept documents (columns text, split) -> packed sequences of each split, batched encoding in an actor pool."""
    from raytrain.data.tokenizer import TokenizePack

    return documents.select_columns(["text", "split"]).map_batches(
        TokenizePack, fn_constructor_args=(tokenizer_json, seq_len), batch_size=TOKENIZE_BATCH,
        batch_format="pyarrow", concurrency=(1, 8))


def run_data(spec: JobSpec) -> dict[str, Any]:
    """Run the data stage; returns the manifest (also written to datasets/<name>/manifest.json).

    Curation (`curate`), then the tokenizer trained on a sample of the kept training documents, then tokenize +
    pack from the curated documents still in the object store, each split written once.
    """
    from ray.data.expressions import col

    from raytrain.data.tokenizer import train_tokenizer
    from raytrain.registry import set_dataset_latest

    d = spec.data
    version, _ = dataset_version(spec)
    version_dir = storage.join(storage.Layout(spec.storage.root).dataset(d.name), version)
    if storage.exists(storage.join(version_dir, "manifest.json")):
        # Same spec, same input files: this version is finished and immutable (models may name it).
        log.info("dataset %s version %s is up to date at %s: not recomputed", d.name, version, version_dir)
        set_dataset_latest(spec.storage.root, d.name, version)
        return storage.read_json(storage.join(version_dir, "manifest.json"))
    c = curate(spec, version_dir)
    t0, out, stage, paths, steps = c["t0"], c["out"], c["stage"], c["paths"], c["steps"]
    by_kind, skipped, counts, samples = c["by_kind"], c["skipped"], c["counts"], c["samples"]
    n_kept, n_removed, n_quarantined, n_read = c["n_kept"], c["n_removed"], c["n_quarantined"], c["n_read"]
    pii_counts, fuzzy_stats = c["pii_counts"], c["fuzzy_stats"]
    documents = c["documents"]

    # 4. Tokenizer on a sample of the training split only (val/test stay unseen).
    t = time.time()
    train_docs = documents.filter(expr=col("split") == "train")
    sample = tokenizer_sample(train_docs, d.tokenizer.sample_docs, total=c["splits"].get("train", 0))
    if not sample:
        raise StageInputError(f"data stage kept no training documents (read {n_read}); see {out}/report.json")
    tok_dir = storage.join(out, "tokenizer")  # with the version: a newer corpus never replaces an older tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer(sample, d.tokenizer.vocab_size, d.tokenizer.min_frequency, tmp)
        tok_bytes = (Path(tmp) / "tokenizer.json").read_bytes()
        storage.upload_dir(tmp, tok_dir)
    steps["tokenizer"] = time.time() - t

    # 5. Tokenize + pack every split in one pass, with the per-split sums; each split written once.
    t = time.time()
    packed = tokenize_pack(documents, tok_bytes.decode(), d.seq_len).materialize()
    split_stats: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in packed.map_batches(packed_sums, batch_format="pyarrow").take_all():
        for k in ("sequences", "tokens", "documents"):
            split_stats[row["split"]][k] += int(row[k])
    for split in SPLITS:
        if split_stats[split]["sequences"]:
            packed.filter(expr=col("split") == split).drop_columns(["split"]).write_parquet(storage.join(out, split))
    del packed, documents
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
    steps["tokenize_pack_write"] = time.time() - t

    report = {
        "dataset": d.name,
        "inputs": paths,
        "read": n_read,
        "kept": n_kept,
        "removed": dict(sorted(counts[docs.REMOVED].items())),
        "quarantined": dict(sorted(counts[docs.QUARANTINED].items())),
        "removed_total": n_removed,
        "quarantined_total": n_quarantined,
        "removed_by_stage": removed_by_stage(counts[docs.REMOVED]),
        "pii_redacted": pii_counts,
        "fuzzy_dedup": fuzzy_stats,
        "nodes": c["nodes"],
        "skipped_files": skipped,
        "inputs_by_format": {k: len(v) for k, v in by_kind.items()},
        "samples": samples,
        "seconds": round(time.time() - t0, 1),
        "seconds_by_step": {k: round(v, 1) for k, v in steps.items()},
    }
    storage.write_json(storage.join(out, "report.json"), report)
    write_report_md(report, out)
    manifest = {
        "manifest_version": 1,
        "dataset": d.name,
        "version": version,
        "path": out,
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
    storage.write_json(storage.join(out, "manifest.json"), manifest)  # last: a version with a manifest is finished
    set_dataset_latest(spec.storage.root, d.name, version)
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
    """The start of a removed or quarantined row for the report, with PII redacted: removed rows keep
    their original text in removed/ (the audit trail), but the report is for people to read and share."""
    from raytrain.data.pii import redact

    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else str(body)
    return redact(text[: n * 2])[0][:n]
