"""Token ids to text while decoding: incremental detokenisation, stop strings, streaming.

Decoding a whole answer again at every token costs O(n^2); decoding only the new token
breaks multi-byte characters (byte-level BPE) and SentencePiece's leading spaces. As in
vLLM and TGI, each step decodes a short window with one token of context before it, and
waits while the text ends in an incomplete character (U+FFFD).

A stop string (the seed template's ``### Human:``) ends the answer and is not part of it;
text that might be the start of a stop string is held back from the stream until it is
known not to be one, so a client never sees half a marker.
"""

from __future__ import annotations

from typing import Callable


class TextTracker:
    """The visible text of one answer, fed one token at a time."""

    def __init__(self, tokenizer, stops: list[str], on_text: Callable[[str], None] | None = None):
        self.tokenizer, self.stops, self.on_text = tokenizer, [s for s in stops if s], on_text
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] is the context window already turned into text
        self.text = ""  # all text so far, cut at a stop string once one is hit
        self.sent = 0  # characters of ``text`` given to ``on_text``
        self.longest = max((len(s) for s in self.stops), default=0)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> bool:
        """Append a token; True when the text now contains a stop string (then cut before it)."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        window = self._decode(self.ids[self.prefix:])
        if window.endswith("\ufffd"):  # an incomplete character: wait for its next byte
            return False
        delta = window[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        start = max(0, len(self.text) - self.longest)
        self.text += delta
        hit = min((p for p in (self.text.find(s, start) for s in self.stops) if p >= 0), default=-1)
        if hit >= 0:
            self.text = self.text[:hit]
            self._emit(len(self.text))
            return True
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        self._emit(len(self.text) - hold)
        return False

    def finish(self) -> str:
        """Flush what was held back (the answer ended without completing a stop string)."""
        # the answer is over: an incomplete character stays as U+FFFD, as in a plain decode
        self.text += self._decode(self.ids[self.prefix:])[len(self._decode(self.ids[self.prefix:self.read])):]
        self.prefix = self.read = len(self.ids)
        self._emit(len(self.text))
        return self.text

    def _emit(self, upto: int) -> None:
        if upto > self.sent:
            if self.on_text is not None:
                self.on_text(self.text[self.sent:upto])
            self.sent = upto
