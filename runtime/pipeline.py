"""Qwen2VLPipeline: messages -> text, from an artifact directory, without torch or transformers."""

from __future__ import annotations

import functools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from . import checks, constraints, memory, tools
from .artifact import Artifact, load_artifact
from .backends import BACKENDS, create_backend
from .detokenize import safe_piece
from .errors import ConfigError, InputError
from .generation import (GenerationOptions, GenerationResult, StepTimes, checkpoint_sampling, drain, generation_kwargs,
                         run, sampling_options, stop_strings)
from .grounding import parse_boxes
from .processor import Processor, is_batch
from .rope import IMAGE, VIDEO, runs, token_types, video_runs, vision_inputs
from .tools import ReplyPlan, ToolCall, new_call_id

if TYPE_CHECKING:
    from .session import ChatSession


def _cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    cuts = [text.index(s) for s in stop if s in text]
    return text[:min(cuts)] if cuts else text


def _check_load_options(backend, providers, num_threads, verify, session_cache, session_config=None) -> None:
    """Load settings, checked before the artifact is read (its verification hashes gigabytes)."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if num_threads is not None:
        checks.integer("num_threads", num_threads, minimum=1, error=ConfigError,
                       hint=" (None lets ONNX Runtime use every core)")
    if providers is not None and (not isinstance(providers, (list, tuple)) or not all(
            isinstance(p, str) or isinstance(p, tuple) and len(p) == 2 for p in providers)):
        raise ConfigError(f"providers must be a list of ONNX Runtime provider names (or (name, options) pairs), "
                          f"got {providers!r}")
    if not isinstance(verify, bool):
        raise ConfigError(f"verify must be True or False, got {verify!r}")
    if session_cache is not None and not isinstance(session_cache, (str, Path)):
        raise ConfigError(f"session_cache must be a directory path, got {type(session_cache).__name__}")
    if session_cache is not None and backend != "onnxruntime":
        raise ConfigError("session_cache is an ONNX Runtime (CPU) option; TensorRT engines are built ahead")
    if session_config is not None and not (isinstance(session_config, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in session_config.items())):
        raise ConfigError(f"session_config must be a dict of ONNX Runtime session config entries, str to str "
                          f"(e.g. {{'session.intra_op.allow_spinning': '0'}}), got {session_config!r}")
    if backend != "onnxruntime" and (providers is not None or num_threads is not None or session_config is not None):
        raise ConfigError("providers, num_threads and session_config are ONNX Runtime options; TensorRT takes none")


def _on_cpu(providers) -> bool:
    first = (providers or ["CPUExecutionProvider"])[0]
    return (first[0] if isinstance(first, tuple) else first) == "CPUExecutionProvider"


def _in_run_order(input_ids: np.ndarray, cfg, per_kind: dict) -> list:
    """The items' features in the order of their placeholder runs, row-major over the batch as the merger places
    them. An item may take several consecutive runs (a Qwen3-VL video: one per frame group, timestamps between):
    its features, frame-major, already hold them in order, so it is placed once, at its first run, whole, and
    needs no split whatever `vision()` returns."""
    ordered, left, tokens = [], {IMAGE: 0, VIDEO: 0}, {IMAGE: 0, VIDEO: 0}
    for row in token_types(input_ids, cfg):
        for kind, s, e in runs(row):
            if not kind:
                continue
            if not left[kind]:  # the next item of this kind starts here
                left[kind], tokens[kind], f = next(per_kind[kind], (0, 0, None))
                if f is None:
                    raise InputError("more vision placeholder runs in input_ids than images and videos given")
                ordered.append(f)
            if tokens[kind] != e - s:
                raise InputError(f"vision features ({tokens[kind]}) and placeholder tokens ({e - s}) differ")
            left[kind] -= 1
    return ordered


def _per_row(name: str, value: Any, rows: int) -> list:
    """A constraint field: one value for every row, or a list of one per row (response_format is a dict and
    regex / grammar strings, so a list is always per row)."""
    if not isinstance(value, (list, tuple)):
        return [value] * rows
    if len(value) != rows:
        raise InputError(f"{name} is a list of {len(value)}, but {rows} conversations were given: give one value "
                         "for all, or one per conversation")
    return list(value)


class Qwen2VLPipeline:
    """Messages -> text, from an artifact directory.

    Threads may share a pipeline: its generations take turns on the backend. Each step of a generation (the
    prompt's preprocessing, vision and prefill; then each token) runs under one lock, so concurrent calls are
    serialized and concurrent streams interleave token by token, each reply what it is alone. A chat session
    (`chat()`) takes the same turns, but is one conversation: one thread at a time may use it. `last_result`
    is the last finished stream's, whichever thread ran it: threads that need a stream's usage read the
    session's or call generate().
    """

    def __init__(self, artifact: Artifact, processor: Processor, backend, tool_format: str | None = None):
        self.artifact, self.processor, self.backend = artifact, processor, backend
        self.lock = threading.Lock()  # held by one generation step at a time (see the class docstring)
        self.tool_format = tools.tool_format(tool_format or artifact.config.family.tool_format,
                                             ConfigError)  # how tool calls are written (tools.py)
        self._grammars: constraints.Grammars | None = None
        gen = artifact.generation
        self.eos_ids = [int(t) for t in gen["eos_token_id"]]  # the manifest schema requires both
        self.pad_id = int(gen["pad_token_id"])
        self.sampling_defaults = checkpoint_sampling(artifact.dir)  # generation_config.json, as transformers reads it
        self.last_result: GenerationResult | None = None  # of the last finished stream()
        self.memory_limit: int | None = None  # bytes the pipeline may use, weights included; None: what the system
        #                                        has (memory.py)

    @classmethod
    def load(cls, artifact_dir: str | Path, backend: str = "onnxruntime", providers: list | None = None,
             num_threads: int | None = None, verify: bool = True,
             session_cache: str | Path | None = None, memory_limit: int | None = None,
             session_config: dict | None = None, tool_format: str | None = None) -> "Qwen2VLPipeline":
        """`session_cache`: a directory where ONNX Runtime keeps the graphs optimized and their weights
        packed for this CPU, so that later starts skip that work (see backends/onnxruntime.py).
        `memory_limit`: bytes the pipeline may use: weights above it (or above what the system has) fail here
        with ConfigError; a request estimated above what the weights leave fails with InputError before any
        graph runs (runtime/memory.py).
        `session_config`: ONNX Runtime session config entries for every graph, over the backend's defaults.
        `tool_format`: how tools and calls are written in the prompt and reply: "qwen" (Qwen2-VL's own,
        Qwen-Agent's ✿FUNCTION✿ form) or "hermes" (<tool_call> JSON, Qwen2.5-VL's and Qwen3-VL's); None: the
        family's own (qwen for Qwen2-VL and Qwen2.5-VL, hermes for Qwen3-VL); see runtime/tools.py."""
        _check_load_options(backend, providers, num_threads, verify, session_cache, session_config)
        if tool_format is not None:
            tools.tool_format(tool_format, ConfigError)  # refused before the artifact is read
        artifact = load_artifact(artifact_dir, verify=verify, backend=backend)
        if backend == "onnxruntime" and _on_cpu(providers):  # the weights go to host memory
            memory.check_weights(artifact.weight_bytes, memory_limit, artifact.dir)
        options = ({"providers": providers, "num_threads": num_threads, "session_cache": session_cache,
                    "session_config": session_config} if backend == "onnxruntime" else {})
        with ThreadPoolExecutor(1) as pool:  # the tokenizer parses while the graphs load
            processor = pool.submit(Processor.from_pretrained, artifact.dir)
            graphs = create_backend(artifact, backend, **options)
            pipe = cls(artifact, processor.result(), graphs, tool_format)
        pipe.memory_limit = memory_limit
        return pipe

    def close(self) -> None:
        """Free what the backend holds (the TensorRT backend's device memory); ONNX Runtime needs nothing."""
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "Qwen2VLPipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- stages -------------------------------------------------------------------------------

    def vision_features(self, inputs: dict) -> Any:
        """Run the encoder once per image / video and order the features as their tokens appear -> [M, hidden]
        (backend-native: the TensorRT backend keeps them on the device)."""
        cfg = self.artifact.config
        m2 = cfg.vision.spatial_merge_size ** 2
        per_kind = {}
        for kind, pixels_key, grid_key in ((IMAGE, "pixel_values", "image_grid_thw"),
                                           (VIDEO, "pixel_values_videos", "video_grid_thw")):
            feats, offset = [], 0
            for t, h, w in inputs.get(grid_key, np.zeros((0, 3), np.int64)):
                n = int(t * h * w)
                patches = inputs[pixels_key][offset:offset + n].reshape(int(t), int(h * w), -1)  # [F, S, D]
                grid_inputs = vision_inputs((int(t), int(h), int(w)), cfg)
                item_runs = video_runs((t, h, w), cfg) if kind == VIDEO else 1
                # (runs, tokens per run, [F, S / m2, hidden])
                feats.append((item_runs, n // m2 // item_runs, self.backend.vision(patches, grid_inputs)))
                offset += n
            per_kind[kind] = iter(feats)
        return self.backend.join(_in_run_order(inputs["input_ids"], cfg, per_kind))

    def _options(self, max_new_tokens=128, min_new_tokens=0, do_sample=None, temperature=None, top_k=None,
                 top_p=None, repetition_penalty=None, seed=None, stop=None, response_format=None, regex=None,
                 grammar=None, tools=None, tool_choice=None, parallel_tool_calls=None) -> GenerationOptions:
        """Sampling fields left None come from generation_config.json, then transformers' defaults."""
        requested = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                         repetition_penalty=repetition_penalty)
        opts = GenerationOptions(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                 sampling=sampling_options(requested, self.sampling_defaults),
                                 seed=seed, stop=stop_strings(stop), response_format=response_format, regex=regex,
                                 grammar=grammar, tools=tools, tool_choice=tool_choice,
                                 parallel_tool_calls=True if parallel_tool_calls is None else parallel_tool_calls)
        opts.validate()
        return opts

    # -- constraints and tools ----------------------------------------------------------------

    @property
    def grammars(self) -> constraints.Grammars:
        """llguidance's tokenizer and compiled grammars, made at the first constrained request."""
        if self._grammars is None:
            self._grammars = constraints.Grammars(self.processor.tokenizer.to_str(),
                                                  self.artifact.config.text.vocab_size, self.eos_ids)
        return self._grammars

    def plan(self, conversation: list[dict], opts: GenerationOptions, row: int = 0, rows: int = 1,
             in_prompt: bool | None = None) -> tuple[list[dict], ReplyPlan]:
        """One conversation -> (the plain messages the chat template renders, its reply's plan). Tool calls
        and tool messages are written in the pipeline's tool_format; the tools go into the system prompt unless
        tool_choice is "none" (`in_prompt`: a chat session keeps them there for its cache)."""
        fns = tools.functions(opts.tools) if opts.tools is not None else None
        choice = tools.chosen(opts.tool_choice, [f["name"] for f in fns]) if fns else "none"
        shown = fns if (in_prompt if in_prompt is not None else choice != "none") else None
        messages, continued = tools.prepare(conversation, self.tool_format, shown, "auto" if shown else "none",
                                            opts.parallel_tool_calls)
        if choice != "none":
            grammar = tools.grammar(self.tool_format, fns, choice, opts.parallel_tool_calls, continued)
        else:
            grammar = constraints.grammar_text(*(_per_row(n, getattr(opts, n), rows)[row]
                                                 for n in ("response_format", "regex", "grammar")))
        return messages, ReplyPlan(self.tool_format, grammar, choice != "none", continued)

    def matchers(self, plans: list[ReplyPlan]) -> list:
        """A constraint per row (None where its reply is free); grammars that do not compile fail here, before
        any graph runs."""
        return [self.grammars.matcher(p.grammar) if p.grammar is not None else None for p in plans]

    def _prepare(self, conversations, opts: GenerationOptions, add_vision_id: bool = False
                 ) -> tuple[dict, list[dict], Any, dict]:
        t0 = time.perf_counter()
        limit = self.artifact.context
        inputs, meta = self.processor.encode(conversations, add_vision_id,
                                             max_tokens=max(limit - opts.max_new_tokens, 0))
        t1 = time.perf_counter()
        prompt_len = inputs["input_ids"].shape[1]
        if prompt_len + opts.max_new_tokens > limit:
            held_by = ("the KV cache length these graphs fix (export --max-context)"
                       if limit == self.artifact.static_kv_length else "the model's context")
            raise InputError(f"prompt ({prompt_len} tokens) + max_new_tokens ({opts.max_new_tokens}) exceeds "
                             f"{held_by} of {limit} tokens: shorten the prompt, use smaller images (max_pixels) or "
                             "lower max_new_tokens")
        self.backend.check_request(inputs, opts.max_new_tokens)
        self.check_memory(inputs, opts.max_new_tokens)
        embeds, timings = self.embed(inputs)
        return inputs, meta, embeds, {"preprocess": t1 - t0, **timings}

    def check_memory(self, inputs: dict, max_new_tokens: int) -> None:
        """ONNX Runtime on the CPU: refuse a request that would not fit before any graph allocates. It may use
        what the weights leave of memory_limit; the prompt is estimated in the backend's prefill chunks."""
        if memory.host_backend(self.backend):
            share = self.memory_limit and max(self.memory_limit - self.artifact.weight_bytes, 1)
            memory.check(self.artifact.config, self.artifact.export, inputs, max_new_tokens, share,
                         self.backend.prefill_chunk(len(inputs["input_ids"])))

    def embed(self, inputs: dict) -> tuple[Any, dict[str, float]]:
        """The prompt's embeddings: vision features merged at their placeholders -> (embeds, timings)."""
        t0 = time.perf_counter()
        feats = self.vision_features(inputs)
        t1 = time.perf_counter()
        embeds = self.backend.merge(inputs["input_ids"], feats)
        return embeds, {"vision": t1 - t0, "merge": time.perf_counter() - t1}

    def _steps(self, conversations, opts: GenerationOptions, add_vision_id: bool = False,
               skip_special_tokens: bool = True):
        started = time.perf_counter()
        batch = list(conversations) if is_batch(conversations) else [conversations]
        planned = [self.plan(conv, opts, b, len(batch)) for b, conv in enumerate(batch)]
        plans = [p for _, p in planned]
        matchers = self.matchers(plans)
        prepared = [m for m, _ in planned]
        inputs, meta, embeds, timings = self._prepare(prepared if is_batch(conversations) else prepared[0], opts,
                                                      add_vision_id)
        steps = StepTimes()
        for state in run(self.backend, embeds, inputs, opts, self.eos_ids, self.pad_id,
                         self.decoder(skip_special_tokens), steps, matchers=matchers, plans=plans):
            yield state
        mask, final = inputs["attention_mask"], self._timings(timings, steps, started)  # one set for the batch
        results = [self._result(ids, reason, opts, dict(final), meta[b],
                                {"prompt_tokens": int(mask[b].sum())}, skip_special_tokens, plans[b])
                   for b, (ids, reason) in enumerate(zip(state.generated, state.reasons))]
        del state, inputs, embeds, mask  # the KV cache and the prompt's arrays, freed before the heap is trimmed
        self.trim()
        return results

    def trim(self) -> None:
        """After a generation on the CPU: malloc's heap keeps the pages of a request's freed KV cache and prompt
        arrays (2B int4, 6,409-token prompt: 0.6 GB of RSS, which MemAvailable would count against the next
        request); hand them back."""
        if memory.host_backend(self.backend):
            memory.trim()

    def decoder(self, skip_special_tokens: bool = True) -> Callable[[list[int]], str]:
        """ids -> the text a reply shows: stop strings are looked for, and streams cut, in this text."""
        return functools.partial(self.processor.decode, skip_special_tokens=skip_special_tokens)

    @staticmethod
    def _timings(timings: dict, steps: StepTimes, started: float) -> dict[str, float]:
        timings = dict(timings)
        merge = timings.pop("merge")
        timings.update(prefill=merge + steps.prefill,
                       decode_per_token=float(np.median(steps.decode)) if steps.decode else 0.0,
                       decode_outside_graphs_per_token=(float(np.median(steps.outside_graphs))
                                                        if steps.outside_graphs else 0.0),
                       time_to_first_token=timings["preprocess"] + timings["vision"] + merge + steps.prefill,
                       total=time.perf_counter() - started)
        return timings

    def _result(self, ids: list[int], reason: str, opts: GenerationOptions, timings: dict, meta: dict,
                usage: dict, skip_special_tokens: bool = True, plan: ReplyPlan | None = None) -> GenerationResult:
        tagged = self.processor.decode(ids, skip_special_tokens=False)
        text = _cut_at_stop(tagged if not skip_special_tokens else self.processor.decode(ids), opts.stop)
        calls: list = []
        if plan is not None:
            text, calls, reason = plan.finish(text, reason)
        return GenerationResult(text=text, token_ids=list(ids), finish_reason=reason,
                                timings=timings, usage={**usage, "completion_tokens": len(ids)},
                                boxes=parse_boxes(_cut_at_stop(tagged, opts.stop), meta["image_sizes"]),
                                video_timestamps=meta["video_timestamps"],
                                tool_calls=[ToolCall(new_call_id(), name, args) for name, args in calls])

    # -- public -------------------------------------------------------------------------------

    def generate(self, conversations, max_new_tokens: int = 128, *, min_new_tokens: int = 0,
                 do_sample: bool | None = None, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, repetition_penalty: float | None = None, seed: int | None = None,
                 stop=None, add_vision_id: bool = False, skip_special_tokens: bool = True,
                 response_format: dict | list | None = None, regex: str | list | None = None,
                 grammar: str | list | None = None, tools: list | None = None, tool_choice: str | dict | None = None,
                 parallel_tool_calls: bool | None = None):
        """One conversation -> GenerationResult; a list of conversations -> a list of them. Sampling
        fields left None take generation_config.json's values, as transformers does.

        Structured output (one of; needs the `agents` extra): `response_format` (OpenAI's {"type": "json_object"}
        or {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}), `regex`, `grammar` (Lark);
        each may be a list with one value per conversation. Tools: `tools` (OpenAI function tools),
        `tool_choice` ("auto" default, "none", "required", {"type": "function", "function": {"name": ...}}),
        `parallel_tool_calls` (default True): calls come back in `result.tool_calls`, with finish_reason
        "tool_calls". Conversations may hold assistant messages with `tool_calls` and `tool` messages. See
        docs/agents.md."""
        opts = self._options(max_new_tokens, min_new_tokens, do_sample, temperature, top_k, top_p,
                             repetition_penalty, seed, stop, response_format, regex, grammar, tools, tool_choice,
                             parallel_tool_calls)
        results = drain(self.serialized(self._steps(conversations, opts, add_vision_id, skip_special_tokens)))
        return results if is_batch(conversations) else results[0]

    def stream(self, conversation, max_new_tokens: int = 128, *, add_vision_id: bool = False,
               skip_special_tokens: bool = True, **kwargs) -> Iterator[str]:
        """Text pieces of one conversation as they are generated; they join to generate()'s text. A piece never
        splits a UTF-8 character, nor shows the start of a stop string before it is known not to be one, nor a
        tool call's markup (the calls come in `last_result.tool_calls`). Takes generate()'s options."""
        if is_batch(conversation):
            raise InputError("stream() takes one conversation; use generate() for a batch")
        opts = self._options(max_new_tokens, **generation_kwargs("stream", kwargs))
        steps = self.serialized(self._steps(conversation, opts, add_vision_id, skip_special_tokens))
        results = yield from self.stream_steps(steps, opts)
        self.last_result = results[0]  # timings and usage of the streamed reply

    def stream_steps(self, steps, opts: GenerationOptions):
        """Text pieces of row 0 of a running generation (`_steps`, or a chat session's turn), then the tail the
        final text has beyond them (held-back text, an incomplete character); returns what `steps` returns."""
        emitted = 0  # characters yielded so far
        while True:
            try:
                state = next(steps)
            except StopIteration as done:
                results = done.value
                if len(results[0].text) > emitted:
                    yield results[0].text[emitted:]
                return results
            text = state.texts[0].text  # complete characters only
            if state.finished[0]:  # the final text (cut at the stop string) comes with the result
                continue
            plan = state.plans[0]
            if plan is not None:  # never a tool call's markup: the calls come with the result
                text = plan.visible(text)
            piece = safe_piece(text, opts.stop + (plan.markers if plan is not None else ()), emitted)
            if piece:
                yield piece
                emitted += len(piece)

    def steps(self, conversations, opts: GenerationOptions):
        """generate() one token at a time, for a caller that streams or cancels a whole batch (the server):
        yields the DecodeState after each chosen token (row b = conversation b) and returns one
        GenerationResult per row. Closing the generator stops the work."""
        opts.validate()
        return self.serialized(self._steps(conversations, opts))

    def serialized(self, steps):
        """A generation's steps (`_steps`, a chat session's turn), each run under the pipeline's lock: other
        threads' steps run between them. Returns what `steps` returns; closing it closes `steps`."""
        try:
            while True:
                with self.lock:
                    try:
                        state = next(steps)
                    except StopIteration as done:
                        return done.value
                yield state
        finally:
            steps.close()  # a consumer that stops early stops the generation (nothing once it has ended)

    def chat(self, system: str | None = None, *, overflow: str = "error", add_vision_id: bool = False,
             **generation_defaults) -> "ChatSession":
        """A multi-turn session that keeps the KV cache between turns (runtime/session.py).
        `overflow`: "error" (default) or "slide" (start over from the latest turns that fit)."""
        from .session import ChatSession

        return ChatSession(self, system=system, overflow=overflow, add_vision_id=add_vision_id,
                           **generation_defaults)
