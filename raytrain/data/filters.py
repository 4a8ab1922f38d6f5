"""Document filters with published defaults: pure functions of (text, spec), no Ray.

Every filter returns ``""`` when the document passes, else ``"<filter>:<rule>"`` naming the rule that
removed it; the pipeline counts removals per rule. The C4 line rules *edit* the text, so
``c4_filter`` returns the edited text as well.

Sources of the rules and thresholds (implemented here from the papers' descriptions):

* Gopher quality and repetition: Rae et al. 2021, "Scaling Language Models: Methods, Analysis &
  Insights from Training Gopher", appendix A.1.1 and Table A1.
* C4: Raffel et al. 2020, "Exploring the Limits of Transfer Learning ...", section 2.2.
* FineWeb: Penedo et al. 2024, "The FineWeb Datasets" (paper section 3.3 and the blog post).
* Toxicity: the alt-profanity-check classifier (TF-IDF + calibrated linear SVM, trained on labelled
  offensive comments), scored on windows of sentences; threshold and window size measured on the demo corpus.

Words are whitespace tokens with surrounding punctuation stripped (tokens that are only
punctuation are not words); lines are split on ``\\n``, paragraphs on blank lines.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from urllib.parse import urlsplit

import numpy as np

from raytrain.config.schema import (
    BadWordsSpec,
    BlocklistSpec,
    C4Spec,
    FineWebSpec,
    GopherQualitySpec,
    GopherRepetitionSpec,
    LanguageSpec,
    ToxicitySpec,
)

PUNCT = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~“”‘’«»…–—·•"
TERMINAL = (".", "!", "?", '"', "”", "'", "’")
BULLETS = ("•", "‣", "●", "○", "◦", "▪", "■", "-", "*", "·", "–", "—", "➢", "→")
ELLIPSES = ("...", "…")
_PARAGRAPHS = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*(?=\s|$)")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


def words_of(text: str) -> list[str]:
    """Whitespace tokens with leading/trailing punctuation stripped; punctuation-only tokens dropped."""
    return [w for w in (t.strip(PUNCT) for t in text.split()) if w]


# -------------------------------------------------------------------------------------------- Gopher


def gopher_quality(text: str, spec: GopherQualitySpec) -> str:
    tokens = text.split()
    words = words_of(text)
    n = len(words)
    if n < spec.min_words or n > spec.max_words or not n:  # no words: every rule below is a ratio per word
        return "gopher_quality:word_count"
    mean = sum(len(w) for w in words) / n
    if mean < spec.min_mean_word_length or mean > spec.max_mean_word_length:
        return "gopher_quality:mean_word_length"
    if text.count("#") / n > spec.max_symbol_word_ratio:
        return "gopher_quality:hash_ratio"
    if (text.count("...") + text.count("…")) / n > spec.max_symbol_word_ratio:
        return "gopher_quality:ellipsis_ratio"
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if lines:
        if sum(ln.startswith(BULLETS) for ln in lines) / len(lines) > spec.max_bullet_lines_ratio:
            return "gopher_quality:bullet_lines"
        if sum(ln.endswith(ELLIPSES) for ln in lines) / len(lines) > spec.max_ellipsis_lines_ratio:
            return "gopher_quality:ellipsis_lines"
    if sum(any(c.isalpha() for c in t) for t in tokens) / len(tokens) < spec.min_alpha_words_ratio:
        return "gopher_quality:alpha_words"
    if spec.min_stop_words and len(_stop_words(spec) & {w.lower() for w in words}) < spec.min_stop_words:
        return "gopher_quality:stop_words"
    return ""


@functools.lru_cache(maxsize=8)
def _stop_words_cached(words: tuple[str, ...]) -> frozenset[str]:
    return frozenset(w.lower() for w in words)


def _stop_words(spec: GopherQualitySpec) -> frozenset[str]:
    return _stop_words_cached(tuple(spec.stop_words))


def _dup_fraction(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier item, fraction of item characters in those repeats)."""
    if not items:
        return 0.0, 0.0
    seen: set[str] = set()
    dup = dup_chars = total_chars = 0
    for it in items:
        total_chars += len(it)
        if it in seen:
            dup += 1
            dup_chars += len(it)
        else:
            seen.add(it)
    return dup / len(items), (dup_chars / total_chars if total_chars else 0.0)


def top_ngram_char_fraction(words: list[str], n: int) -> float:
    """Characters covered by every occurrence of the most frequent word n-gram / all word characters.

    Only a repeated n-gram counts (a most-frequent n-gram seen once is no repetition).
    """
    total = sum(len(w) for w in words)
    if len(words) < n or not total:
        return 0.0
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    gram, count = grams.most_common(1)[0]
    if count < 2:
        return 0.0
    return count * sum(len(w) for w in gram) / total


def dup_ngram_char_fraction(words: list[str], n: int) -> float:
    """Characters of words covered by any n-gram occurring more than once / all word characters.

    Overlapping occurrences count each character once (Rae et al.: "taking care not to count
    characters that occur in overlapping n-grams more than once").
    """
    total = sum(len(w) for w in words)
    if len(words) < n or not total:
        return 0.0
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    if counts.most_common(1)[0][1] < 2:
        return 0.0
    covered = bytearray(len(words))
    for i, g in enumerate(grams):
        if counts[g] > 1:
            covered[i:i + n] = b"\x01" * n
    return sum(len(w) for w, c in zip(words, covered, strict=True) if c) / total


def gopher_repetition(text: str, spec: GopherRepetitionSpec) -> str:
    lines = [ln for ln in text.split("\n") if ln.strip()]
    frac, char_frac = _dup_fraction(lines)
    if frac > spec.max_dup_line_frac:
        return "gopher_repetition:dup_line_frac"
    paragraphs = [p for p in _PARAGRAPHS.split(text) if p.strip()]
    pfrac, pchar_frac = _dup_fraction(paragraphs)
    if pfrac > spec.max_dup_para_frac:
        return "gopher_repetition:dup_para_frac"
    if char_frac > spec.max_dup_line_char_frac:
        return "gopher_repetition:dup_line_char_frac"
    if pchar_frac > spec.max_dup_para_char_frac:
        return "gopher_repetition:dup_para_char_frac"
    words = [w.lower() for w in words_of(text)]
    for n, limit in sorted(spec.top_ngram_max_char_frac.items()):
        if top_ngram_char_fraction(words, n) > limit:
            return f"gopher_repetition:top_{n}gram"
    for n, limit in sorted(spec.dup_ngram_max_char_frac.items()):
        frac_n = dup_ngram_char_fraction(words, n)
        if frac_n > limit:
            return f"gopher_repetition:dup_{n}gram"
        if frac_n == 0.0:
            break  # no repeated n-gram: no longer n-gram repeats either
    return ""


# ------------------------------------------------------------------------------------------------ C4


def c4_filter(text: str, spec: C4Spec) -> tuple[str, str]:
    """(edited text, reason). Document rules first (on the page as read), then line rules, then sentences."""
    lower = text.lower()
    if spec.remove_lorem_ipsum and "lorem ipsum" in lower:
        return text, "c4:lorem_ipsum"
    if spec.remove_curly_bracket and "{" in text:
        return text, "c4:curly_bracket"
    kept: list[str] = []
    for line in text.split("\n"):
        s = line.strip()
        if not s:
            if kept and kept[-1]:
                kept.append("")  # keep paragraph breaks, never two in a row
            continue
        low = s.lower()
        if spec.drop_javascript_lines and "javascript" in low:
            continue
        if spec.drop_policy_lines and any(p in low for p in _POLICY):
            continue
        tokens = s.split()
        if any(len(t) > spec.max_word_length for t in tokens):
            continue
        if spec.drop_lines_without_terminal_punct and not s.endswith(TERMINAL):
            continue
        if len(tokens) < spec.min_words_per_line:
            continue
        kept.append(s)
    out = "\n".join(kept).strip()
    if count_sentences(out) < spec.min_sentences:
        return out, "c4:min_sentences"
    return out, ""


def count_sentences(text: str) -> int:
    return len(_SENTENCE_END.findall(text))


# ------------------------------------------------------------------------------------------- FineWeb


def fineweb(text: str, spec: FineWebSpec) -> str:
    lines = [ln.strip() for ln in text.split("\n") if ln.strip()]
    if not lines:
        return "fineweb:line_punct_ratio"
    if sum(ln.endswith(TERMINAL) for ln in lines) / len(lines) <= spec.min_line_punct_ratio:
        return "fineweb:line_punct_ratio"
    _, dup_chars = _dup_fraction(lines)
    if dup_chars >= spec.max_dup_line_char_ratio:
        return "fineweb:dup_line_char_ratio"
    if sum(len(ln) <= spec.short_line_length for ln in lines) / len(lines) >= spec.max_short_line_ratio:
        return "fineweb:short_line_ratio"
    n_words = len(words_of(text))
    if not n_words or text.count("\n") / n_words > spec.max_newline_word_ratio:
        return "fineweb:newline_ratio"
    return ""


# ------------------------------------------------------------------------------------ language, URL, words


@functools.lru_cache(maxsize=1)
def _language_identifier():
    # py3langid ships its model inside the package: nothing is downloaded at run time.
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def identify_language(text: str, max_chars: int = 4000) -> tuple[str, float]:
    lang, prob = _language_identifier().classify(text[:max_chars])
    return lang, float(prob)


def language(text: str, spec: LanguageSpec) -> str:
    lang, prob = identify_language(text, spec.max_chars)
    if lang not in spec.languages:
        return f"language:{lang}"
    if prob < spec.min_score:
        return "language:low_score"
    return ""


def url_host(url: str) -> str:
    try:
        host = urlsplit(url if "//" in url else "//" + url).hostname or ""
    except ValueError:
        return ""
    return host.lower().rstrip(".")


def url_blocked(url: str, domains: frozenset[str], substrings: tuple[str, ...]) -> str:
    if not url:
        return ""
    host = url_host(url)
    parts = host.split(".")
    # The host itself and every parent domain: a blocked domain blocks its subdomains.
    if any(".".join(parts[i:]) in domains for i in range(len(parts))):
        return "url_blocklist:domain"
    low = url.lower()
    if any(s in low for s in substrings):
        return "url_blocklist:substring"
    return ""


def blocklist_domains(spec: BlocklistSpec, extra: Iterable[str] = ()) -> frozenset[str]:
    cleaned = (d.strip().lower().lstrip(".") for d in (*spec.domains, *extra))
    return frozenset(d.removeprefix("www.") for d in cleaned if d)


def bad_words_pattern(words: Iterable[str]) -> re.Pattern[str] | None:
    alts = sorted({re.escape(w.strip().lower()) for w in words if w.strip()}, key=len, reverse=True)
    if not alts:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(alts) + r")(?!\w)", re.IGNORECASE)


def bad_words(text: str, pattern: re.Pattern[str] | None, spec: BadWordsSpec) -> str:
    if pattern is None:
        return ""
    found = 0
    for _ in pattern.finditer(text):
        found += 1
        if found > spec.max_matches:
            return "bad_words"
    return ""


# ------------------------------------------------------------------------------------------------ toxicity

_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n+")


def text_windows(text: str, words: int) -> list[str]:
    """Consecutive sentences grouped into windows of at least `words` words (a short tail joins the last one).

    A sentence longer than twice `words` (text without punctuation) is cut into `words`-word pieces, so no
    window dilutes an offensive passage with pages of other text. `words` <= 0: the whole text. No words: [].
    """
    if not text.strip():
        return []
    if words <= 0:
        return [text]
    pieces: list[list[str]] = []
    for sentence in _SENTENCE_BREAK.split(text):
        toks = sentence.split()
        if len(toks) > 2 * words:
            pieces.extend(toks[i:i + words] for i in range(0, len(toks), words))
        elif toks:
            pieces.append(toks)
    windows: list[list[str]] = []
    current: list[str] = []
    for toks in pieces:
        current += toks
        if len(current) >= words:
            windows.append(current)
            current = []
    if current:
        if windows and len(current) < words // 2:
            windows[-1] += current
        else:
            windows.append(current)
    return [" ".join(w) for w in windows]


@functools.lru_cache(maxsize=1)
def toxicity_classifier() -> Callable[[list[str]], np.ndarray]:
    """alt-profanity-check's `predict_prob` (probability of 'offensive' per text).

    Its model ships inside the wheel and loads when the module is imported (about 2 s, mostly scikit-learn):
    once per process. A call costs about 8 ms however few texts it gets, so callers batch.
    """
    from profanity_check import predict_prob

    return predict_prob


def toxicity_scores(texts: Sequence[str], chunk_words: int) -> list[float]:
    """Per text, the classifier's highest probability over its windows (`text_windows`); one call for all texts.
    A text without words scores 0."""
    windows = [text_windows(t, chunk_words) for t in texts]
    flat = [w for ws in windows for w in ws]
    if not flat:
        return [0.0] * len(texts)
    probs = toxicity_classifier()(flat)
    out: list[float] = []
    i = 0
    for ws in windows:
        out.append(float(probs[i:i + len(ws)].max()) if ws else 0.0)
        i += len(ws)
    return out


def toxicity_many(texts: Sequence[str], spec: ToxicitySpec) -> list[str]:
    """`toxicity` for many documents in one classifier call."""
    return ["toxicity" if p >= spec.threshold else "" for p in toxicity_scores(texts, spec.chunk_words)]


def toxicity(text: str, spec: ToxicitySpec) -> str:
    return toxicity_many([text], spec)[0]


def read_list_file(path: str | None) -> list[str]:
    """Lines of a word/domain list file (local or object store); '#' starts a comment."""
    if not path:
        return []
    from raytrain import storage

    fs, p = storage.filesystem(path)
    with fs.open_input_stream(p) as f:
        text = f.read().decode("utf-8", errors="replace")
    return [ln.split("#", 1)[0].strip() for ln in text.splitlines() if ln.split("#", 1)[0].strip()]
