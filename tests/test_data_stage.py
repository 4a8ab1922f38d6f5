"""The data stage on a real local Ray instance: every row accounted for, artifacts as the manifest says."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytrain.config import load_spec
from raytrain.data.demo import generate_demo_corpus

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    from raytrain.data.pipeline import run_data

    root = tmp_path_factory.mktemp("data-root")
    corpus = tmp_path_factory.mktemp("corpus")
    planted = generate_demo_corpus(corpus, num_docs=240, seed=3)
    spec = load_spec("tiny", [f"storage.root={root}", "data.source.kind=files",
                              f"data.source.paths=[{corpus}]", "data.tokenizer.vocab_size=400"])
    # planted.json sits beside the shards: pass the shards only.
    spec.data.source.paths = [str(corpus / f) for f in planted["files"]]
    manifest = run_data(spec)
    return root / "datasets" / "tiny", manifest, planted


def _ids(path: Path, column: str = "doc_id") -> list[str]:
    return pq.read_table(path, columns=[column]).column(column).to_pylist()


def test_accounting_identity_and_planted_malformed_rows(demo_run: tuple[Path, dict, dict]) -> None:
    out, _, planted = demo_run
    report = json.loads((out / "report.json").read_text())
    assert report["read"] == planted["rows"]
    assert report["kept"] + report["removed_total"] + report["quarantined_total"] == report["read"]
    assert sum(report["removed"].values()) == report["removed_total"]
    for kind, n in planted["malformed"].items():
        assert report["quarantined"].get(kind, 0) == n, (kind, report["quarantined"])
    # Quarantined rows keep their raw bytes (truncated) so nothing is lost silently.
    quarantine = pq.read_table(out / "quarantine")
    assert quarantine.num_rows == report["quarantined_total"]
    assert all(len(r) > 0 for r in quarantine.column("raw").to_pylist() if r is not None)
    assert report["samples"], "report has example documents per reason"


def test_junk_and_exact_duplicates_are_removed(demo_run: tuple[Path, dict, dict]) -> None:
    out, _, planted = demo_run
    removed = pq.read_table(out / "removed", columns=["doc_id", "reason"]).to_pylist()
    reasons = {r["doc_id"]: r["reason"] for r in removed}
    kept = set(_ids(out / "documents"))
    for junk in planted["junk_ids"]:
        assert junk in reasons and reasons[junk] != "exact_duplicate", junk
    for dup, source in planted["exact_duplicate_pairs"]:
        assert reasons.get(dup) == "exact_duplicate", dup
        assert source in kept or reasons.get(source) == "exact_duplicate"
    assert not kept & set(reasons), "a document is both kept and removed"


def test_splits_are_stable_disjoint_and_packed(demo_run: tuple[Path, dict, dict]) -> None:
    out, manifest, _ = demo_run
    docs = pq.read_table(out / "documents", columns=["hash", "split"]).to_pylist()
    by_hash: dict[str, str] = {}
    for d in docs:
        assert by_hash.setdefault(d["hash"], d["split"]) == d["split"]
    seq_len = manifest["seq_len"]
    total_docs = 0
    for split in ("train", "val", "test"):
        info = manifest["splits"][split]
        if info["sequences"] == 0:
            continue
        table = pq.read_table(out / split)
        assert table.num_rows == info["sequences"]
        ids = table.column("input_ids").combine_chunks()
        lengths = {len(row) for row in ids.to_pylist()} if not isinstance(ids.type, pa.ExtensionType) else {
            ids.type.shape[0]}
        assert lengths == {seq_len}
        num_tokens = table.column("num_tokens").to_pylist()
        assert all(0 < n <= seq_len for n in num_tokens)
        assert sum(num_tokens) == info["tokens"]
        total_docs += info["documents"]
        for f in info["files"]:
            assert hashlib.sha256((out / split / f["path"]).read_bytes()).hexdigest() == f["sha256"]
    assert total_docs == manifest["counts"]["kept"]
    assert manifest["splits"]["train"]["tokens"] > manifest["splits"]["val"]["tokens"] > 0


def test_tokenizer_roundtrip_and_chat_tokens(demo_run: tuple[Path, dict, dict]) -> None:
    from transformers import AutoTokenizer

    _, manifest, _ = demo_run
    tok = AutoTokenizer.from_pretrained(manifest["tokenizer"]["path"])
    text = "The history of the garden, café and Zürich."
    assert tok.decode(tok.encode(text)) == text
    for special in ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"):
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n")


def test_parquet_input_with_malformed_rows(tmp_path: Path) -> None:
    from raytrain.data.pipeline import run_data

    good = [f"Row {i}: the history of the river town is long and the people there bake bread every morning, "
            f"tend their gardens in spring and tell stories about the stars in the clear night sky." for i in range(60)]
    texts = [*good, None, None, good[0]]
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(len(texts))], "text": texts}), tmp_path / "in.parquet")
    spec = load_spec("tiny", [f"storage.root={tmp_path / 'root'}", "data.source.kind=files",
                              f"data.source.paths=[{tmp_path / 'in.parquet'}]", "data.filters.min_words=10",
                              "data.tokenizer.vocab_size=300", "data.split.val_fraction=0.2"])
    manifest = run_data(spec)
    counts = manifest["counts"]
    assert counts["read"] == len(texts)
    assert counts["quarantined"] == {"missing_text": 2}
    assert counts["removed"] == {"exact_duplicate": 1}
    assert counts["kept"] == 60
