"""--target ort-cpu's vision encoder: one MultiHeadAttention per block (flash attention on ONNX Runtime's CPU
kernel), so no [.., S, S] tensor, and the same features as the portable graph (held to transformers)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import random_image
from test_tensorrt_target import _concrete_vision


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_ort_cpu_vision_graph_has_no_patches_by_patches_tensor(family_pipe, family):
    """Qwen2.5-VL's window blocks pass a key_padding_mask over 64 slots; its full block, as Qwen2-VL's blocks,
    nothing but q, k, v (a mask or bias would leave the flash path)."""
    patches = 100  # no other dimension of the tiny vision encoders is 100
    for target, fused in (("ort-cpu", True), ("portable", False)):
        pipe = family_pipe(family, target)
        model = _concrete_vision(pipe.artifact.dir, (1, 10, 10))
        square = [v.name for v in model.graph.value_info
                  if [d.dim_value for d in v.type.tensor_type.shape.dim][-2:] == [patches, patches]]
        mha = [n for n in model.graph.node if n.op_type == "MultiHeadAttention" and n.domain == "com.microsoft"]
        cfg = pipe.artifact.config
        vc = cfg.vision
        full = len(vc.fullatt_block_indexes) if cfg.family.windowed else vc.depth  # blocks without a window mask
        if fused:  # one per block
            assert not square and len(mha) == vc.depth and sum(len(n.input) == 3 for n in mha) == full
        else:  # explicit attention: the scores exist (what ort-cpu removes)
            assert square and not mha


@pytest.mark.parametrize("case", ["one-image", "three-images", "video6"])
def test_ort_cpu_vision_features_match_portable(pipe, pipe_ort, case):
    """Frames are MultiHeadAttention's batch: a 6-frame video checks attention stays within a frame."""
    rng = np.random.default_rng(7)
    if case == "video6":
        content = [{"type": "video", "video": [random_image(rng, 168, 112) for _ in range(6)]}]
    else:
        sizes = [(333, 250)] if case == "one-image" else [(100, 80), (420, 300), (56, 300)]
        content = [{"type": "image", "image": random_image(rng, w, h)} for w, h in sizes]
    inputs = pipe.processor([{"role": "user", "content": content + [{"type": "text", "text": "?"}]}])
    ref, ours = pipe.vision_features(inputs), pipe_ort.vision_features(inputs)
    assert ours.shape == ref.shape
    assert np.abs(np.diff(ref, axis=0)).max(axis=1).min() > 1e-3, "reference features degenerate: rows repeat"
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"ort-cpu vision {case}: max relative error vs portable {rel:.2e}")
    assert rel <= 1e-4


def test_large_images_run_in_the_bounded_session_with_the_same_features(pipe_ort, monkeypatch):
    """From BOUNDED_FROM patches the encoder's session is swapped for one without arena or buffer reuse (its
    activations bounded), and back below it; the features do not change."""
    from qwen2vl_edge.runtime.backends import onnxruntime as ort_backend

    rng = np.random.default_rng(3)
    image = {"type": "image", "image": random_image(rng, 333, 250)}
    inputs = pipe_ort.processor([{"role": "user", "content": [image, {"type": "text", "text": "?"}]}])
    patches = int(np.prod(inputs["image_grid_thw"][0]))
    backend = pipe_ort.backend
    default = backend.sessions["vision_encoder"]
    small = pipe_ort.vision_features(inputs)
    assert backend.sessions["vision_encoder"] is default and default.get_session_options().enable_mem_reuse
    monkeypatch.setattr(ort_backend, "BOUNDED_FROM", patches)
    large = pipe_ort.vision_features(inputs)
    opts = backend.sessions["vision_encoder"].get_session_options()
    assert backend.sessions["vision_encoder"] is not default
    assert not opts.enable_cpu_mem_arena and not opts.enable_mem_reuse
    np.testing.assert_array_equal(large, small)
    monkeypatch.setattr(ort_backend, "BOUNDED_FROM", patches + 1)
    np.testing.assert_array_equal(pipe_ort.vision_features(inputs), small)
    assert backend.sessions["vision_encoder"].get_session_options().enable_mem_reuse


def test_bounded_session_from_a_session_cache(tiny_artifact_ort, pipe_ort, tmp_path, monkeypatch):
    """With session_cache the bounded session maps the cache's optimized graph: same features."""
    from qwen2vl_edge.runtime import Qwen2VLPipeline
    from qwen2vl_edge.runtime.backends import onnxruntime as ort_backend

    image = {"type": "image", "image": random_image(np.random.default_rng(4), 200, 150)}
    inputs = pipe_ort.processor([{"role": "user", "content": [image, {"type": "text", "text": "?"}]}])
    want = pipe_ort.vision_features(inputs)
    cached = Qwen2VLPipeline.load(tiny_artifact_ort, session_cache=tmp_path)
    monkeypatch.setattr(ort_backend, "BOUNDED_FROM", 1)
    np.testing.assert_allclose(cached.vision_features(inputs), want, rtol=1e-5, atol=1e-6)
    assert cached.backend._vision_bounded
