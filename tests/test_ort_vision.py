"""--target ort-cpu's vision encoder: one MultiHeadAttention per block (flash attention on ONNX Runtime's CPU
kernel), so no [.., S, S] tensor, and the same features as the portable graph (held to transformers)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import random_image
from test_tensorrt_target import _concrete_vision


def test_ort_cpu_vision_graph_has_no_patches_by_patches_tensor(tiny_artifact, tiny_artifact_ort):
    patches = 100  # no other dimension of the tiny vision encoder is 100
    for art, fused in ((tiny_artifact_ort, True), (tiny_artifact, False)):
        model = _concrete_vision(art / "vision_encoder.onnx", patches)
        square = [v.name for v in model.graph.value_info
                  if [d.dim_value for d in v.type.tensor_type.shape.dim][-2:] == [patches, patches]]
        mha = [n for n in model.graph.node if n.op_type == "MultiHeadAttention" and n.domain == "com.microsoft"]
        if fused:  # one per block, nothing passed but q, k, v (a mask or bias would leave the flash path)
            assert not square and len(mha) == 2 and all(len(n.input) == 3 for n in mha)
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
