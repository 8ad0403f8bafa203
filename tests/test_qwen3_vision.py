"""Qwen3-VL's vision encoder (issue 26) against transformers' Qwen3VLVisionModel on the tiny checkpoint: the
position-table taps the host computes, the features and each DeepStack feature on every target, the backends'
joins, and the plain-data parts (engine profiles, I/O buffers, parameter counts).

The graphs are those of the tiny checkpoint's whole exports (conftest: family_pipe's artifacts, shared with the
parity tests). Inputs are random patches of the checkpoint's patch size (the processor's pixels are another test's business)."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import onnx
import pytest

from conftest import TARGET_OPTIONS, requires_torch
from qwen2vl_edge.runtime.backends.onnxruntime import join_features
from qwen2vl_edge.runtime.config import load_config, parse_hf_config
from qwen2vl_edge.runtime.rope import vision_inputs, vision_pos_taps

# Qwen/Qwen3-VL-2B-Instruct's config.json (the fields that matter here)
QWEN3VL_2B = {
    "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "tie_word_embeddings": True,
    "text_config": {"hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
                    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                    "max_position_embeddings": 262144, "rms_norm_eps": 1e-6, "rope_theta": 5000000,
                    "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"}},
    "vision_config": {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16,
                      "out_hidden_size": 2048, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                      "num_position_embeddings": 2304, "deepstack_visual_indexes": [5, 11, 17],
                      "hidden_act": "gelu_pytorch_tanh", "in_channels": 3},
}
CFG_3 = parse_hf_config(QWEN3VL_2B)

# -- the position table's taps: transformers' helper and torch's interpolate ---------------------------------

# square and not, smaller and larger than the tables (8 x 8: the tiny checkpoint's; 48 x 48: Qwen3-VL's), several
# frames, one merge block wide
TAP_GRIDS = [(1, 2, 2), (1, 4, 6), (1, 6, 4), (2, 8, 8), (1, 20, 14), (3, 2, 30), (1, 96, 2), (1, 60, 92)]


@requires_torch
@pytest.mark.parametrize("side", [8, 48])
@pytest.mark.parametrize("grid", TAP_GRIDS)
def test_pos_taps_are_transformers_interpolation(grid, side):
    """The same indices and weights (equal floats) as get_vision_interpolation_indices_and_weights (bilinear,
    align_corners=True, merge-block order), whose frames repeat one frame's; the weighted table is torch's
    F.interpolate of it (bilinear, align_corners=True), in patch order."""
    import torch
    import torch.nn.functional as F
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    vision = dataclasses.replace(CFG_3.vision, num_position_embeddings=side * side)
    ours = vision_pos_taps(grid, vision)
    index, weight = get_vision_interpolation_indices_and_weights(
        torch.tensor([grid]), side, mode="bilinear", align_corners=True, spatial_merge_size=2)
    t, h, w = grid
    assert ours["pos_index"].dtype == np.int64 and ours["pos_weight"].dtype == np.float32
    np.testing.assert_array_equal(np.tile(ours["pos_index"], (t, 1)), index.numpy())
    np.testing.assert_array_equal(np.tile(ours["pos_weight"], (t, 1)), weight.numpy())

    table = np.random.default_rng(0).standard_normal((side * side, 5)).astype(np.float32)
    resampled = (table[ours["pos_index"]] * ours["pos_weight"][:, :, None]).sum(1)  # [h*w, 5], patch order
    image = torch.from_numpy(table.T.reshape(1, 5, side, side))
    want = F.interpolate(image, size=(h, w), mode="bilinear", align_corners=True)[0].numpy()  # [5, h, w]
    want = want.reshape(5, h // 2, 2, w // 2, 2).transpose(1, 3, 2, 4, 0).reshape(h * w, 5)  # merge blocks adjacent
    # torch's kernel rounds its float32 source coordinates its own way: equal to ~2e-5 on values of ~1
    np.testing.assert_allclose(resampled, want, rtol=0, atol=1e-4)


def test_vision_inputs_add_the_taps_for_position_table_families_only():
    from test_tensorrt import CFG_2B

    assert {"pos_index", "pos_weight"} <= set(vision_inputs((1, 4, 6), CFG_3))
    assert set(vision_inputs((1, 4, 6), CFG_2B)) == {"rotary_cos", "rotary_sin"}


# -- the graph on every target against transformers ----------------------------------------------------------

@requires_torch
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gelu_tanh_is_pytorchs(tmp_path, precision):
    """The blocks' gelu_pytorch_tanh, alone: the features' tolerance cannot tell it from the exact GELU (their
    difference, 5e-4 at most, is 1e-5 of the tiny encoder's features), so it is held to torch here; in fp16 a
    large |x| gives x (its square overflows to inf, whose tanh is 1), never NaN."""
    import onnxruntime as ort
    import torch

    from qwen2vl_edge.export.graph import FLOAT, Graph, Target, WeightStore
    from qwen2vl_edge.export.vision import activation

    target = Target("tensorrt", precision, "10.3") if precision == "fp16" else Target()
    g = Graph("gelu", WeightStore(tmp_path / "w.data"), 17, target=target)
    x = g.input("x", FLOAT, [None])
    g.output(g.to_f32(activation(g, g.to_act(x), "gelu_pytorch_tanh")), "y", FLOAT, [None])
    session = ort.InferenceSession(g.model().SerializeToString(), providers=["CPUExecutionProvider"])
    xs = np.concatenate([np.linspace(-8, 8, 2001), [-1e4, -300.0, 300.0, 1e4]]).astype(np.float32)
    if precision == "fp16":
        xs = xs.astype(np.float16).astype(np.float32)
    ours = session.run(None, {"x": xs})[0]
    want = torch.nn.functional.gelu(torch.from_numpy(xs), approximate="tanh").numpy()
    exact = torch.nn.functional.gelu(torch.from_numpy(xs)).numpy()
    assert np.isfinite(ours).all()
    tolerance = 1e-6 if precision == "fp32" else 2e-3 * np.maximum(np.abs(want), 1)  # fp16's steps
    assert (np.abs(ours - want) <= tolerance).all()
    assert np.abs(exact - want).max() > 1e-4  # what the check tells apart

CASES = {"one-image": [(1, 16, 20)],
         "three-images": [(1, 6, 8), (1, 22, 14), (1, 4, 30)],  # smaller, larger and wider than the 8 x 8 table
         "video6": [(3, 10, 12)]}  # 6 frames: 3 temporal slices, attention within each
FP32_TARGETS = ["portable", "ort-cpu", "tensorrt-10.3", "tensorrt-10.15"]
# conftest's targets, and ort-cpu with int8 vision weights (block-quantized MatMulNBits)
VISION_TARGETS = {**TARGET_OPTIONS, "ort-cpu-int8-vision": {"target": "ort-cpu", "vision_weights": "int8"}}


_EXTRA_EXPORTS: dict = {}  # VISION_TARGETS outside conftest's TARGET_OPTIONS -> artifact dir


@pytest.fixture
def graphs(family_pipe, tiny_ckpt_3, workdir):
    """graphs(target) -> (path, ONNX Runtime session) of the tiny Qwen3-VL's vision graph for a VISION_TARGETS
    target, from its export (made once per run)."""
    import onnxruntime as ort

    from conftest import export_artifact

    def make(target):
        if target in TARGET_OPTIONS:
            path = family_pipe("qwen3_vl", target).artifact.graph_path("vision_encoder")
        else:
            if target not in _EXTRA_EXPORTS:
                _EXTRA_EXPORTS[target] = export_artifact(tiny_ckpt_3, workdir / f"art-qwen3_vl-{target}",
                                                         **VISION_TARGETS[target])
            path = _EXTRA_EXPORTS[target] / "vision_encoder.onnx"
        return path, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    return make


@pytest.fixture(scope="module")
def cases(tiny_ckpt_3):
    """case -> (patches per grid, grids, transformers' features [M, H], its DeepStack features [K, M, H])."""
    import torch

    from reference import hf_model

    model, cfg = hf_model(str(tiny_ckpt_3)), load_config(tiny_ckpt_3)
    rng = np.random.default_rng(26)
    out = {}
    for name, grids in CASES.items():
        pixels = [rng.standard_normal((t * h * w, cfg.vision.patch_dim)).astype(np.float32) for t, h, w in grids]
        with torch.no_grad():
            ref = model.model.visual(torch.from_numpy(np.concatenate(pixels)), grid_thw=torch.tensor(grids))
        out[name] = pixels, grids, ref.pooler_output.numpy(), np.stack([d.numpy() for d in ref.deepstack_features])
    return out


def _ours(session, cfg, pixels, grids, feeds_of=vision_inputs):
    """The session's outputs per grid as OrtBackend.vision returns them, joined as OrtBackend.join does."""
    features = []
    for x, (t, h, w) in zip(pixels, grids):
        outputs = session.run(None, {"pixel_values": x.reshape(t, h * w, -1), **feeds_of((t, h, w), cfg)})
        features.append(tuple(outputs))
    return join_features(features, cfg.text.hidden_size, len(cfg.vision.deepstack_visual_indexes))


def _errors(ours, ref_main, ref_deep) -> list[float]:
    """Max relative error (as test_export_parity's) of the features, then of each DeepStack feature."""
    main, deep = ours
    assert main.shape == ref_main.shape and deep.shape == ref_deep.shape
    pairs = [(main, ref_main)] + list(zip(deep, ref_deep))
    return [float(np.abs(a - b).max() / np.abs(b).max()) for a, b in pairs]


@requires_torch
@pytest.mark.parametrize("target", FP32_TARGETS)
@pytest.mark.parametrize("case", list(CASES))
def test_vision_and_deepstack_features_match(graphs, cases, tiny_ckpt_3, case, target):
    cfg = load_config(tiny_ckpt_3)
    pixels, grids, ref_main, ref_deep = cases[case]
    errors = _errors(_ours(graphs(target)[1], cfg, pixels, grids), ref_main, ref_deep)
    print(f"qwen3 vision {target} {case}: max relative error, features then DeepStack {errors}")
    assert max(errors) <= 1e-4


@requires_torch
def test_reference_deepstack_is_not_degenerate_and_the_table_counts(graphs, cases, tiny_ckpt_3):
    """Parity proves something only if the reference's DeepStack features differ between taps, from the final
    features and from row to row, and if the position table moves the features far beyond the tolerance."""
    cfg = load_config(tiny_ckpt_3)
    pixels, grids, ref_main, ref_deep = cases["three-images"]
    assert ref_deep.shape == (2, *ref_main.shape)
    scale = np.abs(ref_main).max()
    assert np.abs(ref_deep[0] - ref_deep[1]).max() > 0.1 * scale
    assert min(np.abs(d - ref_main).max() for d in ref_deep) > 0.1 * scale
    for features in (ref_main, *ref_deep):
        assert np.abs(np.diff(features, axis=0)).max(axis=1).min() > 1e-3, "reference features degenerate"

    def untabled(grid, config):  # the taps' weights zeroed: no position embedding
        return {**vision_inputs(grid, config), "pos_weight": np.zeros((grid[1] * grid[2], 4), np.float32)}

    errors = _errors(_ours(graphs("portable")[1], cfg, pixels, grids, untabled), ref_main, ref_deep)
    assert min(errors) > 1e-2, errors


# measured 2026-12-06 (tiny checkpoint, the cases above): fp16 5e-4 on 10.3 and 10.15 (features and DeepStack);
# ort-cpu int8 1.1e-2, int8-dynamic 1.4e-2; tensorrt 10.15 fp16 with int4 blocks 0.15 (random weights: far
# flatter than a trained model's). Floors, with room for kernels that round differently; a wrong cast, norm or
# tap lands far above them.
FLOORS = {"tensorrt-10.3-fp16": 5e-3, "tensorrt-10.15-fp16": 5e-3, "ort-cpu-int8-vision": 5e-2,
          "ort-cpu-int8-dynamic-vision": 5e-2, "tensorrt-10.15-fp16-int4": 0.3}
QUANT_OPS = {"ort-cpu-int8-vision": "MatMulNBits", "ort-cpu-int8-dynamic-vision": "DynamicQuantizeMatMul",
             "tensorrt-10.15-fp16-int4": "DequantizeLinear"}


@requires_torch
@pytest.mark.parametrize("target", list(FLOORS))
def test_reduced_precision_and_quantized_floors(graphs, cases, tiny_ckpt_3, target):
    cfg = load_config(tiny_ckpt_3)
    path, session = graphs(target)
    if target in QUANT_OPS:  # the DeepStack mergers' linears are quantized too
        model = onnx.load(str(path), load_external_data=False)
        quantized = [n for n in model.graph.node if n.op_type == QUANT_OPS[target]]
        mergers = [n for n in quantized if any("merger" in name for name in n.input)]
        assert len(mergers) == 2 * (1 + len(cfg.vision.deepstack_visual_indexes))  # fc1, fc2 of each merger
        assert len(quantized) >= 3 * cfg.vision.depth  # qkv, proj, fc1 (fc2's 48 inputs may divide no block)
    pixels, grids, ref_main, ref_deep = cases["three-images"]
    ours = _ours(session, cfg, pixels, grids)
    assert all(np.isfinite(a).all() for a in ours)
    errors = _errors(ours, ref_main, ref_deep)
    print(f"qwen3 vision {target}: max relative error, features then DeepStack {errors}")
    assert max(errors) <= FLOORS[target]


# -- the graphs' structure: what TensorRT's parser and ONNX Runtime's fused kernels need -----------------------

TRT_VARIANTS = ["tensorrt-10.3", "tensorrt-10.15", "tensorrt-10.3-fp16", "tensorrt-10.15-fp16",
                "tensorrt-10.15-fp16-int4"]


@requires_torch
@pytest.mark.parametrize("target", TRT_VARIANTS)
def test_tensorrt_graphs_fit_the_operator_matrix_and_keep_fp32_islands(graphs, target):
    from qwen2vl_edge.export.graph import FP32_PREFIX
    from qwen2vl_edge.export.trt_check import check_model, load_rules

    path, _ = graphs(target)
    version = TARGET_OPTIONS[target]["min_tensorrt"]
    model = onnx.load(str(path), load_external_data=False)
    assert [str(p) for p in check_model(model, "vision_encoder", load_rules(version), path.parent)] == []
    io = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}
    assert io == {"pixel_values": onnx.TensorProto.FLOAT, "rotary_cos": onnx.TensorProto.FLOAT,
                  "rotary_sin": onnx.TensorProto.FLOAT, "pos_index": onnx.TensorProto.INT64,
                  "pos_weight": onnx.TensorProto.FLOAT, "image_embeds": onnx.TensorProto.FLOAT,
                  "deepstack_features": onnx.TensorProto.FLOAT}
    islands = {"LayerNormalization", "ReduceSum", "Softmax"}  # norms, the taps' sum, attention's softmax
    assert all(n.name.startswith(FP32_PREFIX) for n in model.graph.node if n.op_type in islands)
    attention = [n for n in model.graph.node if n.op_type == "Attention"]
    assert len(attention) == (3 if version == "10.15" else 0)  # one fused Attention a block from 10.15


@requires_torch
def test_engine_profile_covers_the_graphs_inputs(graphs, tiny_ckpt_3):
    """build-trt gives every input of the vision graph a range of its rank (trt_build._check_profiles_cover)."""
    from qwen2vl_edge.runtime.backends.trt_profiles import Limits, profiles_for

    model = onnx.load(str(graphs("tensorrt-10.15-fp16")[0]), load_external_data=False)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in model.graph.input}
    profile = profiles_for("vision_encoder", load_config(tiny_ckpt_3), Limits())[0]
    assert {name: len(lo) for name, (lo, _, _) in profile.items()} == ranks


@requires_torch
def test_ort_cpu_graph_attends_with_one_multi_head_attention_a_block(graphs):
    model = onnx.load(str(graphs("ort-cpu")[0]), load_external_data=False)
    mha = [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]
    assert len(mha) == 3 and all(len(n.input) == 3 for n in mha)  # q, k, v only: the flash path


# -- the backends' joins -----------------------------------------------------------------------------------------

def _features(rng, K, H, frames_tokens):
    return [(rng.standard_normal((f, n, H)).astype(np.float32), rng.standard_normal((K, f, n, H)).astype(np.float32))
            for f, n in frames_tokens]


def test_host_join_places_deepstack_rows_as_the_features_rows():
    rng = np.random.default_rng(1)
    feats = _features(rng, 3, 8, [(1, 6), (3, 4), (1, 2)])
    main, deep = join_features(feats, 8, 3)
    assert main.shape == (20, 8) and deep.shape == (3, 20, 8)
    np.testing.assert_array_equal(main[6:18], feats[1][0].reshape(12, 8))
    np.testing.assert_array_equal(deep[2, 6:18], feats[1][1][2].reshape(12, 8))
    empty = join_features([], 8, 3)
    assert empty[0].shape == (0, 8) and empty[1].shape == (3, 0, 8)
    np.testing.assert_array_equal(join_features([f for f, _ in feats], 8, 0), main)  # K = 0: as before


def test_tensorrt_join_on_device_equals_the_host_join(monkeypatch):
    """TensorRT's join copies each DeepStack tap's rows to row k * M + offset of the decoder's buffer, on the
    device (the CUDA fake moves real bytes): the same [M, H] and [K, M, H] as the host join."""
    from fake_cudart import FakeCudart
    from qwen2vl_edge.runtime.backends import cuda as cuda_layer
    from qwen2vl_edge.runtime.backends.cuda import DeviceBuffer, Stream
    from qwen2vl_edge.runtime.backends.tensorrt import VisionFeatures, join_on_device

    cuda = FakeCudart()
    monkeypatch.setattr(cuda_layer, "cudart", lambda: cuda)
    K, H, stream = 2, 8, Stream()
    host = _features(np.random.default_rng(2), K, H, [(1, 6), (3, 4), (1, 2)])
    device = [tuple(VisionFeatures(DeviceBuffer.alloc(a.nbytes), a.shape) for a in pair) for pair in host]
    want = join_features(host, H, K)
    # the I/O buffers are sized for the limits, not the request
    dst = [DeviceBuffer.alloc(expected.nbytes + 64) for expected in want]
    try:
        for on_device, on_host in zip(device, host):
            for f, a in zip(on_device, on_host):
                f.buf.upload(a, stream)
        for part, expected in enumerate(want):
            join_on_device([pair[part] for pair in device], dst[part], expected.shape, stream)
            got = dst[part].download_into(np.zeros(dst[part].nbytes // 4, np.float32), stream)[:expected.size]
            np.testing.assert_array_equal(got.reshape(expected.shape), expected)
    finally:  # while the CUDA fake is in place
        for f in [f for pair in device for f in pair]:
            f.free()
        for buf in dst:
            buf.free()
        stream.free()
    assert cuda.live() == [] and cuda.errors == []


def _prompt_inputs(cfg, pixels, grids) -> dict:
    """One row whose image placeholder runs, between text tokens, take the images' merged tokens."""
    text, ids = 100, []
    for t, h, w in grids:
        ids += [text] + [cfg.image_token_id] * (t * h * w // cfg.vision.spatial_merge_size ** 2)
    return {"input_ids": np.array([ids + [text]]), "pixel_values": np.concatenate(pixels),
            "image_grid_thw": np.array(grids)}


@requires_torch
@pytest.mark.parametrize("version", ["10.3", "10.15"])
def test_backends_hand_on_the_deepstack_features(tiny_ckpt_3, cases, fakes, tmp_path, version):
    """Through a pipeline: OrtBackend.vision / join give (features [M, H], DeepStack [K, M, H]) within 1e-4 of
    transformers; TrtBackend (build-trt and the engines through the recording fakes, which run the source graphs
    with ONNX Runtime on the bound device bytes) leaves the same numbers in the merger's vision_embeds buffer and the
    decoder's deepstack_embeds buffer."""
    from conftest import TRT_MAX_CONTEXT, export_artifact
    from qwen2vl_edge.runtime import Qwen2VLPipeline
    from qwen2vl_edge.runtime.backends.tensorrt import JoinedFeatures
    from test_tensorrt import SMALL, _built

    with warnings.catch_warnings():  # fp32 10.15's note on fused fp32 attention kernels
        warnings.simplefilter("ignore")
        export = export_artifact(tiny_ckpt_3, tmp_path / "export", target="tensorrt", min_tensorrt=version,
                                 precision="fp32", max_context=TRT_MAX_CONTEXT if version == "10.15" else None)
    art = _built(export, tmp_path / "art")
    pixels, grids, ref_main, ref_deep = cases["three-images"]
    ort_pipe = Qwen2VLPipeline.load(art)
    inputs = _prompt_inputs(ort_pipe.artifact.config, pixels, grids)
    main, deep = ort_pipe.vision_features(inputs)
    assert max(_errors((main, deep), ref_main, ref_deep)) <= 1e-4
    empty = ort_pipe.vision_features({"input_ids": np.array([[100, 101]])})
    assert empty[0].shape == (0, 64) and empty[1].shape == (2, 0, 64)
    with Qwen2VLPipeline.load(art, backend="tensorrt") as pipe:
        backend = pipe.backend
        assert backend.limits == SMALL
        joined = pipe.vision_features(inputs)
        assert joined == (JoinedFeatures(main.shape, 1), JoinedFeatures(deep.shape, 1, "deepstack_embeds"))
        for part, ours in zip(joined, (main, deep)):
            got = backend.buf[part.buffer].download_into(np.zeros(backend.buf[part.buffer].nbytes // 4, np.float32),
                                                         backend.stream)[:ours.size]
            np.testing.assert_allclose(got.reshape(ours.shape), ours, rtol=0, atol=1e-6 * np.abs(ours).max())
    assert fakes[1].live() == [] and fakes[1].errors == []  # close() freed the DeepStack buffers too


# -- plain data: engine profiles, I/O buffers, parameters ----------------------------------------------------------

@pytest.mark.parametrize("grid", [(1, 2, 2), (1, 2, 640), (1, 640, 2), (1, 50, 50), (4, 40, 64)])
def test_engine_profiles_and_buffers_hold_the_taps_and_deepstack(grid):
    from qwen2vl_edge.runtime.backends.trt_memory import io_buffers
    from qwen2vl_edge.runtime.backends.trt_profiles import Limits, check_request, profiles_for
    from test_tensorrt import CFG_2B

    lim = Limits(max_image_tokens=640, min_image_tokens=1, max_frames=8)
    check_request(lim, CFG_3, batch=1, prompt_len=1, max_new_tokens=1, image_grids=[grid])
    profile, buffers = profiles_for("vision_encoder", CFG_3, lim)[0], io_buffers(CFG_3, lim)
    for name, array in vision_inputs(grid, CFG_3).items():
        lo, _, hi = profile[name]
        assert all(a <= d <= b for a, d, b in zip(lo, array.shape, hi)), (name, array.shape, profile[name])
        assert array.nbytes <= buffers[name]
    assert buffers["deepstack_features"] == 3 * buffers["image_embeds"]  # K = 3 per encoder run
    assert buffers["deepstack_embeds"] == 3 * buffers["vision_embeds"]  # joined: the decoder's [K, M, H]
    assert not {"pos_index", "pos_weight", "deepstack_features", "deepstack_embeds"} & set(io_buffers(CFG_2B, lim))


@requires_torch
@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_vision_parameters_are_the_checkpoints(family_ckpt, family):
    """The memory plan's vision weights count every visual.* tensor of the checkpoint: the DeepStack mergers, the
    position table and the patch bias included."""
    from safetensors import safe_open

    from qwen2vl_edge.export.checkpoint import canonical_key
    from qwen2vl_edge.runtime.backends.trt_memory import vision_params

    ckpt = family_ckpt(family)
    with safe_open(str(ckpt / "model.safetensors"), "np") as f:
        count = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys()
                    if canonical_key(k).startswith("visual."))
    assert sum(vision_params(load_config(ckpt))) == count
