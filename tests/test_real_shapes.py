"""Parity at Qwen2-VL's and Qwen2.5-VL's real head shapes, where the tiny checkpoints' small heads could hide a mistake:
text head_dim 128 with mrope_section [16, 24, 24], vision head_dim 80, a prompt of over 4,000 tokens with
an image; both graph targets against transformers. Widths stay small (hidden = heads x head_dim, two
heads) so that the test stays quick."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_varied, export_artifact, random_image, requires_torch

pytestmark = requires_torch

TEXT_HEADS = ["text.hidden_size=256", "text.num_attention_heads=2", "text.num_key_value_heads=1",
              "text.intermediate_size=256", "text.mrope_section=16,24,24"]
REAL_HEADS = {"qwen2_vl": TEXT_HEADS + ["vision.embed_dim=160", "vision.num_heads=2", "vision.hidden_size=256"],
              # Qwen2.5-VL names the ViT width hidden_size; window blocks 0 and 2, full block 1
              "qwen2_5_vl": TEXT_HEADS + ["vision.hidden_size=160", "vision.num_heads=2",
                                          "vision.intermediate_size=192", "vision.out_hidden_size=256"]}
N_NEW = 12
MIN_PROMPT = 4000


@pytest.fixture(scope="module", params=list(REAL_HEADS))
def real_heads(workdir, request):
    """The family's checkpoint and its export for each target."""
    from qwen2vl_edge.export.tiny import make_tiny

    family = request.param
    ckpt = make_tiny(workdir / f"tiny-real-heads-{family}", seed=3, layout="original", overrides=REAL_HEADS[family],
                     family=family)
    arts = {target: export_artifact(ckpt, workdir / f"art-real-heads-{family}-{target}", target=target)
            for target in ("portable", "ort-cpu")}
    return ckpt, arts


@pytest.fixture(scope="module")
def long_conversation():
    rng = np.random.default_rng(21)
    words = " ".join(f"w{int(i)}" for i in rng.integers(0, 500, 1020))  # about 3,850 tokens, + 224 for the image
    # 448 x 392 px: 16 x 14 merged tokens, Qwen2.5-VL's last window column cut by the edge
    return [{"role": "user", "content": [{"type": "image", "image": random_image(rng, 448, 392)},
                                         {"type": "text", "text": f"{words} Describe the image."}]}]


def test_real_head_shapes_long_prompt_token_identical(real_heads, long_conversation):
    from qwen2vl_edge.runtime import Qwen2VLPipeline
    from test_export_parity import _reference_generate

    ckpt, arts = real_heads
    ref = _reference_generate(ckpt, [long_conversation], N_NEW)[0]
    assert_varied(ref)
    for target, art in arts.items():
        pipe = Qwen2VLPipeline.load(art)
        cfg = pipe.artifact.config
        assert (cfg.text.head_dim, cfg.text.mrope_section, cfg.vision.head_dim, cfg.text.num_hidden_layers) == (
            128, (16, 24, 24), 80, 2)
        assert pipe.artifact.export["target"] == target
        ours = pipe.generate(long_conversation, max_new_tokens=N_NEW, min_new_tokens=N_NEW)
        assert ours.usage["prompt_tokens"] >= MIN_PROMPT
        assert ours.token_ids == ref, target
