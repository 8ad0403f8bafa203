"""The generation loop, as small named steps over an explicit state: prefill, choose, check stops, decode.

It only talks to the `Backend` interface, so ONNX Runtime and TensorRT share it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from . import checks
from .backends.base import Backend
from .detokenize import IncrementalText
from .errors import ArtifactError, InputError
from .grounding import Box
from .rope import decode_positions
from .sampling import SamplingOptions, choose
from .tools import ToolCall, chosen, functions

if TYPE_CHECKING:
    from .constraints import Matcher


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated tokens only, not the prompt
    finish_reason: str  # "stop" | "length" | "tool_calls"
    timings: dict[str, float]  # seconds
    usage: dict[str, int]
    boxes: list[Box] = field(default_factory=list)  # grounding boxes in the pixels of the original image
    video_timestamps: list[list[float]] = field(default_factory=list)  # per video: sampled frames' seconds
    #                                                                     (files only; [] for a list of frames)
    tool_calls: list[ToolCall] = field(default_factory=list)  # complete calls only; `text` is what came before

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def drain(steps):
    """Run a generator to its end and return its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


AGENT_KWARGS = ("response_format", "regex", "grammar", "tools", "tool_choice", "parallel_tool_calls")
GENERATION_KWARGS = ("min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "seed",
                     "stop") + AGENT_KWARGS


def generation_kwargs(caller: str, kwargs: dict) -> dict:
    unknown = set(kwargs) - set(GENERATION_KWARGS)
    if unknown:
        raise TypeError(f"{caller}() got unexpected arguments: {', '.join(sorted(unknown))}")
    return kwargs


@dataclass(frozen=True)
class GenerationOptions:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    sampling: SamplingOptions = SamplingOptions()
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # constraints (runtime/constraints.py): one of these; response_format / regex / grammar may also be a list with
    # one entry (or None) per conversation of a batch
    response_format: Any = None  # OpenAI's {"type": "text" | "json_object" | "json_schema", "json_schema": {...}}
    regex: Any = None
    grammar: Any = None  # Lark, as llguidance reads it
    # tool calls (runtime/tools.py): OpenAI function tools, rendered and parsed in the pipeline's tool_format
    tools: Any = None
    tool_choice: Any = None  # "auto" (None) | "none" | "required" | {"type": "function", "function": {"name"}}
    parallel_tool_calls: bool = True

    def validate(self) -> None:
        checks.integer("max_new_tokens", self.max_new_tokens, minimum=1)
        checks.integer("min_new_tokens", self.min_new_tokens, minimum=0, maximum=self.max_new_tokens,
                       hint=" (at most max_new_tokens)")
        if self.seed is not None:
            checks.integer("seed", self.seed, minimum=0, hint=" (or None for a fresh seed)")
        if not isinstance(self.stop, tuple) or any(not isinstance(s, str) or not s for s in self.stop):
            raise InputError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        self.sampling.validate()
        self._validate_agent()

    def _validate_agent(self) -> None:
        checks.flag("parallel_tool_calls", self.parallel_tool_calls)
        if self.tools is None:
            if self.tool_choice not in (None, "none", "auto"):
                raise InputError(f"tool_choice {self.tool_choice!r} needs tools")
            return
        choice = chosen(self.tool_choice, [f["name"] for f in functions(self.tools)])
        given = [n for n in ("response_format", "regex", "grammar") if getattr(self, n) is not None]
        if given and choice != "none" and not (given == ["response_format"] and _is_text(self.response_format)):
            raise InputError(f"tools and {given[0]} cannot constrain the same reply: give one of them, or "
                             "tool_choice='none'")


def _is_text(response_format: Any) -> bool:
    return isinstance(response_format, dict) and response_format.get("type") == "text"


def stop_strings(stop: Any) -> Any:
    """The caller's `stop` (None, a string or a list of strings) as a tuple; anything else is left for
    `GenerationOptions.validate` to refuse by name."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    return tuple(stop) if isinstance(stop, (list, tuple)) else stop


# transformers' values for fields neither the call nor generation_config.json sets
# (GenerationConfig._get_default_generation_params: top_k 50)
LIBRARY_SAMPLING = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}


def checkpoint_sampling(directory: Path) -> dict:
    """The sampling fields of the generation_config.json the export copied from the checkpoint."""
    path = Path(directory) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}): fix or remove it") from None
    found = {k: config[k] for k in LIBRARY_SAMPLING if config.get(k) is not None}
    try:  # the checks a call's values get, at load: a bad default would otherwise fail every call
        SamplingOptions(**{**LIBRARY_SAMPLING, **found}).validate()
    except InputError as e:
        raise ArtifactError(f"{path}: {e}: fix or remove the field") from None
    return found


def sampling_options(requested: dict, checkpoint: dict) -> SamplingOptions:
    """Each field from the first of: the call (`requested`, None = unset), the checkpoint's
    generation_config.json, transformers' default (LIBRARY_SAMPLING). Sampling fields take effect only with
    do_sample, as in transformers; repetition_penalty applies to greedy decoding too."""
    values = {}
    for name, fallback in LIBRARY_SAMPLING.items():
        chain = (requested.get(name), checkpoint.get(name), fallback)
        values[name] = next(v for v in chain if v is not None)
    return SamplingOptions(**values)  # as given: SamplingOptions.validate checks each type and range


@dataclass
class DecodeState:
    """Everything that changes between steps; rows are conversations of the batch."""

    attention_mask: np.ndarray  # [B, T] int64, T = tokens in the cache (left padding included)
    real_lengths: np.ndarray  # [B] tokens in the cache that are not padding
    rope_deltas: np.ndarray  # [B, 1] M-RoPE offset of text positions after the prompt
    cache: Any  # backend-owned KV cache
    seen: list[np.ndarray]  # per row: prompt + generated ids (repetition penalty)
    generated: list[list[int]] = field(default_factory=list)
    texts: list[IncrementalText] = field(default_factory=list)  # per row: the reply's text so far
    finished: np.ndarray | None = None  # [B] bool
    reasons: list[str | None] = field(default_factory=list)
    matchers: list[Matcher | None] = field(default_factory=list)  # per row: its constraint, or None
    plans: list[Any] = field(default_factory=list)  # per row: tools.ReplyPlan (what a stream may show), or None


@dataclass
class StepTimes:
    prefill: float = 0.0
    decode: list[float] = field(default_factory=list)  # per token: choose + bookkeeping + graph runs
    outside_graphs: list[float] = field(default_factory=list)  # the part of each step not inside a graph run


def prefill(backend: Backend, inputs_embeds, inputs: dict, step_times: StepTimes, max_new_tokens: int = 0,
            cache: Any = None, cached_ids: np.ndarray | None = None) -> tuple[np.ndarray, DecodeState]:
    """Run the prompt once; the cache then holds it and it is never re-run.

    `cache`: a cache already holding `cached_ids` [P] (a chat session's earlier turns; one row): the prompt
    is then only the new tokens, `inputs["attention_mask"]` covers [P + L] and positions continue the cache's.
    """
    t0 = time.perf_counter()
    mask = inputs["attention_mask"]
    if cache is None:
        cache = backend.new_cache(mask.shape[0], reserve=mask.shape[1] + max_new_tokens)
    else:
        cache = backend.reserve(cache, mask.shape[1] + max_new_tokens)
    logits, cache = prefill_chunks(backend, inputs_embeds, mask, inputs["position_ids"], cache)
    step_times.prefill = time.perf_counter() - t0
    B, L = inputs["input_ids"].shape
    history = np.zeros(0, np.int64) if cached_ids is None else np.asarray(cached_ids, np.int64)
    state = DecodeState(attention_mask=mask, real_lengths=mask.sum(axis=1), rope_deltas=inputs["rope_deltas"],
                        cache=cache, seen=[np.concatenate([history, inputs["input_ids"][b][mask[b, -L:] == 1]])
                                           for b in range(B)],
                        generated=[[] for _ in range(B)], finished=np.zeros(B, bool), reasons=[None] * B)
    return logits, state


def prefill_chunks(backend: Backend, inputs_embeds, mask: np.ndarray, position_ids: np.ndarray,
                   cache: Any) -> tuple[np.ndarray, Any]:
    """The prompt's L positions through the decoder in chunks of the backend's `prefill_chunk` (None: at once),
    each chunk a run over the positions the cache holds so far: the activations, the mask bias and the attention
    buffers then scale with the chunk instead of L, the cache still takes all L. `mask` [B, P + L] covers the
    cache's P positions too; positions [3, B, L] are per token, so a chunk slices them. -> the last position's
    logits [B, V] (those of the last chunk) and the cache grown by L."""
    L = position_ids.shape[-1]
    chunk = backend.prefill_chunk(mask.shape[0]) or L
    past = mask.shape[1] - L
    for start in range(0, L, chunk):
        end = min(start + chunk, L)
        whole = start == 0 and end == L  # one run: the backend's own embeds, not a slice of them
        logits, cache = backend.decode(inputs_embeds if whole else inputs_embeds[:, start:end],
                                       mask[:, :past + end], position_ids[:, :, start:end], cache)
    return logits, cache


def suppress(logits: np.ndarray, token_ids: list[int]) -> np.ndarray:
    """transformers' MinNewTokensLengthLogitsProcessor: end tokens impossible. [B, V] -> a new [B, V]."""
    logits = logits.copy()
    logits[:, token_ids] = -np.inf
    return logits


def decode_step(backend: Backend, state: DecodeState, tokens: np.ndarray) -> np.ndarray:
    """Feed one new token per row; returns the next logits [B, V]."""
    B = len(tokens)
    embeds = backend.merge(tokens.reshape(B, 1), np.zeros((0, backend.hidden_size), np.float32))
    position_ids = decode_positions(state.real_lengths, state.rope_deltas)  # [3, B, 1]
    state.attention_mask = np.concatenate([state.attention_mask, np.ones((B, 1), np.int64)], axis=1)
    logits, state.cache = backend.decode(embeds, state.attention_mask, position_ids, state.cache)
    state.real_lengths = state.real_lengths + 1
    return logits


def run(backend: Backend, inputs_embeds, inputs: dict, opts: GenerationOptions, eos_ids: list[int], pad_id: int,
        decode_text: Callable[[list[int]], str], step_times: StepTimes, cache: Any = None,
        cached_ids: np.ndarray | None = None, matchers: list | None = None,
        plans: list | None = None) -> Iterator[DecodeState]:
    """Yields the state after each chosen token; stops when every row is finished. The last chosen token is
    never fed: the final state's cache holds the prompt and every generated token but the last.
    `matchers`: per row, its constraint (constraints.Matcher) or None; a row whose grammar is complete stops as
    at an end-of-sequence token. `plans`: per row, carried on the state for streaming consumers."""
    rng = np.random.default_rng(opts.seed)
    logits, state = prefill(backend, inputs_embeds, inputs, step_times, opts.max_new_tokens, cache, cached_ids)
    state.texts = [IncrementalText(decode_text) for _ in state.generated]
    state.matchers = list(matchers) if matchers is not None else [None] * len(state.generated)
    state.plans = list(plans) if plans is not None else [None] * len(state.generated)
    constrained = any(m is not None for m in state.matchers)
    step_start, graph_start = time.perf_counter(), getattr(backend, "graph_seconds", None)
    for step in range(opts.max_new_tokens):
        if step < opts.min_new_tokens:
            logits = suppress(logits, eos_ids)
        tokens = choose(logits, opts.sampling, rng, state.seen, state.matchers if constrained else None)
        tokens = np.where(state.finished, pad_id, tokens)  # finished rows idle on padding
        for b in np.flatnonzero(~state.finished):
            t = int(tokens[b])
            state.generated[b].append(t)
            state.seen[b] = np.append(state.seen[b], t)
            piece = state.texts[b].push(t)
            matcher = state.matchers[b]
            if matcher is not None:
                matcher.take(t)
            if t in eos_ids or state.texts[b].contains_any(opts.stop, piece) or (matcher is not None and matcher.done):
                state.finished[b], state.reasons[b] = True, "stop"
        paused = time.perf_counter()
        yield state
        step_start += time.perf_counter() - paused  # the consumer's time is not the loop's
        if state.finished.all() or step == opts.max_new_tokens - 1:
            break
        logits = decode_step(backend, state, tokens)
        now = time.perf_counter()
        step_times.decode.append(now - step_start)
        if graph_start is not None:
            step_times.outside_graphs.append(now - step_start - (backend.graph_seconds - graph_start))
            graph_start = backend.graph_seconds
        step_start = now
    state.reasons = [r or "length" for r in state.reasons]
