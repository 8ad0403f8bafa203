"""Next-token choice from last-position logits [B, V]: greedy, or sampling with the usual processors
applied in transformers' order (repetition penalty, temperature, top-k, top-p)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError


@dataclass(frozen=True)
class SamplingOptions:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def validate(self) -> None:
        if self.temperature <= 0:
            raise InputError(f"temperature must be > 0, got {self.temperature} (use do_sample=False for greedy)")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def repetition_penalty(logits: np.ndarray, seen: list[np.ndarray], penalty: float) -> np.ndarray:
    """CTRL-style penalty on every token already in the row (prompt and generated)."""
    if penalty == 1.0:
        return logits
    logits = logits.copy()
    for b, ids in enumerate(seen):
        ids = np.unique(ids)
        scores = logits[b, ids]
        logits[b, ids] = np.where(scores < 0, scores * penalty, scores / penalty)
    return logits


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def filter_top_k_top_p(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Set to -inf every logit outside the top-k and outside the smallest set whose mass reaches top_p."""
    logits = logits.astype(np.float64, copy=True)
    if 0 < top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
        logits[logits < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-logits, axis=-1, kind="stable")
        probs = _softmax(np.take_along_axis(logits, order, axis=-1))
        # keep a token while the mass before it is < top_p (the first token is always kept)
        drop = (np.cumsum(probs, axis=-1) - probs) >= top_p
        np.put_along_axis(logits, order, np.where(drop, -np.inf, np.take_along_axis(logits, order, axis=-1)), axis=-1)
    return logits


def choose(logits: np.ndarray, opts: SamplingOptions, rng: np.random.Generator,
           seen: list[np.ndarray] | None = None) -> np.ndarray:
    """logits [B, V] -> token ids [B] int64."""
    if seen is not None:
        logits = repetition_penalty(logits, seen, opts.repetition_penalty)
    if not opts.do_sample:
        return logits.argmax(axis=-1).astype(np.int64)
    probs = _softmax(filter_top_k_top_p(logits / opts.temperature, opts.top_k, opts.top_p))
    return np.array([rng.choice(len(p), p=p) for p in probs], np.int64)
