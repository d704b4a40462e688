"""Token ids -> text pieces for a response: whole UTF-8 characters only, cut at the first stop string.

A token may end inside a multi-byte character (its decoded text then ends in U+FFFD until the rest
arrives), and a stop string may arrive split over several tokens, so a piece is released only when
no later token can change it: text that could still be the start of a stop string is held back.

Decoding is incremental: once the decoded text ends on a whole character, the ids so far are
committed with their text and later calls decode only the ids after them (a long reply costs
O(new tokens) per piece, not O(reply)). That relies on ``decode(a + b) == decode(a) + decode(b)``
when ``decode(a)`` ends on a whole character, which holds for byte-level tokenizers (ours, GGUF
vocabularies: the bytes of the tokens, then UTF-8).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TextStream:
    """Feed token ids; get the text that is final so far. ``stopped`` once a stop string appeared."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self.decode = decode
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already released
        self.stopped = False
        self.text = ""  # everything released
        self._base, self._base_text = 0, ""  # ids[:_base] decode to _base_text, final (whole characters)

    def _release(self, upto: int, full: str) -> str:
        piece = full[self.sent:upto]
        self.sent = max(self.sent, upto)
        self.text += piece
        return piece

    def feed(self, tok: int) -> str:
        """Add one token; return the newly final text ('' if none, or after a stop string)."""
        if self.stopped:
            return ""
        self.ids.append(tok)
        return self._advance()

    def feed_many(self, toks: Sequence[int]) -> tuple[str, int]:
        """Add several tokens; ``(newly final text, tokens taken)``. All are taken unless a stop string
        appears (then up to the token that completed it), and the text is what feeding them one by
        one would release, with one decode instead of one per token when there are no stop strings."""
        if self.stop:  # find the very token that completes a stop string
            out = []
            for i, tok in enumerate(toks):
                out.append(self.feed(tok))
                if self.stopped:
                    return "".join(out), i + 1
            return "".join(out), len(toks)
        if self.stopped or not toks:
            return "", 0
        self.ids.extend(toks)
        return self._advance(), len(toks)

    def _decoded(self) -> str:
        """The text of all ids so far, decoding only those after the committed prefix."""
        full = self._base_text + self.decode(self.ids[self._base:])
        if full and not full.endswith("\ufffd"):  # ends on a whole character: later ids cannot change it
            self._base, self._base_text = len(self.ids), full
        return full

    def _advance(self) -> str:
        full = self._decoded()
        hits = [i for i in (full.find(s, max(0, self.sent - len(s) + 1)) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(min(hits), full)
        end = len(full)
        if full.endswith("\ufffd"):  # an unfinished character: wait for its other bytes
            end = len(full.rstrip("\ufffd"))
        hold = 0  # the longest unreleased suffix that may still grow into a stop string
        for s in self.stop:
            for k in range(min(len(s) - 1, end - self.sent), hold, -1):
                if full[end - k:end] == s[:k]:
                    hold = k
                    break
        end -= hold
        return self._release(max(end, self.sent), full)

    def flush(self) -> str:
        """The generation ended: release what was held back (an unfinished character stays U+FFFD)."""
        if self.stopped:
            return ""
        full = self._decoded()
        return self._release(len(full), full)
