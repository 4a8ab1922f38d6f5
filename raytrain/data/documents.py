"""Per-document curation: parse, extract, normalize, filter. Pure functions, no Ray.

Each raw row becomes exactly one annotated row with a status — ``kept``, ``removed`` (with the
filter that removed it) or ``quarantined`` (with what was malformed, or ``filter_error:<rule>`` when a
rule raised on it) — so the pipeline can prove ``read = kept + removed + quarantined``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from raytrain.config.schema import DecontaminationSpec, FilterSpec, PIISpec
from raytrain.data import decontam, pii
from raytrain.data import filters as rules

KEPT, REMOVED, QUARANTINED = "kept", "removed", "quarantined"

# Annotated row schema: every batch the annotate step returns has exactly these columns.
COLUMNS = ("doc_id", "url", "text", "status", "reason", "source", "line", "hash", "raw")

_HTML_HINT = re.compile(r"<\s*(html|body|article|p|div|head)\b", re.IGNORECASE)
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")


class RuleError(Exception):
    """A filter rule (or PII redaction, decontamination) raised on one document."""

    def __init__(self, rule: str, error: BaseException) -> None:
        super().__init__(f"{rule}: {error!r}")
        self.rule = rule


def _guarded(rule: str, fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # one document's bad luck with one rule must not fail the task: quarantine it
        raise RuleError(rule, exc) from exc


@dataclass(frozen=True)
class Annotated:
    doc_id: str
    url: str
    text: str
    status: str
    reason: str
    source: str
    line: int
    hash: str
    raw: bytes
    pii: tuple[int, ...] = (0, 0, 0, 0)  # redactions per kind, in pii.KINDS order

    def as_dict(self) -> dict[str, Any]:
        return {c: getattr(self, c) for c in COLUMNS}


def parse_jsonl_line(raw: bytes, max_bytes: int) -> tuple[dict[str, Any] | None, str]:
    """Decode one JSONL line. Returns (record, "") or (None, quarantine reason)."""
    if len(raw) > max_bytes:
        return None, "too_large"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "bad_utf8"
    if not line.strip():
        return None, "blank_line"
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None, "invalid_json"
    if not isinstance(record, dict):
        return None, "not_an_object"
    return record, ""


def looks_like_html(text: str) -> bool:
    head = text[:2048]
    return head.lstrip().startswith("<") and _HTML_HINT.search(head) is not None


def extract_html(html: str) -> str | None:
    """Main text of an HTML page (boilerplate removed) via trafilatura; None when nothing is left."""
    import trafilatura

    return trafilatura.extract(html, include_comments=False, include_tables=False, favor_precision=True)


def normalize(text: str) -> str:
    """NFC, unified newlines, collapsed runs of spaces, at most one blank line between paragraphs."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    lines = [_SPACES.sub(" ", ln).strip() for ln in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def dedup_key(text: str) -> str:
    """Hash of the text as exact dedup sees it: case and whitespace do not make a document new."""
    canon = " ".join(text.lower().split())
    return hashlib.blake2b(canon.encode("utf-8"), digest_size=16).hexdigest()


class Curator:
    """The per-document filters of one spec, with their lists, patterns and models loaded once.

    Order follows FineWeb's pipeline, cheapest first: URL blocklist (before extraction), then on the
    extracted text language ID, Gopher repetition, Gopher quality, C4 (which edits lines), FineWeb,
    bad words and decontamination; PII is redacted in documents that pass; last, the toxicity classifier
    reads the redacted text (the costliest rule per call, so a batch of documents shares one call: `screen_toxicity`).
    """

    def __init__(self, spec: FilterSpec, pii_spec: PIISpec | None = None,
                 decontamination: DecontaminationSpec | None = None) -> None:
        self.spec = spec
        self.pii = pii_spec or PIISpec(enabled=False)
        bl = spec.url_blocklist
        self.blocked = rules.blocklist_domains(bl, rules.read_list_file(bl.path)) if bl.enabled else frozenset()
        self.blocked_substrings = tuple(s.lower() for s in bl.url_substrings) if bl.enabled else ()
        bw = spec.bad_words
        self.bad_words = rules.bad_words_pattern([*bw.words, *rules.read_list_file(bw.path)]) if bw.enabled \
            else None
        self.decontam_n = decontamination.ngram if decontamination else 13
        self.eval_grams = (decontam.eval_ngrams(tuple(decontamination.eval_paths), decontamination.ngram)
                           if decontamination and decontamination.eval_paths else frozenset())
        if spec.toxicity.enabled:
            # Load the classifier now: a missing model must fail the task, not quarantine every row as a rule error.
            rules.toxicity_classifier()

    def url_reason(self, url: str) -> str:
        if not self.blocked and not self.blocked_substrings:
            return ""
        return _guarded("url_blocklist", rules.url_blocked, url, self.blocked, self.blocked_substrings)

    def text_reason(self, text: str) -> tuple[str, str]:
        """(text after line edits, first rule broken or ""). Raises RuleError naming a rule that raised."""
        f = self.spec
        if f.language.enabled and (r := _guarded("language", rules.language, text, f.language)):
            return text, r
        if f.gopher_repetition.enabled and (
                r := _guarded("gopher_repetition", rules.gopher_repetition, text, f.gopher_repetition)):
            return text, r
        if f.gopher_quality.enabled and (
                r := _guarded("gopher_quality", rules.gopher_quality, text, f.gopher_quality)):
            return text, r
        if f.c4.enabled:
            text, r = _guarded("c4", rules.c4_filter, text, f.c4)
            if r:
                return text, r
        if f.fineweb.enabled and (r := _guarded("fineweb", rules.fineweb, text, f.fineweb)):
            return text, r
        if f.bad_words.enabled and (r := _guarded("bad_words", rules.bad_words, text, self.bad_words, f.bad_words)):
            return text, r
        if self.eval_grams and _guarded("decontamination", decontam.contaminated, text, self.eval_grams,
                                        self.decontam_n):
            return text, "decontaminated"
        return text, ""

    def toxicity_reasons(self, texts: Sequence[str]) -> list[str]:
        """The toxicity rule's reason per text ("" when it passes or the rule is off), one classifier call."""
        if not self.spec.toxicity.enabled:
            return [""] * len(texts)
        return rules.toxicity_many(texts, self.spec.toxicity)

    def redact(self, text: str) -> tuple[str, tuple[int, ...]]:
        if not self.pii.enabled:
            return text, (0, 0, 0, 0)
        text, counts = _guarded("pii", pii.redact, text, self.pii)
        return text, tuple(counts[k] for k in pii.KINDS)


@functools.lru_cache(maxsize=8)
def curator_for(filters_json: str, pii_json: str = "", decontam_json: str = "") -> Curator:
    """One Curator per distinct spec per worker process (lists and models load once)."""
    return Curator(FilterSpec.model_validate_json(filters_json),
                   PIISpec.model_validate_json(pii_json) if pii_json else None,
                   DecontaminationSpec.model_validate_json(decontam_json) if decontam_json else None)


def quality_reason(text: str, spec: FilterSpec) -> str:
    """The first filter rule the (normalized) text breaks ("" when it passes)."""
    curator = curator_for(spec.model_dump_json())
    text, reason = curator.text_reason(text)
    return reason or curator.toxicity_reasons([text])[0]


def annotate(
    record: dict[str, Any] | None,
    parse_error: str,
    *,
    raw: bytes,
    source: str,
    line: int,
    text_field: str,
    id_field: str,
    url_field: str,
    filters: FilterSpec,
    extract: bool,
    quarantine_sample_bytes: int,
    curator: Curator | None = None,
    defer_toxicity: bool = False,
) -> Annotated:
    """Curate one row. Never raises on bad input: a malformed row is quarantined with its reason, and so is
    a row a filter rule raised on ('filter_error:<rule>').

    `defer_toxicity`: leave the toxicity rule to the caller, who runs `screen_toxicity` on many rows at once."""
    curator = curator or curator_for(filters.model_dump_json())
    fallback_id = f"{source}:{line}"

    def quarantine(reason: str) -> Annotated:
        return Annotated(fallback_id, "", "", QUARANTINED, reason, source, line, "", raw[:quarantine_sample_bytes])

    if record is None:
        return quarantine(parse_error)
    if text_field not in record or record[text_field] is None:
        return quarantine("missing_text")
    text = record[text_field]
    if not isinstance(text, str):
        return quarantine("non_string_text")
    if len(text.encode("utf-8", errors="replace")) > filters.max_doc_bytes:
        return quarantine("too_large")
    doc_id = str(record.get(id_field) or fallback_id)
    url = record.get(url_field)
    url = url if isinstance(url, str) else ""

    try:
        a = _curate(text, doc_id, url, source, line, extract, quarantine_sample_bytes, curator)
        return a if defer_toxicity else screen_toxicity([a], [raw], curator, quarantine_sample_bytes)[0]
    except RuleError as exc:
        return Annotated(doc_id, url, "", QUARANTINED, f"filter_error:{exc.rule}", source, line, "",
                         raw[:quarantine_sample_bytes])


def _curate(text: str, doc_id: str, url: str, source: str, line: int, extract: bool, quarantine_sample_bytes: int,
            curator: Curator) -> Annotated:
    """Extract, normalize, filter and redact one parsed document (RuleError when a rule raises)."""

    def removed(reason: str, body: str) -> Annotated:
        return Annotated(doc_id, url, body, REMOVED, reason, source, line, "", b"")

    if reason := curator.url_reason(url):
        return removed(reason, text)

    if extract and looks_like_html(text):
        try:
            extracted = extract_html(text)
        except Exception as exc:  # an extraction library bug must not fail the job: keep the row
            return Annotated(doc_id, url, "", QUARANTINED, f"html_extract_error:{type(exc).__name__}",
                             source, line, "", text.encode()[:quarantine_sample_bytes])
        if not extracted:
            return removed("html_no_content", text)
        text = extracted
    text = normalize(text)
    if not text:
        return removed("empty_text", text)
    text, reason = curator.text_reason(text)
    if reason:
        return removed(reason, text)
    text, found = curator.redact(text)
    return Annotated(doc_id, url, text, KEPT, "", source, line, dedup_key(text), b"", found)


def screen_toxicity(rows: Sequence[Annotated], raws: Sequence[bytes], curator: Curator,
                    quarantine_sample_bytes: int) -> list[Annotated]:
    """The toxicity rule on the kept rows among `rows` (annotated with `defer_toxicity`), in one classifier call.

    A kept row the classifier flags becomes removed ('toxicity', its redacted text kept as the body). When the
    batch call raises, rows are scored one at a time and only those that raise are quarantined
    ('filter_error:toxicity', with their raw bytes from `raws`), as for any other rule.
    """
    out = list(rows)
    kept = [i for i, a in enumerate(out) if a.status == KEPT]
    if not kept or not curator.spec.toxicity.enabled:
        return out
    reasons: list[str | None]
    try:
        reasons = list(curator.toxicity_reasons([out[i].text for i in kept]))
    except Exception:  # find the row(s) it was: one document must not quarantine its whole batch
        reasons = []
        for i in kept:
            try:
                reasons.append(curator.toxicity_reasons([out[i].text])[0])
            except Exception:
                reasons.append(None)
    for i, reason in zip(kept, reasons, strict=True):
        a = out[i]
        if reason is None:
            out[i] = Annotated(a.doc_id, a.url, "", QUARANTINED, "filter_error:toxicity", a.source, a.line, "",
                               raws[i][:quarantine_sample_bytes])
        elif reason:
            out[i] = replace(a, status=REMOVED, reason=reason, hash="", pii=(0, 0, 0, 0))
    return out


def split_of(key: str, val_fraction: float, test_fraction: float, salt: str) -> str:
    """Stable split from a document's dedup key: the same text lands in the same split everywhere."""
    h = hashlib.blake2b(f"{salt}:{key}".encode(), digest_size=8).digest()
    u = int.from_bytes(h, "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"
