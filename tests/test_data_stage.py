"""The data stage on a real local Ray instance: every row accounted for, artifacts as the manifest says."""

from __future__ import annotations

import hashlib
import json
from io import BytesIO
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import dataset_path
from raytrain.config import load_spec
from raytrain.data.demo import generate_demo_corpus

pytestmark = pytest.mark.usefixtures("ray_local")


# Rows of the extra sources below, besides the demo corpus: 2 text files, 1 HTML file, and a WARC file of 6
# records (warcinfo, a request, 2 HTML responses, an image response, a metadata record).
EXTRA_ROWS = 9
WARC_REMOVED = {"warc_record:warcinfo": 1, "warc_record:request": 1, "warc_record:response_non_text": 1,
                "warc_record:metadata": 1}
EVAL_SENTENCE = ("the archive keeps every letter the old harbour master wrote to the council about the winter "
                 "storms and the repairs that followed")


def _extra_sources(corpus: Path, planted: dict) -> list[str]:
    """A directory of text and HTML files, a WARC archive, and an eval set that contaminates one document."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    other = generate_demo_corpus(corpus / "other", num_docs=60, seed=99)  # unrelated prose: no near duplicates
    special = {*other["html_ids"], *other["junk_ids"], *(d for d, _ in other["near_duplicate_pairs"]),
               *(d for d, _ in other["exact_duplicate_pairs"]), *(e["id"] for e in other["pii"]),
               *(e["id"] for e in other["pii_decoys"])}
    prose = []
    for line in (corpus / "other" / other["files"][0]).read_bytes().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # the planted malformed rows
            continue
        if isinstance(row.get("text"), str) and row["id"] not in special and len(prose) < 5:
            prose.append(row["text"])
    extra = corpus / "extra"
    extra.mkdir()
    (extra / "a.txt").write_text(prose[0])
    (extra / "contaminated.txt").write_text(prose[1] + "\n\nIn the museum, " + EVAL_SENTENCE + ".")
    (extra / "b.html").write_text(f"<html><body><article><p>{prose[2]}</p></article></body></html>")
    (extra / "notes.bin").write_bytes(b"\x00\x01")  # unknown type: skipped and reported
    with open(extra / "crawl.warc.gz", "wb") as f:
        writer = WARCWriter(f, gzip=True)
        writer.write_record(writer.create_warcinfo_record("crawl.warc.gz", {"software": "test"}))
        request = StatusAndHeaders("GET /0 HTTP/1.0", [("Host", "crawl.example.com")], is_http_request=True)
        writer.write_record(writer.create_warc_record("https://crawl.example.com/0", "request",
                                                      payload=BytesIO(b""), http_headers=request))
        for i in range(2):
            page = f"<html><body><article><p>{prose[3 + i]}</p></article></body></html>"
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.0")
            writer.write_record(writer.create_warc_record(f"https://crawl.example.com/{i}", "response",
                                                          payload=BytesIO(page.encode()), http_headers=headers))
        image = StatusAndHeaders("200 OK", [("Content-Type", "image/png")], protocol="HTTP/1.0")
        writer.write_record(writer.create_warc_record("https://crawl.example.com/logo.png", "response",
                                                      payload=BytesIO(b"\x89PNG\r\n\x1a\n"), http_headers=image))
        writer.write_record(writer.create_warc_record("https://crawl.example.com/0", "metadata",
                                                      payload=BytesIO(b"fetchTimeMs: 120\n"),
                                                      warc_content_type="application/warc-fields"))
    (corpus / "eval.txt").write_text(EVAL_SENTENCE + "\n")
    return [str(extra)]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    from raytrain.data.pipeline import run_data

    root = tmp_path_factory.mktemp("data-root")
    corpus = tmp_path_factory.mktemp("corpus")
    planted = generate_demo_corpus(corpus, num_docs=240, seed=3)
    spec = load_spec("tiny", [f"storage.root={root}", "data.source.kind=files",
                              f"data.source.paths=[{corpus}]", "data.tokenizer.vocab_size=400",
                              f"data.decontamination.eval_paths=[{corpus / 'eval.txt'}]"])
    # planted.json sits beside the shards: pass the shards only, plus the extra sources.
    spec.data.source.paths = [str(corpus / f) for f in planted["files"]] + _extra_sources(corpus, planted)
    manifest = run_data(spec)
    return dataset_path(root, "tiny"), manifest, planted


def _ids(path: Path, column: str = "doc_id") -> list[str]:
    return pq.read_table(path, columns=[column]).column(column).to_pylist()


def test_accounting_identity_and_planted_malformed_rows(demo_run: tuple[Path, dict, dict]) -> None:
    out, manifest, planted = demo_run
    report = json.loads((out / "report.json").read_text())
    # `read` is counted at the source (lines, records, files), so it must equal what was planted
    assert report["read"] == manifest["counts"]["read"] == planted["rows"] + EXTRA_ROWS
    assert report["kept"] + report["removed_total"] + report["quarantined_total"] == report["read"]
    assert sum(report["removed"].values()) == report["removed_total"]
    for kind, n in planted["malformed"].items():
        assert report["quarantined"].get(kind, 0) == n, (kind, report["quarantined"])
    # Quarantined rows keep their raw bytes (truncated) so nothing is lost silently.
    quarantine = pq.read_table(out / "quarantine")
    assert quarantine.num_rows == report["quarantined_total"]
    assert all(len(r) > 0 for r in quarantine.column("raw").to_pylist() if r is not None)
    assert report["samples"], "report has example documents per reason"


def test_every_warc_record_is_accounted_for(demo_run: tuple[Path, dict, dict]) -> None:
    out, _, _ = demo_run
    report = json.loads((out / "report.json").read_text())
    assert {k: v for k, v in report["removed"].items() if k.startswith("warc_record:")} == WARC_REMOVED
    assert report["removed_by_stage"]["warc_record"] == sum(WARC_REMOVED.values())
    rows = [r for sub in ("documents", "removed", "quarantine")
            for r in pq.read_table(out / sub, columns=["source", "line", "reason"]).to_pylist()
            if r["source"].endswith("crawl.warc.gz")]
    assert sorted(r["line"] for r in rows) == [1, 2, 3, 4, 5, 6]  # each record exactly once, by position
    by_line = {r["line"]: r["reason"] for r in rows}
    assert by_line[1] == "warc_record:warcinfo" and by_line[2] == "warc_record:request"
    assert by_line[5] == "warc_record:response_non_text" and by_line[6] == "warc_record:metadata"
    kept = pq.read_table(out / "documents", columns=["source", "line"]).to_pylist()
    assert sorted(r["line"] for r in kept if r["source"].endswith("crawl.warc.gz")) == [3, 4]


def test_junk_and_exact_duplicates_are_removed(demo_run: tuple[Path, dict, dict]) -> None:
    out, _, planted = demo_run
    removed = pq.read_table(out / "removed", columns=["doc_id", "reason"]).to_pylist()
    reasons = {r["doc_id"]: r["reason"] for r in removed}
    kept = set(_ids(out / "documents"))
    for junk in planted["junk_ids"]:
        assert junk in reasons and reasons[junk] != "exact_duplicate", junk
    for dup, source in planted["exact_duplicate_pairs"]:
        assert reasons.get(dup) == "exact_duplicate", dup
        assert source in kept or reasons.get(source) in ("exact_duplicate", "fuzzy_duplicate")
    assert not kept & set(reasons), "a document is both kept and removed"


def test_toxicity_removes_the_planted_offensive_documents_and_keeps_the_borderline_ones(
        demo_run: tuple[Path, dict, dict]) -> None:
    out, _, planted = demo_run
    report = json.loads((out / "report.json").read_text())
    removed = pq.read_table(out / "removed", columns=["doc_id", "reason"]).to_pylist()
    flagged = {r["doc_id"] for r in removed if r["reason"].split(":", 1)[0] == "toxicity"}
    assert planted["offensive_ids"] and planted["borderline_ids"]
    assert flagged == set(planted["offensive_ids"])  # all of them, and nothing else in the corpus
    assert set(planted["borderline_ids"]) <= set(_ids(out / "documents"))
    assert report["removed"]["toxicity"] == report["removed_by_stage"]["toxicity"] == len(planted["offensive_ids"])


def _families(planted: dict) -> dict[str, str]:
    """Each planted duplicate -> the original it was copied from (following chains)."""
    parent = {dup: src for dup, src in planted["exact_duplicate_pairs"] + planted["near_duplicate_pairs"]}

    def root(x: str) -> str:
        while x in parent:
            x = parent[x]
        return x

    return {x: root(x) for x in parent} | {src: root(src) for src in parent.values()}


def test_fuzzy_dedup_precision_and_recall_on_planted_near_duplicates(demo_run: tuple[Path, dict, dict]) -> None:
    out, _, planted = demo_run
    removed = pq.read_table(out / "removed", columns=["doc_id", "reason", "dup_of"]).to_pylist()
    docs = pq.read_table(out / "documents", columns=["doc_id", "uid"]).to_pylist()
    by_uid = {d["uid"]: d["doc_id"] for d in docs}
    fuzzy = {r["doc_id"]: by_uid.get(r["dup_of"]) for r in removed if r["reason"] == "fuzzy_duplicate"}
    family = _families(planted)
    assert fuzzy, "near duplicates were found"
    correct = [d for d, kept in fuzzy.items() if kept is not None and family.get(d, d) == family.get(kept, kept)]
    assert len(correct) / len(fuzzy) >= 0.99, {d: k for d, k in fuzzy.items() if d not in correct}
    near = [dup for dup, _ in planted["near_duplicate_pairs"]]
    reasons = {r["doc_id"]: r["reason"] for r in removed}
    found = [d for d in near if reasons.get(d) in ("fuzzy_duplicate", "exact_duplicate")]
    assert len(found) / len(near) >= 0.9, sorted(set(near) - set(found))
    report = json.loads((out / "report.json").read_text())
    assert report["removed"]["fuzzy_duplicate"] == len(fuzzy) == report["fuzzy_dedup"]["removed"]


def test_pii_is_redacted_and_counted(demo_run: tuple[Path, dict, dict]) -> None:
    out, _, planted = demo_run
    texts = dict(zip(_ids(out / "documents"), _ids(out / "documents", "text"), strict=True))
    planted_kept = [e for e in planted["pii"] if e["id"] in texts]
    assert planted_kept, "some planted PII reached the output"
    for e in planted_kept:
        assert e["value"] not in texts[e["id"]], e
    for e in planted["pii_decoys"]:
        if e["id"] in texts:
            assert e["value"] in texts[e["id"]], e  # a Luhn-invalid number is not a card
    report = json.loads((out / "report.json").read_text())
    assert sum(report["pii_redacted"].values()) >= len(planted_kept)


def test_sources_decontamination_and_report(demo_run: tuple[Path, dict, dict]) -> None:
    out, _, _ = demo_run
    report = json.loads((out / "report.json").read_text())
    assert report["inputs_by_format"] == {"jsonl": 2, "text": 2, "html": 1, "warc": 1}
    assert [Path(p).name for p in report["skipped_files"]] == ["notes.bin"]
    removed = pq.read_table(out / "removed", columns=["source", "reason"]).to_pylist()
    assert [Path(r["source"]).name for r in removed if r["reason"] == "decontaminated"] == ["contaminated.txt"]
    sources = {Path(s).name for s in _ids(out / "documents", "source")}
    assert {"a.txt", "b.html", "crawl.warc.gz"} <= sources
    assert sum(report["removed_by_stage"].values()) == report["removed_total"]
    md = (out / "report.md").read_text()
    assert "## What each stage removed" in md and "█" in md and "fuzzy_duplicate" in md
    assert (out / "report.svg").read_text().startswith("<svg")


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
    overrides = [f"storage.root={tmp_path / 'root'}", "data.source.kind=files",
                 f"data.source.paths=[{tmp_path / 'in.parquet'}]",
                 # one-sentence rows that differ in one number: only exact dedup applies here
                 "data.filters.gopher_quality.min_words=10", "data.filters.c4.enabled=false",
                 "data.fuzzy_dedup.enabled=false", "data.tokenizer.vocab_size=300", "data.split.val_fraction=0.2"]
    spec = load_spec("tiny", overrides)
    manifest = run_data(spec)
    counts = manifest["counts"]
    assert counts["read"] == len(texts)
    assert counts["quarantined"] == {"missing_text": 2}
    assert counts["removed"] == {"exact_duplicate": 1}
    assert counts["kept"] == 60

    # Another corpus under the same dataset name is a new version; the first one, which a model's lineage may name,
    # is left as it was. The first corpus again is the first version, not recomputed.
    first = Path(manifest["path"])
    before = {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()}
    pq.write_table(pa.table({"id": [f"q{i}" for i in range(20)], "text": good[:20]}), tmp_path / "other.parquet")
    other = run_data(load_spec("tiny", [*(o for o in overrides if "source.paths" not in o),
                                        f"data.source.paths=[{tmp_path / 'other.parquet'}]"]))
    assert other["version"] != manifest["version"] and Path(other["path"]).parent == first.parent
    assert other["counts"]["read"] == 20 and dataset_path(tmp_path / "root", "tiny") == Path(other["path"])
    assert {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()} == before
    again = run_data(spec)
    assert again == manifest and dataset_path(tmp_path / "root", "tiny") == first


# ------------------------------------------------------------------------- accounting that can fail


def _good_rows(n: int) -> list[str]:
    return [f"Row {i}: the history of the river town is long and the people there bake bread every morning, "
            f"tend their gardens in spring and tell stories about the stars in the clear night sky." for i in range(n)]


def test_a_lost_row_fails_the_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step that loses one row between the read and the outputs (injected here) stops the stage, naming the
    numbers and the file. (That a corpus without the loss passes, with `read` equal to what was planted, the
    demo and Parquet runs above show.)"""
    from raytrain.data import pipeline

    corpus = tmp_path / "in.jsonl"
    lines = [json.dumps({"id": f"d{i}", "text": t}) for i, t in enumerate(_good_rows(30))]
    corpus.write_text("\n".join([*lines[:10], "{not json", *lines[10:]]) + "\n")  # 31 lines, one quarantined
    overrides = ["data.source.kind=files", f"data.source.paths=[{corpus}]", "data.filters.gopher_quality.min_words=10",
                 "data.filters.c4.enabled=false", "data.fuzzy_dedup.enabled=false", "data.exact_dedup=false"]
    annotated = pipeline._annotated

    def losing_one(spec, by_kind, count_dir=None):
        return annotated(spec, by_kind, count_dir).filter(lambda row: row["line"] != 7)

    monkeypatch.setattr(pipeline, "_annotated", losing_one)
    with pytest.raises(pipeline.AccountingError) as err:
        pipeline.curate(load_spec("tiny", [f"storage.root={tmp_path}", *overrides]))
    msg = str(err.value)
    assert "read 31 rows at the source" in msg and "= 30 (1 rows lost)" in msg, msg
    assert f"{corpus}: read 31, accounted 30" in msg, msg


def test_a_corpus_with_nothing_to_keep_stops_with_its_outputs_written(tmp_path: Path) -> None:
    """An empty file and a file of malformed lines: the stage stops with a clear error that points at what it
    wrote, and the malformed lines are in quarantine/ with their reason, none lost."""
    from raytrain.data import pipeline
    from raytrain.errors import StageInputError

    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text("{not json\n" * 3)
    spec = load_spec("tiny", [f"storage.root={tmp_path / 'root'}", "data.source.kind=files",
                              f"data.source.paths=[{tmp_path / 'empty.jsonl'},{tmp_path / 'bad.jsonl'}]"])
    with pytest.raises(StageInputError, match="kept no documents") as err:
        pipeline.curate(spec)
    out = Path(str(err.value).split("; see ")[1].split(" and ")[0]).parent
    quarantined = pq.read_table(out / "quarantine", columns=["source", "line", "reason"]).to_pylist()
    assert sorted(r["line"] for r in quarantined) == [1, 2, 3], quarantined
    assert {r["source"] for r in quarantined} == {str(tmp_path / "bad.jsonl")}
    assert not (out / "documents").exists()


def test_check_accounting_is_per_file() -> None:
    from raytrain.data.pipeline import AccountingError, check_accounting

    check_accounting({"a": 3, "b": 2}, {"a": 3, "b": 2}, kept=3, removed=1, quarantined=1)
    with pytest.raises(AccountingError, match=r"read 5 rows .* = 6 \(1 rows counted more than once\)"):
        check_accounting({"a": 3, "b": 2}, {"a": 4, "b": 2}, kept=4, removed=1, quarantined=1)
    # the totals agree, but one file lost a row and another gained one
    with pytest.raises(AccountingError, match="a: read 3, accounted 2; b: read 2, accounted 3"):
        check_accounting({"a": 3, "b": 2}, {"a": 2, "b": 3}, kept=3, removed=1, quarantined=1)


@pytest.mark.parametrize(("body", "rows"), [
    (b'{"a": 1}\n{"a": 2}\n', 2),
    (b'{"a": 1}\n{"a": 2}', 2),  # no newline at the end
    (b'{"a": 1}\r\n\r\n{"a": 2}\r\n  \t', 3),  # a blank line counts (quarantined), a blank tail does not
    (b"", 0),
])
def test_jsonl_reader_counts_lines_apart_from_the_rows_it_emits(tmp_path: Path, body: bytes, rows: int) -> None:
    from raytrain.data.readers import JsonlLinesDatasource, reported_rows

    path = tmp_path / "x.jsonl"
    path.write_bytes(body)
    source = JsonlLinesDatasource([str(path)], count_dir=str(tmp_path / "counts"), chunk_bytes=3)
    emitted = sum(t.num_rows for t in source._read_stream(pa.BufferReader(body), str(path)))
    assert emitted == rows and reported_rows(str(tmp_path / "counts")) == {str(path): rows}
