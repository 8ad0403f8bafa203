"""The generation loop's own cost per step (sampling, stop check, detokenisation, bookkeeping), measured on
synthetic logits at the real vocabulary: `python -m qwen2vl_edge.benchmarks.host_loop [tokenizer.json]`.

The graphs are replaced by a backend that hands out precomputed logit rows, so what remains is exactly
what `GenerationResult.timings['decode_outside_graphs_per_token']` reports for a real backend, minus the
backend's own I/O binding.

The constrained columns (`constrained_step_ms`, needs the agents extra) run a JSON-schema reply: the backend
then boosts the next token of a valid reply over the noise, as a model that mostly agrees with its schema
does ("model-like"), or hands out the noise alone, whose argmax the grammar almost always rejects (the mask
every step: the worst case). The added cost is the median step against the same loop unconstrained.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from qwen2vl_edge.runtime.generation import GenerationOptions, StepTimes, run
from qwen2vl_edge.runtime.sampling import SamplingOptions

VOCAB = 151_936


class SyntheticBackend:
    """Logits [1, V] from a pool of random rows (spread like a language model's: a few strong candidates);
    the time spent handing them out counts as graph time. `follow`: token ids whose next one is boosted to the
    top at each step (a reply the model "means"), cycling."""

    name = "synthetic"
    hidden_size = 8

    def __init__(self, vocab: int, seed: int = 0, follow: list[int] | None = None):
        rng = np.random.default_rng(seed)
        self.pool = (rng.standard_normal((16, vocab)) * 2.5).astype(np.float32)  # [16, V]
        self.graph_seconds, self.calls = 0.0, 0
        self.follow = follow

    def merge(self, input_ids, vision_embeds):
        return np.zeros((*input_ids.shape, self.hidden_size), np.float32)

    def new_cache(self, batch, reserve=0):
        return None

    def prefill_chunk(self, batch):
        return None  # the prompt in one call

    def decode(self, inputs_embeds, attention_mask, position_ids, cache):
        t0 = time.perf_counter()
        logits = self.pool[self.calls % len(self.pool)][None].copy()  # a fresh array, as a session returns
        if self.follow:
            logits[0, self.follow[self.calls % len(self.follow)]] = 30.0
        self.calls += 1
        self.graph_seconds += time.perf_counter() - t0
        return logits, cache


def host_step_ms(decode_text, *, vocab: int = VOCAB, after: int = 1000, measured: int = 200, prompt: int = 500,
                 top_p: float = 0.9, top_k: int = 50, repetition_penalty: float = 1.1,
                 stop: tuple[str, ...] = ("\n\nUser:",)) -> dict:
    """Median and 90th percentile (ms) of the time per step outside the graphs, over the `measured` steps
    that follow `after` generated tokens."""
    backend = SyntheticBackend(vocab)
    n = after + measured
    opts = GenerationOptions(max_new_tokens=n, min_new_tokens=n, seed=0, stop=stop,
                             sampling=SamplingOptions(True, 1.0, top_k, top_p, repetition_penalty))
    ids = np.random.default_rng(1).integers(0, 150_000, (1, prompt))
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids),
              "position_ids": np.broadcast_to(np.arange(prompt), (3, 1, prompt)).copy(),
              "rope_deltas": np.zeros((1, 1), np.int64)}
    times = StepTimes()
    for _ in run(backend, backend.merge(ids, None), inputs, opts, [], 0, decode_text, times):
        pass
    tail = np.array(times.outside_graphs[after - 1:]) * 1e3
    return {"median_ms": float(np.median(tail)), "p90_ms": float(np.percentile(tail, 90)), "vocab": vocab,
            "after_tokens": after, "top_p": top_p, "top_k": top_k, "repetition_penalty": repetition_penalty}


# a robot's reply: nested object, enum, bounded integers and number, a bounded string
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["action", "target", "speed", "say"],
          "properties": {"action": {"enum": ["move_to", "grasp", "release"]},
                         "target": {"type": "object", "additionalProperties": False, "required": ["x", "y"],
                                    "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 1279},
                                                   "y": {"type": "integer", "minimum": 0, "maximum": 719}}},
                         "speed": {"type": "number", "minimum": 0, "maximum": 1, "multipleOf": 0.01},
                         "say": {"type": "string", "maxLength": 60}}}
REPLY = ('{"action": "grasp", "target": {"x": 412, "y": 230}, "speed": 0.35, "say": "Grasping the red cube on the '
         'left side of the table now."}')


def _reply_ms(backend: SyntheticBackend, opts: GenerationOptions, decode_text, matcher) -> list[float]:
    """Per-step times outside the graphs (ms) of one reply."""
    prompt = 500
    ids = np.random.default_rng(1).integers(0, 150_000, (1, prompt))
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids),
              "position_ids": np.broadcast_to(np.arange(prompt), (3, 1, prompt)).copy(),
              "rope_deltas": np.zeros((1, 1), np.int64)}
    backend.calls = 0  # each reply starts where `follow` starts
    times = StepTimes()
    for _ in run(backend, backend.merge(ids, None), inputs, opts, [], 0, decode_text, times,
                 matchers=None if matcher is None else [matcher]):
        pass
    return [t * 1e3 for t in times.outside_graphs]


def constrained_step_ms(tokenizer, *, steps: int = 400) -> dict:
    """Median ms per step of the host loop, free and constrained by SCHEMA, greedy and top-p 0.9, at the
    tokenizer's vocabulary (free and constrained replies alternate, so that a busy machine slows both alike);
    the llguidance tokenizer's build time once."""
    from qwen2vl_edge.runtime.constraints import Grammars, json_schema_grammar

    t0 = time.perf_counter()
    grammars = Grammars(tokenizer.to_str(), VOCAB, [tokenizer.token_to_id("<|im_end|>")])
    grammars.tokenizer  # noqa: B018 - built here, timed
    build = time.perf_counter() - t0
    grammar = json_schema_grammar(SCHEMA)
    follow = tokenizer.encode(REPLY).ids
    decode_text = lambda ids: tokenizer.decode(ids)  # noqa: E731
    out = {"vocab": VOCAB, "reply_tokens": len(follow), "llguidance_tokenizer_build_s": round(build, 2)}
    for name, sampling in (("greedy", SamplingOptions()), ("top_p_0.9", SamplingOptions(True, 1.0, 0, 0.9, 1.0))):
        # a reply's steps: the grammar completes at the last token
        opts = GenerationOptions(max_new_tokens=len(follow) - 1, seed=0, sampling=sampling)
        for logits, backend in (("model_like", SyntheticBackend(VOCAB, follow=follow)),
                                ("noise", SyntheticBackend(VOCAB))):
            free: list[float] = []
            held: list[float] = []
            while len(held) < steps:
                free += _reply_ms(backend, opts, decode_text, None)
                held += _reply_ms(backend, opts, decode_text, grammars.matcher(grammar))
            f, h = float(np.median(free)), float(np.median(held))
            out[f"{name}_{logits}"] = {"free_ms": round(f, 3), "constrained_ms": round(h, 3),
                                       "added_ms": round(h - f, 3),
                                       "free_p90_ms": round(float(np.percentile(free, 90)), 3),
                                       "constrained_p90_ms": round(float(np.percentile(held, 90)), 3)}
    return out


def main(argv: list[str]) -> None:
    from tokenizers import Tokenizer

    from qwen2vl_edge.export.vocab import tokenizer_json

    tokenizer = Tokenizer.from_file(str(argv[0] if argv else tokenizer_json()))
    print(host_step_ms(lambda ids: tokenizer.decode(ids)))
    try:
        print(constrained_step_ms(tokenizer))
    except ImportError as e:
        print(f"constrained columns skipped: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
