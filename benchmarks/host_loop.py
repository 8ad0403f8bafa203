"""The generation loop's own cost per step (sampling, stop check, detokenisation, bookkeeping), measured on
synthetic logits at the real vocabulary: `python -m qwen2vl_edge.benchmarks.host_loop [tokenizer.json]`.

The graphs are replaced by a backend that hands out precomputed logit rows, so what remains is exactly
what `GenerationResult.timings['decode_outside_graphs_per_token']` reports for a real backend, minus the
backend's own I/O binding.
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
    the time spent handing them out counts as graph time."""

    name = "synthetic"
    hidden_size = 8

    def __init__(self, vocab: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.pool = (rng.standard_normal((16, vocab)) * 2.5).astype(np.float32)  # [16, V]
        self.graph_seconds, self.calls = 0.0, 0

    def merge(self, input_ids, vision_embeds):
        return np.zeros((*input_ids.shape, self.hidden_size), np.float32)

    def new_cache(self, batch, reserve=0):
        return None

    def prefill_chunk(self, batch):
        return None  # the prompt in one call

    def decode(self, inputs_embeds, attention_mask, position_ids, cache):
        t0 = time.perf_counter()
        logits = self.pool[self.calls % len(self.pool)][None].copy()  # a fresh array, as a session returns
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


def main(argv: list[str]) -> None:
    from tokenizers import Tokenizer

    from qwen2vl_edge.export.vocab import tokenizer_json

    tokenizer = Tokenizer.from_file(str(argv[0] if argv else tokenizer_json()))
    print(host_step_ms(lambda ids: tokenizer.decode(ids)))


if __name__ == "__main__":
    main(sys.argv[1:])
