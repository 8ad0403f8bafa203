"""Property: whatever the caller passes (images of any mode and shape, pixel bounds, video frame lists,
generation options), the runtime answers with a result or one of its own errors, never a foreign exception."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import requires_torch
from qwen2vl_edge.runtime.errors import ArtifactError, ConfigError, InputError
from qwen2vl_edge.runtime.generation import GenerationOptions
from qwen2vl_edge.runtime.preprocess import process_image, process_video
from qwen2vl_edge.runtime.sampling import SamplingOptions, choose, distribution

OURS = (InputError, ArtifactError, ConfigError)
MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F", "LA", "La", "PA", "RGBX", "RGBa", "I;16"]

# numbers as callers get them wrong: negative, zero, huge, NaN, inf, strings, bools, None
values = st.one_of(st.none(), st.integers(-3, 3), st.integers(0, 10**7), st.just(10**30), st.booleans(),
                   st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["", "5", "abc"]))


def mostly_int(lo: int, hi: int, odd: int):
    return st.one_of(st.integers(lo, hi), st.integers(lo, hi), st.integers(lo, hi), st.just(odd))


@st.composite
def images(draw):
    h, w = draw(mostly_int(1, 96, 0)), draw(mostly_int(1, 96, 0))
    kind = draw(st.sampled_from(["array", "array", "pil", "pil", "pil", "other"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if kind == "other":
        return draw(st.sampled_from([None, 3, b"\x89PNG", "", "x" * 300, "file://nowhere/a.png", [1, 2]]))
    if kind == "pil":
        assume(h > 0 and w > 0)  # Pillow makes 0-pixel images only from nothing
        rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))
        mode = draw(st.sampled_from(MODES))
        if mode == "I;16":
            return Image.fromarray(rng.integers(0, 65536, (h, w), np.uint16))
        return rgb.convert("LA").convert("La") if mode == "La" else rgb.convert(mode)
    shape = draw(st.sampled_from([(h, w), (h, w, 3), (h, w, 3), (h, w, 4), (h, w, 1), (h, w, 5), (h,)]))
    dtype = draw(st.sampled_from([np.uint8, np.uint8, np.uint8, np.uint16, np.float32, bool]))
    return (rng.random(shape) * 255).astype(dtype)


def mostly(valid):
    """Two draws in three from the valid range, the third anything."""
    return st.one_of(valid, valid, values)


pixel_options = st.one_of(
    st.fixed_dictionaries({}, optional={"min_pixels": st.integers(0, 300_000),
                                        "max_pixels": st.integers(1, 2_000_000)}),
    st.fixed_dictionaries({"resized_height": st.integers(1, 2000), "resized_width": st.integers(1, 2000)}),
    st.fixed_dictionaries({}, optional={
        "min_pixels": mostly(st.integers(0, 300_000)), "max_pixels": mostly(st.integers(1, 2_000_000)),
        "resized_height": mostly(st.integers(1, 2000)), "resized_width": mostly(st.integers(1, 2000))}))


@settings(max_examples=150, deadline=None)
@given(image=images(), opts=pixel_options)
def test_images_and_pixel_options(image, opts):
    try:
        patches, (t, h, w) = process_image(image, **opts)
    except OURS as e:
        event(f"refused: {type(e).__name__}")  # --hypothesis-show-statistics shows the mix
        return
    event("accepted")
    assert t == 1 and patches.shape[0] == h * w and np.isfinite(patches).all()


frame = st.builds(lambda h, w, seed: np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8),
                  st.integers(8, 64), st.integers(8, 64), st.integers(0, 99))


@settings(max_examples=80, deadline=None)
@given(frames=st.one_of(frame.flatmap(lambda im: st.integers(1, 4).map(lambda n: [im] * n)),
                        images().flatmap(lambda im: st.integers(1, 4).map(lambda n: [im] * n)),
                        st.lists(images(), max_size=3), values, st.just("no/such/video.mp4")),
       opts=pixel_options, fps=st.one_of(st.none(), st.none(), values), nframes=st.one_of(st.none(), values),
       total=st.one_of(st.none(), mostly(st.integers(1, 10**6))))
def test_video_frame_lists_and_options(frames, opts, fps, nframes, total):
    assume(not isinstance(frames, str) or frames)  # a video file path is the decoding helper's: one is enough
    try:
        patches, (t, h, w) = process_video(frames, fps=fps, nframes=nframes, total_pixels=total, **opts)
    except OURS as e:
        event(f"refused: {type(e).__name__}")  # --hypothesis-show-statistics shows the mix
        return
    event("accepted")
    assert t >= 1 and patches.shape[0] == t * h * w


@st.composite
def generation_options(draw):
    """Valid options (extremes included), then in one case of two a field replaced by anything."""
    fields = {
        "max_new_tokens": draw(st.integers(1, 10**6)), "seed": draw(st.one_of(st.none(), st.integers(0, 2**70))),
        "stop": draw(st.lists(st.text(min_size=1, max_size=3), max_size=2).map(tuple)),
        "do_sample": draw(st.booleans()),
        "temperature": draw(st.floats(0, 1e6, exclude_min=True, allow_subnormal=True)),
        "top_k": draw(st.integers(0, 10**6)), "top_p": draw(st.floats(0, 1, exclude_min=True)),
        "repetition_penalty": draw(st.floats(0, 1e6, exclude_min=True, allow_subnormal=True)),
    }
    fields["min_new_tokens"] = draw(st.integers(0, min(fields["max_new_tokens"], 50)))
    if draw(st.booleans()):
        fields[draw(st.sampled_from(sorted(fields)))] = draw(values)
    sampling = SamplingOptions(*(fields.pop(k) for k in ("do_sample", "temperature", "top_k", "top_p",
                                                          "repetition_penalty")))
    return GenerationOptions(sampling=sampling, **fields)


@pytest.mark.filterwarnings("error::RuntimeWarning")  # an overflow is a silently wrong distribution
@settings(max_examples=200, deadline=None)
@given(opts=generation_options(), spread=st.floats(0.01, 30))
def test_generation_options(opts, spread):
    """Valid options must then give a proper distribution and sample without error on logits of any spread."""
    try:
        opts.validate()
    except OURS as e:
        event(f"refused: {type(e).__name__}")  # --hypothesis-show-statistics shows the mix
        return
    event("accepted")
    rng = np.random.default_rng(opts.seed)
    logits = (rng.standard_normal((2, 3000)) * spread).astype(np.float32)
    tokens = choose(logits, opts.sampling, rng, [np.arange(5), np.arange(3)])
    assert tokens.shape == (2,) and ((0 <= tokens) & (tokens < 3000)).all()
    ids, probs = distribution(logits[0], opts.sampling)
    assert np.isfinite(probs).all() and abs(probs.sum() - 1) < 1e-9 and len(ids) >= 1
    # the likeliest token survives (unless a huge temperature made every probability equal)
    assert logits[0, ids].max() == logits[0].max() or np.ptp(probs) == 0


@requires_torch
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(max_size=20), values, st.lists(st.text(max_size=3), max_size=2)),
       image=images(), kwargs=st.fixed_dictionaries({}, optional={
           "temperature": mostly(st.floats(0.1, 5)), "top_k": mostly(st.integers(0, 100)),
           "top_p": mostly(st.floats(0.1, 1)), "seed": mostly(st.integers(0, 100)), "stop": values}))
def test_pipeline_end_to_end(pipe, text, image, kwargs):
    conv = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]
    try:
        result = pipe.generate(conv, max_new_tokens=2, do_sample="temperature" in kwargs, **kwargs)
    except OURS as e:
        event(f"refused: {type(e).__name__}")  # --hypothesis-show-statistics shows the mix
        return
    event("accepted")
    assert isinstance(text, str) and 1 <= len(result.token_ids) <= 2
