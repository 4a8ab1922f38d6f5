"""Incremental detokenization: a completion's text, piece by piece, with work per token independent of its length.

Decoding the whole completion after every sampled token costs O(length) per token, O(length²) per completion.
:class:`IncrementalDetokenizer` keeps the prefix/read-offset scheme vLLM uses: each step decodes only a short
window of recent tokens, starting where the text last ended cleanly, and returns what that window adds beyond its
already-returned prefix. The window starts a few tokens back rather than at the new token because decoders need
context: a SentencePiece `▁word` decodes to `word` at the start of a text and to ` word` after another word, and a
multibyte UTF-8 character split across byte-level tokens only decodes once its last byte has arrived (until then
the window ends in U+FFFD and nothing is returned).

Why not `tokenizers.decoders.DecodeStream`, which implements the same idea in Rust: a finished completion must
equal the full decode of its tokens, including a trailing character that was cut off (full decode shows it as
U+FFFD), and DecodeStream has no way to flush what it holds back. The decoding itself stays the tokenizer's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns token ids, pushed one at a time, into text pieces that concatenate to the full decode.

    `decode(ids) -> str` must decode a list of ids on its own (e.g. a `tokenizers.Tokenizer.decode` with special
    tokens skipped); it is called at most twice per pushed token, each time on a window of a few recent tokens.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []  # ids from the window start on; earlier ones are final text and dropped
        self._read = 0  # ids[:_read] are text already returned; ids[_read:] are held back
        self._prefix_text = ""  # decode(ids[:_read]): what the window's text must start with

    def push(self, token: int) -> str:
        """Add one token; returns the text it completes ('' while a multibyte character is unfinished)."""
        self._ids.append(token)
        window = self._decode(self._ids)
        if len(window) <= len(self._prefix_text) or window.endswith(REPLACEMENT_CHAR):
            return ""
        new = window[len(self._prefix_text) :]
        # The next window starts at the old read offset (a clean boundary): enough context for the decoder.
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return new

    def flush(self) -> str:
        """The text of the tokens still held back, as a full decode shows it (an unfinished character as U+FFFD).

        Called once, when the sequence ends.
        """
        if self._read == len(self._ids):
            return ""
        window = self._decode(self._ids)
        new = window[len(self._prefix_text) :]
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return new
