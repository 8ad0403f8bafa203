"""ChatSession: a conversation that keeps its KV cache between turns, the pipeline's stateful helper.

Each turn renders the whole conversation with the chat template and prefills only what the cache does not
hold: the new user message (its images / videos through the vision encoder) and the generation prompt.
A reply stays in the cache as the ids it was generated with (a decoded reply does not always re-tokenise to
the same ids). Its last id and the template's end of turn go in with the next turn's prefill, so that a
reply returns as soon as its last token is chosen (a decoder run of its own would hold it back).
M-RoPE positions continue from the cache's next position. The session reaches the backend only through the
generation loop's steps and the Backend interface (the cache made and grown by prefill), so every cache
kind serves it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from . import chat, tools
from .errors import InputError
from .generation import GenerationOptions, GenerationResult, StepTimes, drain, generation_kwargs, prefill, run
from .processor import empty_segment

if TYPE_CHECKING:
    from .pipeline import Qwen2VLPipeline

SENTINEL = "\x00qwen2vl-edge-reply\x00"  # stands for a reply when the template's end of turn is rendered
OVERFLOW = ("error", "slide")


@dataclass
class _Entry:
    messages: list[dict]  # what one turn added, as rendered: the system message, a user message after tool
    #                       results, or a reply as its raw text (tools.RAW)
    tokens: int  # ids it added to the cache: a user message with its template framing, a reply + end of turn
    reply_ids: list[int] | None = None  # assistant messages: the ids generated (without a final eos)
    view: list[dict] | None = None  # as `history` shows it, where that differs (a reply with tool calls)

    @property
    def role(self) -> str:
        return self.messages[0]["role"]

    def shown(self) -> list[dict]:
        return self.view if self.view is not None else [{k: v for k, v in m.items() if k != tools.RAW}
                                                        for m in self.messages]


@dataclass
class _Turn:
    """What one prefill adds: ids, the vision inputs of its placeholders, and per-item metadata."""
    ids: list[int]
    pixels: dict
    grids: dict
    second_per_grid_ts: list
    image_sizes: list
    video_timestamps: list

    @classmethod
    def of(cls, segments: list[dict]) -> "_Turn":
        """Segments (Processor.segment's dicts) in order -> one turn."""
        turn = cls([], {"image": [], "video": []}, {"image": [], "video": []}, [], [], [])
        for seg in segments:
            turn.ids += seg["ids"]
            turn.second_per_grid_ts += seg["second_per_grid_ts"]
            turn.image_sizes += seg["image_sizes"]
            turn.video_timestamps += seg["video_timestamps"]
            for kind in ("image", "video"):
                turn.pixels[kind] += seg["pixels"][kind]
                turn.grids[kind] += seg["grids"][kind]
        return turn


def _new_messages(content: Any, tool_results: list | None) -> list[dict]:
    """A turn's new messages: the tool results (role "tool"), then the user message (when content is given)."""
    if tool_results is not None and not isinstance(tool_results, (list, tuple)):
        raise InputError("tool_results must be a list of {'tool_call_id': ..., 'content': text or items}")
    new = []
    for i, result in enumerate(tool_results or []):
        if not isinstance(result, dict) or "content" not in result:
            raise InputError(f"tool_results[{i}] must be a dict with 'content' (and 'tool_call_id')")
        new.append({**result, "role": "tool"})
    if content is not None:
        new.append({"role": "user", "content": content})
    if not new:
        raise InputError("send() needs content (a user message), tool_results, or both")
    return new


def _view(result: GenerationResult, plan) -> list[dict] | None:
    """How `history` shows a reply: with its tool calls, and without the format's markup; None: as generated."""
    if not (result.tool_calls or plan.continued):
        return None
    message = {"role": "assistant", "content": result.text}
    if result.tool_calls:
        message["tool_calls"] = [c.to_openai() for c in result.tool_calls]
    return [message]


class ChatSession:
    """`pipe.chat(system=None, overflow="error", add_vision_id=False, **generation_defaults)`.

    send(content, **gen) -> GenerationResult; stream(content, **gen) -> text pieces (then `last_result`);
    both take `tool_results` (tool messages answering the last reply's calls, fed before `content`);
    steps(content, opts) -> the turn token by token (the server);
    append(content) -> dict: prefill only (images, camera frames); reset(); history; token_ids.
    `content` is what a user message holds: a string or a list of content items.
    """

    def __init__(self, pipe: "Qwen2VLPipeline", system: str | None = None, overflow: str = "error",
                 add_vision_id: bool = False, **generation_defaults):
        if overflow not in OVERFLOW:
            raise InputError(f"overflow must be one of {', '.join(OVERFLOW)}, got {overflow!r}")
        self.defaults = dict(generation_defaults)
        self.max_new_tokens = self.defaults.pop("max_new_tokens", 128)
        self.skip_special_tokens = self.defaults.pop("skip_special_tokens", True)
        pipe._options(self.max_new_tokens, **generation_kwargs("chat", self.defaults))  # refused now, not later
        self.pipe, self.system, self.overflow, self.add_vision_id = pipe, system, overflow, add_vision_id
        # the tools are in the cached system prompt, so they are the session's, not a turn's
        self._functions = tools.functions(self.defaults["tools"]) if self.defaults.get("tools") else None
        self._parallel = self.defaults.get("parallel_tool_calls") is not False
        self.last_result: GenerationResult | None = None
        self.reset()

    # -- state --------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the conversation (the system message stays) and the cache."""
        self.cache: Any = None  # backend-owned; holds exactly self._ids
        self._ids: list[int] = []
        self._pending: list[int] = []  # the conversation's ids after self._ids: the last reply's end, fed next turn
        self._pending_end = 0  # how many of them are the template's end of turn (dropped when results reopen it)
        self._next_position = 0  # M-RoPE position of the next token
        self._image_sizes: list[tuple[int, int]] = []  # every image in the cache, in order (boxes refer to them)
        self._entries = [_Entry([{"role": "system", "content": self.system}], 0)] if self.system else []
        self._stale = False  # the cache no longer matches the entries (a turn failed midway): rebuild first

    @property
    def history(self) -> list[dict]:
        return [dict(m) for e in self._entries for m in e.shown()]

    @property
    def _messages(self) -> list[dict]:
        """The conversation as the session renders it (replies as their raw text)."""
        return [m for e in self._entries for m in e.messages]

    @property
    def token_ids(self) -> list[int]:
        """The conversation as the template renders it, replies as generated: the ids in the cache, then the
        last reply's end (its last id and the end of turn), which the next turn's prefill feeds."""
        return self._ids + self._pending

    @property
    def cache_bytes(self) -> int:
        """Memory the KV cache holds now, room reserved for later tokens included (0 before the first turn)."""
        return 0 if self.cache is None else self.pipe.backend.cache_bytes(self.cache)

    @property
    def context(self) -> int:
        return self.pipe.artifact.context

    # -- rendering ----------------------------------------------------------------------------

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        if not messages:
            return ""
        plain, _ = tools.prepare(messages, self.pipe.tool_format, self._functions,
                                 "auto" if self._functions else "none", self._parallel)
        return self.pipe.processor.prompt(plain, self.add_vision_id, generation_prompt)

    def _delta(self, history: list[dict], new: list[dict], generation_prompt: bool) -> tuple[str, str, bool]:
        """-> (the text the `new` messages add after `history` (in the cache, but for a lone system message: it
        goes in with the first user message), the whole conversation rendered through them, whether they
        reopen the last reply: tool results that continue the assistant message (the qwen format), which the
        template's end of turn then no longer closes)."""
        fed = history if any(m["role"] != "system" for m in history) else []
        after = self._render(history + new, generation_prompt)
        before = self._render(fed, False)
        if after.startswith(before):
            return after[len(before):], after, False
        if fed and fed[-1]["role"] == "assistant":
            before = self._render(fed[:-1] + [{**fed[-1], "prefix": True}], False)
            if after.startswith(before):
                return after[len(before):], after, True
        raise InputError("this chat template does not render a conversation as the start of its continuation, "
                         "so a session cannot reuse its cache: use pipe.generate() with the whole conversation")

    def _end_of_turn(self, history: list[dict], prompt: str | None = None) -> list[int]:
        """The ids the template puts after a reply to `history` (Qwen2-VL: <|im_end|> and a newline).
        `prompt`: `history` rendered with its generation prompt, when the caller has it already."""
        rendered = self._render(history + [{"role": "assistant", "content": SENTINEL, tools.RAW: True}], False)
        at = rendered.find(SENTINEL)
        if at < 0 or rendered[:at] != (self._render(history, True) if prompt is None else prompt):
            raise InputError("this chat template does not render a reply right after its generation prompt, so a "
                             "session cannot reuse its cache: use pipe.generate() with the whole conversation")
        return self.pipe.processor.tokenizer.encode(rendered[at + len(SENTINEL):]).ids

    def _user_segment(self, history: list[dict], new: list[dict], generation_prompt: bool, room: int) -> dict:
        """Processor.segment's dict for what the `new` messages add, plus "rendered": the conversation through
        them, and "reopened" (see _delta)."""
        text, rendered, reopened = self._delta(history, new, generation_prompt)
        return {**self.pipe.processor.segment(text, chat.vision_items(new), max_tokens=room),
                "rendered": rendered, "reopened": reopened}

    def _reply_ids(self, generated: list[int], reason: str) -> list[int]:
        """The reply as it stays in the cache: the generated ids, less the eos that ended it (the template's
        end of turn follows instead)."""
        if reason == "stop" and generated and generated[-1] in self.pipe.eos_ids:
            return list(generated[:-1])
        return list(generated)

    # -- the cache ----------------------------------------------------------------------------

    def _inputs(self, turn: _Turn) -> dict:
        """The arrays one prefill of `turn` needs: the processor's for one row, its positions continuing from
        the cache (M-RoPE positions shift as a whole) and its mask covering the cache too."""
        L, P = len(turn.ids), len(self._ids)
        inputs = self.pipe.processor.arrays([turn.ids], [{"pixels": turn.pixels, "grids": turn.grids,
                                                          "second_per_grid_ts": turn.second_per_grid_ts}])
        inputs["attention_mask"] = np.ones((1, P + L), np.int64)
        inputs["position_ids"] = inputs["position_ids"] + self._next_position  # [3, 1, L]
        next_position = int(inputs["position_ids"].max()) + 1 if L else self._next_position
        inputs["rope_deltas"] = np.asarray([[next_position - (P + L)]], np.int64)  # decode steps continue here
        return inputs

    def _checked_inputs(self, turn: _Turn, max_new_tokens: int) -> dict:
        """The turn's arrays, refused before any graph runs when the backend was not built for them, or (ONNX
        Runtime on the CPU) when the turn would not fit in memory, as pipe.generate refuses a request."""
        inputs = self._inputs(turn)
        pipe = self.pipe
        pipe.backend.check_request(inputs, max_new_tokens)
        pipe.check_memory(inputs, max_new_tokens + len(self._ids))  # the cache holds the earlier turns too
        return inputs

    def _commit(self, ids: list[int], cache: Any, rope_delta: int, image_sizes: list) -> None:
        """The cache now holds `ids` more (the pending ids first); the next position follows from the last
        rope delta."""
        self._ids += ids
        self._pending, self._pending_end = [], 0
        self.cache, self._stale = cache, False
        self._next_position = len(self._ids) + rope_delta
        self._image_sizes += image_sizes

    def _feed(self, turn: _Turn) -> dict:
        """Prefill `turn` with nothing generated -> timings."""
        inputs = self._checked_inputs(turn, 0)
        embeds, timings = self.pipe.embed(inputs)
        steps = StepTimes()
        _, state = prefill(self.pipe.backend, embeds, inputs, steps, 0, self.cache, np.asarray(self._ids))
        self._commit(turn.ids, state.cache, int(inputs["rope_deltas"][0, 0]), turn.image_sizes)
        return {**timings, "prefill": steps.prefill}

    def _check_room(self, new: int, max_new_tokens: int) -> None:
        held = len(self.token_ids)
        if held + new + max_new_tokens > self.context:
            raise InputError(
                f"this turn needs {new} new tokens + max_new_tokens {max_new_tokens}, but the session already holds "
                f"{held} of the model's {self.context}-token context ({held / self.context:.0%} full): reset() the "
                "session, lower max_new_tokens, send smaller images (max_pixels) or fewer frames, or create it with "
                "pipe.chat(overflow='slide') to start over from the latest turns")

    # -- overflow: start over from the latest turns ---------------------------------------------

    def _replay(self, entries: list[_Entry], room: int) -> list[dict]:
        """Segments that rebuild `entries` in an empty cache: user messages re-rendered (vision re-run),
        replies as their ids."""
        segments, history = [], []
        for e, after in zip(entries, entries[1:] + [None]):
            if e.reply_ids is not None:
                segments.append(empty_segment(e.reply_ids + self._end_of_turn(history)))
                reply_ids = e.reply_ids
            elif e.role != "system":  # a reply follows its generation prompt
                replied = after is not None and after.reply_ids is not None
                seg = self._user_segment(history, e.messages, replied, room)
                if seg["reopened"]:  # results continue the reply: no end of turn after it
                    segments[-1] = empty_segment(reply_ids)
                segments.append(seg)
            history += e.messages
        return segments

    def _rebuild(self, new: list[dict], generation_prompt: bool, max_new_tokens: int,
                 new_tokens: int) -> tuple[_Turn, dict]:
        """Reset the cache and prefill from the latest messages that fit with the `new` ones (`new_tokens` long;
        oldest dropped first; a kept history starts with a user message). -> the turn to prefill, the new
        messages' segment. What to drop is estimated from each message's recorded tokens, then checked."""
        system = [e for e in self._entries if e.role == "system"]
        rest = [e for e in self._entries if e.role != "system"]
        drop = 0 if self._stale else 1
        while (self.overflow == "slide" and drop < len(rest)
               and sum(e.tokens for e in rest[drop:]) + new_tokens + max_new_tokens > self.context):
            drop += 1
        while True:
            kept = rest[drop:]
            while kept and (kept[0].reply_ids is not None or kept[0].role != "user"):
                kept = kept[1:]
            segments = self._replay(system + kept, self.context)
            history = [m for e in system + kept for m in e.messages]
            seg = self._user_segment(history, new, generation_prompt, self.context)
            if seg["reopened"]:
                segments[-1] = empty_segment(kept[-1].reply_ids)
            total = sum(len(s["ids"]) for s in segments) + len(seg["ids"]) + max_new_tokens
            if total <= self.context or not kept or self.overflow == "error":
                break
            drop += 1
        # stale until the rebuilt turn is in the cache: a failure before then rebuilds again at the next turn
        self._entries, self._stale = system + kept, True
        self.cache, self._ids, self._pending, self._next_position, self._image_sizes = None, [], [], 0, []
        self._pending_end = 0
        self._check_room(total - max_new_tokens, max_new_tokens)
        for e, replayed in zip([e for e in system + kept if e.role != "system"], segments):
            e.tokens = len(replayed["ids"])
        return _Turn.of(segments + [seg]), seg

    def _prepare(self, new: list[dict], generation_prompt: bool, max_new_tokens: int) -> tuple[_Turn, dict]:
        """-> the turn to prefill (the last reply's pending end and the new messages; after a rebuild, the kept
        history and the new messages), and the new messages' own segment."""
        chat.validate(new)
        # a video file is sized before decoding: refused at once when it cannot fit (with "slide": even alone)
        held = len(self.token_ids)
        room = self.context - max_new_tokens - (held if self.overflow == "error" else 0)
        new_tokens = 0
        if not self._stale:
            seg = self._user_segment(self._messages, new, generation_prompt, max(room, 0))
            if held + len(seg["ids"]) + max_new_tokens <= self.context:
                pending = self._pending[:len(self._pending) - self._pending_end] if seg["reopened"] else self._pending
                return _Turn.of([empty_segment(pending), seg]), seg
            if self.overflow == "error":
                self._check_room(len(seg["ids"]), max_new_tokens)
            new_tokens = len(seg["ids"])
        return self._rebuild(new, generation_prompt, max_new_tokens, new_tokens)

    # -- turns --------------------------------------------------------------------------------

    def append(self, content: Any) -> dict:
        """Prefill a user message without a reply (images, a chunk of camera frames). Each call is its own
        user message in the template, so each chunk of frames is its own video item.
        -> {"prompt_tokens", "cached_prompt_tokens", "timings", "video_timestamps"}."""
        t0 = time.perf_counter()
        message = {"role": "user", "content": content}
        turn, seg = self._prepare([message], False, 0)
        cached = len(self._ids)
        t1 = time.perf_counter()
        try:
            with self.pipe.lock:  # one step on the backend, as a generation's (Qwen2VLPipeline's docstring)
                timings = self._feed(turn)
        except BaseException:
            self._stale = True
            raise
        self.pipe.trim()  # the frames' pixels and features, freed
        self._entries.append(_Entry([message], len(seg["ids"])))
        return {"prompt_tokens": len(turn.ids), "cached_prompt_tokens": cached,
                "timings": {"preprocess": t1 - t0, **timings}, "video_timestamps": seg["video_timestamps"]}

    def send(self, content: Any = None, max_new_tokens: int | None = None, *, tool_results: list | None = None,
             **gen) -> GenerationResult:
        """A user message -> the reply; both stay in the cache. `tool_results`: tool messages ({"tool_call_id",
        "content": text or items, images included}) answering the last reply's calls, fed before `content`
        (which may then be None)."""
        opts, skip = self._options(max_new_tokens, gen)
        return drain(self.pipe.serialized(self._reply_steps(_new_messages(content, tool_results), opts, skip)))[0]

    def stream(self, content: Any = None, max_new_tokens: int | None = None, *, tool_results: list | None = None,
               **gen) -> Iterator[str]:
        """Text pieces of the reply (never a tool call's markup); the whole result is then `last_result`."""
        opts, skip = self._options(max_new_tokens, gen)
        yield from self.pipe.stream_steps(
            self.pipe.serialized(self._reply_steps(_new_messages(content, tool_results), opts, skip)), opts)

    def steps(self, content: Any, opts: GenerationOptions, skip_special_tokens: bool = True,
              tool_results: list | None = None):
        """send() one token at a time, with options already made (the server's): yields the DecodeState after
        each chosen token (one row) and returns [GenerationResult]. Closing the generator early forgets the
        turn; the cache is rebuilt at the next one."""
        opts.validate()
        self._check_tools(opts.tools)
        return self.pipe.serialized(self._reply_steps(_new_messages(content, tool_results), opts, skip_special_tokens))

    def _check_tools(self, requested: Any) -> None:
        if requested != self.defaults.get("tools"):
            raise InputError("a chat session's tools are part of its cached system prompt: give them to "
                             "pipe.chat(tools=...) and not per turn (tool_choice may change per turn)")

    def _options(self, max_new_tokens: int | None, gen: dict) -> tuple[GenerationOptions, bool]:
        """The call's options over the session's (given to pipe.chat), over the checkpoint's."""
        skip = gen.pop("skip_special_tokens", self.skip_special_tokens)
        if "tools" in gen:
            self._check_tools(gen["tools"])
        opts = self.pipe._options(self.max_new_tokens if max_new_tokens is None else max_new_tokens,
                                  **{**self.defaults, **{k: v for k, v in generation_kwargs("send", gen).items()
                                                         if v is not None}})
        return opts, skip

    def _reply_steps(self, new: list[dict], opts: GenerationOptions, skip_special_tokens: bool):
        started = time.perf_counter()
        end_of_turn_room = 8  # the context keeps room for the template's end of turn (Qwen2-VL's: 2 tokens)
        _, plan = self.pipe.plan(self._messages + new, opts, in_prompt=True)
        matchers = self.pipe.matchers([plan])  # a grammar that does not compile fails before any graph runs
        turn, seg = self._prepare(new, True, opts.max_new_tokens + end_of_turn_room)
        cached = len(self._ids)
        inputs = self._checked_inputs(turn, opts.max_new_tokens + end_of_turn_room)
        preprocess = time.perf_counter() - started
        state, done = None, False
        try:
            embeds, timings = self.pipe.embed(inputs)
            steps = StepTimes()
            # prefill makes the cache at the first turn, else reserves room in it
            for state in run(self.pipe.backend, embeds, inputs, opts, self.pipe.eos_ids, self.pipe.pad_id,
                             self.pipe.decoder(skip_special_tokens), steps, self.cache, np.asarray(self._ids),
                             matchers=matchers, plans=[plan]):
                yield state
            generated, reason = state.generated[0], state.reasons[0]
            history = self._messages + new
            reply, end_of_turn = self._reply_ids(generated, reason), self._end_of_turn(history, seg["rendered"])
            # the cache holds the turn and all generated tokens but the last; the rest of the reply and the end
            # of turn wait for the next turn's prefill
            self._commit(turn.ids + generated[:-1], state.cache, int(state.rope_deltas[0, 0]), turn.image_sizes)
            self._pending, self._pending_end = reply[len(generated) - 1:] + end_of_turn, len(end_of_turn)
            done = True
        finally:
            if not done:  # the consumer stopped early or a graph failed: the cache is not the history anymore
                self._stale = True
        timings = self.pipe._timings({"preprocess": preprocess, **timings}, steps, started)
        meta = {"image_sizes": self._image_sizes, "video_timestamps": seg["video_timestamps"]}
        result = self.pipe._result(generated, reason, opts, timings, meta,
                                   {"prompt_tokens": cached + len(turn.ids), "cached_prompt_tokens": cached},
                                   skip_special_tokens, plan)
        self._entries.append(_Entry(new, len(seg["ids"])))
        raw = self.pipe.processor.decode(reply)
        self._entries.append(_Entry([{"role": "assistant", "content": raw, tools.RAW: True}],
                                    len(reply) + len(end_of_turn), reply, _view(result, plan)))
        self.last_result = result
        del inputs, embeds, state  # the turn's arrays (the cache is the session's now), freed before the trim
        self.pipe.trim()
        return [result]
