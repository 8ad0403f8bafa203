"""Pixel patches and grids vs the seed pipeline (qwen-vl-utils + transformers' processors)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from conftest import random_image, requires_torch
from qwen2vl_edge.runtime.preprocess import (
    CLIP_MEAN, CLIP_STD, PreprocessorConfig, process_image, process_video, smart_resize,
)

pytestmark = requires_torch


def _image_cases():
    rng = np.random.default_rng(7)
    cases = []
    for i in range(20):  # random sizes from 28x28 to 2000x1500
        w, h = int(rng.integers(28, 2001)), int(rng.integers(28, 1501))
        cases.append((f"random{i}-{w}x{h}", (w, h, "RGB"), {}))
    cases += [
        ("tiny-28", (28, 28, "RGB"), {}),
        ("below-factor", (13, 9, "RGB"), {}),
        ("wide-extreme", (3000, 16, "RGB"), {}),
        ("tall-extreme", (20, 3900, "RGB"), {}),
        ("grayscale", (333, 217, "L"), {}),
        ("rgba", (256, 190, "RGBA"), {}),
        ("palette", (301, 199, "P"), {}),
        ("gray-alpha", (150, 160, "LA"), {}),
        ("custom-min", (64, 48, "RGB"), {"min_pixels": 256 * 28 * 28}),
        ("custom-max", (1800, 1200, "RGB"), {"max_pixels": 64 * 28 * 28}),
        ("custom-both", (640, 480, "RGB"), {"min_pixels": 100 * 28 * 28, "max_pixels": 200 * 28 * 28}),
        ("resized-hw", (500, 400, "RGB"), {"resized_height": 280, "resized_width": 420}),
        ("resized-odd", (500, 400, "RGB"), {"resized_height": 99, "resized_width": 301}),
    ]
    return cases


@pytest.mark.parametrize("name,shape,opts", _image_cases(), ids=[c[0] for c in _image_cases()])
def test_image_matches_reference(tiny_ckpt, name, shape, opts):
    from reference import ref_image

    w, h, mode = shape
    image = random_image(np.random.default_rng(zlib.crc32(name.encode())), w, h, mode)  # same every run
    ref_pixels, ref_grid = ref_image(tiny_ckpt, {"image": image.copy(), **opts})
    pixels, grid = process_image(image, preprocessor=PreprocessorConfig.from_file(tiny_ckpt), **opts)
    assert tuple(ref_grid[0]) == grid
    assert pixels.shape == ref_pixels.shape and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels, ref_pixels, atol=1e-6, rtol=0)


def _levels(pixels: np.ndarray) -> np.ndarray:
    """Undo CLIP normalisation of [N, 3*2*14*14] patches -> 8-bit levels."""
    x = pixels.reshape(-1, 3, 2 * 14 * 14)
    return (x * np.asarray(CLIP_STD)[None, :, None] + np.asarray(CLIP_MEAN)[None, :, None]) * 255


@pytest.mark.parametrize("nframes", range(1, 10))
def test_video_frames_without_resampling_match_exactly(tiny_ckpt, nframes):
    from reference import ref_video

    rng = np.random.default_rng(nframes)
    frames = [random_image(rng, 336, 336) for _ in range(nframes)]  # multiple of 56, within the video budget
    ref_pixels, ref_grid = ref_video(tiny_ckpt, {"video": [f.copy() for f in frames]})
    pixels, grid = process_video(frames, preprocessor=PreprocessorConfig.from_file(tiny_ckpt))
    assert tuple(ref_grid[0]) == grid
    np.testing.assert_allclose(pixels, ref_pixels, atol=1e-6, rtol=0)


@pytest.mark.parametrize("nframes,size,opts", [
    (1, (250, 180), {}), (2, (640, 360), {}), (3, (97, 130), {}), (4, (500, 500), {"max_pixels": 160 * 28 * 28}),
    (5, (300, 200), {"min_pixels": 64 * 28 * 28}), (6, (222, 333), {"total_pixels": 2000 * 28 * 28}),
    (7, (180, 120), {}), (8, (420, 260), {"resized_height": 150, "resized_width": 200}), (9, (128, 128), {}),
])
def test_video_frames_with_resampling_close(tiny_ckpt, nframes, size, opts):
    from reference import ref_video

    rng = np.random.default_rng(100 + nframes)
    frames = [random_image(rng, *size) for _ in range(nframes)]
    ref_pixels, ref_grid = ref_video(tiny_ckpt, {"video": [f.copy() for f in frames], **opts})
    pixels, grid = process_video(frames, preprocessor=PreprocessorConfig.from_file(tiny_ckpt), **opts)
    assert tuple(ref_grid[0]) == grid
    diff = np.abs(_levels(pixels) - _levels(ref_pixels))
    print(f"video {nframes}x{size}: mean {diff.mean():.3f} max {diff.max():.2f} levels")
    assert diff.mean() <= 0.5 and diff.max() <= 8


@settings(max_examples=300, deadline=None)
@given(h=st.integers(1, 8000), w=st.integers(1, 8000), lo=st.integers(1, 4000), span=st.integers(0, 20000))
def test_smart_resize_matches_both_references(h, w, lo, span):
    from qwen_vl_utils.vision_process import smart_resize as qvu
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf

    assume(max(h, w) / min(h, w) <= 200)  # both references refuse a larger aspect ratio
    lo_px, hi_px = lo * 28, (lo + span) * 28 * 28 + lo * 28
    assert smart_resize(h, w, 28, lo_px, hi_px) == qvu(h, w, 28, lo_px, hi_px)
    assert smart_resize(h, w, 28, lo_px, hi_px, floor_to_factor=False) == hf(h, w, 28, lo_px, hi_px)
