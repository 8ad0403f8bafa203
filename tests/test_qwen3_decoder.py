"""Qwen3-VL's merger and decoder graphs (per-head q/k RMSNorm, no q/k/v bias, head_dim != hidden / heads,
interleaved M-RoPE, tied embeddings, DeepStack) against transformers' Qwen3VLForConditionalGeneration on every graph
target, and the runtime plumbing that carries the DeepStack features from merge to decode.

The merger gets features of our own ([M, hidden] and DeepStack [K, M, hidden], random), placed at chosen
<|image_pad|> positions; transformers' language model gets the same embeddings with visual_pos_masks and
deepstack_visual_embeds. Position ids are random per row and differ between t, h and w, so that the interleaved
row map matters.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import TARGET_OPTIONS, assert_varied, export_artifact, requires_torch
from qwen2vl_edge.runtime.artifact import load_artifact
from qwen2vl_edge.runtime.backends.onnxruntime import DeepStackEmbeds, OrtBackend
from qwen2vl_edge.runtime.errors import InputError
from qwen2vl_edge.runtime.generation import StepTimes, decode_step, prefill

pytestmark = requires_torch
FP32_TARGETS = ["portable", "ort-cpu", "tensorrt-10.3", "tensorrt-10.15"]
STEPS = 5  # decode steps compared after the prefill


_ARTIFACTS: dict = {}


@pytest.fixture
def q3_artifact(tiny_ckpt_3, family_pipe, workdir):
    """q3_artifact(target, **export options) -> the tiny Qwen3-VL checkpoint's artifact as `target` (TARGET_OPTIONS)
    exports it, made once per run (the parity tests' own where there are no other options)."""
    def make(target: str, **options) -> Path:
        if not options:
            return family_pipe("qwen3_vl", target).artifact.dir
        key = (target, tuple(sorted(options.items())))
        if key not in _ARTIFACTS:
            out = workdir / f"q3-decoder-{len(_ARTIFACTS)}"
            _ARTIFACTS[key] = export_artifact(tiny_ckpt_3, out, **{**TARGET_OPTIONS[target], **options})
        return _ARTIFACTS[key]
    return make


@pytest.fixture
def q3_backend(q3_artifact):
    """q3_backend(target, **export options) -> an OrtBackend on q3_artifact's graphs."""
    return lambda target, **options: OrtBackend(load_artifact(q3_artifact(target, **options)))


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


def test_row_map_is_transformers_interleave(tiny_ckpt_3):
    """Which position row drives each rotary frequency, read off transformers' own recomposition_frequencies: the
    sectioned map of Qwen2-VL (t t t t t t h h h h h w w w w w for [6, 5, 5]) is not it."""
    import torch

    from reference import hf_model
    from qwen2vl_edge.export.decoder import mrope_rows

    rotary = hf_model(str(tiny_ckpt_3)).model.language_model.rotary_emb
    half = sum(rotary.mrope_section)
    freq = torch.arange(3.0)[:, None, None, None].expand(3, 1, 1, half).clone()  # row r holds r everywhere
    rows = rotary.recomposition_frequencies(freq)[0, 0, :half].long().numpy()
    assert (mrope_rows(tuple(rotary.mrope_section), interleaved=True) == rows).all()
    assert not (mrope_rows(tuple(rotary.mrope_section)) == rows).all()


def test_the_parity_tells_the_sectioned_row_map_apart(tiny_ckpt_3, q3_backend, prompt, monkeypatch):
    """The positions of `prompt` make the row map matter: graphs built with Qwen2-VL's sectioned map miss
    transformers' logits by far more than the parity tolerance."""
    from qwen2vl_edge.export import decoder

    sectioned = decoder.mrope_rows
    monkeypatch.setattr(decoder, "mrope_rows", lambda section, interleaved=False: sectioned(section))
    ours, fed = _ours(q3_backend("portable", all_logits=True), prompt, steps=0)
    assert np.abs(ours[0] - _reference(tiny_ckpt_3, prompt, fed)[0]).max() > 1e-2


@pytest.mark.parametrize("target", ["portable", "ort-cpu"])
def test_prefill_in_small_chunks_equals_one_run(tiny_ckpt_3, q3_backend, prompt, target, monkeypatch):
    """Chunks of 5 positions cut through the image tokens: each chunk's visual_index still ranks among all M
    features, which stay whole. ort-cpu's GroupQueryAttention takes chunks after a past for one row only."""
    rows = slice(None) if target == "portable" else slice(0, 1)
    one = {k: (v[:, rows] if k == "position_ids" else v if k == "vision" else v[rows]) for k, v in prompt.items()}
    if target == "ort-cpu":  # the first row's features only
        from qwen2vl_edge.runtime.config import load_config

        M = int((one["input_ids"] == load_config(tiny_ckpt_3).image_token_id).sum())
        one["vision"] = (prompt["vision"][0][:M], prompt["vision"][1][:, :M])
    backend = q3_backend(target)
    whole, fed = _ours(backend, one, steps=2)
    monkeypatch.setattr(backend, "prefill_chunk", lambda batch: 5)
    chunked, _ = _ours(backend, one, steps=2, feed=fed)
    assert max(float(np.abs(a - b).max()) for a, b in zip(whole, chunked)) <= 1e-5


def test_zeroed_deepstack_features_change_the_logits(q3_backend, prompt):
    backend = q3_backend("portable")
    main, deepstack = prompt["vision"]
    ours, fed = _ours(backend, prompt, steps=2)
    zeroed, _ = _ours(backend, prompt, steps=2, joined=(main, np.zeros_like(deepstack)), feed=fed)
    assert np.abs(ours[0] - zeroed[0]).max() > 1e-2  # the prompt's last position attends to the vision tokens


def test_decode_steps_get_the_one_empty_deepstack_and_a_bare_array_is_refused(q3_backend, prompt):
    backend = q3_backend("portable")
    step = backend.merge(np.array([[5], [6]]), np.zeros((0, backend.hidden_size), np.float32))
    assert isinstance(step, DeepStackEmbeds) and step.deepstack is backend._no_deepstack
    assert step.deepstack.shape == (2, 0, backend.hidden_size) and not step.visual_index.any()
    assert backend.merge(np.array([[7]]), np.zeros((0, backend.hidden_size), np.float32)).deepstack is step.deepstack
    with pytest.raises(InputError, match="DeepStack.*join"):
        backend.merge(prompt["input_ids"], prompt["vision"][0])
    main, deepstack = prompt["vision"]
    with pytest.raises(InputError, match="do not match"):
        backend.merge(prompt["input_ids"], (main, deepstack[:, 1:]))


def _two_turns(backend, turns: list[dict], features: list[tuple]) -> np.ndarray:
    """A chat session's path (runtime/session.py): each turn merges its new tokens with its own join's features
    and prefills after the cache -> the last turn's last-position logits."""
    cache, ids, total = None, np.zeros(0, np.int64), 0
    for turn, joined in zip(turns, features):
        total += turn["input_ids"].shape[1]
        inputs = {**turn, "attention_mask": np.ones((1, total), np.int64), "rope_deltas": np.zeros((1, 1), np.int64)}
        logits, state = prefill(backend, backend.merge(turn["input_ids"], joined), inputs, StepTimes(), cache=cache,
                                cached_ids=ids)
        cache, ids = state.cache, np.concatenate([ids, turn["input_ids"][0]])
    return logits


def test_a_next_turn_carries_its_own_deepstack_features(tiny_ckpt_3, q3_backend, prompt):
    """A next turn with a new image: its visual_index ranks among its own features. Against transformers on the
    two turns as one sequence; zeroing the second turn's DeepStack features changes its logits."""
    turns = [{"input_ids": prompt["input_ids"][:1, a:b].copy(), "position_ids": prompt["position_ids"][:, :1, a:b]}
             for a, b in ((0, 14), (14, 24))]
    turns[1]["input_ids"][0, 3:5] = prompt["input_ids"][0, 4]  # two image tokens; row 0's first 8 are in turn one
    main, deepstack = prompt["vision"]
    feats = [(main[:8], deepstack[:, :8]), (main[8:10], deepstack[:, 8:10])]
    backend = q3_backend("portable")
    ours = _two_turns(backend, turns, feats)
    both = {"input_ids": np.concatenate([t["input_ids"] for t in turns], 1),
            "attention_mask": np.ones((1, 24), np.int64),
            "position_ids": prompt["position_ids"][:, :1], "rope_deltas": np.zeros((1, 1), np.int64),
            "vision": (main[:10], deepstack[:, :10])}
    assert np.abs(ours - _reference(tiny_ckpt_3, both, [])[0]).max() <= 1e-4
    without = _two_turns(backend, turns, [feats[0], (feats[1][0], np.zeros_like(feats[1][1]))])
    assert np.abs(without - ours).max() > 1e-3


def test_an_artifact_without_the_deepstack_io_is_refused(q3_artifact, tmp_path):
    """Graphs exported before DeepStack would drop the features: refused by name."""
    import json
    import shutil

    from qwen2vl_edge.runtime.errors import ArtifactError

    copy = Path(shutil.copytree(q3_artifact("portable"), tmp_path / "old"))
    manifest = json.loads((copy / "manifest.json").read_text())
    decoder = manifest["graphs"]["decoder"]
    decoder["inputs"] = [v for v in decoder["inputs"] if v["name"] != "deepstack_embeds"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="DeepStack.*decoder input deepstack_embeds.*re-export"):
        load_artifact(copy, verify=False)


@pytest.mark.parametrize("version", ["10.3", "10.15"])
def test_tensorrt_backend_binds_the_deepstack_buffer_once_for_decode_steps(q3_artifact, prompt, fakes, tmp_path,
                                                                          version):
    """TrtBackend through the recording fakes (tests/fake_tensorrt.py executing the engines' source graphs with
    ONNX Runtime on the bound device bytes): the same logits as OrtBackend; the prompt's DeepStack features go up
    once, at its merge, and every decode step binds the same buffer with M = 0 and copies nothing into it."""
    import shutil

    from conftest import TRT_MAX_CONTEXT
    from qwen2vl_edge.export.trt_build import build_trt
    from qwen2vl_edge.runtime.backends.tensorrt import TrtBackend
    from qwen2vl_edge.runtime.backends.trt_profiles import Limits

    trt, cuda = fakes
    art = Path(shutil.copytree(q3_artifact(f"tensorrt-{version}", **({"max_context": TRT_MAX_CONTEXT}
                                                                     if version == "10.15" else {})), tmp_path / "art"))
    build_trt(art, limits=Limits(max_image_tokens=256, max_prompt=64, max_context=TRT_MAX_CONTEXT, max_batch=2),
              timing_cache=tmp_path / "timing.cache")
    expected, fed = _ours(OrtBackend(load_artifact(art)), prompt)
    with TrtBackend(load_artifact(art, backend="tensorrt")) as backend:
        start = len(cuda.calls)
        got, _ = _ours(backend, prompt, feed=fed)
        buffer = backend.buf["deepstack_embeds"]
        uploads = [c for c in cuda.calls[start:]
                   if c[0] == "copy" and buffer.ptr <= c[2] < buffer.ptr + buffer.nbytes]
    assert max(float(np.abs(a - b).max()) for a, b in zip(got, expected)) <= 1e-5
    runs = [(shapes, addresses) for engine, shapes, addresses in trt.recorder.executions if engine == "decoder"]
    K, M, H = prompt["vision"][1].shape
    assert [tuple(s["deepstack_embeds"]) for s, _ in runs] == [(K, M, H)] + [(K, 0, H)] * STEPS
    assert len({a["deepstack_embeds"] for _, a in runs}) == 1
    assert [c[3] for c in uploads] == [K * M * H * 4]  # the prompt's features, once
    assert cuda.errors == []


# Teacher-forced top-1 agreement with the portable fp32 graphs over 32 tokens of both rows of `prompt`, floors as
# the Qwen2-VL / Qwen2.5-VL tests set them (tests/test_tensorrt_target.py, tests/test_quantized.py); measured
# 2026-12-06 on the tiny Qwen3-VL checkpoint (printed by the test, docs-draft-qwen3-decoder.md).
FLOORS = {"tensorrt-10.3-fp16": 0.9, "tensorrt-10.15-fp16": 0.9, "tensorrt-10.15-fp16-int4": 0.1,
          "ort-cpu-int8": 0.8, "ort-cpu-int4": 0.05}
AGREEMENT_TOKENS = 32


@pytest.mark.parametrize("target", list(FLOORS))
def test_reduced_precision_and_quantized_floors(q3_backend, prompt, target):
    reference, fed = _ours(q3_backend("portable"), prompt, steps=AGREEMENT_TOKENS)
    assert_varied([int(t) for step in fed for t in step])
    ours, _ = _ours(q3_backend(target), prompt, steps=AGREEMENT_TOKENS, feed=fed)
    top1 = float(np.mean([logits.argmax(-1) == token for logits, token in zip(ours, fed)]))
    print(f"{target}: teacher-forced top-1 vs fp32 {top1:.0%}")
    assert top1 >= FLOORS[target]


def test_profiles_buffers_and_memory_plan_for_deepstack(tiny_ckpt, tiny_ckpt_3):
    """Plain data: the decoder's DeepStack inputs get profiles (M = 0 at decode steps), the TensorRT backend its two
    buffers, the host estimate K more features a vision token; Qwen2-VL's stay as they were."""
    from qwen2vl_edge.runtime import memory
    from qwen2vl_edge.runtime.backends.trt_memory import io_buffers
    from qwen2vl_edge.runtime.backends.trt_profiles import DECODE, PREFILL, Limits, decoder_profiles
    from qwen2vl_edge.runtime.config import load_config

    lim = Limits(max_prompt=64, max_context=128, max_batch=2)
    q3, q2 = load_config(tiny_ckpt_3), load_config(tiny_ckpt)
    K, H = len(q3.vision.deepstack_visual_indexes), q3.text.hidden_size
    for kv in ("concat", "preallocated"):
        profiles = decoder_profiles(q3, lim, kv)
        assert profiles[PREFILL]["deepstack_embeds"] == ((K, 0, H), (K, 128, H), (K, 128, H))
        assert profiles[DECODE]["deepstack_embeds"] == ((K, 0, H),) * 3
        assert profiles[DECODE]["visual_index"] == ((1, 1), (1, 1), (2, 1))
        assert not {"visual_index", "deepstack_embeds"} & set(decoder_profiles(q2, lim, kv)[PREFILL])
    assert io_buffers(q3, lim)["deepstack_embeds"] == K * 2 * 64 * H * 4
    assert "deepstack_embeds" not in io_buffers(q2, lim)
    req = memory.RequestShape(1, 300, 8, ((1, 16, 16),))
    plain = replace(q3, vision=replace(q3.vision, deepstack_visual_indexes=()))
    extra = memory.estimate(q3, {}, req).stages["vision"] - memory.estimate(plain, {}, req).stages["vision"]
    assert extra == K * 4 * (16 * 16 // 4) * H  # K more [tokens, hidden] feature sets


@pytest.mark.parametrize("target,ops", [("ort-cpu", {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"}),
                                        ("tensorrt-10.15", {"Attention", "TensorScatter", "RMSNormalization",
                                                            "RotaryEmbedding"}), ("tensorrt-10.3", {"Softmax"})])
def test_each_target_keeps_its_fused_ops(q3_artifact, target, ops):
    """q/k normalised (and rotated) before GroupQueryAttention / RotaryEmbedding: the fused paths stay fused; and
    the graphs pass check-trt's operator matrix for their TensorRT version."""
    import onnx

    from qwen2vl_edge.export.trt_check import check_artifact

    art = q3_artifact(target)
    model = onnx.load(str(art / "decoder.onnx"), load_external_data=False)
    assert ops <= {n.op_type for n in model.graph.node}
    if target.startswith("tensorrt"):
        assert check_artifact(art) == []


def test_the_deepstack_cost_benchmark_finds_exactly_deepstacks_nodes(q3_artifact):
    """benchmarks/deepstack_cost.py times the nodes that depend on the DeepStack inputs, up to the Adds that join
    the residual stream: one Concat, a Gather of the tap and one at the positions per tap, and one Add per tap."""
    import onnx

    from qwen2vl_edge.benchmarks.deepstack_cost import deepstack_nodes

    path = q3_artifact("ort-cpu") / "decoder.onnx"
    names = deepstack_nodes(path)
    ops = sorted(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node if n.name in names)
    K = 2  # the tiny checkpoint's taps
    assert ops == sorted(["Concat"] + ["Gather"] * 2 * K + ["Add"] * K)
