"""Incremental detokenisation: the text of a growing reply without re-decoding the whole reply per token."""

from __future__ import annotations

from typing import Callable


class IncrementalText:
    """One reply decoded token by token. Each push decodes two short windows (from the last complete
    character on), as transformers' TextStreamer and vLLM do, so a step costs the same after 10 or 10,000
    tokens. `text` only grows by complete characters: a multi-byte character split over tokens waits for
    its last byte; what never completes is the caller's to flush (the full decode at the end has it)."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # ids[_prefix:_read] were decoded and emitted last time: the context window
        self._read = 0

    def push(self, token: int) -> str:
        """Append one token; returns the newly completed text ('' while a character is incomplete)."""
        self.ids.append(token)
        before = self.decode(self.ids[self._prefix:self._read])
        now = self.decode(self.ids[self._prefix:])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        piece = now[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += piece
        return piece

    def contains_any(self, stops: tuple[str, ...], piece: str) -> bool:
        """Whether a stop string ends inside the last `piece` (only the tail is searched)."""
        return any(s in self.text[-(len(piece) + len(s) - 1):] for s in stops) if piece else False


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string: a stream must not emit it
    yet, since the next tokens may complete the stop string (which the final text cuts)."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


def safe_piece(text: str, stops: tuple[str, ...], emitted: int) -> str:
    """What a stream may show of a reply's complete `text` beyond the `emitted` characters already shown: all
    but an end that may still become a stop string (the final text, cut at the stop, comes with the result)."""
    safe = len(text) - held_back(text, stops)
    return text[emitted:safe] if safe > emitted else ""
