"""Data and training across a real 2-node Ray cluster (second node joined with `ray start --address`)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from cluster_fixtures import ray_cluster
from conftest import REPO, dataset_path
from raytrain.config import load_spec
from raytrain.data.demo import generate_demo_corpus
from raytrain.data.tokenizer import EOS
from train_fixtures import build_packed_dataset

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[dict[str, str]]:
    """One 2-node cluster (3 CPUs each) for the module: the head plus a node joined with `ray start --address`."""
    with ray_cluster(nodes=2) as cluster:
        yield cluster


def _env(cluster: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in cluster.items() if k not in ("gcs", "token")}


def test_one_worker_per_node(tmp_path: Path, two_nodes: dict[str, str]) -> None:
    build_packed_dataset(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.pretrain", "--config", "tiny", f"storage.root={tmp_path}",
         f"cluster.address={two_nodes['gcs']}", "train.placement_strategy=STRICT_SPREAD", "train.max_steps=4",
         "train.warmup_steps=1", "train.checkpoint_every=4", "train.log_every=2", "train.micro_batch_size=4"],
        cwd=REPO, env=_env(two_nodes), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The summary is the stage's JSON; Ray may print a warning after it at shutdown.
    summary, _ = json.JSONDecoder().raw_decode(proc.stdout[proc.stdout.index('{\n  "stage"'):])
    assert summary["metrics"]["num_nodes"] == 2
    assert summary["metrics"]["step"] == 4
    assert (Path(summary["model_dir"]) / "model.safetensors").is_file()


def _split_corpus(src: Path, dest: Path, files: int = 16) -> None:
    """The demo corpus re-cut into `files` plain JSONL files, so the read has work to spread over nodes.

    2,400 documents: annotation runs in tasks of 256 rows, and a few hundred rows would be one task on
    one node whatever the cluster.
    """
    import gzip

    planted = generate_demo_corpus(src, num_docs=2400, seed=11)
    lines: list[bytes] = []
    for name in planted["files"]:
        data = (src / name).read_bytes()
        lines += (gzip.decompress(data) if name.endswith(".gz") else data).splitlines()
    dest.mkdir()
    per = -(-len(lines) // files)
    for i in range(files):
        (dest / f"part-{i:02d}.jsonl").write_bytes(b"\n".join(lines[i * per:(i + 1) * per]) + b"\n")


def _data_overrides(root: Path, corpus: Path) -> list[str]:
    return [f"storage.root={root}", "data.source.kind=files", f"data.source.paths=[{corpus}]"]


def _table(path: Path, columns: list[str], key: list[str]) -> list[dict]:
    rows = pq.read_table(path, columns=columns).to_pylist()
    return sorted(rows, key=lambda r: tuple(str(r[k]) for k in key))


def _documents_in_shards(path: Path, eos: int) -> list[tuple[int, ...]]:
    """Every document's token ids as found in the packed shards (padding cut, split at end-of-text)."""
    found: list[tuple[int, ...]] = []
    for f in sorted(path.glob("*.parquet")):
        t = pq.read_table(f, columns=["input_ids", "num_tokens"])
        stream = [tok for ids, n in zip(t.column("input_ids").to_pylist(), t.column("num_tokens").to_pylist(),
                                        strict=True) for tok in ids[:n]]
        doc: list[int] = []
        for tok in stream:
            if tok == eos:
                found.append(tuple(doc))
                doc = []
            else:
                doc.append(tok)
        assert not doc, f"{f}: a document without its end-of-text separator"
    return sorted(found)


@pytest.mark.usefixtures("ray_local")
def test_data_stage_on_two_nodes_does_work_on_both_and_matches_one_node(
        tmp_path: Path, two_nodes: dict[str, str]) -> None:
    """The same corpus through the data stage on one node (the session's local Ray, 4 CPUs) and on a
    2-node cluster (3 CPUs each, `python -m jobs.data` with cluster.address): both nodes annotate
    rows, and the curated output is the same.

    "The same": every count of the report, the kept documents (ids, text after redaction, split, cluster
    keeper), the removed and quarantined rows with their reasons, the tokenizer (byte for byte) and, per
    split, the token ids of every document in the packed shards. Only where documents sit in the packed
    sequences may differ: packing follows the order blocks arrive in, which depends on the cluster.
    """
    from raytrain.data.pipeline import run_data

    corpus = tmp_path / "corpus"
    _split_corpus(tmp_path / "demo", corpus)
    run_data(load_spec("tiny", _data_overrides(tmp_path / "one", corpus)))
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.data", "--config", "tiny", f"cluster.address={two_nodes['gcs']}",
         *_data_overrides(tmp_path / "two", corpus)],
        cwd=REPO, env=_env(two_nodes), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = dataset_path(tmp_path / "one", "tiny"), dataset_path(tmp_path / "two", "tiny")
    r1, r2 = (json.loads((d / "report.json").read_text()) for d in (one, two))

    per_node = r2["nodes"]["rows_annotated"]
    assert r2["nodes"]["cluster_nodes"] == 2 and len(per_node) == 2, r2["nodes"]
    assert all(n > 0 for n in per_node.values()) and sum(per_node.values()) == r2["read"], per_node
    assert len(r1["nodes"]["rows_annotated"]) == 1

    for key in ("read", "kept", "removed", "quarantined", "removed_by_stage", "pii_redacted"):
        assert r1[key] == r2[key], key
    drop = {"shuffle_partitions"}  # one per cluster CPU: 4 here, 6 there
    assert {k: v for k, v in r1["fuzzy_dedup"].items() if k not in drop} == \
        {k: v for k, v in r2["fuzzy_dedup"].items() if k not in drop}

    kept_cols = ["uid", "doc_id", "text", "split", "hash", "dup_of"]
    assert _table(one / "documents", kept_cols, ["uid"]) == _table(two / "documents", kept_cols, ["uid"])
    for sub in ("removed", "quarantine"):
        cols = ["source", "line", "doc_id", "reason"]
        assert _table(one / sub, cols, cols) == _table(two / sub, cols, cols), sub

    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
    assert m1["tokenizer"]["sha256"] == m2["tokenizer"]["sha256"]
    assert m1["counts"] == m2["counts"]
    eos = Tokenizer.from_file(str(Path(m1["tokenizer"]["path"]) / "tokenizer.json")).token_to_id(EOS)
    for split in ("train", "val", "test"):
        assert m1["splits"][split]["documents"] == m2["splits"][split]["documents"], split
        assert m1["splits"][split]["tokens"] == m2["splits"][split]["tokens"], split
        docs1 = _documents_in_shards(one / split, eos)
        assert docs1 == _documents_in_shards(two / split, eos), split
        assert len(docs1) == m1["splits"][split]["documents"], split
