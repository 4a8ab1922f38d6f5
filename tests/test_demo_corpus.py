"""The embedded demo corpus: deterministic, realistic enough, and its ground truth matches the files."""

from __future__ import annotations

import gzip
import json
import random
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from raytrain.data.demo import MALFORMED_KINDS, generate_demo_corpus, shingles, word_shingle_jaccard

MAX_DOC_BYTES = 1_000_000


# ---------------------------------------------------------------------------------------------- helpers


def read_rows(out: Path, files: list[str]) -> list[tuple[str, int, bytes]]:
    """(file, 1-based line, raw bytes) of every line of every shard, in file order."""
    rows = []
    for name in files:
        opener = gzip.open if name.endswith(".gz") else open
        with opener(out / name, "rb") as f:
            for n, line in enumerate(f, 1):
                rows.append((name, n, line.rstrip(b"\n")))
    return rows


def classify(raw: bytes) -> tuple[str, dict[str, Any] | None]:
    """What a reader sees in one line: 'ok' with the record, or the kind of malformation."""
    if len(raw) > MAX_DOC_BYTES:
        return "too_large", None
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bad_utf8", None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return "invalid_json", None
    if not isinstance(record, dict):
        return "not_an_object", None
    if record.get("text") is None:
        return "missing_text", record
    if not isinstance(record["text"], str):
        return "non_string_text", record
    return "ok", record


def quality_problem(text: str) -> str:
    """Gopher-style rules with the usual thresholds; '' when the text passes."""
    words = text.split()
    if len(words) < 30:
        return "too_short"
    mean_len = sum(len(w) for w in words) / len(words)
    if not 3 <= mean_len <= 10:
        return "mean_word_length"
    if sum(any(c.isalpha() for c in w) for w in words) / len(words) < 0.8:
        return "not_enough_alpha_words"
    if (text.count("#") + text.count("...") + text.count("…")) / len(words) > 0.1:
        return "symbol_ratio"
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if (len(lines) - len(set(lines))) / len(lines) > 0.3:
        return "duplicate_lines"
    return ""


def canonical(text: str) -> str:
    return " ".join(text.lower().split())


class Corpus:
    def __init__(self, out: Path, planted: dict[str, Any]) -> None:
        self.out = out
        self.planted = planted
        self.rows = read_rows(out, planted["files"])
        self.records: dict[str, dict[str, Any]] = {}
        self.order: dict[str, int] = {}
        self.kinds: list[str] = []
        for i, (_, _, raw) in enumerate(self.rows):
            kind, record = classify(raw)
            self.kinds.append(kind)
            if kind == "ok":
                assert record is not None
                self.records[record["id"]] = record
                self.order[record["id"]] = i
        self.exact = {dup: src for dup, src in planted["exact_duplicate_pairs"]}
        self.near = {dup: src for dup, src in planted["near_duplicate_pairs"]}
        self.junk = set(planted["junk_ids"])
        self.html = set(planted["html_ids"])
        self.offensive = set(planted["offensive_ids"])
        self.borderline = set(planted["borderline_ids"])
        special = set(self.exact) | set(self.near) | self.junk | self.html | self.offensive | self.borderline
        self.clean = [i for i in self.records if i not in special]

    def text(self, doc_id: str) -> str:
        return self.records[doc_id]["text"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    out = tmp_path_factory.mktemp("demo")
    return Corpus(out, generate_demo_corpus(out))  # the defaults the demo pipeline uses


# ---------------------------------------------------------------------------------------------- tests


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = generate_demo_corpus(tmp_path / "a", num_docs=400, seed=7)
    b = generate_demo_corpus(tmp_path / "b", num_docs=400, seed=7)
    c = generate_demo_corpus(tmp_path / "c", num_docs=400, seed=8)
    assert a == b
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / a["files"][0]).read_bytes() != (tmp_path / "c" / c["files"][0]).read_bytes()


def test_layout_and_planted_json(corpus: Corpus) -> None:
    p = corpus.planted
    assert 2 <= len(p["files"]) <= 4
    assert sum(name.endswith(".jsonl.gz") for name in p["files"]) == 1
    assert all(re.fullmatch(r"part-\d{5}\.jsonl(\.gz)?", name) for name in p["files"])
    for name in p["files"]:
        if name.endswith(".gz"):
            header = (corpus.out / name).read_bytes()[:10]
            assert header[:2] == b"\x1f\x8b" and header[4:8] == b"\0\0\0\0"  # gzip, mtime 0
    assert json.loads((corpus.out / "planted.json").read_text()) == p
    assert p["rows"] == len(corpus.rows) == 1500 + p["offensive"] + p["borderline"]  # those come on top
    assert set(p["malformed"]) == set(MALFORMED_KINDS)
    total = (p["clean"] + p["html"] + p["exact_duplicates"] + p["near_duplicates"] + p["junk"] + p["offensive"]
             + p["borderline"])
    assert total + sum(p["malformed"].values()) == p["rows"]
    # the mix the demo is built around
    assert p["html"] == 300 and p["exact_duplicates"] == 75 and p["near_duplicates"] == 75 and p["junk"] == 120
    assert 30 <= sum(p["malformed"].values()) <= 60 and p["malformed"]["too_large"] == 1
    assert 6 <= p["offensive"] <= 10 and 6 <= p["borderline"] <= 10
    assert all(n >= 1 for n in p["malformed"].values())


def test_planted_counts_match_the_files(corpus: Corpus) -> None:
    p = corpus.planted
    found = Counter(corpus.kinds)
    for kind in MALFORMED_KINDS:
        assert found[kind] == p["malformed"][kind], kind
    assert found["not_an_object"] == 0
    # malformed positions in planted.json point at exactly those lines
    where = {(f, n): corpus.kinds[i] for i, (f, n, _) in enumerate(corpus.rows)}
    assert len(p["malformed_rows"]) == sum(p["malformed"].values())
    for entry in p["malformed_rows"]:
        assert where[(entry["file"], entry["line"])] == entry["kind"]
    # every readable row is exactly one planted kind
    assert found["ok"] == len(corpus.records)  # ids are unique
    assert len(corpus.clean) == p["clean"]
    assert len(corpus.html) == p["html"] and corpus.html <= set(corpus.records)
    assert len(corpus.junk) == p["junk"] == sum(p["junk_by_kind"].values()) and corpus.junk <= set(corpus.records)
    assert len(corpus.exact) == p["exact_duplicates"] and set(corpus.exact) <= set(corpus.records)
    assert len(corpus.near) == p["near_duplicates"] and set(corpus.near) <= set(corpus.records)
    assert len(corpus.offensive) == p["offensive"] and corpus.offensive <= set(corpus.records)
    assert len(corpus.borderline) == p["borderline"] and corpus.borderline <= set(corpus.records)
    assert not corpus.offensive & corpus.borderline
    assert all(v >= 1 for v in p["junk_by_kind"].values())


def test_rows_carry_no_labels(corpus: Corpus) -> None:
    for doc_id, record in corpus.records.items():
        assert set(record) == {"id", "url", "text"}
        assert record["url"].startswith("https://")
        for label in ("dup", "junk", "near", "clean", "planted", "malformed"):
            assert label not in doc_id and label not in record["url"]


def test_clean_docs_look_like_prose(corpus: Corpus) -> None:
    vocabulary: set[str] = set()
    multi_paragraph = 0
    for doc_id in corpus.clean:
        text = corpus.text(doc_id)
        words = text.split()
        assert 80 <= len(words) <= 400, (doc_id, len(words))
        assert quality_problem(text) == "", (doc_id, quality_problem(text))
        assert "..." not in text and "#" not in text
        assert text[0].isupper() and text.rstrip()[-1] in ".!?", doc_id
        multi_paragraph += "\n\n" in text
        vocabulary.update(re.findall(r"[a-z]+", text.lower()))
    assert multi_paragraph >= 0.9 * len(corpus.clean)
    assert len(vocabulary) >= 800  # a real vocabulary, not a handful of words


def test_clean_docs_are_distinct(corpus: Corpus) -> None:
    keys = [canonical(corpus.text(i)) for i in corpus.clean]
    assert len(set(keys)) == len(keys)  # no unplanted exact duplicates
    rng = random.Random(0)
    grams = {i: shingles(corpus.text(i)) for i in corpus.clean}
    worst = 0.0
    for _ in range(3000):
        a, b = rng.sample(corpus.clean, 2)
        worst = max(worst, len(grams[a] & grams[b]) / len(grams[a] | grams[b]))
    assert worst < 0.5  # unrelated documents are nowhere near the near-duplicate range


def article_text(page: str) -> str:
    body = page.split("<article>", 1)[1].split("</article>", 1)[0]
    paras = re.findall(r"<p>(.*?)</p>", body, re.DOTALL)
    return "\n\n".join(paras)


def test_html_pages(corpus: Corpus) -> None:
    for doc_id in corpus.html:
        page = corpus.text(doc_id)
        assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
        for tag in ("<title>", "<script>", "<style>", "<nav>", "<article>", "<h1>", "<footer>"):
            assert tag in page, (doc_id, tag)
        assert "Home</a> | " in page and "Privacy Policy" in page and "©" in page
        assert quality_problem(article_text(page)) == "", doc_id


def test_html_extraction_recovers_the_article(corpus: Corpus) -> None:
    trafilatura = pytest.importorskip("trafilatura")
    for doc_id in sorted(corpus.html)[:20]:
        page = corpus.text(doc_id)
        extracted = trafilatura.extract(page, include_comments=False, include_tables=False, favor_precision=True)
        assert extracted, doc_id
        assert quality_problem(extracted) == "", doc_id
        first_sentence = re.split(r"(?<=\.) ", article_text(page))[0]
        assert first_sentence.replace("&amp;", "&") in extracted, doc_id
        for boilerplate in ("Privacy Policy", "All rights reserved", "Related posts", "window."):
            assert boilerplate not in extracted, (doc_id, boilerplate)


def test_exact_duplicates(corpus: Corpus) -> None:
    clean = set(corpus.clean)
    for dup, src in corpus.exact.items():
        assert src in clean
        assert corpus.order[dup] > corpus.order[src]  # the copy comes after its source
        assert corpus.text(dup) == corpus.text(src)
        assert corpus.records[dup]["url"] != corpus.records[src]["url"]


def test_near_duplicates(corpus: Corpus) -> None:
    clean = set(corpus.clean)
    scores = []
    for dup, src in corpus.near.items():
        assert src in clean
        assert corpus.order[dup] > corpus.order[src]
        assert canonical(corpus.text(dup)) != canonical(corpus.text(src))
        score = word_shingle_jaccard(corpus.text(dup), corpus.text(src))
        assert 0.7 <= score <= 0.99, (dup, src, score)
        assert quality_problem(corpus.text(dup)) == ""  # still a good document, only a duplicate
        scores.append(score)
    assert 0.8 <= sum(scores) / len(scores) <= 0.95


def test_junk_fails_quality_filters(corpus: Corpus) -> None:
    pages = []
    for doc_id in corpus.junk:
        text = corpus.text(doc_id)
        if text.lstrip().startswith("<"):
            pages.append(text)
        else:
            assert quality_problem(text) != "", (doc_id, text[:200])
    if pages:
        trafilatura = pytest.importorskip("trafilatura")
        for page in pages:
            extracted = trafilatura.extract(page, include_comments=False, include_tables=False, favor_precision=True)
            assert not extracted or quality_problem(extracted) != "", extracted


def test_giant_row(corpus: Corpus) -> None:
    (i,) = [i for i, kind in enumerate(corpus.kinds) if kind == "too_large"]
    record = json.loads(corpus.rows[i][2])
    assert isinstance(record["text"], str) and len(record["text"].encode()) > MAX_DOC_BYTES


@pytest.mark.parametrize("num_docs", [0, 1, 10, 50, 99, 100, 250])
def test_small_corpora(tmp_path: Path, num_docs: int) -> None:
    planted = generate_demo_corpus(tmp_path, num_docs=num_docs, seed=3)
    rows = read_rows(tmp_path, planted["files"])
    assert len(rows) == planted["rows"] == num_docs + planted["offensive"] + planted["borderline"]
    kinds = Counter(classify(raw)[0] for _, _, raw in rows)
    for kind in MALFORMED_KINDS:
        assert kinds[kind] == planted["malformed"][kind]
    assert planted["malformed"]["too_large"] == (1 if num_docs >= 100 else 0)
    if num_docs >= 100:
        assert all(n >= 1 for n in planted["malformed"].values())
    assert len(planted["offensive_ids"]) == planted["offensive"] == (8 if num_docs >= 100 else 0)
    assert len(planted["borderline_ids"]) == planted["borderline"] == (8 if num_docs >= 100 else 0)
    if num_docs:
        assert planted["clean"] >= 1


def test_negative_size_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_docs"):
        generate_demo_corpus(tmp_path, num_docs=-1)


def test_fast_enough(tmp_path: Path) -> None:
    start = time.process_time()
    generate_demo_corpus(tmp_path, num_docs=1500, seed=1)
    assert time.process_time() - start < 5.0  # about 0.4 s of CPU; generous for slow CI machines


def test_curation_rules_agree_with_the_plan(corpus: Corpus) -> None:
    """Every planted kind meets the pipeline's per-document curation the way it is meant to.

    The toxicity rule runs once, batched, on what every other rule kept (as the pipeline runs it): the offensive
    and borderline documents pass every other rule, and only the offensive ones fail it.
    """
    documents = pytest.importorskip("raytrain.data.documents")
    schema = pytest.importorskip("raytrain.config.schema")
    filters = schema.FilterSpec()
    curator = documents.Curator(filters)
    malformed = {(e["file"], e["line"]): e["kind"] for e in corpus.planted["malformed_rows"]}
    html_checked = 0
    kept, raws = [], []
    for name, line, raw in corpus.rows:
        record, error = documents.parse_jsonl_line(raw, filters.max_doc_bytes)
        doc_id = record.get("id") if isinstance(record, dict) else None
        is_html = doc_id in corpus.html
        if is_html and html_checked >= 10:
            continue  # HTML extraction is slow; a sample is enough here
        html_checked += is_html
        a = documents.annotate(record, error, raw=raw, source=name, line=line, text_field="text", id_field="id",
                               url_field="url", filters=filters, extract=True, quarantine_sample_bytes=64,
                               curator=curator, defer_toxicity=True)
        if (name, line) in malformed:
            assert (a.status, a.reason) == ("quarantined", malformed[(name, line)])
        elif doc_id in corpus.junk:
            assert a.status == "removed", (doc_id, a.reason)
        else:
            assert (a.status, a.reason) == ("kept", ""), (doc_id, a.reason)
            kept.append(a)
            raws.append(raw)
    screened = documents.screen_toxicity(kept, raws, curator, 64)
    removed = {a.doc_id for a in screened if (a.status, a.reason) == ("removed", "toxicity")}
    assert all(a.status in ("kept", "removed") for a in screened)
    assert removed == corpus.offensive  # every offensive one, and no clean, borderline or HTML document
    assert corpus.borderline <= {a.doc_id for a in screened if a.status == "kept"}


def test_offensive_documents_differ_from_each_other_and_from_the_clean_ones(corpus: Corpus) -> None:
    """Dedup would not remove them: only the toxicity rule stands between them and the training set."""
    planted = sorted(corpus.offensive | corpus.borderline)
    grams = {i: shingles(corpus.text(i)) for i in [*planted, *corpus.clean]}
    for a in planted:
        for b in [*planted, *corpus.clean]:
            if a != b:
                assert len(grams[a] & grams[b]) / len(grams[a] | grams[b]) < 0.5, (a, b)
