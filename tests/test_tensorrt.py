"""TensorRT: everything that can be proven without a GPU, and the GPU parity suite (skipped without one)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from conftest import TRT_MAX_CONTEXT, assert_varied, requires_torch
from qwen2vl_edge.runtime import ArtifactError, InputError
from qwen2vl_edge.runtime.backends.trt_memory import kv_cache_bytes, memory_table, static_cache_table
from qwen2vl_edge.runtime.backends.trt_profiles import (
    DECODE, PREALLOCATED, PREFILL, Limits, check_request, check_shape, check_sidecar, decoder_profile, make_sidecar,
    profiles_for,
)
from qwen2vl_edge.runtime.config import parse_hf_config

# Qwen/Qwen2-VL-2B-Instruct's published config.json (the fields that matter here)
QWEN2VL_2B = {
    "model_type": "qwen2_vl", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": True,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
                      "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
}
CFG_2B = parse_hf_config(QWEN2VL_2B)
# Qwen/Qwen2-VL-7B-Instruct's config.json: where it differs from the 2B's
CFG_7B = parse_hf_config({**QWEN2VL_2B, "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
                          "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
                          "vision_config": {**QWEN2VL_2B["vision_config"], "hidden_size": 3584}})


def _gpu_trt_missing() -> str | None:
    """Why the GPU suite cannot run here (the exact cause, for the skip reason), or None when it can.
    Only the failures that mean "not this machine" are caught; anything else fails the collection."""
    if importlib.util.find_spec("tensorrt") is None:
        return ("needs TensorRT: not installed here (pip install 'tensorrt>=10.3,<12', the [trt] extra, on a machine "
                "with an NVIDIA GPU)")
    from qwen2vl_edge.runtime.backends.cuda import CudaError, gpu_identity

    try:
        gpu_identity()
    except ImportError as e:  # cuda-python missing
        return f"needs cuda-python: {e}"
    except CudaError as e:  # no driver or no device
        return f"needs a CUDA device: {e}"
    return None


GPU_TRT_MISSING = _gpu_trt_missing()
requires_gpu_trt = pytest.mark.skipif(GPU_TRT_MISSING is not None, reason=GPU_TRT_MISSING or "")


# -- profiles, buffers, sidecars, limits (plain Python) --------------------------------------------

def test_decoder_has_prefill_and_decode_profiles_from_limits():
    lim = Limits(max_prompt=1024, max_context=3000, max_batch=2)
    prefill, decode = (profiles_for("decoder", CFG_2B, lim)[i] for i in (PREFILL, DECODE))
    assert prefill["inputs_embeds"] == ((1, 1, 1536), (1, 1024, 1536), (2, 1024, 1536))
    # a chat session's later turn prefills after a past; the profile is tuned for none
    assert prefill["past_key_values.0.key"] == ((1, 2, 0, 128), (1, 2, 0, 128), (2, 2, 2999, 128))
    assert prefill["attention_mask"] == ((1, 1), (1, 1024), (2, 3000))
    assert decode["inputs_embeds"][0][1] == decode["inputs_embeds"][2][1] == 1
    assert decode["past_key_values.27.value"][2] == (2, 2, 2999, 128)
    assert decode["attention_mask"][2] == (2, 3000)
    assert len(prefill) == 3 + 2 * 28
    for profile in (prefill, decode):
        for lo, opt, hi in profile.values():
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))


def test_vision_and_merger_profiles_follow_image_limits():
    vision = profiles_for("vision_encoder", CFG_2B, Limits(max_image_tokens=256, max_frames=8))[0]
    assert vision["pixel_values"][2] == (4, 1024, 1176)  # 8 frames = 4 temporal slices; 256 tokens = 1024 patches
    assert vision["rotary_cos"][2] == (1024, 80)
    merger = profiles_for("embedding_merger", CFG_2B, Limits(max_prompt=512))[0]
    assert merger["vision_embeds"][0] == (0, 1536) and merger["input_ids"][2] == (1, 512)


def test_limits_are_validated():
    with pytest.raises(ValueError, match="--max-prompt"):
        profiles_for("decoder", CFG_2B, Limits(max_prompt=4096, max_context=4096))
    with pytest.raises(ValueError, match="--max-batch"):
        Limits(max_batch=0).validate()


def test_kv_cache_bytes():
    # Qwen2-VL-2B holds 28 layers x (k, v) x 2 kv heads x 128 dims = 14336 values per token; concat
    # graphs need two buffer sets (past in one, present written to the other), preallocated ones one.
    assert kv_cache_bytes(CFG_2B, 1, 4096, "float16") == 2 * 14336 * 2 * 4096
    assert kv_cache_bytes(CFG_2B, 2, 4096, "float32") == 2 * 14336 * 4 * 4096 * 2
    assert kv_cache_bytes(CFG_2B, 1, 4096, "float16", PREALLOCATED) == 14336 * 2 * 4096


def test_preallocated_decoder_profiles_bind_the_whole_buffer():
    """10.15's cache has a static length (KVCacheUpdate needs one): both profiles fix it at the max context."""
    lim = Limits(max_prompt=1024, max_context=3000)
    prefill, decode = profiles_for("decoder", CFG_2B, lim, PREALLOCATED)
    for p in (prefill, decode):
        assert p["past_key_values.0.key"][0] == (1, 2, 3000, 128) and p["past_key_values.0.key"][2] == (1, 2, 3000, 128)
    assert prefill["attention_mask"][2] == decode["attention_mask"][2] == (1, 3000)  # prefill after a past too


def test_decoder_profile_is_chosen_by_the_run_not_by_an_empty_cache():
    """One token after a past: decode; a prompt, or a chat session's later turn (L > 1 after P > 0): prefill;
    and each choice's profile takes that run's shapes."""
    lim = Limits(max_prompt=1024, max_context=3000)
    assert [decoder_profile(p, n) for p, n in ((0, 300), (0, 1), (311, 1), (311, 17))] == \
        [PREFILL, PREFILL, DECODE, PREFILL]
    profiles = profiles_for("decoder", CFG_2B, lim)
    for past, new in ((0, 1), (311, 1), (311, 17), (1976, 1024)):
        profile = profiles[decoder_profile(past, new)]
        check_shape("decoder", "inputs_embeds", (1, new, 1536), profile["inputs_embeds"])
        check_shape("decoder", "attention_mask", (1, past + new), profile["attention_mask"])
        check_shape("decoder", "past_key_values.0.key", (1, 2, past, 128), profile["past_key_values.0.key"])


def test_merger_takes_a_whole_batch_of_vision_tokens():
    merger = profiles_for("embedding_merger", CFG_2B, Limits(max_prompt=512, max_context=1024, max_batch=3))[0]
    assert merger["vision_embeds"][2] == (3 * 512, 1536)


def test_shape_outside_profile_names_tensor_shape_and_flag():
    decode = profiles_for("decoder", CFG_2B, Limits(max_context=4096))[DECODE]
    check_shape("decoder", "attention_mask", (1, 4096), decode["attention_mask"])
    with pytest.raises(InputError, match=r"decoder input attention_mask of shape \(1, 5000\).*2\.\.4096.*"
                                         "build-trt --max-context N"):
        check_shape("decoder", "attention_mask", (1, 5000), decode["attention_mask"])
    with pytest.raises(InputError, match="past_key_values.3.value.*--max-batch"):
        check_shape("decoder", "past_key_values.3.value", (2, 2, 10, 128), decode["past_key_values.3.value"])


def test_docs_jetson_tables_are_the_memory_plan():
    """The docs' Jetson numbers are memory_table() of the 2B config and static_cache_table() of the 2B and 7B ones,
    from the functions the backend allocates with; no int8 row (TensorRT documents no weight-only int8)."""
    docs = (Path(__file__).parents[1] / "docs" / "tensorrt.md").read_text()
    assert memory_table(CFG_2B) in docs and "| int8 |" not in memory_table(CFG_2B)
    assert static_cache_table({"2B": CFG_2B, "7B": CFG_7B}) in docs


def test_sidecar_mismatch_is_refused():
    lim = Limits()
    sidecar = make_sidecar("decoder", trt_version="10.15.1", gpu_name="Orin", compute_capability="8.7",
                           precision="fp16", kv_cache="concat", limits=lim,
                           profiles=profiles_for("decoder", CFG_2B, lim), onnx_sha256="0" * 64)
    json.dumps(sidecar)  # must be plain JSON
    check_sidecar(sidecar, trt_version="10.15.1", gpu_name="Orin", compute_capability="8.7")
    with pytest.raises(ArtifactError, match="TensorRT 10.15.1 \\(running 10.16.0\\).*rebuild them on this device"):
        check_sidecar(sidecar, trt_version="10.16.0", gpu_name="Orin", compute_capability="8.7")
    with pytest.raises(ArtifactError, match="GPU Orin sm_8.7 \\(running on NVIDIA H100 sm_9.0\\)"):
        check_sidecar(sidecar, trt_version="10.15.1", gpu_name="NVIDIA H100", compute_capability="9.0")
    with pytest.raises(ArtifactError, match="onnx_sha256 0+ \\(the manifest's graphs: 1+\\)"):
        check_sidecar(sidecar, trt_version="10.15.1", gpu_name="Orin", compute_capability="8.7", precision="fp16",
                      onnx_sha256="1" * 64)
    with pytest.raises(ArtifactError, match="sidecar has format None"):
        check_sidecar({**sidecar, "format_version": None}, trt_version="10.15.1", gpu_name="Orin",
                      compute_capability="8.7")


@pytest.mark.parametrize("request_kwargs,flag", [
    (dict(batch=2), "--max-batch"),
    (dict(prompt_len=3000), "--max-prompt"),
    (dict(prompt_len=2000, max_new_tokens=3000), "--max-context"),
    (dict(image_grids=[(1, 80, 80)]), "--max-image-tokens"),
    (dict(image_grids=[(9, 20, 20)]), "--max-frames"),
])
def test_request_beyond_profile_names_the_flag(request_kwargs, flag):
    args = dict(batch=1, prompt_len=100, max_new_tokens=10, image_grids=[(1, 20, 20)])
    check_request(Limits(), CFG_2B, **args)
    with pytest.raises(InputError, match=flag):
        check_request(Limits(), CFG_2B, **{**args, **request_kwargs})


# -- check-trt on exported graphs --------------------------------------------------------------------

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "qwen2vl_edge", *args], capture_output=True, text=True)


@requires_torch
def test_check_trt_passes_on_the_export(tiny_artifact):
    result = _cli("check-trt", str(tiny_artifact))
    assert result.returncode == 0, result.stdout + result.stderr


@requires_torch
def test_check_trt_names_each_offending_node(tiny_artifact, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_artifact, bad)
    path = bad / "decoder.onnx"
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    g.node.append(helper.make_node("Unique", ["position_ids"], ["planted_unique"], name="planted_unique_node"))
    g.node.append(helper.make_node("CumSum", ["position_ids", "planted_axis"], ["planted_cumsum"],
                                   name="planted_int64_cumsum"))
    g.node.append(helper.make_node("SkipSimplifiedLayerNormalization", ["inputs_embeds", "inputs_embeds"],
                                   ["planted_ms"], name="planted_ms_node", domain="com.microsoft"))
    g.input.append(helper.make_tensor_value_info("planted_axis", onnx.TensorProto.INT64, []))
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(path))
    result = _cli("check-trt", str(bad))
    assert result.returncode == 1
    out = result.stdout
    assert "node 'planted_unique_node' (Unique): not supported" in out
    assert "node 'planted_int64_cumsum' (CumSum): input 'position_ids' is INT64" in out
    assert "node 'planted_int64_cumsum' (CumSum): axis must be a build-time constant" in out
    assert "node 'planted_ms_node' (SkipSimplifiedLayerNormalization): custom domain 'com.microsoft'" in out


@requires_torch
def test_opset_18_export_runs_and_fits_tensorrt(tiny_ckpt, workdir, pipe):
    from conftest import export_artifact
    from qwen2vl_edge.runtime import Qwen2VLPipeline

    art = export_artifact(tiny_ckpt, workdir / "art-opset18", opset=18)
    assert _cli("check-trt", str(art)).returncode == 0
    conv = [{"role": "user", "content": "Count to ten."}]
    a = Qwen2VLPipeline.load(art).generate(conv, max_new_tokens=8, min_new_tokens=8).token_ids
    assert_varied(a)
    assert a == pipe.generate(conv, max_new_tokens=8, min_new_tokens=8).token_ids


def test_build_trt_without_tensorrt_says_how_to_get_it(tmp_path):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    result = _cli("build-trt", str(tmp_path))
    assert result.returncode == 2 and "needs TensorRT" in result.stderr


# -- build-trt and whole generations through the recording fakes (tests/fake_tensorrt.py, fake_cudart.py) --

sys.path.insert(0, str(Path(__file__).parent))  # the fakes and the stand-in live beside this file


@pytest.fixture(scope="module")
def trt_standins(trt_export, workdir) -> dict[str, Path]:
    """The tiny checkpoint's `--target tensorrt --precision fp32` exports, one per KV layout (10.3: concat,
    10.15: preallocated), copied: the builds write engines into them."""
    root = workdir / "trt-exports"
    if root.exists():
        shutil.rmtree(root)
    return {kind: Path(shutil.copytree(trt_export(min_tensorrt=version), root / kind))
            for kind, version in (("concat", "10.3"), ("preallocated", "10.15"))}


fake_cuda_only = pytest.mark.skipif(os.environ.get("QWEN2VL_EDGE_REAL_CUDA") == "1",
                                    reason="sets the fake GPU's memory size")


SMALL = Limits(max_image_tokens=256, max_prompt=512, max_context=TRT_MAX_CONTEXT)


def _built(src: Path, out: Path) -> Path:
    from qwen2vl_edge.export.trt_build import build_trt

    shutil.copytree(src, out)
    build_trt(out, limits=SMALL, timing_cache=out.parent / "timing.cache")
    return out


def _image_conv(seed: int = 0):
    from conftest import random_image

    image = random_image(np.random.default_rng(seed), 160, 120)
    return [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": "Describe this image."}]}]


@requires_torch
def test_build_trt_refuses_other_targets(tiny_artifact, fakes):
    from qwen2vl_edge.export.trt_build import BuildError, build_trt

    with pytest.raises(BuildError, match="--target portable.*qwen2vl-edge export CKPT OUT --target tensorrt "
                                         "--precision fp16"):
        build_trt(tiny_artifact)


@requires_torch
def test_build_trt_checks_the_tensorrt_version_against_the_graphs(trt_standins):
    from qwen2vl_edge.export.trt_build import BuildError, check_buildable
    from qwen2vl_edge.runtime.artifact import load_artifact

    art = load_artifact(trt_standins["preallocated"], verify=False)
    check_buildable(art, "10.15.1.29")
    check_buildable(art, "11.4.0.106")
    with pytest.raises(BuildError, match="need TensorRT >= 10.15.*this is 10.3.0.*--min-tensorrt 10.3"):
        check_buildable(art, "10.3.0")
    with pytest.raises(BuildError, match="TensorRT 12.0.1 is not supported"):
        check_buildable(art, "12.0.1")


def _symbolic_cache(art: Path) -> None:
    """Rewrite the decoder of a 10.15 export as it was before the cache length was fixed: a symbolic axis."""
    model = onnx.load(str(art / "decoder.onnx"), load_external_data=False)
    for value in (*model.graph.input, *model.graph.output):
        if value.name.startswith(("past_key_values.", "present.")):
            value.type.tensor_type.shape.dim[2].dim_param = "capacity"
    onnx.save(model, str(art / "decoder.onnx"))


@requires_torch
def test_a_symbolic_cache_axis_is_refused_by_check_trt_and_the_parser(trt_standins, fakes, tmp_path):
    """TensorRT parses TensorScatter as KVCacheUpdate, whose cache needs a static sequence length: check-trt names
    the node, and the fake parser (as TensorRT's) refuses the graph at build-trt."""
    from qwen2vl_edge.export.trt_build import BuildError, build_trt
    from qwen2vl_edge.export.trt_check import check_artifact

    art = Path(shutil.copytree(trt_standins["preallocated"], tmp_path / "art"))
    assert check_artifact(art) == []
    _symbolic_cache(art)
    problems = [str(p) for p in check_artifact(art)]
    scatters = [p for p in problems if "(TensorScatter): input 0" in p and "symbolic axis -2" in p]
    assert len(scatters) == 2 * 2 and all("--max-context" in p for p in scatters)  # k and v of the 2 layers
    with pytest.raises(BuildError, match="KVCacheUpdate: the cache past_key_values.0.key .* static sequence length"):
        build_trt(art, limits=SMALL, timing_cache=tmp_path / "timing.cache", verify=False)


@requires_torch
def test_build_trt_takes_the_static_cache_length_as_max_context(trt_standins, fakes, tmp_path):
    from dataclasses import replace

    from qwen2vl_edge.export.trt_build import build_trt

    art = Path(shutil.copytree(trt_standins["preallocated"], tmp_path / "art"))
    with pytest.raises(ArtifactError, match=f"fix the KV cache at {TRT_MAX_CONTEXT} positions.*build with "
                                            f"--max-context {TRT_MAX_CONTEXT}"):
        build_trt(art, limits=replace(SMALL, max_context=TRT_MAX_CONTEXT + 1), timing_cache=tmp_path / "t.cache")
    assert not (art / "engines").exists()
    from qwen2vl_edge.cli import main  # in this process: the fake tensorrt is in its sys.modules

    assert main(["build-trt", str(art), "--max-image-tokens", "256", "--max-prompt", "512",  # no --max-context
                 "--timing-cache", str(tmp_path / "t.cache")]) == 0
    sidecar = json.loads((art / "engines" / "decoder.engine.json").read_text())
    assert sidecar["limits"]["max_context"] == TRT_MAX_CONTEXT


@requires_torch
@pytest.mark.parametrize("kv_cache,version", [("concat", "10.3.0"), ("preallocated", "11.4.0.106")])
def test_trt_generation_matches_onnxruntime_token_for_token(trt_standins, fakes, tmp_path, monkeypatch, kv_cache,
                                                            version):
    """build-trt, then whole generations and a two-turn chat session through TrtBackend (fake TensorRT
    executing the source graphs with ONNX Runtime on the bound device bytes) against OrtBackend on the same
    graphs; 10.3's and 11's bindings differ in the engine stream reader."""
    from fake_tensorrt import make_fake_tensorrt
    from qwen2vl_edge.runtime import Qwen2VLPipeline

    cuda = fakes[1]
    trt = make_fake_tensorrt(version, run_onnx=True, check_buffer=cuda.owner)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    art = _built(trt_standins[kv_cache], tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    sidecar = json.loads((art / "engines" / "decoder.engine.json").read_text())
    assert set(manifest["engines"]) == {"vision_encoder", "embedding_merger", "decoder"}
    assert sidecar["kv_cache"] == kv_cache and sidecar["format_version"] == 1
    assert sidecar["onnx_sha256"] == manifest["files"]["decoder.onnx"]
    assert (tmp_path / "timing.cache").is_file() and not list(art.rglob("*.cache"))

    ort_pipe = Qwen2VLPipeline.load(art)
    convs = [_image_conv(0), [{"role": "user", "content": "Count to ten."}]]
    expected = [ort_pipe.generate(c, max_new_tokens=12, min_new_tokens=12).token_ids for c in convs]
    chat_expected = _two_turn_chat(ort_pipe)
    with Qwen2VLPipeline.load(art, backend="tensorrt") as pipe:
        assert [pipe.generate(c, max_new_tokens=12, min_new_tokens=12).token_ids for c in convs] == expected
        ours, ref = _prefill_logits(pipe, convs[0]), _prefill_logits(ort_pipe, convs[0])  # as the GPU test does
        assert ours.shape == ref.shape and np.abs(ours - ref).max() <= 1e-6 * np.abs(ref).max()
        assert len(set(expected[0])) >= 5 and expected[0] != expected[1]  # varied tokens, image-dependent
        # two generations interleaved on one pipeline: each keeps its own cache
        streams = [pipe.stream(c, max_new_tokens=12, min_new_tokens=12) for c in convs]
        pieces = [[], []]
        for _ in range(12):
            for i, s in enumerate(streams):
                pieces[i].append(next(s, ""))
        assert ["".join(p) for p in pieces] == [pipe.processor.decode(ids) for ids in expected]
        runs_before_chat = len(trt.recorder.executions)
        assert _two_turn_chat(pipe) == chat_expected
        held = pipe.backend.new_cache(1, 16)  # a cache still referenced when the backend closes
    chat_runs = [shapes for engine, shapes, _ in trt.recorder.executions[runs_before_chat:] if engine == "decoder"]
    # the second turn: several new positions after a past (the prefill profile), not one token (decode)
    assert any(s["inputs_embeds"][1] > 1 and s["attention_mask"][1] > s["inputs_embeds"][1] for s in chat_runs)
    decoder_runs = [(shapes, addr) for engine, shapes, addr in trt.recorder.executions if engine == "decoder"]
    same = {addr["past_key_values.0.key"] == addr["present.0.key"] for _, addr in decoder_runs}
    assert same == {kv_cache == "preallocated"}
    assert cuda.live() == []  # close() gave back every buffer, pinned page and stream
    del held  # its buffers are not freed a second time
    assert cuda.errors == []


def _two_turn_chat(pipe) -> list[list[int]]:
    """An image question and a text follow-up in one session: the follow-up prefills after the cache, which
    grows (its reserve is larger than the first turn's)."""
    session = pipe.chat(max_new_tokens=10, min_new_tokens=10)
    first = session.send(_image_conv(1)[0]["content"])
    second = session.send("And what colour is the corner?", max_new_tokens=40, min_new_tokens=40)
    # the cache held the first turn and its reply but the last id, which went in with the follow-up
    assert second.usage["cached_prompt_tokens"] == first.usage["prompt_tokens"] + len(first.token_ids) - 1
    assert len(set(second.token_ids)) >= 5  # varied tokens: agreement is not by accident
    if pipe.backend.name == "tensorrt":  # the device memory the kept cache holds, by the memory plan's formula
        b = pipe.backend
        assert session.cache_bytes == kv_cache_bytes(pipe.artifact.config, 1, session.cache.capacity, b.kv_dtype,
                                                     b.kv_cache) > 0
        # 10.15: every request's cache has the graphs' static length from the start (no growth)
        assert (session.cache.capacity == TRT_MAX_CONTEXT) == (b.kv_cache == PREALLOCATED)
    return [first.token_ids, second.token_ids]


@requires_torch
def test_engine_only_artifact_runs_without_onnx_or_weights(trt_standins, fakes, tmp_path):
    from qwen2vl_edge.runtime import Qwen2VLPipeline

    art = _built(trt_standins["concat"], tmp_path / "art")
    shipped = tmp_path / "shipped"
    shutil.copytree(art, shipped, ignore=shutil.ignore_patterns("*.onnx", "weights.data"))
    conv = [{"role": "user", "content": "Count to ten."}]
    with Qwen2VLPipeline.load(shipped, backend="tensorrt") as pipe:  # sha256 of what is shipped still checked
        ours = pipe.generate(conv, max_new_tokens=8, min_new_tokens=8).token_ids
    assert ours == Qwen2VLPipeline.load(art).generate(conv, max_new_tokens=8, min_new_tokens=8).token_ids
    with pytest.raises(ArtifactError, match="decoder.onnx listed in the manifest is missing"):
        Qwen2VLPipeline.load(shipped)  # ONNX Runtime does need the graphs
    (shipped / "engines" / "decoder.engine").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="engines/decoder.engine does not match its sha256"):
        Qwen2VLPipeline.load(shipped, backend="tensorrt")


@requires_torch
def test_engine_io_is_checked_against_the_manifest(trt_standins, fakes, tmp_path):
    from qwen2vl_edge.runtime import Qwen2VLPipeline

    art = _built(trt_standins["concat"], tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    decoder = manifest["graphs"]["decoder"]
    decoder["inputs"][3]["dtype"] = "float16"  # past_key_values.0.key
    decoder["outputs"] = [o for o in decoder["outputs"] if o["name"] != "present.1.value"]
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"(?s)engine decoder does not match.*past_key_values.0.key: dtype "
                                            r"float32 in the engine, float16 in the manifest.*present.1.value: not in "
                                            "the manifest's graph"):
        Qwen2VLPipeline.load(art, backend="tensorrt")
    assert fakes[1].live() == []  # nothing was allocated before the check


@requires_torch
@fake_cuda_only
def test_out_of_memory_and_oversized_inputs_are_named(trt_standins, fakes, tmp_path):
    from qwen2vl_edge.runtime import Qwen2VLPipeline
    from qwen2vl_edge.runtime.backends.cuda import CudaError

    art = _built(trt_standins["concat"], tmp_path / "art")
    fakes[1].total = 40 << 20  # the I/O buffers (37.7 MiB at SMALL) fit, the 3 MiB activation pool does not
    with pytest.raises(CudaError, match="cudaMalloc of 3145728 bytes for activation pool failed: "
                                        "cudaErrorMemoryAllocation"):
        Qwen2VLPipeline.load(art, backend="tensorrt")
    assert fakes[1].live() == []
    fakes[1].total = 80 << 30
    with Qwen2VLPipeline.load(art, backend="tensorrt") as pipe:  # more vision tokens than the engines take
        too_many = np.zeros((SMALL.max_prompt + 1, pipe.backend.hidden_size), np.float32)
        with pytest.raises(InputError, match=r"embedding_merger input vision_embeds of shape \(513, 64\).*"
                                             "build-trt --max-prompt N"):
            pipe.backend.merge(np.zeros((1, 8), np.int64), too_many)


@requires_torch
def test_bench_trt_systems_reach_the_tensorrt_backend(trt_standins, fakes, tmp_path):
    from qwen2vl_edge.benchmarks.bench import DEFAULT_SYSTEMS, SYSTEMS, backend_of
    from qwen2vl_edge.benchmarks.worker import make_system

    art = _built(trt_standins["concat"], tmp_path / "art")
    for name in ("ours-trt-fp16", "ours-trt-int4"):
        assert name in SYSTEMS and name not in DEFAULT_SYSTEMS.split(",")  # on request: they need a GPU
        system = make_system({"system": name, "artifact": str(art), "threads": 1, "backend": backend_of(name)})
        assert system.pipe.backend.name == "tensorrt" and system.device_memory_bytes > 0
        assert system.run([{"role": "user", "content": "Count to ten."}], 4)["decode_tok_s"] > 0
        system.pipe.close()
    assert fakes[1].live() == []


# -- on a GPU with TensorRT ---------------------------------------------------------------------------

def _prefill_logits(pipe, conv) -> np.ndarray:
    """Last-position logits [1, V] of one prefill, through whichever backend `pipe` has."""
    inputs = pipe.processor(conv)
    embeds = pipe.backend.merge(inputs["input_ids"], pipe.vision_features(inputs))
    cache = pipe.backend.new_cache(1, reserve=inputs["input_ids"].shape[1] + 1)
    return pipe.backend.decode(embeds, inputs["attention_mask"], inputs["position_ids"], cache)[0]


@requires_gpu_trt
@requires_torch
@pytest.mark.gpu
@pytest.mark.parametrize("version, precision", [("10.3", "fp32"), ("10.15", "fp32"), ("10.15", "fp16")])
def test_tensorrt_matches_onnxruntime(trt_export, tmp_path, version, precision):
    """The same tensorrt-target graphs built by TensorRT and run by ONNX Runtime: prefill logits and greedy tokens."""
    from qwen2vl_edge.export.trt_build import build_trt
    from qwen2vl_edge.runtime import Qwen2VLPipeline

    art = tmp_path / "art"
    shutil.copytree(trt_export(min_tensorrt=version, precision=precision), art)
    build_trt(art, limits=Limits(max_prompt=512, max_context=TRT_MAX_CONTEXT, max_image_tokens=512))
    conv = _image_conv(0)
    ort_pipe = Qwen2VLPipeline.load(art)
    with Qwen2VLPipeline.load(art, backend="tensorrt") as trt_pipe:
        logits = {name: _prefill_logits(p, conv) for name, p in (("trt", trt_pipe), ("ort", ort_pipe))}
        ours = trt_pipe.generate(conv, max_new_tokens=32, min_new_tokens=32).token_ids
    ref = ort_pipe.generate(conv, max_new_tokens=32, min_new_tokens=32).token_ids
    assert_varied(ref)
    rel = np.abs(logits["trt"] - logits["ort"]).max() / np.abs(logits["ort"]).max()
    agree = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), len(ref))
    print(f"TensorRT {version} {precision}: prefill logits rel. diff {rel:.1e}; first {agree} of 32 greedy tokens agree")
    # Not yet run on hardware (no GPU with TensorRT in this workplace): fp32 graphs build with TF32 off and must
    # match as ONNX Runtime matches itself; fp16 gets the usual half-precision margin.
    assert np.isfinite(logits["trt"]).all()
    if precision == "fp32":
        assert rel <= 1e-4 and ours == ref
    else:
        assert rel <= 5e-2
