"""Incremental detokenization and stop-string matching, in plain Python.

Owns: turning one token at a time into text deltas that are safe to send:
- no half characters (a byte-level BPE token can end inside a UTF-8 sequence,
  which decodes to U+FFFD until the next token completes it);
- no text that may turn out to be the start of a stop string (held back
  until it is clearly not one, cut off when it is);
- the stop text itself is never returned.

The decode uses the prefix/read offsets of TGI and vLLM: each step decodes a
short window `ids[prefix_offset:]` and subtracts the window's old text, so a
step costs O(window), not O(sequence), and tokenizers that drop or add leading
spaces by context (SentencePiece) still come out right.

It knows nothing of tensors or models: any object with
`decode(ids, skip_special_tokens=...)` will do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class StopMatcher:
    """Holds back text that could begin a stop string; cuts at the first one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(s for s in stops if s)
        self.max_len = max((len(s) for s in self.stops), default=0)
        self.text = ""      # all text seen, cut at the stop once one is found
        self.emitted = 0    # how much of `text` has been released
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Add text; return what can be released now. Sets `stopped` on a match."""
        if self.stopped:
            return ""
        # A new match can only start where it would overlap the new text.
        search_from = max(0, len(self.text) - self.max_len + 1)
        self.text += delta
        if not self.stops:
            return self._release(len(self.text))
        hits = [i for s in self.stops if (i := self.text.find(s, search_from)) >= 0]
        if hits:
            cut = min(hits)
            self.text = self.text[:cut]
            self.stopped = True
            return self._release(cut)
        return self._release(len(self.text) - self._held_suffix())

    def flush(self) -> str:
        """Release everything held back (the sequence ended for another reason)."""
        return self._release(len(self.text))

    def _held_suffix(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop."""
        tail = self.text[-(self.max_len - 1):] if self.max_len > 1 else ""
        for k in range(len(tail), 0, -1):
            piece = tail[-k:]
            if any(s.startswith(piece) for s in self.stops):
                return k
        return 0

    def _release(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out = self.text[self.emitted:upto]
        self.emitted = upto
        return out


class IncrementalDetokenizer:
    """Token ids in, safe text deltas out."""

    def __init__(self, decoder: Decoder, stops: Sequence[str] = (), skip_special_tokens: bool = True):
        self.decoder = decoder
        self.skip_special = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.matcher = StopMatcher(stops)

    @property
    def stopped(self) -> bool:
        return self.matcher.stopped

    @property
    def text(self) -> str:
        """All text produced so far (cut at the stop string, if any)."""
        return self.matcher.text

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self.matcher.feed(self._decode_step(final=False))

    def flush(self) -> str:
        """At the end: release held text and any bytes still undecoded."""
        if self.matcher.stopped:
            return ""
        out = self.matcher.feed(self._decode_step(final=True))
        return out + ("" if self.matcher.stopped else self.matcher.flush())

    def _decode_step(self, final: bool) -> str:
        prefix = self.decoder.decode(self.ids[self.prefix_offset:self.read_offset],
                                     skip_special_tokens=self.skip_special)
        window = self.decoder.decode(self.ids[self.prefix_offset:], skip_special_tokens=self.skip_special)
        if len(window) > len(prefix) and (final or not window.endswith("\ufffd")):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return window[len(prefix):]
        return ""
