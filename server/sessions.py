"""Kept chat sessions: a request whose messages extend an earlier reply's conversation reuses its KV cache.

After a single-conversation turn the server keeps the `ChatSession` that ran it, keyed by the conversation
as the client will send it back (its messages, the reply's text and tool calls, and the tools in its system
prompt). A later request whose messages are exactly that conversation plus tool results and / or one user
message takes the session out of the store, runs as its next turn (prefilling only the new messages) and is
kept again under its longer conversation. Call ids are not part of the key: no template renders them.

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

from qwen2vl_edge.runtime import chat, tools
from qwen2vl_edge.runtime.generation import GenerationOptions


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


def prompt_tools(opts: GenerationOptions) -> list | None:
    """What of a request's tools its system prompt holds (plain data): the tools and whether calls may be
    parallel; None without tools."""
    return [opts.tools, opts.parallel_tool_calls] if opts.tools else None


def conversation_key(messages: list[dict], prompt: list | None = None) -> str | None:
    """A digest of the conversation (the server's runtime form: decoded images) and the tools in its system
    prompt (`prompt_tools`); None when it holds something that cannot be compared (a video file)."""
    plain: list = [prompt]
    for m in messages:
        content = m["content"]
        items = content if isinstance(content, str) else [_item(i) for i in content]
        if not isinstance(items, str) and None in items:
            return None
        calls = [[c["function"]["name"], c["function"]["arguments"]] for c in m.get("tool_calls") or ()]
        plain.append([m["role"], items, calls])
    return hashlib.sha256(json.dumps(plain).encode()).hexdigest()


def reply_message(result) -> dict:
    """A reply as the client sends it back, in the runtime's form (protocol.conversation's)."""
    message = {"role": "assistant", "content": result.text}
    if result.tool_calls:
        message["tool_calls"] = [call.to_openai() for call in result.tool_calls]
    return message


def job_keys(messages: list[dict], opts: GenerationOptions) -> tuple[str | None, bool]:
    """-> (the key of the conversation the messages after the last reply continue: tool results and / or one
    user message, or None; whether a new session can run the messages: an optional system message, then one
    user message). No session serves a request whose tools are left out of its prompt (tool_choice "none"): a
    session keeps its tools in the cached prompt."""
    if opts.tools and opts.tool_choice == "none":
        return None, False
    roles = [m["role"] for m in messages]
    last_reply = max((i for i, role in enumerate(roles) if role == "assistant"), default=0)
    new = roles[last_reply + 1:]
    continues = last_reply > 0 and bool(new) and set(new) <= {"tool", "user"} and "user" not in new[:-1]
    return ((conversation_key(messages[:last_reply + 1], prompt_tools(opts)) if continues else None),
            roles in (["user"], ["system", "user"]))


def encodes_as(pipe, before: list[dict], after: list[dict], ids: list[int], held: int, prompt: list | None) -> bool:
    """Whether the cache's `ids` past the fresh encoding of `before` (its first `held`) are what a fresh run
    prefills for the messages `after` adds, ending with the template's end of turn; `prompt`: the tools in the
    system prompt (prompt_tools). Tool results that continue `before`'s last reply (the qwen format) reopen it:
    its end of turn is then not in the cache. The text is tokenised from the start of the first added message,
    a special token or a chat.BOUNDARY, where tokenising in pieces and at once agree."""
    fns = tools.functions(prompt[0]) if prompt else None

    def render(messages: list[dict], reopen: bool = False) -> str:  # as pipe.plan renders them; nothing for none
        if not messages:
            return ""
        plain, _ = tools.prepare(messages, pipe.tool_format, fns, "auto" if fns else "none",
                                 prompt is None or prompt[1])
        if reopen:
            plain[-1] = {**plain[-1], "prefix": True}
        return pipe.processor.prompt(plain, False, False)

    start, whole = render(before), render(after)
    if not whole.startswith(start) and before and before[-1]["role"] == "assistant":
        reopened = render(before, reopen=True)
        if not start.startswith(reopened):
            return False
        held -= len(pipe.processor.segment(start[len(reopened):], [])["ids"])  # the end of turn it drops
        start = reopened
    if not whole.startswith(start):
        return False
    added = after[len(before):]
    return pipe.processor.segment(whole[len(start):], chat.vision_items(added))["ids"] == ids[held:]


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
