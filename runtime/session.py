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

from . import chat
from .errors import InputError
from .generation import GenerationOptions, GenerationResult, StepTimes, drain, generation_kwargs, prefill, run
from .processor import empty_segment

if TYPE_CHECKING:
    from .pipeline import Qwen2VLPipeline

SENTINEL = "\x00qwen2vl-edge-reply\x00"  # stands for a reply when the template's end of turn is rendered
OVERFLOW = ("error", "slide")


@dataclass
class _Entry:
    message: dict  # as `history` shows it
    tokens: int  # ids it added to the cache: a user message with its template framing, a reply + end of turn
    reply_ids: list[int] | None = None  # assistant messages: the ids generated (without a final eos)


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


class ChatSession:
    """`pipe.chat(system=None, overflow="error", add_vision_id=False, **generation_defaults)`.

    send(content, **gen) -> GenerationResult; stream(content, **gen) -> text pieces (then `last_result`);
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
        self.last_result: GenerationResult | None = None
        self.reset()

    # -- state --------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the conversation (the system message stays) and the cache."""
        self.cache: Any = None  # backend-owned; holds exactly self._ids
        self._ids: list[int] = []
        self._pending: list[int] = []  # the conversation's ids after self._ids: the last reply's end, fed next turn
        self._next_position = 0  # M-RoPE position of the next token
        self._image_sizes: list[tuple[int, int]] = []  # every image in the cache, in order (boxes refer to them)
        self._entries = [_Entry({"role": "system", "content": self.system}, 0)] if self.system else []
        self._stale = False  # the cache no longer matches the entries (a turn failed midway): rebuild first

    @property
    def history(self) -> list[dict]:
        return [dict(e.message) for e in self._entries]

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
        return self.pipe.artifact.config.text.max_position_embeddings

    # -- rendering ----------------------------------------------------------------------------

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.pipe.processor.prompt(messages, self.add_vision_id, generation_prompt) if messages else ""

    def _delta(self, history: list[dict], message: dict, generation_prompt: bool) -> tuple[str, str]:
        """-> (the text `message` adds after `history` (in the cache, but for a lone system message: it goes in
        with the first user message), the whole conversation rendered through it)."""
        fed = history if any(m["role"] != "system" for m in history) else []
        before, after = self._render(fed, False), self._render(history + [message], generation_prompt)
        if not after.startswith(before):
            raise InputError("this chat template does not render a conversation as the start of its continuation, "
                             "so a session cannot reuse its cache: use pipe.generate() with the whole conversation")
        return after[len(before):], after

    def _end_of_turn(self, history: list[dict], prompt: str | None = None) -> list[int]:
        """The ids the template puts after a reply to `history` (Qwen2-VL: <|im_end|> and a newline).
        `prompt`: `history` rendered with its generation prompt, when the caller has it already."""
        rendered = self._render(history + [{"role": "assistant", "content": SENTINEL}], False)
        at = rendered.find(SENTINEL)
        if at < 0 or rendered[:at] != (self._render(history, True) if prompt is None else prompt):
            raise InputError("this chat template does not render a reply right after its generation prompt, so a "
                             "session cannot reuse its cache: use pipe.generate() with the whole conversation")
        return self.pipe.processor.tokenizer.encode(rendered[at + len(SENTINEL):]).ids

    def _user_segment(self, history: list[dict], message: dict, generation_prompt: bool, room: int) -> dict:
        """Processor.segment's dict for what `message` adds, plus "rendered": the conversation through it."""
        text, rendered = self._delta(history, message, generation_prompt)
        return {**self.pipe.processor.segment(text, chat.vision_items([message]), max_tokens=room),
                "rendered": rendered}

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
        self._pending = []
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
            elif e.message["role"] != "system":  # a reply follows its generation prompt
                replied = after is not None and after.reply_ids is not None
                segments.append(self._user_segment(history, e.message, replied, room))
            history.append(e.message)
        return segments

    def _rebuild(self, message: dict, generation_prompt: bool, max_new_tokens: int,
                 new_tokens: int) -> tuple[_Turn, dict]:
        """Reset the cache and prefill from the latest messages that fit with `message` (`new_tokens` long;
        oldest dropped first; a kept history starts with a user message). -> the turn to prefill, the new
        message's segment. What to drop is estimated from each message's recorded tokens, then checked."""
        system = [e for e in self._entries if e.message["role"] == "system"]
        rest = [e for e in self._entries if e.message["role"] != "system"]
        drop = 0 if self._stale else 1
        while (self.overflow == "slide" and drop < len(rest)
               and sum(e.tokens for e in rest[drop:]) + new_tokens + max_new_tokens > self.context):
            drop += 1
        while True:
            kept = rest[drop:]
            while kept and kept[0].reply_ids is not None:
                kept = kept[1:]
            segments = self._replay(system + kept, self.context)
            history = [e.message for e in system + kept]
            new = self._user_segment(history, message, generation_prompt, self.context)
            total = sum(len(s["ids"]) for s in segments) + len(new["ids"]) + max_new_tokens
            if total <= self.context or not kept or self.overflow == "error":
                break
            drop += 1
        # stale until the rebuilt turn is in the cache: a failure before then rebuilds again at the next turn
        self._entries, self._stale = system + kept, True
        self.cache, self._ids, self._pending, self._next_position, self._image_sizes = None, [], [], 0, []
        self._check_room(total - max_new_tokens, max_new_tokens)
        for e, seg in zip([e for e in system + kept if e.message["role"] != "system"], segments):
            e.tokens = len(seg["ids"])
        return _Turn.of(segments + [new]), new

    def _prepare(self, content: Any, generation_prompt: bool, max_new_tokens: int) -> tuple[dict, _Turn, dict]:
        """-> the user message, the turn to prefill (the last reply's pending end and the message; after a
        rebuild, the kept history and the message), and the message's own segment."""
        message = {"role": "user", "content": content}
        chat.validate([message])
        # a video file is sized before decoding: refused at once when it cannot fit (with "slide": even alone)
        held = len(self.token_ids)
        room = self.context - max_new_tokens - (held if self.overflow == "error" else 0)
        new_tokens = 0
        if not self._stale:
            seg = self._user_segment(self.history, message, generation_prompt, max(room, 0))
            if held + len(seg["ids"]) + max_new_tokens <= self.context:
                return message, _Turn.of([empty_segment(self._pending), seg]), seg
            if self.overflow == "error":
                self._check_room(len(seg["ids"]), max_new_tokens)
            new_tokens = len(seg["ids"])
        turn, seg = self._rebuild(message, generation_prompt, max_new_tokens, new_tokens)
        return message, turn, seg

    # -- turns --------------------------------------------------------------------------------

    def append(self, content: Any) -> dict:
        """Prefill a user message without a reply (images, a chunk of camera frames). Each call is its own
        user message in the template, so each chunk of frames is its own video item.
        -> {"prompt_tokens", "cached_prompt_tokens", "timings", "video_timestamps"}."""
        t0 = time.perf_counter()
        message, turn, seg = self._prepare(content, False, 0)
        cached = len(self._ids)
        t1 = time.perf_counter()
        try:
            timings = self._feed(turn)
        except BaseException:
            self._stale = True
            raise
        self.pipe.trim()  # the frames' pixels and features, freed
        self._entries.append(_Entry(message, len(seg["ids"])))
        return {"prompt_tokens": len(turn.ids), "cached_prompt_tokens": cached,
                "timings": {"preprocess": t1 - t0, **timings}, "video_timestamps": seg["video_timestamps"]}

    def send(self, content: Any, max_new_tokens: int | None = None, **gen) -> GenerationResult:
        """A user message -> the reply; both stay in the cache."""
        opts, skip = self._options(max_new_tokens, gen)
        return drain(self._reply_steps(content, opts, skip))[0]

    def stream(self, content: Any, max_new_tokens: int | None = None, **gen) -> Iterator[str]:
        """Text pieces of the reply; the whole result is then `last_result`."""
        opts, skip = self._options(max_new_tokens, gen)
        yield from self.pipe.stream_steps(self._reply_steps(content, opts, skip), opts)

    def steps(self, content: Any, opts: GenerationOptions, skip_special_tokens: bool = True):
        """send() one token at a time, with options already made (the server's): yields the DecodeState after
        each chosen token (one row) and returns [GenerationResult]. Closing the generator early forgets the
        turn; the cache is rebuilt at the next one."""
        opts.validate()
        return self._reply_steps(content, opts, skip_special_tokens)

    def _options(self, max_new_tokens: int | None, gen: dict) -> tuple[GenerationOptions, bool]:
        """The call's options over the session's (given to pipe.chat), over the checkpoint's."""
        skip = gen.pop("skip_special_tokens", self.skip_special_tokens)
        opts = self.pipe._options(self.max_new_tokens if max_new_tokens is None else max_new_tokens,
                                  **{**self.defaults, **{k: v for k, v in generation_kwargs("send", gen).items()
                                                         if v is not None}})
        return opts, skip

    def _reply_steps(self, content: Any, opts: GenerationOptions, skip_special_tokens: bool):
        started = time.perf_counter()
        end_of_turn_room = 8  # the context keeps room for the template's end of turn (Qwen2-VL's: 2 tokens)
        message, turn, seg = self._prepare(content, True, opts.max_new_tokens + end_of_turn_room)
        cached = len(self._ids)
        inputs = self._checked_inputs(turn, opts.max_new_tokens + end_of_turn_room)
        preprocess = time.perf_counter() - started
        state, done = None, False
        try:
            embeds, timings = self.pipe.embed(inputs)
            steps = StepTimes()
            # prefill makes the cache at the first turn, else reserves room in it
            for state in run(self.pipe.backend, embeds, inputs, opts, self.pipe.eos_ids, self.pipe.pad_id,
                             self.pipe.decoder(skip_special_tokens), steps, self.cache, np.asarray(self._ids)):
                yield state
            generated, reason = state.generated[0], state.reasons[0]
            history = self.history + [message]
            reply, end_of_turn = self._reply_ids(generated, reason), self._end_of_turn(history, seg["rendered"])
            # the cache holds the turn and all generated tokens but the last; the rest of the reply and the end
            # of turn wait for the next turn's prefill
            self._commit(turn.ids + generated[:-1], state.cache, int(state.rope_deltas[0, 0]), turn.image_sizes)
            self._pending = reply[len(generated) - 1:] + end_of_turn
            done = True
        finally:
            if not done:  # the consumer stopped early or a graph failed: the cache is not the history anymore
                self._stale = True
        timings = self.pipe._timings({"preprocess": preprocess, **timings}, steps, started)
        meta = {"image_sizes": self._image_sizes, "video_timestamps": seg["video_timestamps"]}
        result = self.pipe._result(generated, reason, opts, timings, meta,
                                   {"prompt_tokens": cached + len(turn.ids), "cached_prompt_tokens": cached},
                                   skip_special_tokens)
        self._entries.append(_Entry(message, len(seg["ids"])))
        self._entries.append(_Entry({"role": "assistant", "content": self.pipe.processor.decode(reply)},
                                    len(reply) + len(end_of_turn), reply))
        self.last_result = result
        del inputs, embeds, state  # the turn's arrays (the cache is the session's now), freed before the trim
        self.pipe.trim()
        return [result]
