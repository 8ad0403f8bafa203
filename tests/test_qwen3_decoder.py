"""Qwen3-VL's merger and decoder graphs (per-head q/k RMSNorm, no q/k/v bias, head_dim != hidden / heads,
interleaved M-RoPE, tied embeddings, DeepStack) against transformers' Qwen3VLForConditionalGeneration on every graph
target, and the runtime plumbing that carries the DeepStack features from merge to decode.

The merger gets features of our own ([M, hidden] and DeepStack [K, M, hidden], random), placed at chosen
<|image_pad|> positions; transformers' language model gets the same embeddings with visual_pos_masks and
deepstack_visual_embeds. Position ids are random per row and differ between t, h and w, so that the interleaved
row map matters.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import TARGET_OPTIONS, assert_varied, export_artifact, requires_torch
from qwen2vl_edge.export.graph import FLOAT
from qwen2vl_edge.runtime.artifact import load_artifact
from qwen2vl_edge.runtime.backends.onnxruntime import DeepStackEmbeds, OrtBackend
from qwen2vl_edge.runtime.errors import InputError
from qwen2vl_edge.runtime.generation import StepTimes, decode_step, prefill

pytestmark = requires_torch
FP32_TARGETS = ["portable", "ort-cpu", "tensorrt-10.3", "tensorrt-10.15"]
STEPS = 5  # decode steps compared after the prefill


def _vision_stand_in(g, ckpt, progress=None) -> None:
    """The vision_encoder graph of these artifacts: a stand-in with Qwen2-VL's encoder inputs, so that an artifact
    has its three graphs while export/vision.py cannot build Qwen3-VL's encoder. Nothing here runs it: the merger is
    fed features of the test's own."""
    v = ckpt.config.vision
    pixels = g.input("pixel_values", FLOAT, ["frames", "patches", v.patch_dim])
    for name in ("rotary_cos", "rotary_sin"):
        g.input(name, FLOAT, ["patches", v.head_dim])
    g.output(pixels, "image_embeds", FLOAT, ["frames", "patches", v.patch_dim])


_ARTIFACTS: dict = {}


@pytest.fixture
def q3_backend(tiny_ckpt_3, workdir):
    """q3_backend(target, **export options) -> an OrtBackend on the tiny Qwen3-VL checkpoint's graphs as `target`
    (TARGET_OPTIONS) exports them, made once per run."""
    from qwen2vl_edge.export import onnx_export

    def load(target: str, **options) -> OrtBackend:
        key = (target, tuple(sorted(options.items())))
        if key not in _ARTIFACTS:
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(onnx_export, "build_vision_encoder", _vision_stand_in)
                out = workdir / f"q3-decoder-{len(_ARTIFACTS)}"
                _ARTIFACTS[key] = export_artifact(tiny_ckpt_3, out, **{**TARGET_OPTIONS[target], **options})
        return OrtBackend(load_artifact(_ARTIFACTS[key]))
    return load


@pytest.fixture(scope="module")
def prompt(tiny_ckpt_3):
    """A left-padded batch of two rows with image tokens at chosen positions, their features, and positions."""
    from qwen2vl_edge.runtime.config import load_config

    cfg = load_config(tiny_ckpt_3)
    rng = np.random.default_rng(26)
    B, L, H, K = 2, 24, cfg.text.hidden_size, len(cfg.vision.deepstack_visual_indexes)
    pad = np.array([0, 7])  # left padding per row
    ids = rng.integers(100, 5000, (B, L))
    ids[0, 4:12] = ids[1, 12:16] = cfg.image_token_id
    mask = (np.arange(L)[None] >= pad[:, None]).astype(np.int64)
    M = int((ids == cfg.image_token_id).sum())
    # t, h and w rows that differ: each row's own start, then per row and axis random steps
    steps = rng.integers(0, 3, (3, B, L))
    pos = np.cumsum(steps, axis=-1) + rng.integers(0, 4, (3, B, 1))
    pos = np.where(mask[None] == 1, pos, 1).astype(np.int64)  # padding positions as transformers sets them
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
            "rope_deltas": pos.max(axis=(0, 2))[:, None] + 1 - mask.sum(axis=1)[:, None],
            "vision": (rng.normal(0, 0.5, (M, H)).astype(np.float32),
                       rng.normal(0, 0.5, (K, M, H)).astype(np.float32))}


def _ours(backend, prompt, steps: int = STEPS, joined=None, feed=None) -> tuple[list[np.ndarray], list]:
    """Last-position logits at prefill and after each of `steps` decode steps; the tokens fed: `feed`, or greedy."""
    inputs = {k: prompt[k] for k in ("input_ids", "attention_mask", "position_ids", "rope_deltas")}
    embeds = backend.merge(prompt["input_ids"], prompt["vision"] if joined is None else joined)
    logits, state = prefill(backend, embeds, inputs, StepTimes(), max_new_tokens=steps)
    out, fed = [logits], []
    for step in range(steps):
        token = logits.argmax(-1) if feed is None else feed[step]
        fed.append(token)
        logits = decode_step(backend, state, token)
        out.append(logits)
    return out, fed


def _reference(ckpt, prompt, fed: list) -> list[np.ndarray]:
    """transformers' Qwen3-VL language model on the same embeddings, DeepStack features and positions."""
    import torch

    from reference import hf_model
    from qwen2vl_edge.runtime.rope import decode_positions

    model = hf_model(str(ckpt))
    lm = model.model.language_model
    ids = torch.from_numpy(prompt["input_ids"])
    visual = ids == model.config.image_token_id
    main, deepstack = (torch.from_numpy(a) for a in prompt["vision"])
    mask = torch.from_numpy(prompt["attention_mask"])
    real = prompt["attention_mask"].sum(axis=1)
    with torch.no_grad():
        embeds = lm.embed_tokens(ids)
        embeds[visual] = main  # row-major over the batch, as the merger places them
        out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=torch.from_numpy(prompt["position_ids"]),
                 use_cache=True, visual_pos_masks=visual, deepstack_visual_embeds=list(deepstack))
        logits, cache = [model.lm_head(out.last_hidden_state)[:, -1].numpy()], out.cache
        for step, token in enumerate(fed):
            mask = torch.cat([mask, torch.ones((len(real), 1), dtype=mask.dtype)], dim=1)
            pos = torch.from_numpy(decode_positions(real + step, prompt["rope_deltas"]))
            out = lm(inputs_embeds=lm.embed_tokens(torch.from_numpy(np.asarray(token)[:, None])), attention_mask=mask,
                     position_ids=pos, cache=cache, use_cache=True)
            logits.append(model.lm_head(out.last_hidden_state)[:, -1].numpy())
            cache = out.cache
    return logits


@pytest.mark.parametrize("target", FP32_TARGETS)
def test_logits_at_prefill_and_decode_steps_match_transformers(tiny_ckpt_3, q3_backend, prompt, target):
    """A left-padded batch of two rows, image tokens in both, DeepStack features after layers 0 and 1."""
    ours, fed = _ours(q3_backend(target), prompt)
    ref = _reference(tiny_ckpt_3, prompt, fed)
    diffs = [float(np.abs(a - b).max()) for a, b in zip(ours, ref)]
    print(f"{target}: logit max abs diff per step", [f"{d:.1e}" for d in diffs])
    assert_varied([int(t) for step in fed for t in step], "greedy tokens fed back")
    assert max(diffs) <= 1e-4
