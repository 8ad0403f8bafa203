"""GPTQ and AWQ checkpoints: their integers read as published, kept as MatMulNBits on ort-cpu, dequantized on portable."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import FAMILY_CKPTS, export_artifact, random_image, requires_torch
from quantized_checkpoints import Variant, pack_awq, pack_gptq, quantize_layer
from qwen2vl_edge.export.prequantized import QuantizedWeight, read_scheme, unpack
from qwen2vl_edge.runtime.config import ConfigError


def test_words_are_read_in_the_published_order():
    """Hand-packed words: GPTQ puts input k at bits 4k of a word along K; AWQ puts output order_map[i] in slot i."""
    gptq = {"qweight": np.full((1, 8), 0x87654321, np.uint32).view(np.int32),  # inputs 0..7 hold 1..8
            "qzeros": np.array([[0x77777777]], np.uint32).view(np.int32),  # v1 stores zero - 1
            "scales": np.ones((1, 8), np.float16), "g_idx": np.zeros(8, np.int32)}
    w = unpack(read_scheme({"quant_method": "gptq", "bits": 4, "group_size": 8}), gptq, "gptq")
    assert (w.q == np.arange(1, 9)).all() and (w.zeros == 8).all()
    awq = {"qweight": np.array([[0x86427531]], np.uint32).view(np.int32),  # slots hold outputs 0,2,4,6,1,3,5,7
           "qzeros": np.array([[0x00000010]], np.uint32).view(np.int32), "scales": np.ones((1, 8), np.float16)}
    w = unpack(read_scheme({"quant_method": "awq", "bits": 4, "group_size": 1, "version": "gemm"}), awq, "awq")
    assert (w.q[:, 0] == np.arange(1, 9)).all() and (w.zeros[:, 0] == [0, 0, 1, 0, 0, 0, 0, 0]).all()


LAYER_VARIANTS = [Variant("gptq", 4, 32, sym=True), Variant("gptq", 4, 32, desc_act=True),
                  Variant("gptq", 8, 16), Variant("gptq", 8, 32, sym=True, desc_act=True),
                  Variant("gptq", 4, -1), Variant("gptq", 4, 48, desc_act=True), Variant("gptq", 4, 32, fmt="gptq_v2"),
                  Variant("awq", 4, 32, fmt="gemm"), Variant("awq", 4, -1, fmt="gemm")]


def _run_linear(tmp_path, weight, x: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """One Graph.linear on the ort-cpu target (accuracy level 1: fp32 math), run by ONNX Runtime."""
    import onnxruntime as ort

    from qwen2vl_edge.export.graph import FLOAT, Graph, Target, WeightStore

    store = WeightStore(tmp_path / "w.data")
    g = Graph("g", store, 17, target=Target("ort-cpu"), accuracy_level=1)
    g.output(g.linear(g.input("x", FLOAT, list(x.shape)), weight, None, "lin"), "y", FLOAT, [x.shape[0], "n"])
    store.close()
    onnx.save_model(g.model(), tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0], [n.op_type for n in g.nodes]


@pytest.mark.parametrize("v", LAYER_VARIANTS, ids=lambda v: v.name)
def test_layer_reads_back_exactly_and_runs_as_matmulnbits(v, tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((40, 96)).astype(np.float32)
    perm = rng.permutation(96) if v.desc_act else None
    packed, reference = quantize_layer(w, v, perm)
    qw = unpack(read_scheme({"quant_method": v.method, "bits": v.bits, "group_size": v.group_size,
                             "checkpoint_format": v.fmt, "version": v.fmt}), packed, "lin")
    assert np.array_equal(qw.dequantize(), reference)  # bit-exact
    assert np.abs(reference - w).max() < 0.5 * np.abs(w).max()  # a real quantization of w, not noise
    x = rng.standard_normal((3, 96)).astype(np.float32)
    y, ops = _run_linear(tmp_path, qw, x)
    assert ops == (["Gather", "MatMulNBits"] if v.desc_act else ["MatMulNBits"])
    np.testing.assert_allclose(y, x @ reference.T, rtol=1e-4, atol=1e-4)


def test_gptq_v1_zero_point_overflow_is_refused():
    packed = pack_gptq(np.zeros((8, 8), np.int64), np.ones((8, 1), np.float16), np.zeros((8, 1), np.int64),
                       np.zeros(8, np.int32), 4, "gptq")  # a zero of 0 stores -1: not in v1's 4 bits
    with pytest.raises(ConfigError, match="re-save the checkpoint with checkpoint_format 'gptq_v2'"):
        unpack(read_scheme({"quant_method": "gptq", "bits": 4, "group_size": 8}), packed, "lin")


@pytest.mark.parametrize("qc, message", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method 'bitsandbytes' is not supported"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "GPTQ with 3 bits is not supported"),
    ({"quant_method": "gptq", "bits": 2, "group_size": 128}, "GPTQ with 2 bits is not supported"),
    ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
    ({"quant_method": "gptq", "bits": 4, "is_marlin_format": True}, "checkpoint_format 'marlin'"),
    ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "AWQ version 'gemv' is not supported"),
    ({"quant_method": "awq", "bits": 8, "version": "gemm"}, "AWQ with 8 bits is not supported"),
    ({"quant_method": "exl2", "bits": 4.0}, "quant_method 'exl2' is not supported"),
])
def test_unsupported_quantization_is_a_config_error(qc, message):
    with pytest.raises(ConfigError, match=message) as err:
        read_scheme(qc)
    assert "supported: GPTQ" in str(err.value)


@pytest.mark.parametrize("keys, message", [
    (["lm_head.qweight"], "only the decoder layers' linears may be quantized"),
    (["model.visual.blocks.0.attn.qkv.qweight"], "only the decoder layers' linears may be quantized"),
    (["model.layers.0.mlp.up_proj.q_weight", "model.layers.0.mlp.up_proj.q_invperm"], "exllama v2"),
])
def test_unsupported_layouts_are_config_errors(tiny_ckpt, tmp_path, keys, message):
    import torch
    from safetensors.torch import save_file

    from qwen2vl_edge.export.checkpoint import Checkpoint

    config = json.loads((tiny_ckpt / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({k: torch.zeros(4, dtype=torch.int32) for k in keys}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match=message):
        Checkpoint(tmp_path)
    del config["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    if keys[0].endswith(".qweight"):
        with pytest.raises(ConfigError, match="no quantization_config"):
            Checkpoint(tmp_path)


# -- whole checkpoints -------------------------------------------------------------------------------------

CHECKPOINTS = [Variant("gptq", 4, 32, sym=True),  # the published Qwen2-VL GPTQ-Int4 settings, smaller groups
               # act order, one permutation per projection, v_proj left float: qkv as three kernels
               Variant("gptq", 4, 16, desc_act=True, float_layers=("self_attn.v_proj",)),
               Variant("gptq", 8, 32, sym=True, desc_act=True),
               Variant("awq", 4, 32, fmt="gemm"),
               Variant("awq", 4, 32, fmt="gemm", family="qwen2_5_vl")]  # Qwen2.5-VL-*-AWQ's layout
N_NEW = 24  # against transformers
N_ORT = 16  # ort-cpu against portable, two conversations


@pytest.fixture(scope="module", params=CHECKPOINTS, ids=lambda v: v.name)
def ckpt(request, workdir):
    from quantized_checkpoints import write_pair

    v = request.param
    quant, dequant, reference = write_pair(request.getfixturevalue(FAMILY_CKPTS[v.family]), workdir / "prequantized", v)
    return SimpleNamespace(
        variant=v, quant=quant, dequant=dequant, reference=reference,
        portable=export_artifact(quant, workdir / f"art-{v.name}"),
        ort=export_artifact(quant, workdir / f"art-{v.name}-ort", target="ort-cpu", accuracy_level=1))


@pytest.fixture(scope="module")
def convs():
    img = random_image(np.random.default_rng(21), 320, 240)
    return {"text": [{"role": "user", "content": "Tell me a story about a robot."}],
            "image": [{"role": "user", "content": [{"type": "image", "image": img},
                                                   {"type": "text", "text": "Describe this image."}]}]}


@requires_torch
def test_portable_export_equals_transformers_on_the_dequantized_weights(ckpt, convs):
    from reference import hf_model, ref_inputs
    from qwen2vl_edge.runtime import Qwen2VLPipeline

    pipe = Qwen2VLPipeline.load(ckpt.portable)
    v = ckpt.variant
    assert pipe.artifact.export["source_quantization"] == {
        "method": v.method, "format": v.fmt, "bits": v.bits, "group_size": v.group_size,
        "desc_act": v.desc_act, "sym": v.sym}
    inputs = ref_inputs(ckpt.dequant, [convs["image"]])
    out = hf_model(str(ckpt.dequant)).generate(**inputs, max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False)
    ref = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert len(set(ref)) > N_NEW // 2, "reference output degenerate: parity would prove nothing"
    assert pipe.generate(convs["image"], max_new_tokens=N_NEW, min_new_tokens=N_NEW).token_ids == ref


FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _op_dequantized(model: onnx.ModelProto, node: onnx.NodeProto) -> np.ndarray:
    """A MatMulNBits node's weight [N, K] as the op defines it: (q - zero_point) * scale per block along K, in
    the order of its input (the Gather before it, if any, picks that order from the layer's inputs)."""
    inits = {t.name: t for t in model.graph.initializer}
    attrs = {a.name: a.i for a in node.attribute}
    bits, block, n, k = attrs["bits"], attrs["block_size"], attrs["N"], attrs["K"]
    b, scales, zp = (numpy_helper.to_array(inits[name]) for name in node.input[1:4])

    def values(packed, count):  # uint8 bytes [N, ...] -> [N, count], first value in the low bits
        if bits == 4:
            packed = np.stack([packed & 0x0F, packed >> 4], axis=-1)
        return packed.reshape(n, -1)[:, :count].astype(np.float32)

    blocks = np.arange(k) // block
    w = (values(b, k) - values(zp, k // block)[:, blocks]) * scales.reshape(n, -1)[:, blocks]
    producer = next((p for p in model.graph.node if node.input[0] in p.output), None)
    if producer is not None and producer.op_type == "Gather":
        order = numpy_helper.to_array(inits[producer.input[1]])
        restored = np.empty_like(w)
        restored[:, order] = w
        w = restored
    return w


@requires_torch
def test_ort_cpu_matmulnbits_weights_are_the_checkpoints_numbers(ckpt):
    model = onnx.load(str(ckpt.ort / "decoder.onnx"))  # with its external data
    seen = []
    for node in (n for n in model.graph.node if n.op_type == "MatMulNBits"):
        layer = node.input[1].split(".weight.")[0]  # model.layers.0.self_attn.qkv_proj[.part1]
        prefix, _, fused = layer.partition(".part")[0].rpartition(".")
        parts = [f"{prefix}.{p}" for p in FUSED.get(fused, (fused,))]
        if ".part" in layer:
            parts = [parts[int(layer.rpartition(".part")[2])]]
        expected = np.concatenate([ckpt.reference[p] for p in parts])
        assert np.array_equal(_op_dequantized(model, node), expected), layer
        seen += parts
    assert sorted(seen) == sorted(ckpt.reference), "every quantized linear is one MatMulNBits (or part of one)"


@requires_torch
def test_ort_cpu_export_gives_the_portable_exports_tokens(ckpt, convs):
    """Accuracy level 1: MatMulNBits computes in fp32, so only summation order differs from the portable graphs."""
    from qwen2vl_edge.runtime import Qwen2VLPipeline

    ort_pipe, portable = Qwen2VLPipeline.load(ckpt.ort), Qwen2VLPipeline.load(ckpt.portable)
    assert ort_pipe.artifact.export["source_quantization"]["bits"] == ckpt.variant.bits
    for conv in convs.values():
        a = ort_pipe.generate(conv, max_new_tokens=N_ORT, min_new_tokens=N_ORT).token_ids
        assert a == portable.generate(conv, max_new_tokens=N_ORT, min_new_tokens=N_ORT).token_ids


@requires_torch
@pytest.mark.parametrize("ckpt", CHECKPOINTS[:1], indirect=True, ids=lambda v: v.name)
def test_default_accuracy_level_int8_activations_against_portable(ckpt, convs, workdir):
    """Accuracy level 4 (the default) quantizes activations to int8 on the fly: not token-identical. Measured
    2026-11-26 on this tiny checkpoint against the portable export (32 tokens), teacher-forced top-1: 97 % (text)
    and 100 % (image) as here; 91 % and 91 % with the lm_head left fp32 (greedy prefixes 20 and 1 of 32), the
    other variants 91-100 %. A wrong layout or zero point scores near 0 %."""
    from test_quantized import _teacher_forced
    from qwen2vl_edge.runtime import Qwen2VLPipeline

    # as docs/export.md exports a published checkpoint: the float lm_head (tied embedding) quantized to int8 too
    art = export_artifact(ckpt.quant, workdir / f"art-{ckpt.variant.name}-ort4", target="ort-cpu", weights="int8")
    fast, portable = Qwen2VLPipeline.load(art), Qwen2VLPipeline.load(ckpt.portable)
    assert fast.artifact.export["accuracy_level"] == 4
    ops = [n.op_type for n in onnx.load(str(art / "embedding_merger.onnx"), load_external_data=False).graph.node]
    assert "GatherBlockQuantized" in ops  # the table the int8 lm_head reads
    for name, conv in convs.items():
        ref = portable.generate(conv, max_new_tokens=32, min_new_tokens=32).token_ids
        top1 = _teacher_forced(fast, ref, conv)
        print(f"{ckpt.variant.name} accuracy level 4, {name}: teacher-forced top-1 {top1:.0%}")
        assert top1 >= 0.8


@requires_torch
@pytest.mark.parametrize("ckpt", CHECKPOINTS[:1], indirect=True, ids=lambda v: v.name)
@pytest.mark.parametrize("version", ["10.3", "10.15"])
def test_tensorrt_fp32_export_of_a_gptq_checkpoint_gives_the_portable_exports_tokens(ckpt, convs, workdir, version):
    """The tensorrt target takes a quantized checkpoint's weights dequantized, through the same linear-layer
    reader as the other targets (both attention forms)."""
    from qwen2vl_edge.runtime import Qwen2VLPipeline

    art = export_artifact(ckpt.quant, workdir / f"art-{ckpt.variant.name}-trt-{version}", target="tensorrt",
                          precision="fp32", min_tensorrt=version)
    trt, portable = Qwen2VLPipeline.load(art), Qwen2VLPipeline.load(ckpt.portable)
    conv = convs["image"]
    ref = portable.generate(conv, max_new_tokens=N_ORT, min_new_tokens=N_ORT).token_ids
    assert len(set(ref)) > N_ORT // 2, "reference output degenerate: parity would prove nothing"
    assert trt.generate(conv, max_new_tokens=N_ORT, min_new_tokens=N_ORT).token_ids == ref
