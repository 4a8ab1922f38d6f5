"""Each filter rule on hand-made documents just inside and just outside its published threshold.

Pure functions, no Ray: these run in well under a second each.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from raytrain.config.schema import (
    BadWordsSpec,
    BlocklistSpec,
    C4Spec,
    FineWebSpec,
    GopherQualitySpec,
    GopherRepetitionSpec,
    LanguageSpec,
    PIISpec,
    ToxicitySpec,
)
from raytrain.data import decontam, filters, minhash, pii
from raytrain.data.demo import generate_demo_corpus, word_shingle_jaccard

# ------------------------------------------------------------------------------------------ helpers


def uniq(n: int, start: int = 0) -> list[str]:
    """n distinct 5-letter words (so character fractions equal word fractions)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = []
    for i in range(start, start + n):
        out.append("".join(letters[(i // 26 ** k) % 26] for k in range(4)) + "q")
    return out


def prose(n_words: int) -> str:
    """n words of plain prose-like text with stop words, mean word length ~4.3."""
    vocab = ["the", "garden", "and", "river", "of", "stone", "bread", "to", "market", "with"]
    return " ".join(vocab[i % len(vocab)] for i in range(n_words))


GQ = GopherQualitySpec()


def only_repetition(**rule: object) -> GopherRepetitionSpec:
    """A repetition spec with every rule off except the one given (at its default unless given)."""
    off = {"max_dup_line_frac": 1.0, "max_dup_para_frac": 1.0, "max_dup_line_char_frac": 1.0,
           "max_dup_para_char_frac": 1.0, "top_ngram_max_char_frac": {}, "dup_ngram_max_char_frac": {}}
    default = GopherRepetitionSpec()
    return GopherRepetitionSpec(**(off | {k: (getattr(default, k) if v is None else v) for k, v in rule.items()}))


# ----------------------------------------------------------------------------------- Gopher quality


def test_gopher_word_count() -> None:
    assert filters.gopher_quality(prose(50), GQ) == ""
    assert filters.gopher_quality(prose(49), GQ) == "gopher_quality:word_count"
    assert filters.gopher_quality(prose(100_000), GQ) == ""
    assert filters.gopher_quality(prose(100_001), GQ) == "gopher_quality:word_count"


def test_gopher_mean_word_length() -> None:
    three = ["the", "and"] + ["cat"] * 58  # mean exactly 3.0
    assert filters.gopher_quality(" ".join(three), GQ) == ""
    assert filters.gopher_quality(" ".join([*three[:-1], "at"]), GQ) == "gopher_quality:mean_word_length"
    ten = ["the", "and"] + ["watermelon"] * 44 + ["watermelons"] * 14  # (6 + 440 + 154) / 60 = 10.0
    assert filters.gopher_quality(" ".join(ten), GQ) == ""
    assert filters.gopher_quality(" ".join([*ten[:-1], "watermelonss"]), GQ) == "gopher_quality:mean_word_length"


def test_gopher_hash_and_ellipsis_ratios() -> None:
    for symbol, rule in (("#", "hash_ratio"), ("...", "ellipsis_ratio")):
        base = prose(100).split()
        inside = " ".join(w + (f" {symbol}" if i % 10 == 0 else "") for i, w in enumerate(base))  # 10 / 100
        outside = inside + f" {symbol}"  # 11 / 100
        assert filters.gopher_quality(inside, GQ) == "", symbol
        assert filters.gopher_quality(outside, GQ) == f"gopher_quality:{rule}", symbol


def test_gopher_bullet_lines() -> None:
    line = "the garden and the river of stone"
    inside = "\n".join([f"- {line}"] * 9 + [line])  # 9 of 10 lines start with a bullet
    assert filters.gopher_quality(inside, GQ) == ""
    assert filters.gopher_quality("\n".join([f"• {line}"] * 10), GQ) == "gopher_quality:bullet_lines"


def test_gopher_ellipsis_lines() -> None:
    line = "the garden and the river of stone bread"
    inside = "\n".join([f"{line} …"] * 3 + [line] * 7)  # 3 of 10 lines end with an ellipsis
    outside = "\n".join([f"{line} …"] * 4 + [line] * 6)
    assert filters.gopher_quality(inside, GQ) == ""
    assert filters.gopher_quality(outside, GQ) == "gopher_quality:ellipsis_lines"


def test_gopher_alpha_words() -> None:
    words = prose(100).split()
    inside = " ".join(words[:80] + ["1234"] * 20)  # 80% of words have a letter
    outside = " ".join(words[:79] + ["1234"] * 21)
    assert filters.gopher_quality(inside, GQ) == ""
    assert filters.gopher_quality(outside, GQ) == "gopher_quality:alpha_words"


def test_gopher_stop_words() -> None:
    filler = " ".join(["garden river stone bread market"] * 12)
    assert filters.gopher_quality(f"{filler} the and", GQ) == ""  # two distinct stop words
    assert filters.gopher_quality(f"{filler} the the", GQ) == "gopher_quality:stop_words"


# ------------------------------------------------------------ settings that make a rule meaningless, rules that raise

PUNCTUATION_ONLY = "... !!! --- ??? ;;;"


@pytest.mark.parametrize(("override", "message"), [
    ("data.filters.gopher_quality.min_words=0", "data.filters.gopher_quality.min_words: Input should be greater"),
    ("data.filters.gopher_quality.min_stop_words=9", "min_stop_words (9) exceeds the 8 distinct stop_words"),
    ("data.filters.language.languages=[]", "data.filters.language: languages is empty"),
    ("data.filters.fineweb.max_short_line_ratio=0", "data.filters.fineweb.max_short_line_ratio"),
    ("data.filters.fineweb.min_line_punct_ratio=1", "data.filters.fineweb.min_line_punct_ratio"),
    ("data.filters.gopher_repetition.top_ngram_max_char_frac={0: 0.2}", "n-gram size 0"),
])
def test_meaningless_settings_are_rejected_naming_the_key(override: str, message: str) -> None:
    from raytrain.config import load_spec
    from raytrain.config.loader import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_spec("tiny", [override])


def test_a_document_without_words_is_removed_not_a_crash() -> None:
    # min_words >= 1 is enforced at validation; the rule holds even if a spec slips past it
    assert filters.gopher_quality(PUNCTUATION_ONLY, GopherQualitySpec.model_construct(min_words=0)) == \
        "gopher_quality:word_count"


def test_a_rule_that_raises_quarantines_its_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rule raising on one document quarantines that row as filter_error:<rule>; the batch goes on."""
    import pyarrow as pa

    from raytrain.config.schema import DataSpec
    from raytrain.data import documents
    from raytrain.data.pipeline import annotate_batch

    real = filters.gopher_quality

    def fragile(text: str, spec: GopherQualitySpec) -> str:
        if "!!!" in text:
            raise ZeroDivisionError("division by zero")
        return real(text, spec)

    monkeypatch.setattr(filters, "gopher_quality", fragile)
    good = "The history of the river town is long and the people there bake bread every morning, tend their " \
           "gardens in spring and tell stories about the stars in the clear night sky to their children. " * 2
    spec = DataSpec(filters={k: {"enabled": False} for k in ("language", "gopher_repetition", "c4", "fineweb")})
    a = documents.annotate({"id": "p", "text": PUNCTUATION_ONLY}, "", raw=b"raw bytes", source="s", line=1,
                           text_field="text", id_field="id", url_field="url", filters=spec.filters, extract=False,
                           quarantine_sample_bytes=64)
    assert (a.status, a.reason, a.doc_id, a.raw) == ("quarantined", "filter_error:gopher_quality", "p", b"raw bytes")
    raws = [json.dumps({"id": i, "text": t}).encode() for i, t in (("a", good), ("p", PUNCTUATION_ONLY), ("b", good))]
    batch = pa.table({"raw": raws, "source": ["s"] * 3, "line": [1, 2, 3]})
    out = annotate_batch(batch, spec.model_dump(mode="json"), "jsonl").to_pylist()
    assert [(r["doc_id"], r["status"], r["reason"]) for r in out] == [
        ("a", "kept", ""), ("p", "quarantined", "filter_error:gopher_quality"), ("b", "kept", "")]


# -------------------------------------------------------------------------------- Gopher repetition


def test_duplicate_line_fraction() -> None:
    spec = only_repetition(max_dup_line_frac=None)
    lines = uniq(7)
    assert filters.gopher_repetition("\n".join(lines + lines[:3]), spec) == ""  # 3 of 10 lines repeat
    outside = "\n".join(lines[:6] + lines[:4])  # 4 of 10
    assert filters.gopher_repetition(outside, spec) == "gopher_repetition:dup_line_frac"


def test_duplicate_paragraph_fraction() -> None:
    spec = only_repetition(max_dup_para_frac=None)
    paras = [f"{w} one\n{w} two" for w in uniq(7)]
    assert filters.gopher_repetition("\n\n".join(paras + paras[:3]), spec) == ""
    outside = "\n\n".join(paras[:6] + paras[:4])
    assert filters.gopher_repetition(outside, spec) == "gopher_repetition:dup_para_frac"


def test_duplicate_line_and_paragraph_char_fractions() -> None:
    lines = uniq(16)  # equal-length lines: character fraction = line fraction
    for key, sep, rule in (("max_dup_line_char_frac", "\n", "dup_line_char_frac"),
                           ("max_dup_para_char_frac", "\n\n", "dup_para_char_frac")):
        spec = only_repetition(**{key: None})
        assert filters.gopher_repetition(sep.join(lines + lines[:4]), spec) == "", rule  # 4 / 20 = 0.20
        outside = sep.join(lines[:15] + lines[:5])  # 5 / 20 = 0.25
        assert filters.gopher_repetition(outside, spec) == f"gopher_repetition:{rule}"


@pytest.mark.parametrize(("n", "limit"), [(2, 0.20), (3, 0.18), (4, 0.16)])
def test_top_ngram_char_fraction(n: int, limit: float) -> None:
    spec = only_repetition(top_ngram_max_char_frac={n: limit})
    gram = uniq(n, start=5000)

    def doc(k: int, total: int = 100) -> str:
        # k copies of one n-gram, each followed by a distinct word; distinct filler to `total` words
        fill = uniq(total - k * n)
        words: list[str] = []
        for i in range(k):
            words += [*gram, fill[i]]
        return " ".join(words + fill[k:])

    inside = math.floor(round(limit * 100 / n, 9))  # most copies covering at most `limit` of the characters
    assert filters.top_ngram_char_fraction(doc(inside).split(), n) <= limit
    assert filters.gopher_repetition(doc(inside), spec) == ""
    assert filters.gopher_repetition(doc(inside + 1), spec) == f"gopher_repetition:top_{n}gram"


@pytest.mark.parametrize(("n", "limit"), [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)])
def test_duplicate_ngram_char_fraction(n: int, limit: float) -> None:
    spec = only_repetition(dup_ngram_max_char_frac={n: limit})
    gram = uniq(n, start=5000)
    covered = 2 * n  # one n-gram occurring twice

    def doc(total: int) -> str:
        fill = uniq(total - covered)
        return " ".join([*gram, *fill[:3], *gram, *fill[3:]])

    at_limit = math.ceil(round(covered / limit, 9))  # fewest words so that covered / total <= limit
    assert filters.dup_ngram_char_fraction(doc(at_limit).split(), n) <= limit
    assert filters.gopher_repetition(doc(at_limit), spec) == ""
    assert filters.gopher_repetition(doc(at_limit - 1), spec) == f"gopher_repetition:dup_{n}gram"


def test_overlapping_ngrams_count_characters_once() -> None:
    words = ["aaaa"] * 12  # every 5-gram is the same: all 12 words covered once, not 8 times
    assert filters.dup_ngram_char_fraction(words, 5) == 1.0


# -------------------------------------------------------------------------------------------- C4

SENT = "The garden by the river is full of stone and bread."


def test_c4_line_rules() -> None:
    spec = C4Spec()
    text = "\n".join([
        SENT, "A heading without punctuation at all", "Too short to keep.", "Five words make a line.",
        "Please enable JavaScript to view this page properly.", "Read our privacy policy before you continue.",
        SENT.replace("full", "f" + "u" * 1000 + "ll"), "“The garden is lovely,” she said to the river.”",
    ])
    out, reason = filters.c4_filter(text, spec)
    assert reason == ""
    assert out.split("\n") == [SENT, "Five words make a line.", "“The garden is lovely,” she said to the river.”"]


def test_c4_document_rules() -> None:
    spec = C4Spec()
    three = " ".join([SENT] * 3)
    assert filters.c4_filter(three, spec)[1] == ""
    assert filters.c4_filter(" ".join([SENT] * 2), spec)[1] == "c4:min_sentences"
    assert filters.c4_filter(three + " Lorem ipsum dolor sit amet.", spec)[1] == "c4:lorem_ipsum"
    assert filters.c4_filter(three + " The dict {a: 1} is code.", spec)[1] == "c4:curly_bracket"
    assert filters.c4_filter(three + " The dict {a: 1} is code.", C4Spec(remove_curly_bracket=False))[1] == ""


# --------------------------------------------------------------------------------------- FineWeb

LONG = "the garden by the river is full of stone and bread"  # 51 characters, 11 words


def test_fineweb_line_punctuation_ratio() -> None:
    spec = FineWebSpec()
    inside = "\n".join([LONG + "."] * 13 + [LONG] * 87)  # 13% of lines end in punctuation
    outside = "\n".join([LONG + "."] * 12 + [LONG] * 88)  # 12%: at the threshold, removed
    assert filters.fineweb(inside.replace(LONG, LONG + " x"), spec) in ("", "fineweb:dup_line_char_ratio")
    assert filters.fineweb(outside, FineWebSpec(max_dup_line_char_ratio=1.0)) == "fineweb:line_punct_ratio"
    assert filters.fineweb(inside, FineWebSpec(max_dup_line_char_ratio=1.0)) == ""


def test_fineweb_duplicate_line_characters() -> None:
    spec = FineWebSpec()
    lines = [f"{w} {LONG}." for w in uniq(11)]  # equal length
    assert filters.fineweb("\n".join(lines[:10] + lines[:1]), spec) == ""  # 1 / 11 = 0.091
    assert filters.fineweb("\n".join(lines[:9] + lines[:1]), spec) == "fineweb:dup_line_char_ratio"  # 0.1


def test_fineweb_short_lines() -> None:
    spec = FineWebSpec()
    short = [f"{w} is a short one." for w in uniq(67)]  # 22 characters, 5 words
    long = [f"{w} {LONG}." for w in uniq(34, start=100)]
    assert filters.fineweb("\n".join(short[:66] + long[:34]), spec) == ""  # 66%
    assert filters.fineweb("\n".join(short[:67] + long[:33]), spec) == "fineweb:short_line_ratio"  # 67%


def test_fineweb_newline_ratio() -> None:
    spec = FineWebSpec()
    lines = [f"{w}aaaaaaa {w}bbbbbbbbb {w}ccccccccc." for w in uniq(10)]  # 3 words, > 30 characters
    assert filters.fineweb("\n".join(lines), spec) == ""  # 9 newlines / 30 words = 0.30
    assert filters.fineweb("\n".join([*lines[:-1], lines[-1].split(" ", 1)[1]]), spec) == "fineweb:newline_ratio"


# ---------------------------------------------------------------------------- language, URL, words


def test_language() -> None:
    en = "The garden by the river is full of flowers, and the people who live there bake bread every morning."
    de = "Der Garten am Fluss ist voller Blumen, und die Leute, die dort wohnen, backen jeden Morgen Brot."
    assert filters.language(en, LanguageSpec()) == ""
    assert filters.language(de, LanguageSpec()) == "language:de"
    assert filters.language(de, LanguageSpec(languages=["en", "de"])) == ""
    lang, score = filters.identify_language(en)
    assert lang == "en" and score < 1.0
    assert filters.language(en, LanguageSpec(min_score=min(1.0, score + 1e-6))) == "language:low_score"
    assert filters.language(en, LanguageSpec(min_score=score)) == ""


def test_url_blocklist() -> None:
    domains = filters.blocklist_domains(BlocklistSpec(domains=["Spam.example", "www.casino.test"]))
    assert domains == {"spam.example", "casino.test"}
    assert filters.url_blocked("https://spam.example/a", domains, ()) == "url_blocklist:domain"
    assert filters.url_blocked("http://a.b.spam.example:8080/x", domains, ()) == "url_blocklist:domain"
    assert filters.url_blocked("https://casino.test/", domains, ()) == "url_blocklist:domain"
    assert filters.url_blocked("https://notspam.example/", domains, ()) == ""
    assert filters.url_blocked("https://ok.example/free-casino", domains, ("casino",)) == "url_blocklist:substring"
    assert filters.url_blocked("", domains, ("casino",)) == ""


def test_bad_words(tmp_path: Path) -> None:
    (tmp_path / "words.txt").write_text("# comment\nbadword\ntwo words\n")
    words = filters.read_list_file(str(tmp_path / "words.txt"))
    assert words == ["badword", "two words"]
    pattern = filters.bad_words_pattern(words)
    spec = BadWordsSpec(words=words)
    assert filters.bad_words("a clean text about badwords and twowords", pattern, spec) == ""
    assert filters.bad_words("this has a BadWord in it", pattern, spec) == "bad_words"
    assert filters.bad_words("these two words matter", pattern, spec) == "bad_words"
    assert filters.bad_words("one badword only", pattern, BadWordsSpec(max_matches=1)) == ""
    assert filters.bad_words("badword and badword", pattern, BadWordsSpec(max_matches=1)) == "bad_words"
    assert filters.bad_words_pattern([]) is None


# ---------------------------------------------------------------------------------------- toxicity

MILL = [
    "The old mill by the river was built in the eighteenth century to grind wheat for the farms around the village. "
    "Its wooden wheel turned for more than a hundred years, and the miller and his family lived in the cottage next "
    "to it. When steam engines arrived the mill fell quiet, and the wheel slowly rotted in the water.",
    "In the nineteen seventies a group of volunteers decided to bring the mill back to life. They cleared the leat, "
    "rebuilt the sluice gates and carved a new wheel from oak that a local farmer had given them. It took them six "
    "summers of weekend work, and the whole village came to watch when the wheel turned again for the first time.",
    "Today the mill grinds flour on the first Sunday of every month, and visitors can buy a bag to take home. A "
    "small museum upstairs tells the story of the millers, the floods and the volunteers, and children can try "
    "the hand quern that stands by the door. The cafe in the old granary serves scones baked with the mill's flour.",
]
RANT = ("Shut the fuck up about your precious mill, you smug bastard. Nobody in this village gives a shit about "
        "your flour or your fucking wheel. Get a life, dickhead, and stop boring everyone to death, you pathetic "
        "asshole.")


def test_text_windows_group_sentences() -> None:
    text = "One two three. Four five six seven!\n\nEight nine? " + " ".join(uniq(13)) + "\nTail."
    assert filters.text_windows(text, 4) == [
        "One two three. Four five six seven!", "Eight nine? " + " ".join(uniq(4)), *(
            " ".join(uniq(4, k)) for k in (4, 8)), " ".join(uniq(1, 12)) + " Tail."]  # a 2-word tail joins
    assert filters.text_windows(text, 0) == [text]
    assert filters.text_windows(" \n ", 60) == []
    assert filters.toxicity_scores(["", "  "], 60) == [0.0, 0.0]


def test_toxicity_removes_offensive_text_and_keeps_clean_text() -> None:
    spec = ToxicitySpec()
    clean = "\n\n".join(MILL)
    assert filters.toxicity(clean, spec) == ""
    assert filters.toxicity(RANT, spec) == "toxicity"
    assert filters.toxicity_many([clean, RANT, clean], spec) == ["", "toxicity", ""]
    # "At or above": the score itself is the boundary.
    (p,) = filters.toxicity_scores([RANT], spec.chunk_words)
    assert filters.toxicity(RANT, ToxicitySpec(threshold=min(p, 0.999))) == "toxicity"
    low = filters.toxicity_scores([clean], spec.chunk_words)[0]
    assert filters.toxicity(clean, ToxicitySpec(threshold=low)) == "toxicity"
    assert filters.toxicity(clean, ToxicitySpec(threshold=low + 1e-6)) == ""


def test_one_offensive_paragraph_in_a_long_document_is_caught_by_windows() -> None:
    """Scored whole, a long clean document dilutes the one offensive paragraph below the threshold."""
    long = "\n\n".join(MILL * 4 + [RANT] + MILL)
    assert len(long.split()) > 900
    spec = ToxicitySpec()
    whole = filters.toxicity_scores([long], 0)[0]
    assert whole < spec.threshold
    assert filters.toxicity(long, ToxicitySpec(chunk_words=0)) == ""
    assert filters.toxicity(long, spec) == "toxicity"
    # Windows are computed before scoring: the offensive one scores what the paragraph alone (plus its
    # neighbours' sentences that fill the window) scores.
    assert max(filters.toxicity_scores(filters.text_windows(long, spec.chunk_words), 0)) == pytest.approx(
        filters.toxicity_scores([long], spec.chunk_words)[0])


def test_toxicity_runs_in_the_annotation_pass_batched_and_quarantines_what_raises(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One classifier call per batch; a row the classifier raises on is quarantined as filter_error:toxicity, the
    offensive row is removed as toxicity, and with the rule off both are kept."""
    import pyarrow as pa

    from raytrain.config.schema import DataSpec
    from raytrain.data.pipeline import annotate_batch

    clean = "\n\n".join(MILL)
    rows = (("a", clean), ("t", f"{MILL[0]}\n\n{RANT}"), ("boom", clean + " Kaboom."), ("b", MILL[1] + " " + MILL[2]))
    batch = pa.table({"raw": [json.dumps({"id": i, "text": t}).encode() for i, t in rows], "source": ["s"] * 4,
                      "line": [1, 2, 3, 4]})
    real = filters.toxicity_classifier()
    calls: list[int] = []

    def fragile(texts: list[str]) -> np.ndarray:
        calls.append(len(texts))
        if any("Kaboom" in t for t in texts):
            raise ValueError("cannot score this")
        return real(texts)

    monkeypatch.setattr(filters, "toxicity_classifier", lambda: fragile)
    spec = DataSpec(filters={"language": {"enabled": False}})
    out = annotate_batch(batch, spec.model_dump(mode="json"), "jsonl").to_pylist()
    assert [(r["doc_id"], r["status"], r["reason"]) for r in out] == [
        ("a", "kept", ""), ("t", "removed", "toxicity"), ("boom", "quarantined", "filter_error:toxicity"),
        ("b", "kept", "")]
    assert len(calls) == 1 + 4  # the batch's kept rows in one call, then each alone to find the one
    assert out[2]["raw"] == batch.column("raw")[2].as_py()[:spec.quarantine_sample_bytes]
    off = spec.model_copy(update={"filters": spec.filters.model_copy(update={"toxicity": ToxicitySpec(enabled=False)})})
    out = annotate_batch(batch, off.model_dump(mode="json"), "jsonl").to_pylist()
    assert [r["status"] for r in out] == ["kept"] * 4


# -------------------------------------------------------------------------------------------- PII


@pytest.mark.parametrize(("text", "kind"), [
    ("write to jane.doe+news@mail.example.org today", "email"),
    ("call (415) 555-0132 now", "phone"),
    ("call 415-555-0132 now", "phone"),
    ("call +1 415 555 0132 now", "phone"),
    ("call +44 20 7946 0958 now", "phone"),
    ("from 203.0.113.42 at night", "ip_address"),
    ("from 2001:db8:85a3::8a2e:370:7334 at night", "ip_address"),
    ("card 4111 1111 1111 1111 charged", "credit_card"),
    ("card 5500-0000-0000-0004 charged", "credit_card"),
    ("card 378282246310005 charged", "credit_card"),
    ("call 5551234567 for details", "phone"),  # no separators: found because 'call' says it is a phone
    ("the mapped address ::ffff:192.0.2.128 answered", "ip_address"),
])
def test_pii_found(text: str, kind: str) -> None:
    out, counts = pii.redact(text)
    assert counts[kind] == 1 and sum(counts.values()) == 1, counts
    assert pii.REPLACEMENT[kind] in out


@pytest.mark.parametrize("text", [
    "the tracking number 4111 1111 1111 1112 is not a card",  # Luhn fails
    "an order 1234567812345670 with a valid checksum but no issuer",  # Luhn passes, no issuer prefix
    "version 999.1.2.3 of the tool",  # not an IPv4 address
    "at 12:30:45 the train left",  # a time, not IPv6
    "in the years 1990-2000 and 2001-2010",
    "a price of 1,234,567.89 dollars",
    "email me at name at example dot com",
    "symbols 24118 13883 42008 0x3c36",  # digit groups that happen to pass Luhn, not printed like a card
    "upgrade to version 1.2.3.4 first",  # a valid IPv4 string, but a version
    "order 4815162342 shipped",  # a possible phone number, but an order
    "order number 4111111111111111 shipped",  # Luhn-valid with a Visa prefix, but an order
    "the retina image logo@2x.png",
])
def test_pii_not_found(text: str) -> None:
    out, counts = pii.redact(text)
    assert sum(counts.values()) == 0, (text, counts, out)
    assert out == text


# Floors (precision, recall) on the labelled set with decoys, raytrain/data/pii_eval.jsonl. The detectors
# before it scored precision 0.80 (email), 0.64 (IP), 0.73 (card) and phone recall 0.64 on it.
PII_FLOORS = {"email": (0.95, 0.95), "phone": (0.95, 0.95), "ip_address": (0.8, 0.95), "credit_card": (0.95, 0.95)}


def test_pii_precision_and_recall_on_the_labelled_set() -> None:
    examples = pii.load_labelled()
    assert len(examples) >= 100 and {e["set"] for e in examples} == {"dev", "heldout"}
    scores = pii.evaluate(examples)
    for kind, (precision, recall) in PII_FLOORS.items():
        s = scores[kind]
        assert s["labelled"] >= 15, (kind, s)
        assert s["precision"] >= precision and s["recall"] >= recall, (kind, s)


def test_pii_evaluation_counts_partial_and_wrong_kind_matches() -> None:
    text = "from ::ffff:192.0.2.128 and 555-123-4567"
    gold = [{"kind": "ip_address", "start": 5, "end": 23, "value": "::ffff:192.0.2.128"},
            {"kind": "credit_card", "start": 28, "end": 40, "value": "555-123-4567"}]
    scores = pii.evaluate([{"text": text, "spans": gold}])
    assert scores["ip_address"] == {"tp": 1, "fp": 0, "fn": 0, "labelled": 1, "precision": 1.0, "recall": 1.0}
    assert scores["phone"]["fp"] == 1 and scores["credit_card"]["fn"] == 1  # the right span, the wrong kind


def test_pii_kinds_can_be_switched_off() -> None:
    text = "mail a@b.example from 203.0.113.42"
    out, counts = pii.redact(text, PIISpec(ip_address=False))
    assert counts["email"] == 1 and counts["ip_address"] == 0 and "203.0.113.42" in out
    assert pii.redact(text, PIISpec(enabled=False)) == (text, dict.fromkeys(pii.KINDS, 0))


def test_luhn() -> None:
    assert pii.luhn_valid("4111111111111111") and not pii.luhn_valid("4111111111111112")
    assert pii.is_card_number("4012 8888 8888 1881") and not pii.is_card_number("9999 9999 9999 9995")


# ----------------------------------------------------------------- recall on the demo corpus (no Ray)


def _demo_records(tmp_path: Path, num_docs: int, seed: int) -> tuple[dict, dict[str, str]]:
    planted = generate_demo_corpus(tmp_path, num_docs=num_docs, seed=seed)
    texts = {}
    for name in planted["files"]:
        opener = gzip.open if name.endswith(".gz") else open
        with opener(tmp_path / name, "rb") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    continue
                if isinstance(row, dict) and isinstance(row.get("text"), str) and len(row["text"]) < 100_000:
                    texts[row["id"]] = row["text"]
    return planted, texts


def test_pii_recall_on_planted_pii(tmp_path: Path) -> None:
    planted, texts = _demo_records(tmp_path, 2000, seed=4)
    found: dict[str, list[int]] = {k: [0, 0] for k in pii.KINDS}
    for e in planted["pii"]:
        out, _ = pii.redact(texts[e["id"]])
        found[e["kind"]][0] += e["value"] not in out
        found[e["kind"]][1] += 1
    for kind, (hit, total) in found.items():
        assert total >= 5 and hit / total >= 0.95, (kind, hit, total)
    for e in planted["pii_decoys"]:
        assert e["value"] in pii.redact(texts[e["id"]])[0]  # Luhn-invalid numbers stay
    with_pii = {e["id"] for e in planted["pii"]}
    false_hits = sum(sum(pii.redact(t)[1].values()) for i, t in texts.items()
                     if i not in with_pii and i not in planted["html_ids"] and i not in planted["junk_ids"])
    assert false_hits == 0


def test_minhash_precision_and_recall_on_planted_near_duplicates(tmp_path: Path) -> None:
    planted, texts = _demo_records(tmp_path, 3000, seed=5)
    skip = set(planted["junk_ids"]) | set(planted["html_ids"])  # removed before dedup in the pipeline
    ids = [i for i in texts if i not in skip]
    found = minhash.find_near_duplicates([texts[i] for i in ids], list(range(len(ids))))
    removed = {ids[r]: ids[k] for r, k in found.items()}
    parent = {d: s for d, s in planted["near_duplicate_pairs"] + planted["exact_duplicate_pairs"]}

    def root(x: str) -> str:
        while x in parent:
            x = parent[x]
        return x

    correct = sum(root(r) == root(k) for r, k in removed.items())
    assert correct / len(removed) >= 0.99
    similar = [(d, s) for d, s in planted["near_duplicate_pairs"] if word_shingle_jaccard(texts[d], texts[s]) >= 0.8]
    assert len(similar) >= 100
    recalled = sum(removed.get(d, d) == removed.get(s, s) for d, s in similar)
    assert recalled / len(similar) >= 0.9


def test_lsh_clusters() -> None:
    a, b = minhash.bucket_edges(np.array([7, 7, 7, 9, 9, 3]), np.array([30, 10, 20, 40, 10, 50]))
    assert sorted(zip(a.tolist(), b.tolist(), strict=True)) == [(10, 20), (10, 30), (10, 40)]
    removed, kept = minhash.duplicates_to_remove(np.array([1, 2, 8, 5]), np.array([2, 3, 9, 3]))
    assert dict(zip(removed.tolist(), kept.tolist(), strict=True)) == {2: 1, 3: 1, 5: 1, 9: 8}


# --------------------------------------------------------------------------------- decontamination


def test_decontamination(tmp_path: Path) -> None:
    question = "Which planet in the solar system has the largest number of known moons as of this year"
    (tmp_path / "eval.jsonl").write_text(json.dumps({"text": question}) + "\n")
    grams = decontam.eval_ngrams((str(tmp_path / "eval.jsonl"),), 13)
    assert grams
    leaked = "Quiz night! " + question.upper().replace(" ", "  ") + "? Answer below."
    assert decontam.contaminated(leaked, grams, 13)
    twelve = " ".join(question.split()[:12])  # 12 shared words: not a 13-gram
    assert not decontam.contaminated(f"Quiz: {twelve}, or not.", grams, 13)



def test_cluster_join_counts_each_pair_once_and_refuses_too_many() -> None:
    """The join task (a plain function; Ray runs it as a task): pairs found in several bands or in either
    orientation count once, each cluster keeps its smallest uid, and too many pairs is a clear error."""
    import pyarrow as pa

    from raytrain.data.pipeline import join_clusters

    blocks = [pa.table({"a": [1, 5, 9], "b": [2, 6, 8]}), pa.table({"a": [2, 2, 6], "b": [1, 3, 7]})]
    (removed, keep), stats = join_clusters(100, *blocks)
    assert stats == {"candidate_pairs": 5, "clusters": 3, "removed": 5}
    assert dict(zip(removed.tolist(), keep.tolist(), strict=True)) == {2: 1, 3: 1, 6: 5, 7: 5, 9: 8}
    assert join_clusters(100)[1] == {"candidate_pairs": 0, "clusters": 0, "removed": 0}
    none, err = join_clusters(5, *blocks)
    assert none is None and "data.fuzzy_dedup.max_pairs=5" in err["error"]


def test_report_samples_are_redacted() -> None:
    from raytrain.data.pipeline import _snippet

    snippet = _snippet(b"contact jane.doe@example.com or 192.168.10.20 about it")
    assert "jane.doe@example.com" not in snippet and "192.168.10.20" not in snippet
    assert snippet.startswith("contact ")
