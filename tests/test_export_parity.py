"""The exported graphs, run by the NumPy runtime, against transformers on tiny random checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import TARGET_OPTIONS, assert_varied, random_image, requires_torch

pytestmark = requires_torch


def _user(*content):
    return [{"role": "user", "content": list(content)}]


def _img(x):
    return {"type": "image", "image": x}


def _video(frames, **options):
    return {"type": "video", "video": frames, **options}


def _text(t):
    return {"type": "text", "text": t}


@pytest.fixture(scope="module")
def convs():
    """Videos use 336x336 frames: multiples of 56 inside the video budget, so no resampling and the
    reference's torchvision pixels equal ours exactly (resampled frames are covered in test_preprocess).
    The 8-frame videos (four temporal groups of 12 x 14 merged tokens, partial windows) stand for 2, 4 and 3 fps:
    Qwen2.5-VL's temporal ids step by tokens_per_second * 1, 0.5 and 2/3 seconds."""
    rng = np.random.default_rng(11)
    im = lambda w, h: random_image(rng, w, h)  # noqa: E731
    frames = lambda n: [random_image(rng, 336, 336) for _ in range(n)]  # noqa: E731
    rng8 = np.random.default_rng(12)
    frames8 = [random_image(rng8, 392, 336) for _ in range(8)]  # one clip at three frame rates
    return {
        "text": _user(_text("Tell me a story about a robot.")),
        "one-image": _user(_img(im(320, 240)), _text("Describe this image.")),
        "three-images": _user(_img(im(200, 300)), _img(im(448, 448)), _text("and"), _img(im(150, 90)),
                              _text("Compare them.")),
        "video": _user(_video(frames(4)), _text("What happens?")),
        "image-video": _user(_img(im(280, 210)), _video(frames(2)), _text("Relate them.")),
        "other-image": _user(_img(im(320, 240)), _text("Describe this image.")),
        "video-spg-1": _user(_video(frames8, sample_fps=2.0), _text("What happens?")),
        "video-spg-half": _user(_video(frames8, sample_fps=4.0), _text("What happens?")),
        "video-spg-two-thirds": _user(_video(frames8, sample_fps=3.0), _text("What happens?")),
        # Qwen3-VL's processor resizes again (torchvision, up to 2 levels from Pillow's pixels) an image that
        # qwen-vl-utils leaves under its 65,536-pixel floor, and a video frame under 128 tokens: these stay above,
        # at multiples of 32 (test_qwen3_front covers the resampled sizes)
        "three-images-q3": _user(_img(im(256, 320)), _img(im(448, 448)), _text("and"), _img(im(352, 224)),
                                 _text("Compare them.")),
        "video-q3": _user(_video([random_image(rng, 384, 384) for _ in range(4)]), _text("What happens?")),
        "image-video-q3": _user(_img(im(320, 256)), _video([random_image(rng, 384, 416) for _ in range(2)]),
                                _text("Relate them.")),
    }


def _vision_reference(ckpt, pixel_values, grid):
    import torch

    from reference import hf_model

    with torch.no_grad():
        out = hf_model(str(ckpt)).model.visual(torch.from_numpy(pixel_values), grid_thw=torch.from_numpy(grid))
    return out.pooler_output.numpy()


VISION_CASES = [("qwen2_vl", case, "portable") for case in ("one-image", "three-images", "video6")] + [
    ("qwen2_5_vl", case, target) for case in ("merged-5x6", "merged-4x8", "three-images", "video6")
    for target in ("portable", "ort-cpu", "tensorrt-10.3", "tensorrt-10.15")]  # the fp32 graphs
VISION_IMAGES = {"one-image": [(333, 250)], "three-images": [(100, 80), (420, 300), (56, 300)],
                 # Qwen2.5-VL's windows (4 x 4 merged tokens): cut by the grid's edge, and dividing it evenly
                 "merged-5x6": [(168, 140)], "merged-4x8": [(224, 112)]}


@pytest.mark.parametrize("family, case, target", VISION_CASES)
def test_vision_features_match(family_ckpt, family_pipe, family, case, target):
    rng = np.random.default_rng(5)
    if case == "video6":
        conv = _user(_video([random_image(rng, 168, 112) for _ in range(6)]), _text("?"))
    else:
        conv = _user(*[_img(random_image(rng, w, h)) for w, h in VISION_IMAGES[case]])
    pipe = family_pipe(family, target)
    inputs = pipe.processor(conv)
    key, grid_key = ("pixel_values_videos", "video_grid_thw") if case == "video6" else ("pixel_values",
                                                                                        "image_grid_thw")
    if case.startswith("merged"):
        assert [tuple(g[1:] // 2) for g in inputs[grid_key]] == [tuple(map(int, case[7:].split("x")))]
    ours = pipe.vision_features(inputs)
    ref = _vision_reference(family_ckpt(family), inputs[key], inputs[grid_key])
    assert ours.shape == ref.shape
    assert np.abs(np.diff(ref, axis=0)).max(axis=1).min() > 1e-3, "reference features degenerate: rows repeat"
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f"vision {case}: max relative error {rel:.2e}")
    assert rel <= 1e-4


def test_logits_prefill_and_decode_steps_match(tiny_ckpt, pipe, convs):
    import torch

    from reference import hf_model, ref_rope_index
    from qwen2vl_edge.runtime.generation import StepTimes, decode_step, prefill

    model = hf_model(str(tiny_ckpt))
    inputs = pipe.processor(convs["three-images"])
    embeds = pipe.backend.merge(inputs["input_ids"], pipe.vision_features(inputs))
    logits, state = prefill(pipe.backend, embeds, inputs, StepTimes())
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items() if k not in ("position_ids", "rope_deltas")}
    # positions as transformers' generate() makes them: get_rope_index, then +1 per new token on every row
    ref_pos, _ = ref_rope_index(tiny_ckpt, t)
    with torch.no_grad():
        out = model(**t, position_ids=torch.from_numpy(ref_pos), use_cache=True)
        diffs = [np.abs(out.logits[:, -1].numpy() - logits).max()]
        cache, mask, chosen = out.cache, t["attention_mask"], []
        for step in range(1, 6):
            token = logits.argmax(-1)
            chosen.append(int(token[0]))
            logits = decode_step(pipe.backend, state, token)
            mask = torch.cat([mask, torch.ones((1, 1), dtype=mask.dtype)], dim=1)
            pos = torch.from_numpy(ref_pos[:, :, -1:] + step)
            out = model(input_ids=torch.from_numpy(token[:, None]), attention_mask=mask, cache=cache,
                        position_ids=pos, use_cache=True)
            cache = out.cache
            diffs.append(np.abs(out.logits[:, -1].numpy() - logits).max())
    print("logit max abs diff per step:", [f"{d:.1e}" for d in diffs])
    assert_varied(chosen, "greedy tokens fed back")
    assert max(diffs) <= 1e-4


_REFERENCE: dict = {}


def _reference_generate(ckpt, conversations, n, key=None):
    """transformers' greedy tokens; `key` (the case's name) keeps them for the other targets' runs."""
    from reference import hf_model, ref_inputs

    if key is not None and (str(ckpt), key, n) in _REFERENCE:
        return _REFERENCE[str(ckpt), key, n]
    inputs = ref_inputs(ckpt, conversations)
    out = hf_model(str(ckpt)).generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    tokens = [row[inputs["input_ids"].shape[1]:].tolist() for row in out]
    if key is not None:
        _REFERENCE[str(ckpt), key, n] = tokens
    return tokens


N_NEW = 32
# the graphs under test: portable, and the tensorrt target's fp32 graphs for each TensorRT floor, run by
# ONNX Runtime (the very files TensorRT would be given); Qwen2-VL's ort-cpu generation is test_quantized's
TARGETS = ["portable", "tensorrt-10.3", "tensorrt-10.15"]
FAMILY_TARGETS = {"qwen2_vl": TARGETS, **{f: ["portable", "ort-cpu", "tensorrt-10.3", "tensorrt-10.15"]
                                           for f in ("qwen2_5_vl", "qwen3_vl")}}
assert all(t in TARGET_OPTIONS for targets in FAMILY_TARGETS.values() for t in targets)
CASES = ["text", "one-image", "three-images", "video", "image-video"]
FAMILY_CASES = {"qwen2_vl": CASES, "qwen2_5_vl": CASES + ["video-spg-1", "video-spg-half", "video-spg-two-thirds"],
                "qwen3_vl": ["text", "one-image", "three-images-q3", "video-q3", "image-video-q3"]}
BATCH = {"qwen2_vl": ["text", "three-images", "image-video"], "qwen2_5_vl": ["text", "three-images", "image-video"],
         "qwen3_vl": ["text", "three-images-q3", "image-video-q3"]}


@pytest.mark.parametrize("family, target, name", [(f, t, n) for f, targets in FAMILY_TARGETS.items()
                                                  for t in targets for n in FAMILY_CASES[f]])
def test_greedy_generation_token_identical(family_ckpt, family_pipe, convs, family, name, target):
    ours = family_pipe(family, target).generate(convs[name], max_new_tokens=N_NEW, min_new_tokens=N_NEW)
    ref = _reference_generate(family_ckpt(family), [convs[name]], N_NEW, key=name)[0]
    assert_varied(ref)
    assert ours.token_ids == ref
    assert ours.finish_reason == "length" and ours.usage["completion_tokens"] == N_NEW


def test_qwen25_video_reply_follows_its_frame_rate(tiny_ckpt_25, convs):
    """One clip at 2, 4 and 3 fps: only the temporal ids differ, and transformers' replies differ with them, so
    the parity cases above tell timed positions from Qwen2-VL's one-id-per-group."""
    replies = [tuple(_reference_generate(tiny_ckpt_25, [convs[name]], N_NEW, key=name)[0])
               for name in ("video-spg-1", "video-spg-half", "video-spg-two-thirds")]
    assert len(set(replies)) == 3


@pytest.mark.parametrize("family, target", [(f, t) for f, targets in FAMILY_TARGETS.items() for t in targets])
def test_batch_with_left_padding_token_identical(family_ckpt, family_pipe, convs, family, target):
    batch = [convs[name] for name in BATCH[family]]
    ours = family_pipe(family, target).generate(batch, max_new_tokens=N_NEW, min_new_tokens=N_NEW)
    ref = _reference_generate(family_ckpt(family), batch, N_NEW, key="batch")
    for row in ref:
        assert_varied(row)
    assert [r.token_ids for r in ours] == ref
    lengths = {r.usage["prompt_tokens"] for r in ours}
    assert len(lengths) == 3, "the batch must mix prompt lengths to exercise left padding"


def test_output_follows_the_image(pipe, convs):
    """Guards against a degenerate checkpoint where any pipeline agrees with any other."""
    a = pipe.generate(convs["one-image"], max_new_tokens=8, min_new_tokens=8).token_ids
    b = pipe.generate(convs["other-image"], max_new_tokens=8, min_new_tokens=8).token_ids
    assert a != b


@pytest.mark.parametrize("target", TARGETS)
def test_untied_v5_layout_and_other_mrope_section(tiny_ckpt_v5, pipe_v5, trt_pipe, convs, target):
    ours_pipe = pipe_v5 if target == "portable" else trt_pipe(min_tensorrt=target.split("-")[1], ckpt="v5")
    assert not ours_pipe.artifact.config.tie_word_embeddings
    assert ours_pipe.artifact.config.text.mrope_section == (4, 2, 2)
    for name in ("one-image", "image-video"):
        ours = ours_pipe.generate(convs[name], max_new_tokens=N_NEW, min_new_tokens=N_NEW)
        ref = _reference_generate(tiny_ckpt_v5, [convs[name]], N_NEW, key=name)[0]
        assert_varied(ref)
        assert ours.token_ids == ref


def test_all_logits_export_gives_every_position(tiny_ckpt, workdir, pipe, convs):
    from conftest import export_artifact
    from qwen2vl_edge.runtime import Qwen2VLPipeline

    art = export_artifact(tiny_ckpt, workdir / "art-all-logits", all_logits=True)
    full = Qwen2VLPipeline.load(art)
    inputs = full.processor(convs["one-image"])
    embeds = full.backend.merge(inputs["input_ids"], full.vision_features(inputs))
    sess = full.backend.sessions["decoder"]
    feeds = {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"],
             "position_ids": inputs["position_ids"]}
    feeds.update({n: np.zeros((1, 2, 0, 16), np.float32) for n in full.backend.past_names})
    logits = sess.run(["logits"], feeds)[0]
    assert logits.shape[1] == inputs["input_ids"].shape[1]
    ref = pipe.generate(convs["one-image"], max_new_tokens=8, min_new_tokens=8).token_ids
    assert_varied(ref)
    assert full.generate(convs["one-image"], max_new_tokens=8, min_new_tokens=8).token_ids == ref


# fp16 weights, fp32 compute: measured 2026-11-26 on the tiny checkpoint (see the printed figures); the floors sit
# below them. A wrong cast or a swapped table scores near 0 %.
FP16_TOP1, FP16_PREFIX = 0.9, 16  # measured: 100 %, 32 of 32


def test_fp16_export_runs_without_nan(tiny_ckpt, workdir, pipe, convs):
    from conftest import export_artifact
    from qwen2vl_edge.runtime import Qwen2VLPipeline
    from qwen2vl_edge.runtime.generation import StepTimes, prefill
    from test_quantized import _teacher_forced

    art = export_artifact(tiny_ckpt, workdir / "art-fp16", dtype="fp16")
    half = Qwen2VLPipeline.load(art)
    inputs = half.processor(convs["one-image"])
    logits, _ = prefill(half.backend, half.backend.merge(inputs["input_ids"], half.vision_features(inputs)), inputs,
                        StepTimes())
    assert np.isfinite(logits).all()
    a = half.generate(convs["one-image"], max_new_tokens=N_NEW, min_new_tokens=N_NEW).token_ids
    b = pipe.generate(convs["one-image"], max_new_tokens=N_NEW, min_new_tokens=N_NEW).token_ids
    assert_varied(b)
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    top1 = _teacher_forced(half, b, convs["one-image"])
    print(f"fp16 vs fp32: first {same} of {N_NEW} greedy tokens agree, teacher-forced top-1 {top1:.0%}")
    assert top1 >= FP16_TOP1 and same >= FP16_PREFIX
    assert (workdir / "art-fp16" / "weights.data").stat().st_size < 0.6 * (
        workdir / "art-original" / "weights.data").stat().st_size


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("which", ["portable", "ort-cpu"])
def test_prefill_in_chunks_token_identical(family_ckpt, family_pipe, convs, which, family, monkeypatch):
    """The prompt run through the decoder 7 positions at a time (generation.prefill_chunks): transformers'
    tokens, as one run gives them. Portable: a batch whose left padding fills whole chunks of its shortest
    row; ort-cpu: one row (GroupQueryAttention takes a batch's prompt in one run)."""
    p = family_pipe(family, which)
    batch = [convs[name] for name in BATCH[family]] if which == "portable" else [convs[BATCH[family][1]]]
    assert p.backend.prefill_chunk(len(batch)) is not None, "chunked on this backend as it is"
    runs = []
    decode = p.backend.decode
    monkeypatch.setattr(p.backend, "prefill_chunk", lambda batch: 7)
    monkeypatch.setattr(p.backend, "decode", lambda embeds, *a: runs.append(embeds.shape[1]) or decode(embeds, *a))
    ours = p.generate(batch, max_new_tokens=N_NEW, min_new_tokens=N_NEW)
    ref = _reference_generate(family_ckpt(family), batch, N_NEW, key="batch" if len(batch) > 1 else BATCH[family][1])
    lengths = [r.usage["prompt_tokens"] for r in ours]
    assert runs[:-(N_NEW - 1)] == [7] * (max(lengths) // 7) + [max(lengths) % 7] * (max(lengths) % 7 > 0)
    assert len(batch) == 1 or max(lengths) - min(lengths) > 7, "a chunk of padding only"
    for row in ref:
        assert_varied(row)
    assert [r.token_ids for r in ours] == ref


def test_qwen3_reply_needs_its_deepstack_features(family_pipe, convs, monkeypatch):
    """Drop DeepStack, as a three-graph split that ignores it does, and the reply changes: the parity above could
    not pass with the features lost. The join hands the merger zeros in their place."""
    pipe = family_pipe("qwen3_vl", "portable")
    full = pipe.generate(convs["one-image"], max_new_tokens=N_NEW, min_new_tokens=N_NEW).token_ids
    join = pipe.backend.join

    def zeroed(features):
        vision_embeds, deepstack = join(features)
        return vision_embeds, np.zeros_like(deepstack)

    monkeypatch.setattr(pipe.backend, "join", zeroed)
    dropped = pipe.generate(convs["one-image"], max_new_tokens=N_NEW, min_new_tokens=N_NEW).token_ids
    assert_varied(full)
    assert dropped != full
