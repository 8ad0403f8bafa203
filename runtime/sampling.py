"""Next-token choice from last-position logits [B, V]: greedy, or sampling with transformers' processors in
transformers' order (repetition penalty, [min_new_tokens in generation.py], temperature, top-k, top-p), after
a row's constraint (runtime/constraints.py) when it has one.

The host loop must stay cheap at a 151,936-token vocabulary, so nothing here sorts the vocabulary:
top-k and top-p work on a small candidate set found from chunk maxima (one pass over the logits); a
top-p whose mass is spread over thousands of tokens buckets them by log-probability and sorts one bucket.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import checks

if TYPE_CHECKING:
    from .constraints import Matcher

CHUNK = 256  # logits per chunk when bounding the top values from chunk maxima
MIN_PENALTY = 1e-3
LEVELS_PER_UNIT, LEVELS = 32, 2048  # log-probability buckets of the top-p fallback, down to e^-64


@dataclass(frozen=True)
class SamplingOptions:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def validate(self) -> None:
        checks.flag("do_sample", self.do_sample)
        checks.real("temperature", self.temperature, above=0, hint=" (use do_sample=False for greedy)")
        checks.real("top_p", self.top_p, above=0, maximum=1, hint=" (1 disables it)")
        checks.integer("top_k", self.top_k, minimum=0, hint=" (0 disables it)")
        # beyond these a penalised logit overflows float32 for no useful effect
        checks.real("repetition_penalty", self.repetition_penalty, minimum=MIN_PENALTY, maximum=1 / MIN_PENALTY,
                    hint=" (1 disables it)")


def repetition_penalty(row: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL-style penalty on every token already in the row (prompt and generated); row [V] -> a new row."""
    if penalty == 1.0:
        return row
    row = row.copy()
    ids = seen  # a repeated id is written twice with the same value: no sort of the history per token
    scores = row[ids]
    row[ids] = np.where(scores < 0, scores * penalty, scores / penalty)
    return row


def top_superset(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of a small superset of x's k largest values: every value >= the k-th largest chunk maximum
    (k chunks reach it, so at least k values do). x [V] -> sorted indices [>= k]."""
    n = len(x) // CHUNK
    if n <= k:
        return np.arange(len(x))
    maxima = x[:n * CHUNK].reshape(n, CHUNK).max(axis=1)  # [n]
    if len(x) > n * CHUNK:
        maxima = np.append(maxima, x[n * CHUNK:].max())
    threshold = np.partition(maxima, len(maxima) - k)[len(maxima) - k]
    return np.flatnonzero(x >= threshold)


def top_k_ids(x: np.ndarray, k: int) -> np.ndarray:
    """transformers' TopKLogitsWarper: keep every value >= the k-th largest (ties kept). -> indices."""
    cands = top_superset(x, k)
    vals = x[cands]
    kth = np.partition(vals, len(vals) - k)[len(vals) - k]
    return cands[vals >= kth]


def _nucleus_candidates(logits: np.ndarray, weights: np.ndarray, total: float, top_p: float) -> np.ndarray | None:
    """The smallest top-m superset (m = 64, 512) whose mass exceeds top_p, or None: a token outside it has at
    least top_p of mass above it, so top-p removes it."""
    for m in (64, 512):
        if m >= len(logits) // CHUNK:
            break
        cands = top_superset(logits, m)
        if weights[cands].sum() > top_p * total * (1 + 1e-9):
            return cands
    return None


def _nucleus_by_level(weights: np.ndarray, total: float, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Top-p over a flat distribution, without sorting the vocabulary: tokens bucketed by log-probability
    (1/LEVELS_PER_UNIT wide). Levels above the one where the cumulative mass reaches top_p are kept whole
    (less than top_p lies above any of their tokens), levels below are dropped (at least top_p lies above),
    and only the tokens of that one level are sorted."""
    with np.errstate(divide="ignore"):  # weight 0 -> log -inf -> the last level
        level = np.minimum(-np.log(weights) * LEVELS_PER_UNIT, LEVELS - 1).astype(np.int64)  # [V], 0: likeliest
    mass = np.bincount(level, weights=weights, minlength=LEVELS) / total  # [LEVELS]
    reached = np.cumsum(mass)
    edge_level = min(int(np.searchsorted(reached, top_p)), LEVELS - 1)  # first level reaching top_p
    edge = np.flatnonzero(level == edge_level)
    p_edge = weights[edge] / total
    order = np.argsort(-p_edge)
    above = (reached[edge_level] - mass[edge_level]) + np.cumsum(p_edge[order]) - p_edge[order]
    ids = np.concatenate([np.flatnonzero(level < edge_level), edge[order][above < top_p]])
    probs = weights[ids]
    return ids, probs / probs.sum()


def distribution(row: np.ndarray, opts: SamplingOptions) -> tuple[np.ndarray, np.ndarray]:
    """Processed logits [V] -> (token ids [n], probabilities [n]) after temperature, top-k and top-p: the
    tokens outside `ids` have probability 0, as after transformers' warpers and softmax."""
    V = len(row)
    if 0 < opts.top_k < V:  # top-p then only renormalises inside the top-k
        ids = top_k_ids(row, opts.top_k)
        weights = _scaled_exp(row[ids], opts.temperature)
        probs = weights / weights.sum()
    else:
        weights = _scaled_exp(row, opts.temperature)
        total = weights.sum()
        if opts.top_p >= 1:
            return np.arange(V), weights / total
        ids = _nucleus_candidates(row, weights, total, opts.top_p)
        if ids is None:
            return _nucleus_by_level(weights, total, opts.top_p)
        probs = weights[ids] / total
    return _top_p(ids, probs, opts.top_p) if opts.top_p < 1 else (ids, probs)


def _scaled_exp(logits: np.ndarray, temperature: float) -> np.ndarray:
    """exp((x - max) / T) in float64: the softmax numerator. The max is subtracted before dividing, so that a
    tiny temperature gives 0 and 1 (greedy in the limit), not inf - inf."""
    x = logits.astype(np.float64)
    with np.errstate(over="ignore"):  # (x - max) / T below -1e308 is -inf, and exp(-inf) = 0: what we want
        return np.exp((x - x.max()) / temperature)


def _top_p(ids: np.ndarray, probs: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """transformers' TopPLogitsWarper: sort ascending, remove while the cumulative mass is <= 1 - top_p,
    keep the most likely token. `probs` may cover part of the vocabulary; the rest counts as the smallest."""
    order = np.argsort(probs)  # ascending; ties in any order, as torch.sort leaves them
    p = probs[order]
    cumulative = (1.0 - probs.sum()) + np.cumsum(p)  # mass of every token not above this one
    keep = cumulative > 1 - top_p
    keep[-1] = True
    kept = p[keep]
    return ids[order][keep], kept / kept.sum()


def _pick(row: np.ndarray, opts: SamplingOptions, rng: np.random.Generator) -> int:
    """One token from processed logits [V]: the argmax, or a sample of `distribution`."""
    if not opts.do_sample:
        return int(row.argmax())
    ids, probs = distribution(row, opts)
    cumulative = np.cumsum(probs)  # [n]
    return int(ids[min(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"), len(ids) - 1)])


def allowed_logits(row: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """The logits of the allowed token ids [n] only: a masked row's tokens at -inf have probability 0 after every
    processor, so the processors run on the n allowed ones (a handful between JSON values, most of the vocabulary
    inside a string). Allowed tokens all at -inf (min_new_tokens suppressing the end a complete grammar
    requires) become equal: the grammar wins."""
    sub = row[allowed]  # [n]
    return sub if np.isfinite(sub.max()) else np.zeros_like(sub)


def constrained_pick(row: np.ndarray, opts: SamplingOptions, rng: np.random.Generator, matcher: "Matcher") -> int:
    """A token of the masked distribution. The constraint masks first, then the processors run (the penalty
    already ran: it maps -inf to -inf, so penalising then masking is masking then penalising).

    Fast path: the unconstrained choice, kept when the grammar allows it; the mask only when it does not.
    Exact for greedy (the argmax over all tokens, when allowed, is the argmax over the allowed ones), and for
    sampling without top-k / top-p, as rejection sampling: a token t drawn from p is kept when allowed, else
    one is drawn from p restricted to the allowed set A, so P(t) = p(t) + (1 - p(A)) p(t) / p(A) = p(t) / p(A).
    top-k and top-p choose their set after the mask, which the fast path cannot see: those always mask."""
    if not opts.do_sample or (opts.top_k == 0 and opts.top_p >= 1):
        t = _pick(row, opts, rng)
        if matcher.allows(t):
            return t
    allowed = matcher.allowed_ids()  # [n]
    return int(allowed[_pick(allowed_logits(row, allowed), opts, rng)])


def choose(logits: np.ndarray, opts: SamplingOptions, rng: np.random.Generator,
           seen: list[np.ndarray] | None = None, matchers: list["Matcher | None"] | None = None) -> np.ndarray:
    """logits [B, V] -> token ids [B] int64. `matchers`: per row, its constraint or None."""
    out = np.empty(len(logits), np.int64)
    for b, row in enumerate(logits):
        if seen is not None:
            row = repetition_penalty(row, seen[b], opts.repetition_penalty)
        matcher = matchers[b] if matchers is not None else None
        out[b] = _pick(row, opts, rng) if matcher is None else constrained_pick(row, opts, rng, matcher)
    return out
