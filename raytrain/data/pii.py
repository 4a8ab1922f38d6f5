"""PII redaction: emails, phone numbers, IP addresses and payment-card numbers. Pure functions.

Candidates come from regular expressions; each is then validated: IP addresses with ``ipaddress``, card
numbers with the Luhn checksum and an issuer prefix, phone numbers with ``phonenumbers`` (Google's
libphonenumber metadata, shipped in the package). The words
just before a candidate decide what validation alone cannot: ``version 1.2.3.4`` is a version, ``order
4111111111111111`` an order number, ``call 5551234567`` a phone. Kinds are matched in a fixed order (cards,
emails, IPs, phones) and a span already taken by one kind is not matched again, so one span is redacted
once, as one kind.

How well this works is measured, not assumed: ``evaluate`` scores the detectors against a labelled set
with decoys (``pii_eval.jsonl`` beside this module), per kind; ``python -m raytrain.bench.pii`` prints it.
"""

from __future__ import annotations

import bisect
import functools
import ipaddress
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raytrain.config.schema import PIISpec

KINDS = ("email", "phone", "ip_address", "credit_card")
REPLACEMENT = {"email": "<EMAIL>", "phone": "<PHONE>", "ip_address": "<IP_ADDRESS>", "credit_card": "<CREDIT_CARD>"}
LABELLED_SET = Path(__file__).with_name("pii_eval.jsonl")

_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}"
    r"(?![\w-])"
)
# Asset file extensions, none of them a top-level domain: `logo@2x.png` is a retina image, not an address.
_FILE_SUFFIXES = frozenset(
    "png jpg jpeg gif svg webp bmp ico tif tiff avif heic css js mjs ts tsx jsx json map woff woff2 ttf otf eot "
    "mp3 mp4 wav ogg webm mov avi pdf txt csv yaml yml toml lock".split()
)
# A run of 13-19 digits, or digits in the groups cards are printed in (4-4-4-4[-3], Amex 4-6-5).
_CARD = re.compile(r"(?<![\w-])(?:\d{13,19}|\d{4}(?:[ -]\d{4}){2}[ -]\d{4}(?:[ -]\d{3})?|\d{4}[ -]\d{6}[ -]\d{5})"
                   r"(?![\w-])")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d|\w)")
# The dotted-quad tail first: `::ffff:192.0.2.128` is one address, not `::ffff:192` and a remainder.
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?(?![\w:.])")
# Printed the way phone numbers are printed: (415) 555-0132, 415-555-0132, 415.555.0132, +1 415 555 0132, +44 20 ...
_PHONE_NANP = re.compile(r"(?<![\w+])(?:\+?1[ .-]?)?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}(?![\w-]|\.\d)")
_PHONE_INTL = re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]\(?\d{1,4}\)?){2,5}(?![\w-]|\.\d)")
# Any digit run of phone length, spaces, dashes and brackets allowed (dotted runs are versions, amounts and
# addresses far more often; dotted phones are printed like NANP numbers above): a phone only where the words
# before it say so, or libphonenumber finds it valid.
_PHONE_LOOSE = re.compile(r"(?<![\w+.-])\+?\(?\d[\d ()-]{5,20}\d(?![\w-]|\.\d)")
_DIGIT_RUN = re.compile(r"\d[\d ().-]{5,}\d")

# Words that say what the number after them is. The nearest one within _CONTEXT characters decides.
_CONTEXT = 40
_PHONE_WORDS = r"call(?:ed|ing)?|phone|telephone|tel|ph|mobile|cell|cellphone|fax|sms|whatsapp|dial|hotline|" \
               r"helpline|text (?:me|us)|contact|reach (?:me|us|her|him|them)(?: on| at)?"
_NUMBER_WORDS = r"order|invoice|tracking|track|isbn|issn|serial|sku|part|account|acct|ref|reference|ticket|id|" \
                r"confirmation|transaction|txn|patent|zip|postal|postcode|imei|iccid|upc|ean|barcode|timestamp|" \
                r"epoch|population|receipt no|policy|customer|member|routing|iban|shipment|parcel|case|docket|" \
                r"lot|batch|model|version|build"
_CARD_WORDS = r"card|cards|visa|mastercard|master card|amex|american express|discover|jcb|credit|debit|cc|" \
              r"payment|paid|pay|charged|billed"
_VERSION_WORDS = r"version|ver|release|build|section|sect|chapter|ch|clause|figure|fig|table|oid|rule|paragraph|" \
                 r"para|step|item|rev|revision|firmware|patch|appendix|standard|iso|rfc|§|v"
_IP_WORDS = r"ip|ipv4|ipv6|address|addr|host|server|client|from|ping|gateway|dns|router|subnet|proxy|peer|node|" \
            r"connect(?:ed|ion)?|login|logged in"


def _words(alternatives: str) -> re.Pattern[str]:
    # Letters, not word characters, bound a keyword: `#4111…`, `v1.2.3.4` and `ID123` still count.
    return re.compile(r"(?<![A-Za-z])(?:" + alternatives + r")(?![A-Za-z])", re.IGNORECASE)


_PHONE_CTX, _NUMBER_CTX, _CARD_CTX = _words(_PHONE_WORDS), _words(_NUMBER_WORDS), _words(_CARD_WORDS)
_VERSION_CTX, _IP_CTX = _words(_VERSION_WORDS), _words(_IP_WORDS)


@dataclass(frozen=True, order=True)
class Span:
    start: int
    end: int
    kind: str


class _Taken:
    """Disjoint spans kept sorted, so an overlap test costs O(log n), not a scan (documents with thousands
    of numbers exist: tables, logs)."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.spans: list[Span] = []

    def overlaps(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self.starts, start)
        return (i > 0 and self.spans[i - 1].end > start) or (i < len(self.spans) and self.spans[i].start < end)

    def add(self, span: Span) -> None:
        i = bisect.bisect_right(self.starts, span.start)
        self.starts.insert(i, span.start)
        self.spans.insert(i, span)


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def card_issuer_ok(digits: str) -> bool:
    """A known issuer prefix (IIN) with a length that issuer uses."""
    n = len(digits)
    p2, p4 = int(digits[:2]), int(digits[:4])
    if digits[0] == "4":
        return n in (13, 16, 19)  # Visa
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:
        return n == 16  # Mastercard
    if p2 in (34, 37):
        return n == 15  # American Express
    if digits.startswith("6011") or p2 == 65 or 644 <= int(digits[:3]) <= 649:
        return 16 <= n <= 19  # Discover
    if 3528 <= p4 <= 3589:
        return 16 <= n <= 19  # JCB
    return False


def is_card_number(candidate: str) -> bool:
    digits = re.sub(r"[ -]", "", candidate)
    return 13 <= len(digits) <= 19 and card_issuer_ok(digits) and luhn_valid(digits)


def _is_ipv4(s: str) -> bool:
    try:
        ipaddress.IPv4Address(s)
    except ValueError:
        return False
    return True


def _is_ipv6(s: str) -> bool:
    if s.count(":") < 2 or not any(c not in ":" for c in s):
        return False
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return True


def _nearest(text: str, start: int, *patterns: re.Pattern[str]) -> int:
    """Which of `patterns` matches closest before `start` (within _CONTEXT characters): its index, or -1."""
    best, best_end = -1, -1
    for i, pattern in enumerate(patterns):
        # pos/endpos rather than a slice: the lookbehind still sees the letter before the window ('ri|ver').
        for m in pattern.finditer(text, max(0, start - _CONTEXT), start):
            if m.end() > best_end or (m.end() == best_end and i == 0):
                best, best_end = i, m.end()
    return best


def _email_ok(text: str, m: re.Match[str]) -> bool:
    return m.group(0).rsplit(".", 1)[1].lower() not in _FILE_SUFFIXES


def _card_ok(text: str, m: re.Match[str]) -> bool:
    # A Luhn-valid number after 'order', 'IMEI', 'tracking' … is that, not a card (unless 'card' is nearer).
    return is_card_number(m.group(0)) and _nearest(text, m.start(), _CARD_CTX, _NUMBER_CTX) != 1


def _ip_ok(text: str, m: re.Match[str], valid: Callable[[str], bool]) -> bool:
    # `version 1.2.3.4`, `section 2.1.3.4`, `OID 2.5.4.3` are valid IPv4 strings and no addresses.
    return valid(m.group(0)) and _nearest(text, m.start(), _IP_CTX, _VERSION_CTX) != 1


@functools.lru_cache(maxsize=1)
def _phonenumbers():
    import phonenumbers

    return phonenumbers


def _valid_phone(candidate: str) -> bool:
    """libphonenumber says it is a number in service somewhere (US numbers without a country code)."""
    pn = _phonenumbers()
    digits = re.sub(r"\D", "", candidate)
    if candidate.startswith("00"):
        candidate, digits = "+" + candidate[2:], digits[2:]
    if not candidate.startswith("+") and len(digits) not in (10, 11):
        return False  # without a country code only a North American number can be valid here
    try:
        return pn.is_valid_number(pn.parse(candidate, "US"))
    except pn.NumberParseException:
        return False


def _phone_spans(text: str, taken: _Taken) -> None:
    """Phone numbers: printed like one, or valid per libphonenumber, or any phone-length digit run after
    'call', 'phone', 'tel' …; never after 'order', 'ISBN', 'tracking' … (the nearest such word decides).

    Candidates come from regular expressions, not from ``phonenumbers.PhoneNumberMatcher``: the matcher
    parses every digit run it meets and is 50x slower on number-heavy documents; ``parse`` runs only on
    the few candidates neither their printing nor the words before them decide.
    """
    if not _DIGIT_RUN.search(text):
        return
    candidates: dict[tuple[int, int], bool] = {}  # span -> printed the way phone numbers are printed
    for m in _PHONE_LOOSE.finditer(text):
        body = m.group(0).rstrip(" (-")
        if 7 <= sum(c.isdigit() for c in body) <= 15:
            candidates[(m.start(), m.start() + len(body))] = False
    for pattern in (_PHONE_NANP, _PHONE_INTL):
        for m in pattern.finditer(text):
            digits = sum(c.isdigit() for c in m.group(0))
            candidates[(m.start(), m.end())] = pattern is _PHONE_NANP or 8 <= digits <= 15
    for (start, end), printed in sorted(candidates.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        if taken.overlaps(start, end):
            continue
        context = _nearest(text, start, _PHONE_CTX, _NUMBER_CTX)
        if context == 0 or (context == -1 and (printed or _valid_phone(text[start:end]))):
            taken.add(Span(start, end, "phone"))


_CHECKS: list[tuple[str, re.Pattern[str], Callable[[str, re.Match[str]], bool]]] = [
    ("credit_card", _CARD, _card_ok),
    ("email", _EMAIL, _email_ok),
    ("ip_address", _IPV6, lambda t, m: _ip_ok(t, m, _is_ipv6)),
    ("ip_address", _IPV4, lambda t, m: _ip_ok(t, m, _is_ipv4)),
]


def _enabled(spec: PIISpec) -> dict[str, bool]:
    return {"email": spec.email, "phone": spec.phone, "ip_address": spec.ip_address, "credit_card": spec.credit_card}


def find(text: str, spec: PIISpec | None = None) -> list[Span]:
    """The PII spans of `text` for the kinds `spec` enables (all by default), in text order, disjoint."""
    spec = spec or PIISpec()
    if not spec.enabled:
        return []
    enabled = _enabled(spec)
    taken = _Taken()
    for kind, pattern, check in _CHECKS:
        if not enabled[kind]:
            continue
        # Cheap pre-checks skip the regex on most documents.
        if kind == "email" and "@" not in text:
            continue
        if kind == "ip_address" and pattern is _IPV6 and "::" not in text and text.count(":") < 7:
            continue
        for m in pattern.finditer(text):
            if not taken.overlaps(m.start(), m.end()) and check(text, m):
                taken.add(Span(m.start(), m.end(), kind))
    if enabled["phone"]:
        _phone_spans(text, taken)
    return taken.spans


def redact(text: str, spec: PIISpec | None = None) -> tuple[str, dict[str, int]]:
    """(redacted text, {kind: count}) for the kinds `spec` enables (all by default)."""
    counts = dict.fromkeys(KINDS, 0)
    spans = find(text, spec)
    if not spans:
        return text, counts
    parts, pos = [], 0
    for s in spans:
        parts += [text[pos:s.start], REPLACEMENT[s.kind]]
        counts[s.kind] += 1
        pos = s.end
    parts.append(text[pos:])
    return "".join(parts), counts


# ------------------------------------------------------------------------------------- measurement


def load_labelled(path: str | Path = LABELLED_SET) -> list[dict[str, Any]]:
    """The labelled examples: {"text", "spans": [{"kind", "start", "end", "value"}], "note"} per line."""
    examples = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        ex = json.loads(line)
        for s in ex["spans"]:
            if s["kind"] not in KINDS or ex["text"][s["start"]:s["end"]] != s["value"]:
                raise ValueError(f"{path}:{n}: span {s} does not match the text")
        examples.append(ex)
    return examples


def evaluate(examples: Iterable[dict[str, Any]], spec: PIISpec | None = None) -> dict[str, dict[str, float]]:
    """Precision and recall per kind of `find` against labelled spans.

    A found span is a true positive when it covers a labelled span of the same kind not matched yet
    (one to one): a partial match leaks the rest, so it counts as a false positive and a miss. A found span
    of another kind, or over no labelled span, is a false positive of its kind.
    """
    tally = {k: {"tp": 0, "fp": 0, "fn": 0} for k in KINDS}
    for ex in examples:
        gold = [Span(s["start"], s["end"], s["kind"]) for s in ex["spans"]]
        matched: set[Span] = set()
        for p in find(ex["text"], spec):
            hit = next((g for g in gold if g.kind == p.kind and g not in matched
                        and p.start <= g.start and g.end <= p.end), None)
            if hit is None:
                tally[p.kind]["fp"] += 1
            else:
                matched.add(hit)
                tally[p.kind]["tp"] += 1
        for g in gold:
            if g not in matched:
                tally[g.kind]["fn"] += 1
    out: dict[str, dict[str, float]] = {}
    for kind, t in tally.items():
        found, labelled = t["tp"] + t["fp"], t["tp"] + t["fn"]
        out[kind] = {**t, "labelled": labelled,
                     "precision": round(t["tp"] / found, 4) if found else 1.0,
                     "recall": round(t["tp"] / labelled, 4) if labelled else 1.0}
    return out
