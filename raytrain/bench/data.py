"""`raytrain bench data`: curation throughput and dedup quality, raytrain vs datatrove, side by side.

One run generates the demo corpus (planted exact and near duplicates, junk, PII), then alternates:

* raytrain: passes 1-3 of the data stage (read, filters, PII, exact + MinHash dedup, accounting) on
  a local Ray instance;
* datatrove: ``LocalPipelineExecutor`` with the same rules (Gopher repetition and quality, C4 with the
  same thresholds, FineWeb, email/IP PII) and the same MinHash settings (word 5-grams, 14 x 8),
  run with the datatrove interpreter given by ``--datatrove-python`` (datatrove 0.10.1 pins
  trafilatura < 1.12, which conflicts with raytrain's trafilatura 2.3, so it lives in its own venv).

Both read the same JSONL (the corpus without its malformed rows, which datatrove's reader cannot
skip), with HTML extraction and language ID off on both sides (datatrove's language filter downloads
its fastText model at run time). Reported: documents/s of each and the ratio, and dedup precision and
recall on the planted near duplicates (Jaccard >= 0.8 on word 5-grams). Then tokenization: tokens/s of
the pipeline's tokenize + pack pass (Ray Data) vs ``tokenizers``' own ``encode_batch`` on the same texts.

``--memory`` instead measures the driver's peak RSS of the curation passes at N and 4N documents
(each in a fresh process).
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from raytrain.bench.machine import machine

_PACKAGES = ("ray", "tokenizers", "pyarrow", "numpy", "xxhash", "py3langid")

log = logging.getLogger(__name__)

DEFAULT_DATATROVE_PYTHON = ".venv-datatrove/bin/python"

_DATATROVE_SCRIPT = r'''
import json, sys, time
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                               MinhashDedupFilter, MinhashDedupSignature)
from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                        GopherRepetitionFilter)
from datatrove.pipeline.formatters import PIIFormatter
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter

def main():
    inp, work, tasks, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    cfg = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8)
    t0 = time.time()
    filtering = LocalPipelineExecutor(pipeline=[
        JsonlReader(inp),
        GopherRepetitionFilter(),
        GopherQualityFilter(),
        C4QualityFilter(min_num_sentences=3, min_words_per_line=5, split_paragraph=True),
        FineWebQualityFilter(char_duplicates_ratio=0.1),
        PIIFormatter(),
        JsonlWriter(f"{work}/filtered"),
    ], tasks=tasks, workers=workers, logging_dir=f"{work}/logs/filter")
    filtering.run()
    sigs = LocalPipelineExecutor(pipeline=[JsonlReader(f"{work}/filtered"),
                                           MinhashDedupSignature(f"{work}/sigs", config=cfg)],
                                 tasks=tasks, workers=workers, logging_dir=f"{work}/logs/sigs")
    sigs.run()
    buckets = LocalPipelineExecutor(pipeline=[MinhashDedupBuckets(f"{work}/sigs", f"{work}/buckets", config=cfg)],
                                    tasks=cfg.num_buckets, workers=workers, logging_dir=f"{work}/logs/buckets")
    buckets.run()
    cluster = LocalPipelineExecutor(pipeline=[MinhashDedupCluster(f"{work}/buckets", f"{work}/remove", config=cfg)],
                                    tasks=1, workers=1, logging_dir=f"{work}/logs/cluster")
    cluster.run()
    final = LocalPipelineExecutor(pipeline=[
        JsonlReader(f"{work}/filtered"),
        MinhashDedupFilter(f"{work}/remove", exclusion_writer=JsonlWriter(f"{work}/removed")),
        JsonlWriter(f"{work}/output"),
    ], tasks=tasks, workers=workers, logging_dir=f"{work}/logs/final")
    final.run()
    print(json.dumps({"seconds": time.time() - t0}))


if __name__ == "__main__":  # the executor starts workers with forkserver, which re-imports this file
    main()
'''


# ------------------------------------------------------------------------------------------ corpus


def prepare_corpus(workdir: Path, num_docs: int, seed: int, shards: int = 4) -> tuple[dict[str, Any], Path, dict]:
    """Generate the demo corpus and write the well-formed rows as `shards` plain JSONL files.

    Returns (planted ground truth, input folder, {doc id: text}).
    """
    from raytrain.data.demo import generate_demo_corpus
    from raytrain.data.documents import parse_jsonl_line

    raw = workdir / "corpus"
    planted = generate_demo_corpus(raw, num_docs=num_docs, seed=seed)
    inp = workdir / "input"
    inp.mkdir(parents=True, exist_ok=True)
    outs = [open(inp / f"part-{i:05d}.jsonl", "wb") for i in range(shards)]
    texts: dict[str, str] = {}
    n = 0
    try:
        for name in planted["files"]:
            opener = gzip.open if name.endswith(".gz") else open
            with opener(raw / name, "rb") as f:
                for line in f:
                    record, err = parse_jsonl_line(line.rstrip(b"\n"), 1_000_000)
                    if err or not isinstance(record.get("text"), str) or len(record["text"]) > 1_000_000:
                        continue
                    texts[record["id"]] = record["text"]
                    outs[n * shards // max(1, num_docs)].write(line if line.endswith(b"\n") else line + b"\n")
                    n += 1
    finally:
        for f in outs:
            f.close()
    return planted, inp, texts


# --------------------------------------------------------------------------------------- measures


def dedup_quality(planted: dict[str, Any], texts: dict[str, str], dedup_removed: set[str],
                  filter_removed: set[str], min_jaccard: float = 0.8) -> dict[str, Any]:
    """Precision and recall of duplicate removal against the planted duplicates.

    Recall: of the planted near-duplicate pairs with word 5-gram Jaccard >= `min_jaccard` whose two
    documents both passed the quality filters, the fraction with one of the two removed as a duplicate.
    Precision: of the documents removed as duplicates, the fraction that belong to a planted family
    (a source and its exact or near copies). The definition needs no cluster ids, so it applies to
    both tools alike.
    """
    from raytrain.data.demo import word_shingle_jaccard

    family = set()
    for dup, src in planted["exact_duplicate_pairs"] + planted["near_duplicate_pairs"]:
        family.update((dup, src))
    pairs = [(d, s) for d, s in planted["near_duplicate_pairs"]
             if d in texts and s in texts and d not in filter_removed and s not in filter_removed
             and word_shingle_jaccard(texts[d], texts[s]) >= min_jaccard]
    found = sum(1 for d, s in pairs if d in dedup_removed or s in dedup_removed)
    correct = sum(1 for d in dedup_removed if d in family)
    return {"pairs": len(pairs), "recall": found / len(pairs) if pairs else None,
            "removed_as_duplicates": len(dedup_removed),
            "precision": correct / len(dedup_removed) if dedup_removed else None}


def _bench_spec(inp: Path, root: Path, **overrides: Any):
    from raytrain.config.loader import load_spec

    args = [f"storage.root={root}", "data.name=bench", "data.source.kind=files", f"data.source.paths=[{inp}]",
            "data.extract_html=false", "data.filters.language.enabled=false",
            "data.pii.phone=false", "data.pii.credit_card=false"]
    args += [f"{k}={v}" for k, v in overrides.items()]
    return load_spec("tiny", args)


def run_raytrain(inp: Path, root: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from raytrain.data.pipeline import curate

    spec = _bench_spec(inp, root)
    t0 = time.perf_counter()
    c = curate(spec)
    seconds = time.perf_counter() - t0
    out = Path(c["out"])
    removed = pq.read_table(out / "removed", columns=["doc_id", "reason"]).to_pylist()
    dedup = {r["doc_id"] for r in removed if r["reason"] in ("exact_duplicate", "fuzzy_duplicate")}
    filtered = {r["doc_id"] for r in removed} - dedup
    return {"seconds": seconds, "read": c["n_read"], "kept": c["n_kept"], "dedup_removed": dedup,
            "steps": {k: round(v, 2) for k, v in c["steps"].items()},
            "filter_removed": filtered, "removed": dict(c["counts"]["removed"]), "out": str(out)}


def run_datatrove(python: str, inp: Path, work: Path, tasks: int, workers: int) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    script = work / "datatrove_pipeline.py"
    script.write_text(_DATATROVE_SCRIPT)
    t0 = time.perf_counter()
    proc = subprocess.run([python, str(script), str(inp), str(work / "run"), str(tasks), str(workers)],
                          capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"datatrove failed ({proc.returncode}): {proc.stderr[-3000:]}")

    def ids(folder: Path) -> set[str]:
        found: set[str] = set()
        for f in sorted(folder.glob("*.jsonl*")) if folder.exists() else []:
            with (gzip.open if f.suffix == ".gz" else open)(f, "rt", encoding="utf-8") as fh:
                found.update(json.loads(line)["id"] for line in fh if line.strip())
        return found

    run_dir = work / "run"
    kept, dedup, filtered_in = ids(run_dir / "output"), ids(run_dir / "removed"), ids(run_dir / "filtered")
    return {"seconds": seconds, "kept": len(kept), "dedup_removed": dedup, "filtered_ids": filtered_in}


def tokenization(out: Path, vocab_size: int = 4096, seq_len: int = 1024, rounds: int = 1) -> dict[str, Any]:
    """tokens/s of the data stage's tokenize + pack (`raytrain.data.pipeline.tokenize_pack`: documents read from
    the curated Parquet, encoded in batches by an actor pool, packed, written as Parquet) vs `tokenizers`'
    `encode_batch` (and `encode_batch_fast`) alone in this process on the same texts, alternating `rounds` times.

    The bare side runs with TOKENIZERS_PARALLELISM as set for the run (the CLI sets false: one thread), and the
    pipeline with one actor per Ray CPU at most, so on N CPUs the pipeline may use N cores against the bare
    side's one: the ratio says what the pipeline makes of the machine, not the cost per token.
    """
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer

    from raytrain.data.pipeline import tokenize_pack
    from raytrain.data.readers import read_prepared
    from raytrain.data.tokenizer import train_tokenizer

    texts = pq.read_table(out / "documents", columns=["text"]).column("text").to_pylist()
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer(texts[:20_000], vocab_size, 2, tmp)
        tok_json = (Path(tmp) / "tokenizer.json").read_text()
    tok = Tokenizer.from_str(tok_json)
    bare: dict[str, list[float]] = {"encode_batch": [], "encode_batch_fast": []}
    piped: list[float] = []
    n_bare = n_piped = 0
    for _ in range(rounds):
        for name in bare:
            t0 = time.perf_counter()
            n_bare = sum(len(e.ids) for e in getattr(tok, name)(texts, add_special_tokens=False))
            bare[name].append(n_bare / (time.perf_counter() - t0))
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            tokenize_pack(read_prepared(str(out / "documents"), columns=["text", "split"]), tok_json,
                          seq_len).write_parquet(tmp)
            seconds = time.perf_counter() - t0
            n_piped = int(pq.read_table(tmp, columns=["num_tokens"]).column("num_tokens").to_numpy().sum())
            piped.append(n_piped / seconds)
    # Every document's tokens plus its end-of-text separator: the pipeline's count is the bare one + documents.
    best_bare = max(statistics.median(v) for v in bare.values())
    ratios = [p / max(b) for p, b in zip(piped, zip(*bare.values(), strict=True), strict=True)]
    return {"documents": len(texts), "tokens_bare": n_bare, "tokens_pipeline": n_piped, "rounds": rounds,
            "bare_tokens_per_s": {k: [round(x) for x in v] for k, v in bare.items()},
            "pipeline_tokens_per_s": [round(x) for x in piped],
            "pipeline_vs_bare": statistics.median(piped) / best_bare,
            "pipeline_vs_bare_per_round": [round(r, 3) for r in ratios]}


def run(num_docs: int = 100_000, seed: int = 0, rounds: int = 1, cpus: int | None = None,
        datatrove_python: str | None = DEFAULT_DATATROVE_PYTHON, workdir: str | None = None,
        tokenize: bool = True) -> dict[str, Any]:
    """Run the comparison; returns every figure (what `main` writes as JSON)."""
    import ray

    cpus = cpus or os.cpu_count() or 2
    tmp = tempfile.TemporaryDirectory(dir=workdir) if workdir is None or Path(workdir).exists() else None
    work = Path(tmp.name if tmp else workdir)
    t0 = time.perf_counter()
    planted, inp, texts = prepare_corpus(work, num_docs, seed)
    n_input = len(texts)
    result: dict[str, Any] = {"benchmark": "data", "num_docs_generated": num_docs, "num_docs_input": n_input,
                              "seed": seed, "rounds": rounds, "cpus": cpus, "machine": machine(_PACKAGES),
                              "corpus_seconds": time.perf_counter() - t0}
    use_dt = bool(datatrove_python) and Path(datatrove_python).exists()
    if datatrove_python and not use_dt:
        log.warning("datatrove interpreter %s not found: raytrain side only", datatrove_python)
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="WARNING", ignore_reinit_error=True)
    try:
        rt_runs, dt_runs = [], []
        for r in range(rounds):  # alternate, so drift on a shared machine hits both sides alike
            rt = run_raytrain(inp, work / f"rt-{r}")
            rt_runs.append(rt)
            log.info("round %d raytrain: %.1fs", r, rt["seconds"])
            if use_dt:
                dt = run_datatrove(datatrove_python, inp, work / f"dt-{r}", tasks=4, workers=cpus)
                dt_runs.append(dt)
                log.info("round %d datatrove: %.1fs", r, dt["seconds"])
        rt = rt_runs[-1]
        rt_s = statistics.median(x["seconds"] for x in rt_runs)
        result["raytrain"] = {
            "seconds": [x["seconds"] for x in rt_runs], "docs_per_s": n_input / rt_s, "kept": rt["kept"],
            "removed": rt["removed"], "seconds_by_step": [x["steps"] for x in rt_runs],
            "dedup": dedup_quality(planted, texts, rt["dedup_removed"], rt["filter_removed"]),
        }
        if dt_runs:
            dt = dt_runs[-1]
            dt_s = statistics.median(x["seconds"] for x in dt_runs)
            dt_filtered = set(texts) - dt["filtered_ids"]
            result["datatrove"] = {
                "seconds": [x["seconds"] for x in dt_runs], "docs_per_s": n_input / dt_s, "kept": dt["kept"],
                "removed_by_filters": len(dt_filtered),
                "dedup": dedup_quality(planted, texts, dt["dedup_removed"], dt_filtered),
            }
            result["throughput_ratio_raytrain_vs_datatrove"] = dt_s / rt_s
            result["throughput_ratio_per_round"] = [round(d["seconds"] / r["seconds"], 3)
                                                    for r, d in zip(rt_runs, dt_runs, strict=True)]
        if tokenize:
            result["tokenization"] = tokenization(Path(rt["out"]), rounds=rounds)
    finally:
        ray.shutdown()
        if tmp:
            tmp.cleanup()
    return result


def profile(num_docs: int, seed: int, top: int = 15) -> dict[str, Any]:
    """Where the data stage's CPU time goes: its per-row work (the UDFs its Ray Data steps run: annotate, exact-dedup
    keys, MinHash band keys, bucket join, final outcomes, accounting, tokenize + pack) run in this process under
    cProfile on the generated corpus, batch by batch as the stage runs them. Ray's scheduling, object transfer and
    Parquet I/O are not in it (the stage's `seconds_by_step` and the throughput run cover the whole).

    Returns the seconds of each step and the `top` functions by own time and by cumulative time.
    """
    import cProfile
    import pstats

    import pyarrow as pa

    from raytrain.data import pipeline as pl
    from raytrain.data.readers import RAW_SCHEMA
    from raytrain.data.tokenizer import TokenizePack, train_tokenizer

    work = Path(tempfile.mkdtemp())
    _, inp, _ = prepare_corpus(work, num_docs, seed)
    spec = _bench_spec(inp, work / "rt")
    spec_json = spec.data.model_dump(mode="json")
    files = sorted(inp.glob("*.jsonl"))
    ranks = {str(f): i for i, f in enumerate(files)}
    batches = []
    for f in files:
        lines = f.read_bytes().split(b"\n")
        rows = [(raw, str(f), i + 1) for i, raw in enumerate(lines) if raw.strip()]
        for i in range(0, len(rows), 256):
            chunk = rows[i:i + 256]
            batches.append(pa.table({"raw": [r[0] for r in chunk], "source": [r[1] for r in chunk],
                                     "line": [r[2] for r in chunk]}, schema=RAW_SCHEMA))
    fz = spec.data.fuzzy_dedup
    sp = spec.data.split
    steps: dict[str, float] = {}
    prof = cProfile.Profile()

    def step(name: str, fn: Any) -> Any:
        t0 = time.perf_counter()
        prof.enable()
        try:
            return fn()
        finally:
            prof.disable()
            steps[name] = round(time.perf_counter() - t0, 3)

    annotated = step("annotate", lambda: [pl.annotate_batch(b, spec_json, "jsonl", ranks) for b in batches])
    kept = [b.filter(pa.compute.equal(b.column("status"), "kept")) for b in annotated]
    keys = pa.concat_tables(step("exact_keys", lambda: [pl.exact_key_rows(b, 4) for b in kept]))
    marks = step("exact_groups", lambda: [pl.partition_exact(keys.filter(pa.compute.equal(keys.column("part"), p)))
                                          for p in range(4)])
    exact, _ = pl.collect_marks(*marks)
    unique = [pl.without_exact(b, exact) for b in kept]
    bands = pa.concat_tables(step("minhash_bands", lambda: [pl.band_rows(b.select(["uid", "text"]), fz.model_dump(), 4)
                                                            for b in unique]))
    edges = step("bucket_join", lambda: [pl.partition_edges({c: bands.filter(pa.compute.equal(bands.column("part"), p))
                                                             .column(c).to_numpy() for c in ("key", "uid")})
                                         for p in range(4)])
    fuzzy, _ = step("clusters", lambda: pl.join_clusters(fz.max_pairs, *[pa.table(e) for e in edges]))
    final = step("finalize", lambda: [pl.finalize(b, exact, fuzzy, sp.val_fraction, sp.test_fraction, sp.salt)
                                      for b in annotated])
    step("accounting", lambda: [pl.outcome_stats(b, spec.data.report_samples) for b in final])
    texts = [t for b in final for t, s in zip(b.column("text").to_pylist(), b.column("status").to_pylist(),
                                               strict=True) if s == "kept"]
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer(texts[:5000], spec.data.tokenizer.vocab_size, 2, tmp)
        pack = TokenizePack((Path(tmp) / "tokenizer.json").read_text(), spec.data.seq_len)
    step("tokenize_pack", lambda: [pack({"text": texts[i:i + pl.TOKENIZE_BATCH]})
                                   for i in range(0, len(texts), pl.TOKENIZE_BATCH)])
    stats = pstats.Stats(prof)
    total = sum(steps.values())

    def rows(key: int) -> list[dict[str, Any]]:
        entries = sorted(stats.stats.items(), key=lambda kv: kv[1][key], reverse=True)[:top]  # type: ignore[attr-defined]
        return [{"function": f"{Path(f).name}:{line}({name})", "calls": nc, "own_s": round(tt, 3),
                 "cumulative_s": round(ct, 3), "own_pct": round(100 * tt / total, 1)}
                for (f, line, name), (_, nc, tt, ct, _) in entries]

    return {"benchmark": "data-profile", "num_docs": num_docs, "machine": machine(_PACKAGES), "seconds_by_step": steps,
            "total_s": round(total, 3), "top_own": rows(2), "top_cumulative": rows(3)}


def _memory_child(num_docs: int, seed: int, cpus: int) -> dict[str, Any]:
    import ray

    work = Path(tempfile.mkdtemp())
    _, inp, texts = prepare_corpus(work, num_docs, seed)
    del texts
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="WARNING")
    try:
        rt = run_raytrain(inp, work / "rt")
    finally:
        ray.shutdown()
    return {"num_docs": num_docs, "seconds": rt["seconds"], "driver_peak_rss_mib":
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_ray_mib": base / 1024}


def memory(num_docs: int, seed: int, cpus: int) -> dict[str, Any]:
    """Driver peak RSS of the curation passes at N and 4N documents, each in a fresh process.

    The corpus generator runs in the same process before Ray starts; its peak (it streams rows) is
    reported as `rss_before_ray_mib` so the two can be told apart.
    """
    runs = []
    for n in (num_docs, 4 * num_docs):
        proc = subprocess.run([sys.executable, "-m", "raytrain.bench.data", "--memory-child", str(n),
                               "--seed", str(seed), "--cpus", str(cpus)], capture_output=True, text=True, check=True)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {"benchmark": "data-memory", "machine": machine(_PACKAGES), "runs": runs,
            "peak_rss_ratio_4x": runs[1]["driver_peak_rss_mib"] / runs[0]["driver_peak_rss_mib"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="raytrain bench data", description=__doc__.split("\n\n")[0])
    p.add_argument("--num-docs", type=int, default=100_000, help="documents in the generated corpus")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=1, help="alternating rounds of raytrain and datatrove")
    p.add_argument("--cpus", type=int, default=None, help="Ray CPUs and datatrove workers (default: all)")
    p.add_argument("--datatrove-python", default=DEFAULT_DATATROVE_PYTHON,
                   help="python of a venv with datatrove[processing,io]==0.10.1 and spacy ('' to skip)")
    p.add_argument("--no-tokenize", action="store_true", help="skip the tokenization comparison")
    p.add_argument("--memory", action="store_true", help="measure driver peak RSS at N and 4N documents instead")
    p.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true",
                   help="profile the stage's per-row work in this process (cProfile) instead: top functions by time")
    p.add_argument("--workdir", default=None, help="where the corpus and outputs go (default: a temp dir)")
    p.add_argument("--out", default=None, help="JSON result file (default: artifacts/bench/data-<N>.json)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cpus = args.cpus or os.cpu_count() or 2
    if args.memory_child is not None:
        print(json.dumps(_memory_child(args.memory_child, args.seed, cpus)))
        return 0
    if args.profile:
        result = profile(args.num_docs, args.seed)
    elif args.memory:
        result = memory(args.num_docs, args.seed, cpus)
    else:
        result = run(args.num_docs, args.seed, args.rounds, cpus, args.datatrove_python or None, args.workdir,
                     not args.no_tokenize)
    kind = "-profile" if args.profile else "-memory" if args.memory else ""
    out = Path(args.out or f"artifacts/bench/data{kind}-{args.num_docs}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
