"""Sampling: the distributions equal transformers' logits processors on the same logits, at the real
151,936-token vocabulary; the sampler draws from them; options are validated."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import requires_torch
from qwen2vl_edge.runtime.errors import InputError
from qwen2vl_edge.runtime.generation import GenerationOptions, suppress
from qwen2vl_edge.runtime.sampling import SamplingOptions, choose, distribution, repetition_penalty

V = 151_936
CASES = [  # temperature, top_k, top_p, repetition_penalty, min_new_tokens active
    (1.0, 0, 1.0, 1.0, False),
    (0.7, 50, 1.0, 1.0, False),
    (1.0, 0, 0.9, 1.0, False),
    (0.7, 50, 0.9, 1.1, False),
    (1.3, 0, 0.95, 1.3, True),
    (0.5, 0, 0.5, 1.0, False),  # a nucleus over a flat distribution: the full-vocabulary fallback
    (1.0, 1, 1.0, 1.0, True),
    (2.0, 200_000, 0.3, 0.8, False),  # top_k above the vocabulary disables it; penalty < 1 boosts
]


def _logits(seed: int, spread: float) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((1, V)) * spread).astype(np.float32)


def _ours(logits, seen, eos, opts: SamplingOptions, min_new: bool) -> np.ndarray:
    row = repetition_penalty(logits[0], seen, opts.repetition_penalty)
    if min_new:
        row = suppress(row[None], eos)[0]
    ids, probs = distribution(row, opts)
    full = np.zeros(V)
    full[ids] = probs
    return full


def _transformers(logits, seen, eos, opts: SamplingOptions, min_new: bool) -> np.ndarray:
    import torch
    from transformers.generation import logits_process as lp

    processors = lp.LogitsProcessorList()
    if opts.repetition_penalty != 1.0:
        processors.append(lp.RepetitionPenaltyLogitsProcessor(opts.repetition_penalty))
    if min_new:
        processors.append(lp.MinNewTokensLengthLogitsProcessor(len(seen), 5, eos))
    processors.append(lp.TemperatureLogitsWarper(opts.temperature))
    if opts.top_k:
        processors.append(lp.TopKLogitsWarper(opts.top_k))
    if opts.top_p < 1:
        processors.append(lp.TopPLogitsWarper(opts.top_p))
    scores = processors(torch.from_numpy(seen[None]), torch.from_numpy(logits.copy()))
    return torch.softmax(scores.double(), dim=-1)[0].numpy()


@requires_torch
@pytest.mark.parametrize("case", CASES)
def test_distribution_equals_transformers_processors(case):
    temperature, top_k, top_p, penalty, min_new = case
    opts = SamplingOptions(True, temperature, top_k, top_p, penalty)
    for seed, spread in ((0, 3.0), (1, 1.0), (2, 0.3)):
        logits = _logits(seed, spread)
        seen = np.random.default_rng(seed + 10).integers(0, V, 1500)
        eos = [int(logits[0].argmax()), 7]  # the likeliest token is an end token: suppression matters
        ours, ref = _ours(logits, seen, eos, opts, min_new), _transformers(logits, seen, eos, opts, min_new)
        assert np.array_equal(ours > 0, ref > 0), (case, seed)  # the same tokens survive
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-9)
        if spread < 1:  # a flat distribution: the comparison covers many surviving tokens
            assert (ours > 0).sum() > 1 or top_k == 1


def test_sampler_draws_from_the_distribution():
    """A small vocabulary, many draws: the frequencies match `distribution` (chi-square, fixed seed)."""
    logits = np.log(np.array([[0.4, 0.3, 0.15, 0.1, 0.05]], np.float32))
    opts = SamplingOptions(True, 1.0, 0, 0.8, 1.0)
    ids, probs = distribution(logits[0], opts)
    assert sorted(ids.tolist()) == [0, 1, 2]  # 0.4 + 0.3 < 0.8: the third token is kept
    rng = np.random.default_rng(0)
    draws = np.array([choose(logits, opts, rng)[0] for _ in range(4000)])
    counts = np.array([(draws == i).sum() for i in ids])
    expected = probs * len(draws)
    assert set(draws.tolist()) == set(ids.tolist())
    assert ((counts - expected) ** 2 / expected).sum() < 13.8  # chi-square, 2 dof, p = 0.001


@pytest.mark.parametrize("field,value", [
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", 0), ("temperature", "1"),
    ("top_p", float("nan")), ("top_p", 0.0), ("top_p", 1.5), ("top_k", 5.0), ("top_k", "5"), ("top_k", -1),
    ("top_k", True), ("repetition_penalty", float("nan")), ("repetition_penalty", 0),
    ("repetition_penalty", float("inf")), ("do_sample", "yes"),
])
def test_sampling_options_refused(field, value):
    with pytest.raises(InputError, match=field):
        SamplingOptions(**{field: value}).validate()


@pytest.mark.parametrize("field,value", [
    ("max_new_tokens", 0), ("max_new_tokens", 2.0), ("max_new_tokens", None), ("min_new_tokens", "3"),
    ("min_new_tokens", 1.5), ("min_new_tokens", -1), ("min_new_tokens", 200), ("seed", -1), ("seed", 1.5),
    ("seed", "7"), ("stop", 5), ("stop", ("",)), ("stop", ("a", None)),
])
def test_generation_options_refused(field, value):
    with pytest.raises(InputError, match=field):
        GenerationOptions(**{field: value}).validate()
