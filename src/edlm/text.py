"""Text around token ids: stop strings and incremental detokenization (one rule for the CLI, the evaluations, the
lm-eval adapter and the server)."""

from __future__ import annotations

import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)


def stop_index(text: str, stops: list[str] | tuple[str, ...]) -> int | None:
    """Index of the earliest occurrence of any non-empty stop string in ``text``; None when there is none."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def cut_at_stop(text: str, stops: list[str] | tuple[str, ...]) -> str:
    """``text`` up to (excluding) the earliest occurrence of any non-empty stop string."""
    i = stop_index(text, stops)
    return text if i is None else text[:i]


class TextStream:
    """Incremental detokenization with stop strings.

    The text sent so far is always a prefix of the final text: a trailing U+FFFD (an unfinished UTF-8 sequence)
    and any tail that could be the start of a stop string are held back until more tokens decide them. Streamed
    and non-streamed responses are both the concatenation of these pieces, so they are equal by construction.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]):
        self.decode = decode
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = ""

    def push(self, ids: list[int]) -> tuple[str, bool]:
        """Add tokens; returns (new text that is safe to send, whether a stop string was reached)."""
        self.ids.extend(ids)
        text = self.decode(self.ids)
        cut = stop_index(text, self.stop)
        if cut is not None:
            return self._take(text[:cut]), True
        return self._take(text[:len(text) - self._held(text)]), False

    def flush(self) -> str:
        """The rest of the text, held-back tail included (when decoding ends without a stop string)."""
        return self._take(self.decode(self.ids))

    def _take(self, upto: str) -> str:
        if not upto.startswith(self.sent):  # a tokenizer whose decode is not prefix-stable; cannot unsend
            logger.debug("decoded text changed under already sent text; continuing from its length")
        delta = upto[len(self.sent):]
        self.sent += delta
        return delta

    def _held(self, text: str) -> int:
        """Length of the tail of ``text`` that must wait."""
        body = text.rstrip("\ufffd")
        held = len(text) - len(body)
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(body)), longest, -1):
                if body.endswith(s[:k]):
                    longest = k
                    break
        return held + longest
