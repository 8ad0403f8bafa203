"""Kept chat sessions: a request whose messages extend an earlier reply's conversation reuses its KV cache.

After a single-conversation turn the server keeps the `ChatSession` that ran it, keyed by the conversation
as the client will send it back (its messages and the reply's text). A later request whose messages are
exactly that conversation plus one user message takes the session out of the store, runs as its next turn
(prefilling only the new message) and is kept again under its longer conversation.

A session is kept only when its cache holds exactly the ids a fresh run of that conversation would prefill:
a reply stays in the cache as the ids it was generated with, and a decoded reply does not always
re-tokenise to them (special tokens dropped from the text, a stop string cut off, merges across pieces).
Then reuse gives the same tokens as running the whole conversation afresh; otherwise the next request
simply runs afresh.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from qwen2vl_edge.runtime import chat


def _item(item: dict) -> Any:
    """One content item as plain JSON: images by a hash of their pixels, so that the same picture sent as a
    data URI, a URL or a file is the same item, and another picture behind the same URL is not."""
    if item["type"] == "text":
        return ["text", item["text"]]
    if item["type"] == "image":
        return ["image", _pixels(item["image"])]
    video = item["video"]
    if isinstance(video, str):
        return None  # a file on disk may change under its name: such a conversation is not kept
    return ["video", [_pixels(frame) for frame in video], item.get("fps")]


def _pixels(image: Image.Image) -> str:
    data = np.asarray(image)
    return hashlib.sha256(f"{image.mode}{data.shape}".encode() + data.tobytes()).hexdigest()


def conversation_key(messages: list[dict]) -> str | None:
    """A digest of the conversation (the server's runtime form: decoded images); None when it holds
    something that cannot be compared (a video file)."""
    plain = []
    for m in messages:
        content = m["content"]
        items = content if isinstance(content, str) else [_item(i) for i in content]
        if not isinstance(items, str) and None in items:
            return None
        plain.append([m["role"], items])
    return hashlib.sha256(json.dumps(plain).encode()).hexdigest()


def job_keys(messages: list[dict]) -> tuple[str | None, bool]:
    """-> (the key of the conversation the last user message continues, or None; whether a new session can
    run the messages: an optional system message, then one user message)."""
    roles = [m["role"] for m in messages]
    continues = len(messages) >= 3 and roles[-1] == "user"  # a kept conversation has a user message and a reply
    return (conversation_key(messages[:-1]) if continues else None), roles in (["user"], ["system", "user"])


def encodes_as(pipe, before: list[dict], after: list[dict], ids: list[int]) -> bool:
    """Whether `ids` (the cache's ids past the fresh encoding of `before`) are what a fresh run prefills for
    the messages `after` adds, ending with the template's end of turn. The text is tokenised from the start of
    the first added message, a special token, where tokenising in pieces and at once agree."""
    render = lambda messages: pipe.processor.prompt(messages, False, False) if messages else ""  # noqa: E731
    start, whole = render(before), render(after)
    if not whole.startswith(start):
        return False
    added = after[len(before):]
    return pipe.processor.segment(whole[len(start):], chat.vision_items(added))["ids"] == ids


@dataclass
class Kept:
    session: Any  # ChatSession, used by one job at a time: taken out of the store while it runs
    messages: list[dict]  # the conversation its cache holds, as the client sends it back
    nbytes: int = 0  # what its KV cache holds (ChatSession.cache_bytes when it was kept)


class SessionStore:
    """At most `capacity` kept sessions whose KV caches hold at most `max_bytes` in all (None: no bound), least
    recently used evicted first; a session whose cache alone is over `max_bytes` is not kept. Used by the
    batcher's worker thread only, but for `keys`, which any thread may read."""

    def __init__(self, capacity: int, max_bytes: int | None = None):
        self.capacity, self.max_bytes = capacity, max_bytes
        self._kept: OrderedDict[str, Kept] = OrderedDict()
        self.keys: frozenset[str] = frozenset()  # the kept conversations, replaced (not changed) on each change

    def __len__(self) -> int:
        return len(self._kept)

    @property
    def nbytes(self) -> int:
        return sum(kept.nbytes for kept in self._kept.values())

    def holds(self, key: str | None) -> bool:
        return key is not None and key in self._kept

    def take(self, key: str | None) -> Kept | None:
        kept = self._kept.pop(key, None) if key is not None else None
        self.keys = frozenset(self._kept)
        return kept

    def clear(self) -> int:
        """Drop every kept session (their caches go with them) -> how many there were."""
        count = len(self._kept)
        self._kept.clear()
        self.keys = frozenset()
        return count

    def keep(self, key: str, kept: Kept) -> None:
        if self.capacity <= 0 or (self.max_bytes is not None and kept.nbytes > self.max_bytes):
            return
        self._kept[key] = kept
        while len(self._kept) > self.capacity or (self.max_bytes is not None and self.nbytes > self.max_bytes):
            self._kept.popitem(last=False)
        self.keys = frozenset(self._kept)
