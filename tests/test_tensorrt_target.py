"""--target tensorrt: the strongly typed graphs for TensorRT 10.3 / 10.15, run by ONNX Runtime on the CPU.

fp32 parity with transformers is in test_export_parity (parametrized over targets); here: reduced precision and
quantized weights against fp32, the in-place cache, the structure TensorRT relies on, and check-trt.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from conftest import TRT_MAX_CONTEXT, random_image, requires_torch
from qwen2vl_edge.runtime import ArtifactError, ConfigError, InputError, Qwen2VLPipeline

pytestmark = requires_torch
VERSIONS = ["10.3", "10.15"]


@pytest.fixture(scope="module")
def prompts():
    img = random_image(np.random.default_rng(9), 320, 240)
    return {"text": [{"role": "user", "content": "Tell me about robots and the sea."}],
            "image": [{"role": "user", "content": [{"type": "image", "image": img},
                                                   {"type": "text", "text": "Describe this image."}]}]}


def _report(label: str, top1: dict[str, float]) -> None:
    print(f"{label}: teacher-forced top-1 vs fp32 " + ", ".join(f"{k} {v:.0%}" for k, v in top1.items()))


def _agreement(pipe, reference_pipe, prompts) -> dict[str, float]:
    from test_quantized import _teacher_forced

    return {name: _teacher_forced(pipe, reference_pipe.generate(conv, max_new_tokens=32, min_new_tokens=32).token_ids,
                                  conv) for name, conv in prompts.items()}


# Teacher-forced top-1 agreement with the fp32 graphs over 32 tokens, measured 2026-11-26 on the tiny
# checkpoint (printed by the tests): fp16 100 % on text and image for both versions (Qwen2.5-VL's tiny checkpoint:
# 100 % too, 2026-12-06; Qwen3-VL's: 100 % / 97 % on both versions, 2026-12-06). The floor leaves room
# for kernels that round differently; a wrong cast or mask scores far below it.
FP16_TOP1 = 0.9


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("version", VERSIONS)
def test_fp16_agrees_with_fp32(family_pipe, prompts, version, family):
    """Qwen2.5-VL's image (320 x 240: 8 x 11 merged tokens) fills its windows partly: pad slots in fp16 too."""
    half = family_pipe(family, f"tensorrt-{version}-fp16")
    top1 = _agreement(half, family_pipe(family, "portable"), prompts)
    _report(f"{family} tensorrt {version} fp16", top1)
    assert min(top1.values()) >= FP16_TOP1


@pytest.mark.parametrize("version", VERSIONS)
def test_fp16_left_padded_batch_stays_finite(trt_pipe, version):
    from qwen2vl_edge.runtime.generation import StepTimes, decode_step, prefill

    half = trt_pipe(min_tensorrt=version, precision="fp16")
    convs = [[{"role": "user", "content": "Hi."}],
             [{"role": "user", "content": "Tell me a long story about a robot who sails the sea at night, " * 3}]]
    inputs = half.processor(convs)
    assert (inputs["attention_mask"][0] == 0).sum() > 20  # the short row is mostly padding
    embeds = half.backend.merge(inputs["input_ids"], np.zeros((0, 64), np.float32))
    logits, state = prefill(half.backend, embeds, inputs, StepTimes(), max_new_tokens=4)
    for _ in range(4):
        assert np.isfinite(logits).all()
        logits = decode_step(half.backend, state, logits.argmax(-1))
    cache = state.cache.buffers or {k: v.numpy() for k, v in state.cache.values.items()}
    assert all(buf.dtype == np.float16 and np.isfinite(buf).all() for buf in cache.values())


# measured 2026-11-26 (tiny checkpoint, fp16 graphs, 10.15): int4 in blocks of 32: 22 % (text) / 22 % (image);
# Qwen2.5-VL's tiny checkpoint (2026-12-06): 25 % / 38 %; Qwen3-VL's: 16 % / 12 %. Random weights give far flatter logits than a trained
# model: a floor only.
INT4_TOP1 = 0.1


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_int4_weights_agreement(family_pipe, prompts, family):
    q = family_pipe(family, "tensorrt-10.15-fp16-int4")
    dq = [n for n in onnx.load(str(q.artifact.graph_path("decoder")), load_external_data=False).graph.node
          if n.op_type == "DequantizeLinear"]
    assert len(dq) == 7 * q.artifact.config.text.num_hidden_layers  # every linear; the tied lm_head stays fp16
    top1 = _agreement(q, family_pipe(family, "portable"), prompts)
    _report(f"{family} tensorrt fp16 int4", top1)
    assert min(top1.values()) >= INT4_TOP1


def test_int8_weights_are_refused_for_tensorrt(tiny_ckpt, tmp_path):
    """TensorRT documents weight-only quantization for int4 blocks only; int8 GEMMs need quantized activations."""
    from qwen2vl_edge.export.onnx_export import export

    for flags in ({"weights": "int8"}, {"weights": "int4", "vision_weights": "int8"}):
        with pytest.raises(ConfigError, match="not offered with --target tensorrt.*W4A16.*W8A8.*--weights int4.*"
                                              "--weights fp32"):
            export(tiny_ckpt, tmp_path / "a", target="tensorrt", verbose=False, **flags)
    assert not (tmp_path / "a").exists()


def test_preallocated_cache_is_scattered_in_place(trt_pipe, pipe):
    """10.15: TensorScatter writes each step into the request's buffer (bound as past and present), whose length the
    graphs fix (export --max-context); decode reads all of it, the mask hiding the unused tail. Logits follow the
    portable graphs on a left-padded batch."""
    from qwen2vl_edge.runtime.generation import StepTimes, decode_step, prefill

    fused = trt_pipe(min_tensorrt="10.15")
    assert fused.artifact.export["kv_cache"] == "preallocated"
    convs = [[{"role": "user", "content": "Hi."}],
             [{"role": "user", "content": "Tell me a long story about a robot who sails the sea at night."}]]
    inputs = pipe.processor(convs)
    states, logits = {}, {}
    for name, p in (("ref", pipe), ("fused", fused)):
        embeds = p.backend.merge(inputs["input_ids"], np.zeros((0, 64), np.float32))
        logits[name], states[name] = prefill(p.backend, embeds, inputs, StepTimes(), max_new_tokens=2)
    first = states["fused"].cache.buffers
    before = {k: v.copy() for k, v in first.items()}
    for step in range(5):
        np.testing.assert_allclose(logits["fused"], logits["ref"], atol=1e-4, rtol=0)
        token = logits["ref"].argmax(-1)
        for name, p in (("ref", pipe), ("fused", fused)):
            logits[name] = decode_step(p.backend, states[name], token)
        if step == 0:  # the new row was written into the very buffer bound as past
            buf = states["fused"].cache.buffers
            assert buf is first and any((buf[k] != before[k]).any() for k in buf)
    assert states["fused"].cache.capacity == TRT_MAX_CONTEXT == fused.artifact.static_kv_length
    conv = [{"role": "user", "content": "Hi."}]  # more positions than the static cache holds: named, before running
    with pytest.raises(InputError, match=rf"these graphs fix \(export --max-context\) of {TRT_MAX_CONTEXT} tokens"):
        fused.generate(conv, max_new_tokens=TRT_MAX_CONTEXT)


def _concrete_vision(art, grid: tuple[int, int, int]) -> onnx.ModelProto:
    """The vision graph with the concrete input shapes of one frame of `grid` (its pixels and the grid's
    other inputs, runtime/rope.py: vision_inputs), shapes inferred."""
    from qwen2vl_edge.runtime.rope import vision_inputs

    config = Qwen2VLPipeline.load(art).artifact.config
    shapes = {name: a.shape for name, a in vision_inputs(grid, config).items()}
    shapes["pixel_values"] = (1, grid[1] * grid[2], config.vision.patch_dim)
    model = onnx.load(str(art / "vision_encoder.onnx"), load_external_data=False)
    for value in model.graph.input:
        for d, size in zip(value.type.tensor_type.shape.dim, shapes[value.name]):
            d.dim_value = size
    return onnx.shape_inference.infer_shapes(model)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("version", VERSIONS)
def test_only_the_1015_vision_graph_has_no_patches_by_patches_tensor(family_pipe, version, family):
    """No tensor is ever [N, N] over the window layout's N slots (Qwen2.5-VL: 4 windows of 64 for 10 x 10 patches);
    10.15's fused Attention leaves no [S, S] one either, window blocks only [64, 64] per window."""
    patches, slots = 100, 256  # no other dimension of the tiny vision encoders is 100 or 256
    model = _concrete_vision(family_pipe(family, f"tensorrt-{version}-fp16").artifact.dir, (1, 10, 10))
    last2 = [[d.dim_value for d in v.type.tensor_type.shape.dim][-2:] for v in model.graph.value_info]
    attention = [n for n in model.graph.node if n.op_type == "Attention"]
    depth = 2 if family == "qwen2_vl" else 3
    assert [slots, slots] not in last2
    if version == "10.15":
        assert [patches, patches] not in last2 and len(attention) == depth  # one fused Attention per block
    else:
        assert [patches, patches] in last2 and not attention  # explicit attention: the scores exist
    if family == "qwen2_5_vl":  # window blocks: [frames * windows, heads, 64, 64] scores or mask, per window
        assert [64, 64] in last2


@pytest.mark.parametrize("version", VERSIONS)
def test_graphs_are_strongly_typed_in_the_precision(trt_export, version):
    art = trt_export(min_tensorrt=version, precision="fp16")
    manifest = json.loads((art / "manifest.json").read_text())
    export = manifest["export"]
    assert (export["target"], export["precision"], export["min_tensorrt"], export["weights"]) == (
        "tensorrt", "fp16", version, "fp32")
    assert export["kv_cache"] == ("preallocated" if version == "10.15" else "concat")
    # 10.15: the cache's length is a number in the file itself (TensorRT's KVCacheUpdate needs a static one)
    assert export["max_context"] == (TRT_MAX_CONTEXT if version == "10.15" else None)
    past = next(v for v in manifest["graphs"]["decoder"]["inputs"] if v["name"] == "past_key_values.0.key")
    assert past["shape"][2] == (TRT_MAX_CONTEXT if version == "10.15" else "past_seq")
    assert export["opset"] == (24 if version == "10.15" else 17)
    for name, graph in manifest["graphs"].items():
        for value in graph["inputs"] + graph["outputs"]:
            kv = value["name"].startswith(("past_key_values.", "present."))
            assert value["dtype"] in (("float16",) if kv else ("float32", "int64")), (name, value)
    decoder = onnx.load(str(art / "decoder.onnx"), load_external_data=False)
    floats = {t.data_type for t in decoder.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)
              and t.data_location == TensorProto.EXTERNAL}
    assert floats == {TensorProto.FLOAT16}  # weights stored in the precision
    fused = {"Attention", "TensorScatter", "RMSNormalization", "RotaryEmbedding"}
    ops = {n.op_type for n in decoder.graph.node}
    assert (fused <= ops) if version == "10.15" else not (fused & ops)
    cache_ops = {n.op_type for n in decoder.graph.node if any(i.startswith("past_key_values.") for i in n.input)}
    assert cache_ops == ({"TensorScatter", "Shape"} if version == "10.15" else {"Concat"})  # Shape: capacity


@pytest.mark.parametrize("version", ["10.3", "10.15"])
def test_graphs_carry_the_oldest_ir_version_their_opset_allows(trt_export, tiny_artifact, version):
    """onnx writes its newest IR version by default (14 with onnx 1.23), which onnxruntime 1.30 refuses ("max
    supported IR version: 13", seen on the GPU machine's onnxruntime) and older TensorRT parsers may too."""
    art = trt_export(min_tensorrt=version, precision="fp16")
    for directory in (art, tiny_artifact):
        for name in ("vision_encoder", "embedding_merger", "decoder"):
            model = onnx.load(str(directory / f"{name}.onnx"), load_external_data=False)
            opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
            assert model.ir_version == (12 if opset >= 24 else 10), (directory.name, name, opset)


def test_bf16_export_is_for_tensorrt_only(trt_export):
    art = trt_export(precision="bf16")
    model = onnx.load(str(art / "decoder.onnx"), load_external_data=False)
    kv = [v for v in list(model.graph.input) + list(model.graph.output) if "key" in v.name or "value" in v.name]
    assert kv and {v.type.tensor_type.elem_type for v in kv} == {TensorProto.BFLOAT16}
    with pytest.raises(ArtifactError, match="bf16 tensorrt export.*no bf16 MatMul.*--precision fp16"):
        Qwen2VLPipeline.load(art)


def test_check_trt_passes_on_every_variant_with_its_matrix(trt_export):
    from qwen2vl_edge.export.trt_check import check_artifact, load_rules

    variants = [dict(min_tensorrt=v, precision=p, weights=w) for v in VERSIONS for p in ("fp32", "fp16", "bf16")
                for w in ("fp32", "int4")]
    for options in variants:
        assert [str(p) for p in check_artifact(trt_export(**options))] == [], options
    # the 10.15 graphs are refused by the 10.3 matrix, naming what 10.3's parser lacks
    problems = [str(p) for p in check_artifact(trt_export(min_tensorrt="10.15"), version="10.3")]
    assert any("(TensorScatter): not supported by TensorRT 10.3" in p for p in problems)
    assert load_rules("10.3")["source"] != load_rules("10.15")["source"]


def test_check_trt_enforces_the_fused_ops_restrictions(trt_export, tmp_path):
    """Attention with a past input, TensorScatter on another axis, a DequantizeLinear with a zero point."""
    import shutil
    import subprocess
    import sys

    bad = tmp_path / "bad"
    shutil.copytree(trt_export(min_tensorrt="10.15", precision="fp16", weights="int4"), bad)
    model = onnx.load(str(bad / "decoder.onnx"), load_external_data=False)
    nodes = model.graph.node
    attention = next(n for n in nodes if n.op_type == "Attention")
    attention.input.extend(["", "past_key_values.0.key"])
    scatter = next(n for n in nodes if n.op_type == "TensorScatter")
    next(a for a in scatter.attribute if a.name == "axis").i = 2
    dq = next(n for n in nodes if n.op_type == "DequantizeLinear")
    dq.input.append(dq.input[0])
    onnx.save(model, str(bad / "decoder.onnx"))
    result = subprocess.run([sys.executable, "-m", "qwen2vl_edge", "check-trt", str(bad)], capture_output=True,
                            text=True)
    assert result.returncode == 1 and "TensorRT 10.15" in result.stderr
    assert f"({attention.op_type}): input 5 ('past_key_values.0.key') is unsupported" in result.stdout
    assert "(TensorScatter): attribute axis must be -2" in result.stdout
    assert "(DequantizeLinear): a zero point is given" in result.stdout


def test_bad_tensorrt_options(tiny_ckpt, tmp_path):
    from qwen2vl_edge.export.onnx_export import export

    with pytest.raises(ValueError, match="--min-tensorrt must be one of 10.3, 10.15"):
        export(tiny_ckpt, tmp_path / "a", target="tensorrt", min_tensorrt="9.0", verbose=False)
    with pytest.raises(ValueError, match="choose the strongly typed graphs of --target tensorrt"):
        export(tiny_ckpt, tmp_path / "b", precision="fp16", verbose=False)
    with pytest.raises(ValueError, match="above what TensorRT 10.3's parser takes"):
        export(tiny_ckpt, tmp_path / "c", target="tensorrt", opset=24, verbose=False)
    with pytest.raises(ValueError, match="--max-context fixes the KV cache length of --min-tensorrt 10.15 graphs"):
        export(tiny_ckpt, tmp_path / "d", target="tensorrt", max_context=512, verbose=False)
    with pytest.raises(ValueError, match="--max-context must be 2..32768"):
        export(tiny_ckpt, tmp_path / "e", target="tensorrt", min_tensorrt="10.15", max_context=40000, verbose=False)


def test_fp32_1015_warns_that_it_needs_a_fused_fp32_attention_kernel():
    from qwen2vl_edge.export.onnx_export import _target

    with pytest.warns(UserWarning, match="IAttention, which is not decomposable by default.*--precision fp16"):
        _target("tensorrt", "fp32", "10.15", "fp32", 17, "fp32")


def test_vision_memory_benchmark_measures_the_encoder_in_a_child(trt_export):
    from qwen2vl_edge.benchmarks.vision_memory import run_child

    result = run_child(trt_export(precision="fp16"), size=224, threads=1, timeout=300)
    assert result.get("error") is None, result
    assert result["patches"] == (224 // 14) ** 2 and result["features_finite"]
    assert result["peak_rss_bytes"] >= result["peak_after_load_bytes"] > result["rss_before_load_bytes"] > 0
    assert result["export"] == {"target": "tensorrt", "precision": "fp16", "min_tensorrt": "10.15"}


def _lowered_to_fp16(src, out):
    """The decoder with its additive mask as an fp16 build would hold it: the fp32 minimum becomes -inf."""
    from qwen2vl_edge.export.decoder import MASK_MIN

    model = onnx.load(str(src / "decoder.onnx"))
    lowered = 0
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT and init.dims == [] and onnx.numpy_helper.to_array(init) == MASK_MIN:
            init.CopyFrom(onnx.numpy_helper.from_array(np.array(-np.inf, np.float32), init.name))
            lowered += 1
    assert lowered == 1  # the one bias every layer shares
    onnx.save(model, str(out))
    return out


def test_10_3_left_padding_mask_survives_an_fp16_lowering(trt_export, tmp_path):
    """A build may run the 10.3 decoder's mask in fp16, where its fp32 minimum is -inf: a pad query that saw no key
    would be NaN after the softmax, and NaN keys poison the real queries of its row in the next layer (NaN * 0 is
    NaN). Every query sees itself, so a left-padded batch stays finite and its real rows keep their logits."""
    import onnxruntime as ort

    art = trt_export(min_tensorrt="10.3", precision="fp16")
    cfg = Qwen2VLPipeline.load(art).artifact.config.text
    rng = np.random.default_rng(0)
    L, pad = 12, 5
    embeds = (rng.standard_normal((2, L, cfg.hidden_size)) * 0.5).astype(np.float32)
    mask = np.ones((2, L), np.int64)
    mask[0, :pad] = 0  # row 0 is left-padded
    positions = np.broadcast_to(np.clip(np.cumsum(mask, 1) - 1, 0, None), (3, 2, L)).astype(np.int64)
    feeds = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": np.ascontiguousarray(positions)}
    feeds |= {f"past_key_values.{i}.{kind}": np.zeros((2, cfg.num_key_value_heads, 0, cfg.head_dim), np.float16)
              for i in range(cfg.num_hidden_layers) for kind in ("key", "value")}
    logits = {name: ort.InferenceSession(str(path)).run(["logits"], feeds)[0]
              for name, path in (("exported", art / "decoder.onnx"),
                                 ("lowered", _lowered_to_fp16(art, tmp_path / "lowered.onnx")))}
    assert np.isfinite(logits["lowered"]).all()
    np.testing.assert_allclose(logits["lowered"], logits["exported"], atol=1e-3, rtol=0)


def test_quantization_scales_stay_positive_normals(tmp_path):
    """An all-zero block (scale 0 before) and a block whose fp16 scale underflows get the smallest positive normal
    of their dtype, q = 0 (still exact); TensorRT's parser refuses scales <= 0, and check-trt names them."""
    from onnx import helper

    from qwen2vl_edge.export.graph import Graph, Target, WeightStore
    from qwen2vl_edge.export.quantize import QuantSpec, dequantize_matmul
    from qwen2vl_edge.export.trt_check import check_model, load_rules

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 64)).astype(np.float32)
    weight[0] = 0  # a row of all-zero blocks
    weight[1, :32] = 1e-9  # a block whose scale (1e-9 / 7) is 0 in fp16
    store = WeightStore(tmp_path / "w.data", "fp16")
    g = Graph("q", store, 21, quant=QuantSpec(4, 32), target=Target("tensorrt", "fp16", "10.3"))
    x = g.input("x", TensorProto.FLOAT16, [1, 64])
    g.output(dequantize_matmul(g, x, weight, "lin", g.quant), "y", TensorProto.FLOAT16, [1, 8])
    store.close()
    model = g.model()
    onnx.save(model, str(tmp_path / "q.onnx"))
    scales = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name.endswith("scales4")),
                                        str(tmp_path))
    assert scales.dtype == np.float16 and (scales > 0).all()
    assert scales[0, 0] == scales[0, 1] == np.finfo(np.float16).tiny  # [K/block, N]: block 0 of rows 0 and 1
    rules = load_rules("10.3")
    assert check_model(model, "q", rules, tmp_path) == []
    import onnxruntime as ort

    x_value = rng.standard_normal((1, 64)).astype(np.float16)
    y = ort.InferenceSession(str(tmp_path / "q.onnx")).run(None, {"x": x_value})[0]
    assert np.isfinite(y).all() and y[0, 0] == 0  # the zero row stays exactly zero
    # the rule itself: a scale of 0 (what an all-zero block got before) is refused
    bad = helper.make_model(helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w", "s"], ["y"], axis=0, block_size=2)], "bad", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 1])],
        [helper.make_tensor("w", TensorProto.INT4, [2, 1], [1, 2]),
         helper.make_tensor("s", TensorProto.FLOAT16, [1, 1], [0.0])]),
        opset_imports=[helper.make_opsetid("", 21)])
    problems = [str(p) for p in check_model(bad, "bad", rules)]
    assert any("1 of 1 scale(s) in 's' are not positive" in p and "Scale coefficients must all be positive" in p
               for p in problems), problems
