"""decoder graph: one step of the Qwen2 / Qwen3 text model with a KV cache; serves prefill (P = 0) and decode.

Inputs: inputs_embeds [B, L, H], attention_mask [B, P+L], position_ids [3, B, L] (M-RoPE), with DeepStack (Qwen3-VL,
K = len(deepstack_visual_indexes) > 0) visual_index [B, L] and deepstack_embeds [K, M, H] (_deepstack),
past_key_values.{i}.key/value [B, kv_heads, P, head_dim]. Outputs: logits [B, 1 | L, V] and
present.{i}.key/value [B, kv_heads, P+L, head_dim]. Grouped-query attention never repeats the kv heads: the
query heads that share one go along the query axis on tensorrt ([B, kv, groups*L, hd] against [B, kv, T, hd],
the 4-D form TensorRT fuses), and are broadcast against them elsewhere ([B, kv, groups, L, hd] against
[B, kv, 1, T, hd]).

Preallocated caches (ort-cpu, tensorrt from 10.15): past and present are one buffer [B, kv_heads,
capacity, head_dim] that the runtime binds as both; the graph writes rows P..P+L-1 in place
(GroupQueryAttention, or TensorScatter followed by ONNX Attention), P = attention_mask.shape[1] - L.
On tensorrt the capacity is a fixed number, `Target.kv_length` (export --max-context): TensorRT's parser turns
TensorScatter into KVCacheUpdate, whose cache "must be a network input and have a static sequence length
dimension" (TensorRT operator reference, KVCacheUpdate: docs.nvidia.com/deeplearning/tensorrt/latest/_static/
operators/KVCacheUpdate.html). ort-cpu keeps a symbolic capacity, sized per request.
"""

from __future__ import annotations

import numpy as np

from qwen2vl_edge.runtime.backends.trt_profiles import kv_names

from .checkpoint import Checkpoint
from .graph import BOOL, FLOAT, INT32, INT64, Graph
from .prequantized import join_outputs
from .quantize import matmul_nbits
from .vision import activation, attend, rms_norm, rotate

MASK_MIN = float(np.finfo(np.float32).min)  # finite: a fully padded row stays NaN-free


def mrope_rows(mrope_section: tuple[int, ...], interleaved: bool = False) -> np.ndarray:
    """For each rotary frequency, which position row (0 = t, 1 = h, 2 = w) drives it: in sections (t t t h h w w,
    Qwen2-VL), or interleaved (Qwen3-VL, transformers' Qwen3VLTextRotaryEmbedding.recomposition_frequencies):
    frequency j takes h where j % 3 == 1 and j < 3 * section[1], w where j % 3 == 2 and j < 3 * section[2], else t."""
    if not interleaved:
        return np.concatenate([np.full(n, i % 3) for i, n in enumerate(mrope_section)]).astype(np.int64)
    rows = np.zeros(sum(mrope_section), np.int64)
    for row in (1, 2):
        rows[row:3 * mrope_section[row]:3] = row
    return rows


def inv_freq(theta: float, head_dim: int) -> np.ndarray:
    return np.float32(1.0) / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))


def _residual_norm(g: Graph, delta: str, residual: str, weight: str, eps: float) -> tuple[str, str]:
    """(RMSNorm(residual + delta), residual + delta): one SkipSimplifiedLayerNormalization when fused."""
    if g.fused:
        normed, _, _, total = g.op("SkipSimplifiedLayerNormalization", delta, residual, weight, n_out=4,
                                   domain="com.microsoft", epsilon=eps)
        return normed, total
    total = g.op("Add", residual, delta)
    return rms_norm(g, total, weight, eps), total


def _split_last(g: Graph, y: str, sizes: list[int]) -> list[str]:
    return g.op("Split", y, g.const(sizes), axis=-1, n_out=len(sizes))


def _rotary(g: Graph, position_ids: str, ckpt: Checkpoint, heads_axis: int) -> tuple[str, str]:
    """cos, sin from M-RoPE positions [3, B, L] (angles in fp32, then in the compute type as transformers
    does): [B, 1, L, head_dim] for heads_axis 1 (q/k as [B, n, L, hd]), [B, L, 1, head_dim] for heads_axis 2
    (q/k as [B, L, n, hd]); [B, L, head_dim/2] for RotaryEmbedding (the two halves are equal)."""
    tc = ckpt.config.text
    rows = mrope_rows(tc.mrope_section, ckpt.config.family.mrope_interleaved)
    if len(rows) != tc.head_dim // 2:
        raise ValueError(f"mrope_section {tc.mrope_section} must sum to head_dim/2 = {tc.head_dim // 2}")
    pos = g.op("Gather", position_ids, g.const(rows), axis=0)  # [hd/2, B, L]
    with g.fp32():
        pos = g.op("Cast", g.op("Transpose", pos, perm=[1, 2, 0]), to=FLOAT)  # [B, L, hd/2]
        freqs = g.op("Mul", pos, g.const(inv_freq(tc.rope_theta, tc.head_dim), np.float32))
        if g.target.llm_ops:
            return g.to_act(g.op("Cos", freqs)), g.to_act(g.op("Sin", freqs))
        emb = g.op("Unsqueeze", g.op("Concat", freqs, freqs, axis=-1), g.const([heads_axis]))
        return g.to_act(g.op("Cos", emb)), g.to_act(g.op("Sin", emb))


def _visible(g: Graph, keep: str, q_pos: str, k_pos: str) -> str:
    """Boolean [B, 1, Lq, T]: key j (at position k_pos[j], padding where keep [B, T] is false) is visible to query i
    (at position q_pos[i]) when k_pos[j] <= q_pos[i] and it is not padding, and always at the query's own position:
    no row is ever fully masked, so a left-padded row's pad queries stay finite even where a build lowers the mask
    to fp16 (the fp32 minimum becomes -inf there, and a row of -inf is NaN after the softmax). Their outputs go
    unused, and their keys are padding to every other query."""
    row = g.op("Unsqueeze", k_pos, g.const([0]))  # [1, T]
    col = g.op("Unsqueeze", q_pos, g.const([1]))  # [Lq, 1]
    visible = g.op("And", g.op("LessOrEqual", row, col), g.op("Unsqueeze", keep, g.const([1, 2])))
    return g.op("Or", visible, g.op("Equal", row, col))


def _positions(g: Graph, attention_mask: str, seq_len: str) -> tuple[str, str, str]:
    """(P + L as [1], query positions P..P+L-1 [L], scalar) with P = attention_mask.shape[1] - L."""
    total = g.shape_dim(attention_mask, 1)
    scalar = lambda t: g.op("Squeeze", t, g.const([0]))  # noqa: E731
    return total, g.op("Range", scalar(g.op("Sub", total, seq_len)), scalar(total), g.const(1)), scalar


def _mask_bias(g: Graph, attention_mask: str, seq_len: str, groups: int | None) -> str:
    """Additive bias, 0 where the key is visible (_visible) and MASK_MIN elsewhere: [B, 1, groups*L, T] for queries
    laid out [B, kv, groups*L, hd] (row r is position P + r mod L), or [B, 1, 1, L, T] for [B, kv, groups, L, hd]
    when `groups` is None (_attention)."""
    total, q_pos, scalar = _positions(g, attention_mask, seq_len)
    k_pos = g.op("Range", g.const(0), scalar(total), g.const(1))  # [T]
    if groups:
        q_pos = g.op("Tile", q_pos, g.const([groups]))  # [groups*L]
    visible = _visible(g, g.op("Cast", attention_mask, to=BOOL), q_pos, k_pos)
    bias = g.op("Where", visible, g.const(0.0, np.float32), g.const(MASK_MIN, np.float32))
    return bias if groups else g.op("Unsqueeze", bias, g.const([2]))


def _bias(ckpt: Checkpoint, name: str) -> np.ndarray | None:
    """A linear's bias, None where the checkpoint has none (Qwen3's attention projections)."""
    return ckpt.get(name) if name in ckpt else None


def _qk_norm(g: Graph, ckpt: Checkpoint, x: str, i: int, which: str) -> str:
    """Qwen3's per-head RMSNorm of q or k (`which`) over head_dim, x [..., n, hd]; x itself for the families
    without it."""
    if not ckpt.config.family.qk_norm:
        return x
    name = f"model.layers.{i}.self_attn.{which}_norm.weight"
    return rms_norm(g, x, g.weight(name, lambda: ckpt.get(name)), ckpt.config.text.rms_norm_eps)


def _qkv_heads(g: Graph, h: str, ckpt: Checkpoint, i: int) -> tuple[str, str, str]:
    """q [B, heads, L, hd], k and v [B, kv_heads, L, hd]: the three projections of layer i, split into heads
    (q and k normalised per head where the family does so)."""
    tc = ckpt.config.text
    p = f"model.layers.{i}.self_attn"

    def heads(n: str, count: int) -> str:  # [B, L, count*hd] -> [B, count, L, hd]
        y = g.linear(h, ckpt.linear(f"{p}.{n}_proj"), _bias(ckpt, f"{p}.{n}_proj.bias"), f"{p}.{n}_proj")
        y = g.op("Reshape", y, g.const([0, 0, count, tc.head_dim]))  # [B, L, count, hd]
        y = y if n == "v" else _qk_norm(g, ckpt, y, i, n)
        return g.op("Transpose", y, perm=[0, 2, 1, 3])

    return heads("q", tc.num_attention_heads), heads("k", tc.num_key_value_heads), heads("v", tc.num_key_value_heads)


def _attention(g: Graph, h: str, ckpt: Checkpoint, i: int, cos: str, sin: str, bias: str,
               past_k: str, past_v: str) -> tuple[str, str, str]:
    tc = ckpt.config.text
    nh, kv, hd = tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim
    p = f"model.layers.{i}.self_attn"
    q, k, v = _qkv_heads(g, h, ckpt, i)
    q, k = rotate(g, q, cos, sin, hd // 2), rotate(g, k, cos, sin, hd // 2)
    present_k = g.op("Concat", past_k, k, axis=2)  # [B, kv, T, hd]
    present_v = g.op("Concat", past_v, v, axis=2)
    if g.target.typed:
        # TensorRT's attention fusion takes Q [B, N_q, S_q, H] against K/V [B, N_kv, S_kv, H], N_q % N_kv == 0, the
        # scale on Q before the first MatMul (TensorRT developer guide, "Fused Attention", docs.nvidia.com/
        # deeplearning/tensorrt/latest/inference-library/transformers-fused-attention.html). ONNX MatMul broadcasts
        # only equal or unit batch dims, so the heads sharing a kv head (consecutive: head h reads kv head
        # h // groups) go along the query axis, the mask tiled to match (_mask_bias): 4-D throughout. Its MHA
        # fusion also wants both MatMuls' inputs in fp16/bf16 (so fp32 graphs stay unfused) and 16 <= hd <= 256,
        # hd % 8 == 0 (developer guide "MHA fusion", as quoted in NVIDIA/TensorRT#2981); it says nothing of the
        # fp32 casts around the softmax, which stay (attend): gpu-check's engine inspector tells whether it fused.
        q = g.op("Reshape", q, g.const([0, kv, -1, hd]))  # [B, nh, L, hd] -> [B, kv, groups*L, hd]
        k_t = g.op("Transpose", present_k, perm=[0, 1, 3, 2])  # [B, kv, hd, T]
        v = present_v  # [B, kv, T, hd]
    else:  # ONNX Runtime broadcasts the kv heads over the groups: the mask stays [B, 1, 1, L, T], groups times smaller
        q = g.op("Reshape", q, g.const([0, kv, nh // kv, -1, hd]))  # [B, kv, groups, L, hd]
        k_t = g.op("Transpose", g.op("Unsqueeze", present_k, g.const([2])), perm=[0, 1, 2, 4, 3])  # [B, kv, 1, hd, T]
        v = g.op("Unsqueeze", present_v, g.const([2]))  # [B, kv, 1, T, hd]
    out = attend(g, q, k_t, v, hd ** -0.5, bias)  # [B, kv, groups*L, hd] or [B, kv, groups, L, hd]
    out = g.op("Reshape", out, g.const([0, nh, -1, hd]))  # [B, nh, L, hd]
    out = g.op("Reshape", g.op("Transpose", out, perm=[0, 2, 1, 3]), g.const([0, 0, nh * hd]))
    out = g.linear(out, ckpt.linear(f"{p}.o_proj"), None, f"{p}.o_proj")
    return out, present_k, present_v


def _cache_mask(g: Graph, attention_mask: str, seq_len: str, capacity: str) -> str:
    """ONNX Attention's boolean mask [B, 1, L, capacity] over a preallocated cache (_visible): rows past P + L hold
    nothing yet and are never visible, since every query sits before them; decode reads the whole buffer."""
    total, q_pos, scalar = _positions(g, attention_mask, seq_len)
    k_pos = g.op("Range", g.const(0), scalar(capacity), g.const(1))  # [capacity]
    keep = g.op("Gather", g.op("Cast", attention_mask, to=BOOL),  # [B, capacity]; rows >= P + L read the last
                g.op("Min", k_pos, g.op("Sub", total, g.const([1]))), axis=1)
    return _visible(g, keep, q_pos, k_pos)


def _attention_scatter(g: Graph, h: str, ckpt: Checkpoint, i: int, cos: str, sin: str, mask: str, write_at: str,
                       past_k: str, past_v: str) -> tuple[str, str, str]:
    """TensorRT >= 10.15's fused ops: RotaryEmbedding on q/k, TensorScatter writes the L new rows into the
    preallocated cache at P (in place when past and present share a buffer), then one ONNX Attention over
    the whole buffer with a boolean mask (its parser takes no past/present inputs of Attention itself)."""
    tc = ckpt.config.text
    nh, hd = tc.num_attention_heads, tc.head_dim
    p = f"model.layers.{i}.self_attn"
    q, k, v = _qkv_heads(g, h, ckpt, i)
    q, k = (g.op("RotaryEmbedding", t, cos, sin) for t in (q, k))
    present_k = g.op("TensorScatter", past_k, k, write_at, axis=-2)  # [B, kv, capacity, hd]
    present_v = g.op("TensorScatter", past_v, v, write_at, axis=-2)
    out = g.op("Attention", q, present_k, present_v, mask, scale=float(hd ** -0.5), softmax_precision=FLOAT)
    out = g.op("Reshape", g.op("Transpose", out, perm=[0, 2, 1, 3]), g.const([0, 0, nh * hd]))  # [B, L, nh*hd]
    return g.linear(out, ckpt.linear(f"{p}.o_proj"), None, f"{p}.o_proj"), present_k, present_v


def _padding_bias(g: Graph, attention_mask: str, seq_len: str) -> str:
    """GroupQueryAttention's attention_bias [B, 1, L, T]: MASK_MIN on padding keys (it applies causality itself)."""
    keep = g.op("Unsqueeze", g.op("Cast", attention_mask, to=BOOL), g.const([1, 2]))  # [B, 1, 1, T]
    bias = g.op("Where", keep, g.const(0.0, np.float32), g.const(MASK_MIN, np.float32))
    batch, total = g.shape_dim(attention_mask, 0), g.shape_dim(attention_mask, 1)
    shape = g.op("Concat", batch, g.const([1]), seq_len, total, axis=0)
    return g.op("Expand", bias, shape)


def _attention_gqa(g: Graph, h: str, ckpt: Checkpoint, i: int, cos: str, sin: str, bias: str, seqlens_k: str,
                   total: str, past_k: str, past_v: str) -> tuple[str, str, str]:
    """ONNX Runtime's GroupQueryAttention over a preallocated cache [B, kv, capacity, hd] that it updates in
    place when past and present are bound to the same buffer; M-RoPE is applied before (its own rotary
    takes one position row). Left padding stays what the mask says: a bias on the padded keys."""
    tc = ckpt.config.text
    nh, kv, hd = tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim
    p = f"model.layers.{i}.self_attn"
    names = ("q_proj", "k_proj", "v_proj")
    weights = [ckpt.linear(f"{p}.{n}") for n in names]
    # one packed projection: one kernel call instead of three
    biases = [_bias(ckpt, f"{p}.{n}.bias") for n in names]
    qkv = g.linear(h, join_outputs(weights), None if biases[0] is None else np.concatenate(biases), f"{p}.qkv_proj")
    q, k, v = _split_last(g, qkv, [w.shape[0] for w in weights])

    def rotated(x: str, n: int, which: str) -> str:  # [B, L, n*hd] -> (normalised per head,) rotated, same shape
        x = _qk_norm(g, ckpt, g.op("Reshape", x, g.const([0, 0, n, hd])), i, which)
        return g.op("Reshape", rotate(g, x, cos, sin, hd // 2), g.const([0, 0, n * hd]))

    # GroupQueryAttention's head size is q's width / num_heads (= head_dim, which may differ from hidden / heads)
    out, present_k, present_v = g.op("GroupQueryAttention", rotated(q, nh, "q"), rotated(k, kv, "k"), v, past_k, past_v,
                                     seqlens_k, total, "", "", "", bias, n_out=3, domain="com.microsoft",
                                     num_heads=nh, kv_num_heads=kv, scale=float(hd ** -0.5))
    return g.linear(out, ckpt.linear(f"{p}.o_proj"), None, f"{p}.o_proj"), present_k, present_v


def _mlp(g: Graph, h: str, ckpt: Checkpoint, i: int) -> str:
    p = f"model.layers.{i}.mlp"
    if g.fused:
        gate_up = join_outputs([ckpt.linear(f"{p}.gate_proj"), ckpt.linear(f"{p}.up_proj")])
        sizes = [ckpt.config.text.intermediate_size] * 2
        gate, up = _split_last(g, g.linear(h, gate_up, None, f"{p}.gate_up_proj"), sizes)
    else:
        gate = g.linear(h, ckpt.linear(f"{p}.gate_proj"), None, f"{p}.gate_proj")
        up = g.linear(h, ckpt.linear(f"{p}.up_proj"), None, f"{p}.up_proj")
    act = activation(g, gate, ckpt.config.text.hidden_act)
    return g.linear(g.op("Mul", act, up), ckpt.linear(f"{p}.down_proj"), None, f"{p}.down_proj")


def cache_names(cfg) -> list[tuple[str, str, str, str]]:
    """(past key, past value, present key, present value) names per layer: the names the runtime binds."""
    pairs = kv_names(cfg)  # (past, present) of each layer's key, then its value
    return [(k[0], v[0], k[1], v[1]) for k, v in zip(pairs[0::2], pairs[1::2])]


def preallocated(g: Graph) -> bool:
    """Whether the graph keeps its KV cache in preallocated buffers written in place (see the module doc)."""
    return g.fused or g.target.llm_ops


def _attention_for(g: Graph, ckpt: Checkpoint, x: str, attention_mask: str, position_ids: str, pasts: list):
    """The per-layer attention the target allows, as attention(h, i) -> (out, present_k, present_v)."""
    if g.fused:
        cos, sin = _rotary(g, position_ids, ckpt, heads_axis=2)
        total = g.op("Cast", g.op("Squeeze", g.shape_dim(attention_mask, 1), g.const([0])), to=INT32)  # T, scalar
        seqlens_k = g.op("Expand", g.op("Sub", total, g.const(1, np.int32)),
                         g.shape_dim(attention_mask, 0))  # [B] int32: every row holds T positions
        bias = _padding_bias(g, attention_mask, g.shape_dim(x, 1))
        return lambda h, i: _attention_gqa(g, h, ckpt, i, cos, sin, bias, seqlens_k, total, *pasts[i])
    cos, sin = _rotary(g, position_ids, ckpt, heads_axis=1)
    if g.target.llm_ops:
        seq_len = g.shape_dim(x, 1)
        mask = _cache_mask(g, attention_mask, seq_len, g.shape_dim(pasts[0][0], 2))
        past_len = g.op("Sub", g.shape_dim(attention_mask, 1), seq_len)
        write_at = g.op("Expand", past_len, g.shape_dim(attention_mask, 0))  # [B]: every row writes at P
        return lambda h, i: _attention_scatter(g, h, ckpt, i, cos, sin, mask, write_at, *pasts[i])
    tc = ckpt.config.text
    groups = tc.num_attention_heads // tc.num_key_value_heads if g.target.typed else None  # see _attention
    bias = _mask_bias(g, attention_mask, g.shape_dim(x, 1), groups)
    return lambda h, i: _attention(g, h, ckpt, i, cos, sin, bias, *pasts[i])


def _lm_head(g: Graph, ckpt: Checkpoint, x: str) -> str:
    """Logits [B, L, V] in fp32 from the final hidden states [B, L, H]."""
    tc = ckpt.config.text
    name = ckpt.lm_head_name()
    if g.quant is not None and not g.target.typed:  # MatMulNBits reads the [V, H] table quantized; when tied,
        return matmul_nbits(g, x, lambda: ckpt.get(name), "lm_head", g.quant, key=name)  # the merger's bytes
    # [V, H], shared with the merger when tied; kept in the precision on the tensorrt target (as TensorRT's
    # Model Optimizer leaves the lm_head unquantized), so the tied table is stored once
    table = g.weight(name, lambda: ckpt.get(name))
    flat = g.op("Reshape", x, g.const([-1, tc.hidden_size]))
    logits = g.op("Gemm", flat, table, transB=1)  # x @ table.T without a transposed copy
    out_shape = g.op("Concat", g.shape_dim(x, 0), g.const([-1, tc.vocab_size]), axis=0)
    return g.to_f32(g.op("Reshape", logits, out_shape))


def _deepstack(g: Graph, ckpt: Checkpoint):
    """DeepStack (Qwen3-VL): inputs visual_index [B, L] (1-based rank of each vision token among the M, 0 at text)
    and deepstack_embeds [K, M, H]; returns i -> feature i placed at the vision positions, zeros elsewhere [B, L, H],
    which joins the hidden states after decoder layer i. A gather from [M + 1, H] whose row 0 is zeros: a decode step
    or a text chunk (M = 0, visual_index 0) gathers the zero row only, nothing proportional to the prompt."""
    K, H = len(ckpt.config.vision.deepstack_visual_indexes), ckpt.config.text.hidden_size
    visual_index = g.input("visual_index", INT64, ["batch", "seq"])
    feats = g.input("deepstack_embeds", FLOAT, [K, "vision_tokens", H])
    table = g.to_act(g.op("Concat", g.const(np.zeros((K, 1, H)), np.float32), feats, axis=1))  # [K, M + 1, H]
    return lambda i: g.op("Gather", g.op("Gather", table, g.const(i), axis=0), visual_index, axis=0)


def build_decoder(g: Graph, ckpt: Checkpoint, all_logits: bool = False, progress=None) -> None:
    """Preallocated caches (ort-cpu; tensorrt from 10.15): past/present are [B, kv, capacity, hd] and the runtime
    binds both to one buffer; otherwise past [B, kv, P, hd] -> present [B, kv, P+L, hd]. The cache is in the
    graph's compute type (fp16/bf16 on a typed target), every other input and output in fp32 / int64."""
    tc = ckpt.config.text
    H, kv, hd = tc.hidden_size, tc.num_key_value_heads, tc.head_dim
    x = g.input("inputs_embeds", FLOAT, ["batch", "seq", H])
    attention_mask = g.input("attention_mask", INT64, ["batch", "total_seq"])
    position_ids = g.input("position_ids", INT64, [3, "batch", "seq"])
    deepstack = _deepstack(g, ckpt) if ckpt.config.vision.deepstack_visual_indexes else None
    names = cache_names(ckpt.config)
    if preallocated(g):
        past_dim = present_dim = g.target.kv_length or "capacity"  # static on tensorrt (module doc)
    else:
        past_dim, present_dim = "past_seq", "total_seq"
    pasts = [(g.input(pk, g.act, ["batch", kv, past_dim, hd]), g.input(pv, g.act, ["batch", kv, past_dim, hd]))
             for pk, pv, _, _ in names]
    attention = _attention_for(g, ckpt, x, attention_mask, position_ids, pasts)
    x = g.to_act(x)
    norm = lambda name: g.weight(name, ckpt.get(name))  # noqa: E731
    eps, last = tc.rms_norm_eps, tc.num_hidden_layers - 1
    # x is the residual stream; each block's output joins it in the next norm (fused there on ort-cpu)
    h = rms_norm(g, x, norm("model.layers.0.input_layernorm.weight"), eps)
    for i in range(tc.num_hidden_layers):
        attn, present_k, present_v = attention(h, i)
        h, x = _residual_norm(g, attn, x, norm(f"model.layers.{i}.post_attention_layernorm.weight"), eps)
        mlp = _mlp(g, h, ckpt, i)
        if deepstack and i < len(ckpt.config.vision.deepstack_visual_indexes):
            mlp = g.op("Add", mlp, deepstack(i))  # joins the residual stream with the layer's output
        if i < last:
            h, x = _residual_norm(g, mlp, x, norm(f"model.layers.{i + 1}.input_layernorm.weight"), eps)
        g.output(present_k, names[i][2], g.act, ["batch", kv, present_dim, hd])
        g.output(present_v, names[i][3], g.act, ["batch", kv, present_dim, hd])
        if progress:
            progress.update(1)
    if not all_logits:  # prefill over a long prompt would otherwise allocate [B, L, vocab]
        mlp, x = (g.slice(t, -1, np.iinfo(np.int64).max, 1) for t in (mlp, x))
    x, _ = _residual_norm(g, mlp, x, norm("model.norm.weight"), eps)
    g.output(_lm_head(g, ckpt, x), "logits", FLOAT, ["batch", "seq" if all_logits else 1, tc.vocab_size])
