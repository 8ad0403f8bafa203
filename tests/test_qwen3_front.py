"""Qwen3-VL's front-end against transformers' Qwen3VLProcessor / Qwen3VLModel.get_rope_index and qwen-vl-utils 0.0.14
(image_patch_size=16, return_video_metadata=True, as the model card calls it): the checkpoint's files, pixels and
grids, the video prompt written frame by frame after "<t seconds>" and its ids, M-RoPE positions and deltas, the
vision features placed once per video across its frame runs, and chat sessions over Qwen3-VL's template.
(tests/test_processor.py runs its conversations over this checkpoint too.)"""

from __future__ import annotations

import dataclasses
import re
import shutil

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import random_image, requires_torch
from qwen2vl_edge.runtime import InputError
from qwen2vl_edge.runtime.preprocess import PreprocessorConfig, process_image, process_video, smart_resize_clip
from qwen2vl_edge.runtime.processor import Processor
from qwen2vl_edge.runtime.rope import get_rope_index

pytestmark = requires_torch

user = lambda *content: {"role": "user", "content": list(content)}  # noqa: E731
text = lambda t: {"type": "text", "text": t}  # noqa: E731
image = lambda x, **kw: {"type": "image", "image": x, **kw}  # noqa: E731
video = lambda x, **kw: {"type": "video", "video": x, **kw}  # noqa: E731
TIMESTAMP = re.compile(r"<(\d+\.\d) seconds><\|vision_start\|>")


@pytest.fixture(scope="module")
def proc3(tiny_ckpt_3) -> Processor:
    return Processor.from_pretrained(tiny_ckpt_3)


# -- the checkpoint's files ---------------------------------------------------------------------

def test_the_tiny_checkpoint_loads_as_qwen3_in_both(tiny_ckpt_3, proc3, tmp_path):
    """transformers sees a Qwen3VLProcessor with the checkpoint's own limits; we read the same numbers from the
    files, and the template is Qwen3-VL's (no default system prompt), shipped and built in alike."""
    from reference import hf_processor

    ref = hf_processor(str(tiny_ckpt_3))
    assert type(ref).__name__ == "Qwen3VLProcessor" and type(ref.video_processor).__name__ == "Qwen3VLVideoProcessor"
    pp = proc3.preprocessor
    assert (pp.min_pixels, pp.max_pixels) == (ref.image_processor.size.shortest_edge,
                                              ref.image_processor.size.longest_edge) == (65536, 16777216)
    limits = pp.video_limits
    assert (limits.min_pixels, limits.max_pixels) == (ref.video_processor.size.shortest_edge,
                                                      ref.video_processor.size.longest_edge) == (4096, 25165824)
    assert limits.clip_budget and pp.factor == 32 and pp.image_mean == pp.image_std == (0.5, 0.5, 0.5)
    conv = [user(text("Hi"))]
    expected = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert proc3.prompt(conv) == ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == expected
    bare = shutil.copytree(tiny_ckpt_3, tmp_path / "no-template", ignore=shutil.ignore_patterns("chat_template.*"))
    assert Processor.from_pretrained(bare).prompt(conv) == expected  # the built-in fallback of the family


# -- pixels and grids ---------------------------------------------------------------------------

@pytest.mark.parametrize("size,opts", [
    ((120, 90), {}), ((200, 300), {}), ((13, 9), {}), ((256, 256), {}), ((640, 480), {}), ((1000, 700), {}),
    ((3000, 16), {}), ((640, 480), {"max_pixels": 64 * 32 * 32}), ((100, 80), {"min_pixels": 128 * 32 * 32}),
    ((500, 400), {"resized_height": 280, "resized_width": 420}),
])
def test_images_match_the_reference_bit_for_bit(tiny_ckpt_3, size, opts):
    """qwen-vl-utils at factor 32, then the PIL image processor with the checkpoint's 65536-pixel minimum (which
    grows the small ones a second time)."""
    from reference import ref_image

    w, h = size
    img = random_image(np.random.default_rng(w * 10_000 + h), w, h)
    ref_pixels, ref_grid = ref_image(tiny_ckpt_3, {"image": img.copy(), **opts})
    pixels, grid = process_image(img, preprocessor=PreprocessorConfig.from_file(tiny_ckpt_3), **opts)
    assert grid == tuple(ref_grid[0])
    np.testing.assert_allclose(pixels, ref_pixels, atol=1e-6, rtol=0)


@pytest.mark.parametrize("nframes", [1, 2, 3, 5])
def test_frame_lists_match_the_reference(tiny_ckpt_3, nframes):
    """384 x 384 frames: multiples of 64 (qwen-vl-utils fits listed frames to 2 x factor) inside the video
    budgets, so neither side resamples and the pixels agree exactly."""
    from reference import ref_video

    rng = np.random.default_rng(nframes)
    frames = [random_image(rng, 384, 384) for _ in range(nframes)]
    ref_pixels, ref_grid = ref_video(tiny_ckpt_3, {"video": [f.copy() for f in frames]})
    pixels, grid = process_video(frames, preprocessor=PreprocessorConfig.from_file(tiny_ckpt_3))
    assert grid == tuple(ref_grid[0]) == (-(-nframes // 2) * 2 // 2, 24, 24)
    np.testing.assert_allclose(pixels, ref_pixels, atol=1e-6, rtol=0)


@settings(max_examples=300, deadline=None)
@given(groups=st.integers(1, 400), h=st.integers(1, 60), w=st.integers(1, 60))
def test_the_clip_budget_matches_the_video_processor(tiny_ckpt_3, groups, h, w):
    """The second resize of `frames` frames of a qwen-vl-utils size (multiples of 32): Qwen3VLVideoProcessor caps
    each frame at 768 tokens and at an even share of the clip's 25165824 pixels (long clips shrink)."""
    from reference import hf_video_processor
    from qwen2vl_edge.runtime.preprocess import _processor_video_size

    frames, height, width = 2 * groups, 32 * h, 32 * w
    if max(h, w) / min(h, w) > 200:
        return
    pp = PreprocessorConfig.from_file(tiny_ckpt_3)
    rh, rw = _processor_video_size(height, width, frames, pp)
    ref = hf_video_processor(str(tiny_ckpt_3)).get_num_of_video_patches(frames, height, width,
                                                                         {"cap_pixels_per_frame": True})
    assert groups * (rh // 16) * (rw // 16) == ref


@settings(max_examples=300, deadline=None)
@given(t=st.integers(2, 800), h=st.integers(1, 4000), w=st.integers(1, 4000), lo=st.integers(1, 20000),
       span=st.integers(0, 200_000))
def test_smart_resize_clip_matches_transformers(t, h, w, lo, span):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize as hf

    if max(h, w) / min(h, w) > 100:  # the reference scales a side under 32 up first; the ratio check follows
        return
    args = dict(temporal_factor=2, factor=32, min_pixels=lo * 32, max_pixels=(lo + span) * 32 * 32)
    assert smart_resize_clip(t, h, w, **args) == hf(t, h, w, **args)


# -- the video prompt ---------------------------------------------------------------------------

def _texts(proc3, ours: dict, ref: dict) -> tuple[str, str]:
    decode = lambda ids: proc3.tokenizer.decode(list(ids), skip_special_tokens=False)  # noqa: E731
    return decode(ours["input_ids"][0]), decode(ref["input_ids"][0].tolist())


def test_a_frame_list_is_written_frame_by_frame_with_its_timestamps(tiny_ckpt_3, proc3):
    """5 frames at sample_fps 4 (padded to 6): qwen-vl-utils' metadata gives frame i the time i / 4, and each
    group of two is shown at its mean, "<0.1 seconds>" (0.125), "<0.6 seconds>", "<1.1 seconds>", each group's
    pads in a vision start / end pair of their own (the template's wrapper replaced)."""
    from reference import ref_inputs

    rng = np.random.default_rng(5)
    conv = [user(video([random_image(rng, 140, 100) for _ in range(5)], sample_fps=4.0), text("What happens?"))]
    ours, ref = proc3(conv), ref_inputs(tiny_ckpt_3, [conv])
    ours_text, ref_text = _texts(proc3, ours, ref)
    assert TIMESTAMP.findall(ref_text) == ["0.1", "0.6", "1.1"]
    assert ours_text == ref_text
    np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"].numpy())
    np.testing.assert_array_equal(ours["video_grid_thw"], ref["video_grid_thw"].numpy())
    assert "second_per_grid_ts" not in ours and "second_per_grid_ts" not in ref
    tokens = int(np.prod(ours["video_grid_thw"][0, 1:])) // 4
    pads = re.escape("<|video_pad|>")
    assert len(re.findall(rf"<\|vision_start\|>(?:{pads}){{{tokens}}}<\|vision_end\|>", ours_text)) == 3


@pytest.fixture(scope="module")
def clip_384(tmp_path_factory):
    """48 frames at 12 fps, 384 x 384: inside the video budgets at factor 32, so nothing is resampled."""
    from test_video import write_video

    return write_video(tmp_path_factory.mktemp("video3") / "clip384.mp4", 48, 12, size=(384, 384))


def test_a_video_file_takes_its_timestamps_from_its_metadata(tiny_ckpt_3, proc3, clip_384, monkeypatch):
    """4 frames sampled, indices linspace(0, 47, 4).round() = 0, 16, 31, 47 at the file's 12 fps: groups at
    (0 + 16) / 24 s and (31 + 47) / 24 = 3.25 s, which Python writes "3.2" (half to even) as transformers does."""
    torchvision = pytest.importorskip("torchvision")
    from reference import ref_inputs
    from test_video import _read_whole_video

    monkeypatch.setattr(torchvision.io, "read_video", _read_whole_video, raising=False)
    conv = [user(video(str(clip_384), nframes=4), text("What happens?"))]
    ours, meta = proc3.encode(conv)
    ref = ref_inputs(tiny_ckpt_3, [conv])
    ours_text, ref_text = _texts(proc3, ours, ref)
    assert TIMESTAMP.findall(ref_text) == ["0.7", "3.2"]
    assert ours_text == ref_text
    np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"].numpy())
    np.testing.assert_array_equal(ours["video_grid_thw"], ref["video_grid_thw"].numpy())
    np.testing.assert_allclose(ours["pixel_values_videos"], ref["pixel_values_videos"].numpy(), atol=1e-6, rtol=0)
    assert meta[0]["video_timestamps"] == [pytest.approx([0, 16 / 12, 31 / 12, 47 / 12])]


# -- M-RoPE -------------------------------------------------------------------------------------

def _rope_cases():
    rng = np.random.default_rng(11)
    frames = lambda n, w, h: [random_image(rng, w, h) for _ in range(n)]  # noqa: E731
    return {
        "text": [[user(text("Hello there, how are you?"))]],
        "image": [[user(image(random_image(rng, 300, 200)), text("Describe."))]],
        "video": [[user(video(frames(6, 160, 96)), text("What happens?"))]],
        "image+video": [[user(text("Look:"), image(random_image(rng, 90, 120)), video(frames(4, 100, 140)),
                              text("and"), image(random_image(rng, 400, 100)))]],
        "left-padded batch": [[user(text("Hi"))],
                              [user(video(frames(3, 128, 128)), text("then"), image(random_image(rng, 64, 64)))],
                              [user(image(random_image(rng, 200, 300)), video(frames(2, 96, 160)))]],
    }


@pytest.mark.parametrize("case", list(_rope_cases()))
def test_mrope_positions_match_get_rope_index(tiny_ckpt_3, proc3, case):
    """Our positions from the reference's own ids and grids, and from our processor's, against transformers'; a
    video's frame groups are runs of their own, and Qwen2-VL's rule (one run of t groups) cannot read them."""
    from reference import ref_inputs, ref_rope_index

    batch = _rope_cases()[case]
    ref = ref_inputs(tiny_ckpt_3, batch)
    pos, deltas = ref_rope_index(tiny_ckpt_3, ref)
    arrays = [ref[k].numpy() if k in ref else None
              for k in ("input_ids", "attention_mask", "image_grid_thw", "video_grid_thw")]
    ours = get_rope_index(*arrays, proc3.config)
    np.testing.assert_array_equal(ours[0], pos)
    np.testing.assert_array_equal(ours[1], deltas)
    mine = proc3(batch)
    np.testing.assert_array_equal(mine["position_ids"], pos)
    np.testing.assert_array_equal(mine["rope_deltas"], deltas)
    if case == "left-padded batch":
        assert (mine["attention_mask"] == 0).any()
    if arrays[3] is not None:
        qwen2_rule = dataclasses.replace(proc3.config, model_type="qwen2_vl")
        with pytest.raises(InputError, match="placeholder tokens"):
            get_rope_index(*arrays, qwen2_rule)


# -- vision features in placeholder order ---------------------------------------------------------

class _LabelBackend:
    """Stands in for the encoder only: item k's features are k * 1000 + its frame index, so the joined order
    shows which item and frame each placeholder gets."""

    def __init__(self):
        self.calls = 0

    def vision(self, pixels, grid_inputs):
        F, S, _ = pixels.shape
        out = np.broadcast_to((self.calls * 1000 + np.arange(F))[:, None, None], (F, S // 4, 1))
        self.calls += 1
        return out

    def join(self, features):
        return np.concatenate([f.reshape(-1) for f in features])


def test_vision_features_follow_the_frame_runs(proc3):
    """One encoder run per image and per video; a video's frame groups, each a run of its own with timestamp
    text between, get its features frame by frame; a batch is placed row-major."""
    from types import SimpleNamespace

    from qwen2vl_edge.runtime.pipeline import Qwen2VLPipeline

    rng = np.random.default_rng(2)
    frames = lambda n: [random_image(rng, 96, 64) for _ in range(n)]  # noqa: E731
    batch = [[user(video(frames(4)), text("and"), image(random_image(rng, 64, 64)))],
             [user(image(random_image(rng, 96, 96)), video(frames(6)), video(frames(2)))]]
    inputs = proc3(batch)
    backend = _LabelBackend()
    pipe = SimpleNamespace(artifact=SimpleNamespace(config=proc3.config), backend=backend)
    joined = Qwen2VLPipeline.vision_features(pipe, inputs)
    assert backend.calls == 5  # 2 images, then 3 videos: once each
    runs = [(int(k), s, e) for row in inputs["input_ids"] for k, s, e in _vision_runs(row, proc3.config)]
    # images are calls 0, 1; videos 2, 3, 4; row 0: video 2 (2 groups), image 0; row 1: image 1, videos 3 (3), 4 (1)
    expected_items = [2000, 2001, 0, 1000, 3000, 3001, 3002, 4000]
    assert len(runs) == len(expected_items)
    expected = np.concatenate([np.full(e - s, item) for (_, s, e), item in zip(runs, expected_items)])
    np.testing.assert_array_equal(joined, expected)


def _vision_runs(ids, config):
    from qwen2vl_edge.runtime.rope import runs, token_types

    return [r for r in runs(token_types(ids, config)) if r[0]]


# -- chat sessions and tools over Qwen3-VL's template ---------------------------------------------

@pytest.fixture
def qwen3_prompts(family_pipe):
    """The tiny Qwen3-VL pipeline with a tool format (None: the family's own, hermes)."""
    from qwen2vl_edge.runtime import Qwen2VLPipeline

    p = family_pipe("qwen3_vl", "portable")
    return lambda tool_format=None: Qwen2VLPipeline(p.artifact, p.processor, p.backend, tool_format)


def _cached_text(session) -> str:
    return session.pipe.processor.decode(session.token_ids, skip_special_tokens=False)


def test_a_chat_session_holds_what_qwen3_renders(tiny_ckpt_3, qwen3_prompts):
    """The cache holds the conversation as Qwen3VLProcessor renders it (no system prompt added), replies as
    generated, and each greedy reply is transformers' reply to exactly those ids."""
    from test_session import N, _reference_ids, _reference_reply

    session = qwen3_prompts().chat(max_new_tokens=N, min_new_tokens=N)
    messages, replies = [], []
    for question in ("Hello there!", "Tell me more about the sea."):
        messages.append({"role": "user", "content": question})
        prompt, out = _reference_ids(tiny_ckpt_3, messages, replies, generation_prompt=True)
        assert prompt[:len(session.token_ids)] == session.token_ids, "the cache must be a prefix of the next prompt"
        result = session.send(question)
        ref = _reference_reply(tiny_ckpt_3, prompt, out)
        assert len(set(ref)) > N // 2, "reference reply degenerate: parity would prove nothing"
        assert result.token_ids == ref
        replies.append(result.token_ids)
        messages.append({"role": "assistant", "content": result.text})
        expected, _ = _reference_ids(tiny_ckpt_3, messages, replies, generation_prompt=False)
        assert session.token_ids == expected
    assert _cached_text(session).startswith("<|im_start|>user\nHello there!")  # no default system prompt


@pytest.mark.parametrize("tool_format", ["qwen", "hermes"])
def test_tool_calls_and_results_in_a_qwen3_session(qwen3_prompts, tool_format):
    """A forced call, its result, a free reply: each turn reuses the cache, which holds what the Qwen3-VL template
    renders of the conversation."""
    from qwen2vl_edge.runtime import chat
    from test_agents import TOOLS, _check_calls

    agent = qwen3_prompts(tool_format)
    session = agent.chat(system="You drive a robot arm.", tools=TOOLS, max_new_tokens=60)
    first = session.send("Pick up the cube.", tool_choice="required", parallel_tool_calls=False)
    _check_calls(first)
    second = session.send(tool_results=[{"tool_call_id": first.tool_calls[0].id, "content": "done"}],
                          tool_choice="none", max_new_tokens=6)
    assert second.usage["cached_prompt_tokens"] == first.usage["prompt_tokens"] + len(first.token_ids) - 1
    rendered = session._render(session._messages, False).replace(chat.BOUNDARY, "")
    assert _cached_text(session) == rendered and rendered.startswith("<|im_start|>system\nYou drive a robot arm.")
