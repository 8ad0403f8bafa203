"""input_ids, pixel values and M-RoPE positions vs transformers' Qwen2VLProcessor / Qwen2_5_VLProcessor +
get_rope_index, for each family's tiny checkpoint."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import FAMILY_CKPTS, random_image, requires_torch
from qwen2vl_edge.runtime.preprocess import CLIP_STD
from qwen2vl_edge.runtime.processor import Processor

pytestmark = requires_torch


def _conversations(images) -> list[tuple[str, list, bool]]:
    rng = np.random.default_rng(3)
    img = lambda w, h: random_image(rng, w, h)  # noqa: E731
    frames = lambda n, w, h: [random_image(rng, w, h) for _ in range(n)]  # noqa: E731
    a, b, c = (str(images[k]) for k in "abc")
    user = lambda *content: {"role": "user", "content": list(content)}  # noqa: E731
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    image = lambda x, **kw: {"type": "image", "image": x, **kw}  # noqa: E731
    video = lambda x, **kw: {"type": "video", "video": x, **kw}  # noqa: E731
    return [
        ("text-string", [{"role": "user", "content": "Hello, world!"}], False),
        ("text-list", [user(text("What is 12345 + 678?"))], False),
        ("system", [{"role": "system", "content": "You are terse."}, user(text("Hi"))], False),
        ("multi-turn", [user(text("Hi")), {"role": "assistant", "content": "Hello! 你好"}, user(text("again"))], False),
        ("one-image-path", [user(image(a), text("Describe this image."))], False),
        ("one-image-file-url", [user(image("file://" + b), text("What is here?"))], False),
        ("image-after-text", [user(text("Look:"), image(img(90, 60)))], False),
        ("two-images", [user(image(a), image(c), text("Compare."))], False),
        ("three-images", [user(image(a), text("and"), image(b), image(img(400, 100)), text("?"))], False),
        ("image-min-max", [user(image(img(640, 480), min_pixels=50 * 784, max_pixels=80 * 784), text("x"))], False),
        ("image-resized", [user(image(img(300, 300), resized_height=200, resized_width=120), text("y"))], False),
        ("video-frames", [user(video(frames(4, 112, 84)), text("What happens?"))], False),
        ("video-odd-frames", [user(video(frames(3, 140, 100)), text("Summarise."))], False),
        # Qwen2.5-VL: temporal ids step by tokens_per_second * 2 / sample_fps (0.5 and 2/3 s a group here)
        ("video-4fps", [user(video(frames(8, 112, 84), sample_fps=4.0), text("Fast?"))], False),
        ("video-3fps", [user(video(frames(8, 112, 84), sample_fps=3.0), text("Slow?"))], False),
        ("image-and-video", [user(image(c), video(frames(2, 90, 120)), text("Both?"))], False),
        ("video-then-image", [user(video(frames(2, 100, 100)), text("then"), image(a))], False),
        ("multi-turn-images", [user(image(a), text("One")), {"role": "assistant", "content": "A cat."},
                               user(image(b), text("Two"))], False),
        ("vision-id-images", [user(image(a), image(b), text("Which?"))], True),
        ("vision-id-mixed", [user(image(a), video(frames(2, 84, 84)), text("Which?"))], True),
        ("system-and-image", [{"role": "system", "content": [text("Be brief.")]}, user(image(c), text("?"))], False),
        ("long-text", [user(text(" ".join(["token"] * 300)))], False),
        ("unicode", [user(text("Ünïcödé — emoji 🤖 and 中文"), image(c))], False),
    ]


@pytest.fixture(scope="module", params=list(FAMILY_CKPTS))
def family_processor(request):
    """(the family's tiny checkpoint, our Processor of it)."""
    ckpt = request.getfixturevalue(FAMILY_CKPTS[request.param])
    return ckpt, Processor.from_pretrained(ckpt)


def _check(ours: dict, ref: dict, ckpt, processor: Processor):
    from reference import ref_rope_index

    np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"].numpy())
    np.testing.assert_array_equal(ours["attention_mask"], ref["attention_mask"].numpy())
    for key in ("image_grid_thw", "video_grid_thw"):
        assert (key in ours) == (key in ref and ref[key] is not None)
        if key in ours:
            np.testing.assert_array_equal(ours[key], ref[key].numpy())
    # transformers' processor resamples with torchvision, Pillow here: these videos' frames, and Qwen3-VL's images
    # under its 65536-pixel minimum (the PIL processor gives our images bit for bit: test_qwen3_front.py)
    resampled = ("pixel_values_videos",) + (("pixel_values",) if processor.config.model_type == "qwen3_vl" else ())
    for key in ("pixel_values", "pixel_values_videos"):
        if key in ours:
            atol = 8 / 255 / min(CLIP_STD) if key in resampled else 1e-6
            np.testing.assert_allclose(ours[key], ref[key].numpy(), atol=atol, rtol=0)
    np.testing.assert_array_equal(ours["mm_token_type_ids"], ref["mm_token_type_ids"].numpy())
    if "second_per_grid_ts" in ref:  # Qwen2.5-VL's processor
        np.testing.assert_array_equal(ours["second_per_grid_ts"], ref["second_per_grid_ts"].numpy())
    pos, deltas = ref_rope_index(ckpt, ref)
    np.testing.assert_array_equal(ours["position_ids"], pos)
    np.testing.assert_array_equal(ours["rope_deltas"], deltas)


def test_conversations_match_reference(family_processor, images):
    from reference import ref_inputs

    tiny_ckpt, processor = family_processor
    cases = _conversations(images)
    assert len(cases) >= 20
    for name, conv, vid in cases:
        try:
            _check(processor(conv, add_vision_id=vid), ref_inputs(tiny_ckpt, [conv], add_vision_id=vid), tiny_ckpt,
                   processor)
        except AssertionError as e:
            raise AssertionError(f"conversation {name!r}: {e}") from None


def test_batch_left_padding_matches_reference(family_processor, images):
    from reference import ref_inputs

    tiny_ckpt, processor = family_processor
    cases = {name: conv for name, conv, _ in _conversations(images)}
    batch = [cases[name] for name in ("text-list", "three-images", "image-and-video", "multi-turn", "video-3fps")]
    ours = processor(batch)
    assert ours["input_ids"].shape[0] == 5 and (ours["attention_mask"] == 0).any()
    _check(ours, ref_inputs(tiny_ckpt, batch), tiny_ckpt, processor)


def test_both_config_layouts_load_the_same(tiny_ckpt, tiny_ckpt_v5, workdir):
    from qwen2vl_edge.export.tiny import make_tiny
    from qwen2vl_edge.runtime.config import load_config

    twin = make_tiny(workdir / "tiny-original-as-v5", seed=0, layout="v5")
    assert load_config(twin) == load_config(tiny_ckpt)
    cfg = load_config(tiny_ckpt_v5)
    assert cfg.text.mrope_section == (4, 2, 2) and not cfg.tie_word_embeddings
    assert load_config(tiny_ckpt).text.mrope_section == (2, 3, 3)
