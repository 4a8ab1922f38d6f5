"""PII redaction: emails, phone numbers, IP addresses and payment-card numbers. Pure functions.

Candidates come from regular expressions; IP addresses are then validated with ``ipaddress`` and card
numbers with the Luhn checksum and an issuer prefix, so an order number or a long digit run is not
redacted as a card. Kinds are matched in a fixed order (cards before phones, IPs before phones) so one
span is redacted once, as one kind.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

from raytrain.config.schema import PIISpec

KINDS = ("email", "phone", "ip_address", "credit_card")
REPLACEMENT = {"email": "<EMAIL>", "phone": "<PHONE>", "ip_address": "<IP_ADDRESS>", "credit_card": "<CREDIT_CARD>"}

_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}"
    r"(?![\w-])"
)
# A run of 13-19 digits, or digits in the groups cards are printed in (4-4-4-4[-3], Amex 4-6-5).
_CARD = re.compile(r"(?<![\w-])(?:\d{13,19}|\d{4}(?:[ -]\d{4}){2}[ -]\d{4}(?:[ -]\d{3})?|\d{4}[ -]\d{6}[ -]\d{5})"
                   r"(?![\w-])")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d|\w)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|(?:\d{1,3}\.){3}\d{1,3})?(?![\w:])")
_PHONE_NANP = re.compile(r"(?<![\w+])(?:\+?1[ .-]?)?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}(?![\w-]|\.\d)")
_PHONE_INTL = re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]\(?\d{1,4}\)?){2,5}(?![\w-]|\.\d)")


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


def _is_intl_phone(s: str) -> bool:
    return 8 <= sum(c.isdigit() for c in s) <= 15


_CHECKS: list[tuple[str, re.Pattern[str], Callable[[str], bool] | None]] = [
    ("credit_card", _CARD, is_card_number),
    ("email", _EMAIL, None),
    ("ip_address", _IPV6, _is_ipv6),
    ("ip_address", _IPV4, _is_ipv4),
    ("phone", _PHONE_INTL, _is_intl_phone),
    ("phone", _PHONE_NANP, None),
]


def redact(text: str, spec: PIISpec | None = None) -> tuple[str, dict[str, int]]:
    """(redacted text, {kind: count}) for the kinds `spec` enables (all by default)."""
    spec = spec or PIISpec()
    counts = dict.fromkeys(KINDS, 0)
    if not spec.enabled:
        return text, counts
    enabled = {"email": spec.email, "phone": spec.phone, "ip_address": spec.ip_address,
               "credit_card": spec.credit_card}
    for kind, pattern, check in _CHECKS:
        if not enabled[kind]:
            continue
        # Cheap pre-checks skip the regex on most documents.
        if kind == "email" and "@" not in text:
            continue
        if kind == "ip_address" and pattern is _IPV6 and "::" not in text and text.count(":") < 7:
            continue

        def sub(m: re.Match[str], kind: str = kind, check: Callable[[str], bool] | None = check) -> str:
            if check is not None and not check(m.group(0)):
                return m.group(0)
            counts[kind] += 1
            return REPLACEMENT[kind]

        text = pattern.sub(sub, text)
    return text, counts
