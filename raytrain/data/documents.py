"""Per-document curation: parse, extract, normalize, filter. Pure functions, no Ray.

Each raw row becomes exactly one annotated row with a status — ``kept``, ``removed`` (with the
filter that removed it) or ``quarantined`` (with what was malformed) — so the pipeline can prove
``read = kept + removed + quarantined``.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from raytrain.config.schema import FilterSpec

KEPT, REMOVED, QUARANTINED = "kept", "removed", "quarantined"

# Annotated row schema: every batch the annotate step returns has exactly these columns.
COLUMNS = ("doc_id", "url", "text", "status", "reason", "source", "line", "hash", "raw")

_HTML_HINT = re.compile(r"<\s*(html|body|article|p|div|head)\b", re.IGNORECASE)
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")


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


def quality_reason(text: str, spec: FilterSpec) -> str:
    """The first quality rule the text breaks ("" when it passes). Gopher-style rules."""
    words = text.split()
    n = len(words)
    if n < spec.min_words:
        return "too_short"
    if n > spec.max_words:
        return "too_long"
    mean_len = sum(len(w) for w in words) / n
    if mean_len < spec.min_mean_word_length or mean_len > spec.max_mean_word_length:
        return "mean_word_length"
    alpha = sum(1 for w in words if any(c.isalpha() for c in w))
    if alpha / n < spec.min_alpha_words_fraction:
        return "not_enough_alpha_words"
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols / n > spec.max_symbol_word_ratio:
        return "symbol_ratio"
    lines = [ln for ln in text.split("\n") if ln.strip()]
    if lines:
        dup = len(lines) - len(set(lines))
        if dup / len(lines) > spec.max_duplicate_line_fraction:
            return "duplicate_lines"
    return ""


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
) -> Annotated:
    """Curate one row. Never raises on bad input: a malformed row is quarantined with its reason."""
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

    def removed(reason: str, body: str) -> Annotated:
        return Annotated(doc_id, url, body, REMOVED, reason, source, line, "", b"")

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
    reason = quality_reason(text, filters)
    if reason:
        return removed(reason, text)
    return Annotated(doc_id, url, text, KEPT, "", source, line, dedup_key(text), b"")


def split_of(key: str, val_fraction: float, test_fraction: float, salt: str) -> str:
    """Stable split from a document's dedup key: the same text lands in the same split everywhere."""
    h = hashlib.blake2b(f"{salt}:{key}".encode(), digest_size=8).digest()
    u = int.from_bytes(h, "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"
