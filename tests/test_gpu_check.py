"""gpu-check: its reading of the engine inspector's layers (against hand-written samples), and its control flow
through the recording fakes (tests/fake_tensorrt.py, fake_cudart.py)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import requires_torch
from qwen2vl_edge.benchmarks import gpu_check
from qwen2vl_edge.runtime.backends.trt_profiles import ENGINES, Limits

sys.path.insert(0, str(Path(__file__).parent))  # the fakes live beside this file

# HAND-WRITTEN samples, NOT output of TensorRT: the shape of IEngineInspector's JSON with DETAILED verbosity
# ({"Layers": [{"Name", "LayerType", "Inputs"/"Outputs": [{"Name", "Dimensions", "Format/Datatype"}],
# "TacticName", "Metadata"}], "Bindings": [...]}) as TensorRT's trex parser reads it and as inspector output
# quoted in NVIDIA/TensorRT issues #4397 (a fused "_gemm_mha_v2" kgen layer) and #3665 (unfused gemm layers).
FUSED_INT4 = {"Layers": [
    {"Name": "/layers.0/q_proj/MatMul_myl0_3", "LayerType": "gemm", "TacticName": "sm90_xmma_gemm_f16f16",
     "Inputs": [{"Name": "x", "Dimensions": [1, 40, 1536], "Format/Datatype": "Half"},
                {"Name": "w", "Dimensions": [1536, 1536], "Format/Datatype": "Int4"}],
     "Outputs": [{"Name": "q", "Dimensions": [1, 40, 1536], "Format/Datatype": "Half"}]},
    {"Name": "_gemm_mha_v2_myl0_17", "LayerType": "kgen", "TacticName": "_gemm_mha_v2_0x957a2fe283f77dcf",
     "Inputs": [{"Name": "q", "Dimensions": [12, 40, 128], "Format/Datatype": "Half"}],
     "Outputs": [{"Name": "o", "Dimensions": [12, 40, 128], "Format/Datatype": "Half"}],
     "Metadata": "[ONNX Layer: /layers.0/self_attn/MatMul]"}], "Bindings": ["inputs_embeds", "logits"]}
UNFUSED_FP16 = {"Layers": [
    {"Name": "[MATRIX_MULTIPLY]_[scaled_dot_product_attention]_[x11_qk]_matrix_multiply", "LayerType": "gemm",
     "TacticName": "sm80_xmma_gemm_f16f16_f16f16_f16_nn_n_tilesize32x32x64",
     "Inputs": [{"Name": "a", "Dimensions": [12, 40, 128], "Format/Datatype": "Half"}], "Outputs": []},
    {"Name": "/layers.0/self_attn/Softmax", "LayerType": "kgen", "TacticName": "__myl_Softmax",
     "Inputs": [], "Outputs": [], "Weights": {"Type": "Half", "Count": 4}}], "Bindings": []}


def test_layer_summary_tells_fused_attention_and_int4_weights():
    fused = gpu_check.summarize_layers(FUSED_INT4)
    assert fused["fused_attention_layers"] == ["_gemm_mha_v2_myl0_17"]
    assert fused["int4_layers"] == ["/layers.0/q_proj/MatMul_myl0_3"]
    assert fused["layer_types"] == {"gemm": 1, "kgen": 1} and fused["layers"] == 2
    unfused = gpu_check.summarize_layers(UNFUSED_FP16)  # "attention" in a gemm's name is not a fused kernel
    assert unfused["fused_attention_layers"] == [] and unfused["int4_layers"] == []
    with pytest.raises(ValueError, match="layer names only.*ProfilingVerbosity.DETAILED"):
        gpu_check.summarize_layers({"Layers": ["gemm_0", "softmax_1"]})  # what LAYER_NAMES_ONLY gives


def test_check_lines_say_fused_int4_and_device_memory():
    engine = {**gpu_check.summarize_layers(FUSED_INT4), "device_memory_bytes": 3 << 20,
              "device_memory_per_profile_bytes": [3 << 20, 1 << 20], "engine_file_bytes": 10 << 20}
    lines = gpu_check.check_lines("2b-shape trt-int4", "trt-int4", {"build_seconds": 61.2, "engines": {
        "decoder": engine, "embedding_merger": {**engine, "fused_attention_layers": []}}})
    assert lines == [
        "build 2b-shape trt-int4: ok in 61 s",
        "attention 2b-shape trt-int4 decoder: FUSED, 1 layer(s), e.g. _gemm_mha_v2_myl0_17",
        "int4 2b-shape trt-int4 decoder: kept, 1 layer(s) with int4 tensors",
        "device memory 2b-shape trt-int4 decoder: 3.0 MiB for activations (profiles [3.0, 1.0]), engine file 10.0 MiB",
        "device memory 2b-shape trt-int4 embedding_merger: 3.0 MiB for activations (profiles [3.0, 1.0]), engine "
        "file 10.0 MiB"]
    assert gpu_check.check_lines("tiny x", "trt-fp32-10.15", {"build_error": "TensorRT failed to build decoder"}) == [
        "build tiny x: FAILED: TensorRT failed to build decoder"]


@requires_torch
def test_gpu_check_records_layers_and_one_line_per_check(trt_export, tmp_path, monkeypatch, capsys):
    """gpu-check's flow through the fakes: each variant built with detailed layers (a stand-in for the cached
    export), its engines' layer JSON written, one line per check; a variant that fails to build is reported
    and the others still run; parity with ONNX Runtime through the fake engines that run the graphs."""
    from fake_cudart import FakeCudart
    from fake_tensorrt import make_fake_tensorrt
    from qwen2vl_edge.export.trt_build import BuildError, build_trt
    from qwen2vl_edge.runtime.backends import cuda as cuda_layer

    cuda = FakeCudart()
    monkeypatch.setattr(cuda_layer, "cudart", lambda: cuda)
    trt = make_fake_tensorrt("10.15.1.29", run_onnx=True, check_buffer=cuda.owner)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    src = trt_export(min_tensorrt="10.3")

    def exported(model, layers, cache, variants, detailed=False):  # the export is not what is checked here
        (variant,) = variants
        if variant == "trt-fp16-10.15":
            raise BuildError("TensorRT failed to build decoder (see its log above)")
        art = shutil.copytree(src, tmp_path / variant)
        build_trt(art, limits=Limits(max_image_tokens=256, max_prompt=512, max_context=640),
                  timing_cache=tmp_path / "timing.cache", detailed=detailed)
        return None, {variant: Path(art)}

    monkeypatch.setattr(gpu_check, "model_dirs", exported)
    monkeypatch.setitem(gpu_check.CHECKED, "tiny", ("trt-fp32", "trt-fp16-10.15"))
    out = tmp_path / "out"
    assert gpu_check.gpu_check(out, models=["tiny"], new_tokens=4) == 1  # one variant did not build
    report = json.loads((out / "gpu_check.json").read_text())
    checks = [line for line in capsys.readouterr().out.splitlines() if line.split(" ")[0] in (
        "build", "attention", "int4", "device", "parity")]
    assert checks == report["checks"] and len(checks) == 1 + 2 + 3 + 2 + 1
    assert checks[0].startswith("build tiny trt-fp32: ok")
    attention = [line for line in checks if line.startswith("attention")]
    assert len(attention) == 2 and all(": NOT fused" in line for line in attention)  # the fake fuses nothing
    assert checks[-3:] == ["parity tiny trt-fp32 text: first 4 of 4 greedy tokens agree with ONNX Runtime",
                           "parity tiny trt-fp32 image: first 4 of 4 greedy tokens agree with ONNX Runtime",
                           "build tiny trt-fp16-10.15: FAILED: TensorRT failed to build decoder (see its log above)"]
    for engine in ENGINES:
        layers = json.loads((out / f"tiny-trt-fp32-{engine}.layers.json").read_text())["Layers"]
        assert layers and all(isinstance(layer, dict) and layer["Name"] for layer in layers)
    assert report["models"]["tiny"]["trt-fp32"]["engines"]["decoder"]["device_memory_bytes"] == 3 << 20
    assert cuda.live() == []
