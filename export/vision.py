"""vision_encoder graph: patches of F frames of one grid -> merged features [F, S/merge^2, hidden].

Attention runs within a frame (Qwen2-VL's cu_seqlens has one segment per temporal slice), so frames
are a batch dimension: no N x N mask across images or frames ever exists. The rotary table of the
patch grid is data-dependent and comes from the runtime (runtime/rope.py: vision_rotary). With the
fused ops attention is one op per frame, no [F, heads, S, S] tensor: ONNX Attention (tensorrt from 10.15),
ONNX Runtime's MultiHeadAttention (ort-cpu).

The family (runtime/config.py: FAMILIES) picks the norm (LayerNorm / RMSNorm), the MLP (fc / gated) and
whether blocks outside `fullatt_block_indexes` attend in windows (Qwen2.5-VL); where its weights sit in the
checkpoint is data too (WEIGHT_NAMES). A window block gathers its q, k, v from the frame's patches into W
windows of P patch slots (host-fed `window_index`, runtime/rope.py: vision_windows), attends as [F * W, P] rows
whose pad slots are masked as keys (`window_mask`), and gathers its output back into patch order
(`window_inverse`): the residual stream, norms and MLPs stay on the S real patches, and no shape depends on the
data.

Qwen3-VL adds a learned square position table, resampled to the grid by 4 host-fed bilinear taps a patch
(`pos_index`, `pos_weight`: runtime/rope.py: vision_pos_taps) and added after the patch embedding, and DeepStack:
the outputs of the blocks in `deepstack_visual_indexes` each go through a merger of their own (LayerNorm over the
shuffled merge_size^2 * width) into a second output, `deepstack_features` [K, F, S/merge^2, hidden] (the backends
join them into the decoder's `deepstack_embeds` [K, M, hidden], as `image_embeds` into the merger's `vision_embeds`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .checkpoint import Checkpoint
from .graph import BOOL, FLOAT, INT32, INT64, Graph

LN_EPS = 1e-6
MASK_MIN = float(np.finfo(np.float32).min)  # a pad slot's score: finite, so a softmax never sees inf - inf
TAPS = 4  # bilinear taps a patch into the position table


@dataclass(frozen=True)
class WeightNames:
    """Where a family's vision weights sit (canonical `visual.*` names, export/checkpoint.py)."""

    mlp: tuple[str, ...]  # a block's MLP linears under visual.blocks.{i}.mlp: (in, out) or (gate, up, down)
    merger_norm: str  # the final merger's norm, over the width before the merge_size^2 shuffle
    merger: tuple[str, str]  # its two linears (exact GELU between)
    deepstack: str | None = None  # DeepStack mergers `{deepstack}.{j}`: norm over the shuffled width, then the same


_QWEN2_MERGER = ("visual.merger.mlp.0", "visual.merger.mlp.2")
WEIGHT_NAMES = {  # model_type -> its names
    "qwen2_vl": WeightNames(("fc1", "fc2"), "visual.merger.ln_q", _QWEN2_MERGER),
    "qwen2_5_vl": WeightNames(("gate_proj", "up_proj", "down_proj"), "visual.merger.ln_q", _QWEN2_MERGER),
    "qwen3_vl": WeightNames(("linear_fc1", "linear_fc2"), "visual.merger.norm",
                            ("visual.merger.linear_fc1", "visual.merger.linear_fc2"), "visual.deepstack_merger_list"),
}


def activation(g: Graph, x: str, kind: str) -> str:
    if kind == "quick_gelu":  # x * sigmoid(1.702 x)
        return g.op("Mul", x, g.op("Sigmoid", g.op("Mul", x, g.act_const(1.702))))
    if kind == "gelu":  # exact (erf) GELU, valid at every opset and in TensorRT
        inner = g.op("Erf", g.op("Div", x, g.act_const(np.sqrt(2.0))))
        return g.op("Mul", g.op("Mul", x, g.act_const(0.5)), g.op("Add", inner, g.act_const(1.0)))
    if kind == "silu":
        return g.op("Mul", x, g.op("Sigmoid", x))
    if kind == "gelu_pytorch_tanh":  # 0.5 x (1 + tanh(sqrt(2 / pi) x (1 + 0.044715 x^2))); in fp16 a large |x|
        #                              overflows x^2 to inf, whose tanh is 1: x, as it should be, never NaN
        cubic = g.op("Add", g.op("Mul", g.op("Mul", x, x), g.act_const(0.044715)), g.act_const(1.0))
        inner = g.op("Tanh", g.op("Mul", g.op("Mul", x, cubic), g.act_const(np.sqrt(2.0 / np.pi))))
        return g.op("Mul", g.op("Mul", x, g.act_const(0.5)), g.op("Add", inner, g.act_const(1.0)))
    raise ValueError(f"unsupported activation {kind!r}")


def rotate(g: Graph, x: str, cos: str, sin: str, half: int) -> str:
    """x * cos + rotate_half(x) * sin over the last axis."""
    with g.fp32():
        x1, x2 = g.slice(x, 0, half, -1), g.slice(x, half, 2 * half, -1)
        rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
        return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))


def attend(g: Graph, q: str, k_t: str, v: str, scale: float, bias: str | None = None) -> str:
    """softmax(q @ k_t * scale + bias) @ v with the softmax (and bias) in fp32. Typed graphs scale q before the
    first matmul, as TensorRT's attention fusion asks, and cast around the fp32 softmax."""
    if g.target.typed:
        scores = g.to_f32(g.op("MatMul", g.op("Mul", q, g.act_const(scale)), k_t))
        with g.fp32():
            probs = g.op("Softmax", g.op("Add", scores, bias) if bias else scores, axis=-1)
        return g.op("MatMul", g.to_act(probs), v)
    with g.fp32():
        scores = g.op("Mul", g.op("MatMul", q, k_t), g.const(scale, np.float32))
        probs = g.op("Softmax", g.op("Add", scores, bias) if bias else scores, axis=-1)
    return g.op("MatMul", probs, v)


def layer_norm(g: Graph, x: str, ckpt: Checkpoint, name: str) -> str:
    w = g.weight(f"{name}.weight", lambda: ckpt.get(f"{name}.weight"))
    b = g.weight(f"{name}.bias", lambda: ckpt.get(f"{name}.bias"))
    x, w, b = g.to_f32(x), g.to_f32(w), g.to_f32(b)  # statistics in fp32
    with g.fp32():
        y = g.op("LayerNormalization", x, w, b, axis=-1, epsilon=LN_EPS)
    return g.to_act(y)


def rms_norm(g: Graph, x: str, weight: str, eps: float) -> str:
    """weight * (x / rms(x)), the statistics in fp32 and the result cast back before the weight, as
    transformers' Qwen2RMSNorm does; one RMSNormalization where the target has it."""
    x = g.to_f32(x)
    with g.fp32():
        if g.target.llm_ops:
            return g.to_act(g.op("RMSNormalization", x, g.to_f32(weight), axis=-1, epsilon=eps, stash_type=1))
        var = g.reduce_mean(g.op("Mul", x, x), [-1])
        inv = g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, g.const(eps, np.float32))))
        return g.op("Mul", weight, g.to_act(g.op("Mul", x, inv)))


def norm(g: Graph, x: str, ckpt: Checkpoint, name: str) -> str:
    """The family's vision norm: LayerNorm (Qwen2-VL) or RMSNorm (Qwen2.5-VL), eps 1e-6 in both."""
    if ckpt.config.family.vision_norm == "layer":
        return layer_norm(g, x, ckpt, name)
    return rms_norm(g, x, g.weight(f"{name}.weight", lambda: ckpt.get(f"{name}.weight")), LN_EPS)


def _blocks_divide(g: Graph, k: int) -> bool:
    """Whether a linear of `k` input channels can take the graph's quantization blocks (QuantSpec.block: the
    block, or with `fit` any power of two from 16). Qwen2.5-VL's vision MLP width (3420) divides by none: that
    linear stays float, as the patch embedding does."""
    q = g.quant
    return q is None or q.dynamic or k % (16 if q.fit else q.block_size) == 0


def _mlp(g: Graph, h: str, ckpt: Checkpoint, p: str) -> str:
    """fc2(act(fc1(h))) (Qwen2-VL, Qwen3-VL) or down(act(gate(h)) * up(h)) with biases (Qwen2.5-VL)."""
    vc = ckpt.config.vision
    names = WEIGHT_NAMES[ckpt.config.model_type].mlp
    lin = lambda x, name: g.linear(x, w := ckpt.get(f"{p}.{name}.weight"), ckpt.get(f"{p}.{name}.bias"),  # noqa: E731
                                   f"{p}.{name}", quantize=_blocks_divide(g, w.shape[1]))
    if ckpt.config.family.vision_mlp == "fc":
        fc1, fc2 = names
        return lin(activation(g, lin(h, fc1), vc.hidden_act), fc2)
    gate, up, down = names
    return lin(g.op("Mul", activation(g, lin(h, gate), vc.hidden_act), lin(h, up)), down)


@dataclass(frozen=True)
class Windows:
    """The window layout's graph values (one set per graph): P patch slots a window, flat gather index [W * P],
    inverse [S], the frame count [1], and the key mask of the [F * W, P] rows in the form the target's
    attention takes."""

    slots: int
    index: str
    inverse: str
    frames: str
    keys: str

    @classmethod
    def inputs(cls, g: Graph, ckpt: Checkpoint, frames: str) -> "Windows":
        vc = ckpt.config.vision
        slots = vc.window_merged ** 2 * vc.spatial_merge_size ** 2
        index = g.input("window_index", INT64, ["windows", slots])
        mask = g.input("window_mask", FLOAT, ["windows", slots])
        inverse = g.input("window_inverse", INT64, ["patches"])
        rows = g.op("Tile", mask, g.op("Concat", frames, g.const([1]), axis=0))  # [F * W, P]: frames share it
        if g.target.contrib:  # MultiHeadAttention's key_padding_mask
            keys = g.op("Cast", rows, to=INT32)
        else:
            keep = g.op("Unsqueeze", g.op("Cast", rows, to=BOOL), g.const([1, 2]))  # [F * W, 1, 1, P]
            if g.target.llm_ops:  # ONNX Attention's mask spells out the query axis: [F * W, 1, P, P], per window
                keys = g.op("Expand", keep, g.const([1, 1, slots, slots]))
            else:
                keys = g.op("Where", keep, g.const(0.0, np.float32), g.const(MASK_MIN, np.float32))
        return cls(slots, g.op("Reshape", index, g.const([-1])), inverse, frames, keys)

    def group(self, g: Graph, t: str, head_major: bool, nh: int, hd: int) -> str:
        """q, k or v of the frame's patches -> the windows' rows: [F, S, nh, hd] -> [F * W, P, nh, hd], or head-major
        [F, nh, S, hd] -> [F * W, nh, P, hd]."""
        if not head_major:
            return g.op("Reshape", g.op("Gather", t, self.index, axis=1), g.const([-1, self.slots, nh, hd]))
        t = g.op("Reshape", g.op("Gather", t, self.index, axis=2), g.const([0, 0, -1, self.slots, hd]))
        return g.op("Reshape", g.op("Transpose", t, perm=[0, 2, 1, 3, 4]), g.const([-1, nh, self.slots, hd]))

    def ungroup(self, g: Graph, attn: str, E: int) -> str:
        """[F * W, P, E] -> [F, W * P, E] -> the patches' rows [F, S, E] (pad slots are never read)."""
        flat = g.op("Reshape", attn, g.op("Concat", self.frames, g.const([-1, E]), axis=0))
        return g.op("Gather", flat, self.inverse, axis=1)


def _rotate_vision(g: Graph, x: str, cos: str, sin: str, hd: int) -> str:
    """Rotary on [F, S, nh, hd] (cos/sin [S, 1, hd]) -> [F, nh, S, hd]; in fp32 like transformers' vision rotary.
    With the fused ops: one RotaryEmbedding on [F, nh, S, hd] (cos/sin [F, S, hd/2])."""
    x = g.to_f32(x)
    if g.target.llm_ops:
        x = g.op("RotaryEmbedding", g.op("Transpose", x, perm=[0, 2, 1, 3]), cos, sin)
    else:
        x = g.op("Transpose", rotate(g, x, cos, sin, hd // 2), perm=[0, 2, 1, 3])
    return g.to_act(x)


def _multi_head_attention(g: Graph, q: str, k: str, v: str, nh: int, hd: int, keys: str | None) -> str:
    """ONNX Runtime's MultiHeadAttention on q, k, v [B, S, nh, hd] -> [B, S, E]. Without mask, bias, past or
    present its fp32 CPU kernel runs flash attention (MlasFlashAttention, tiles sized to the L2 cache): memory
    linear in the patches. `keys`: a window block's key_padding_mask [B, S] (int32)."""
    q, k, v = (g.op("Reshape", t, g.const([0, 0, nh * hd])) for t in (q, k, v))  # [B, S, E]: frames are the batch
    masks = ("", keys) if keys else ()
    return g.op("MultiHeadAttention", q, k, v, *masks, domain="com.microsoft", num_heads=nh,
                scale=float(hd ** -0.5))


def _attention(g: Graph, q: str, k: str, v: str, vc, cos: str, sin: str, windows: Windows | None) -> str:
    """q, k, v [F, S, nh, hd] -> [F, S, E]: over each frame, or within each window when `windows` is given."""
    E, nh, hd = vc.embed_dim, vc.num_heads, vc.head_dim
    keys = windows.keys if windows else None
    if g.target.typed:
        q, k = _rotate_vision(g, q, cos, sin, hd), _rotate_vision(g, k, cos, sin, hd)  # [F, nh, S, hd]
        v = g.op("Transpose", v, perm=[0, 2, 1, 3])
        if windows:
            q, k, v = (windows.group(g, t, True, nh, hd) for t in (q, k, v))  # [F * W, nh, P, hd]
        if g.target.llm_ops:  # fused per frame or window: no [F, nh, S, S] tensor in the graph
            masks = (keys,) if keys else ()
            attn = g.op("Attention", q, k, v, *masks, scale=float(hd ** -0.5), softmax_precision=FLOAT)
        else:
            attn = attend(g, q, g.op("Transpose", k, perm=[0, 1, 3, 2]), v, hd ** -0.5, keys)
    else:
        q, k = rotate(g, q, cos, sin, hd // 2), rotate(g, k, cos, sin, hd // 2)
        if windows:
            q, k, v = (windows.group(g, t, False, nh, hd) for t in (q, k, v))  # [F * W, P, nh, hd]
        if g.target.contrib:  # fused per frame or window (they are the batch): no [F, nh, S, S] tensor
            attn = _multi_head_attention(g, q, k, v, nh, hd, keys)  # [B, S, E]
        else:
            q = g.op("Transpose", q, perm=[0, 2, 1, 3])  # [B, nh, S, hd]
            k = g.op("Transpose", k, perm=[0, 2, 3, 1])  # [B, nh, hd, S]
            v = g.op("Transpose", v, perm=[0, 2, 1, 3])
            attn = attend(g, q, k, v, hd ** -0.5, keys)  # [B, nh, S, hd]
    if not g.target.contrib:
        attn = g.op("Reshape", g.op("Transpose", attn, perm=[0, 2, 1, 3]), g.const([0, 0, E]))  # [B, S, E]
    return windows.ungroup(g, attn, E) if windows else attn


def _block(g: Graph, x: str, ckpt: Checkpoint, i: int, cos: str, sin: str, windows: Windows | None) -> str:
    vc = ckpt.config.vision
    p = f"visual.blocks.{i}"
    nh, hd = vc.num_heads, vc.head_dim
    h = norm(g, x, ckpt, f"{p}.norm1")
    qkv = g.linear(h, ckpt.get(f"{p}.attn.qkv.weight"), ckpt.get(f"{p}.attn.qkv.bias"), f"{p}.attn.qkv")
    qkv = g.op("Reshape", qkv, g.const([0, 0, 3, nh, hd]))  # [F, S, 3, nh, hd]
    q, k, v = (g.op("Squeeze", t, g.const([2]))
               for t in g.op("Split", qkv, g.const([1, 1, 1]), axis=2, n_out=3))  # [F, S, nh, hd]
    windowed = windows if windows and i not in vc.fullatt_block_indexes else None
    attn = _attention(g, q, k, v, vc, cos, sin, windowed)
    x = g.op("Add", x, g.linear(attn, ckpt.get(f"{p}.attn.proj.weight"), ckpt.get(f"{p}.attn.proj.bias"),
                                 f"{p}.attn.proj"))
    return g.op("Add", x, _mlp(g, norm(g, x, ckpt, f"{p}.norm2"), ckpt, f"{p}.mlp"))


def _position_embedding(g: Graph, ckpt: Checkpoint) -> str:
    """The learned table resampled to the frame's grid: sum over the 4 taps of table[pos_index] * pos_weight ->
    [S, E] (frames share it), the weighted sum in fp32."""
    index = g.input("pos_index", INT64, ["patches", TAPS])
    weight = g.input("pos_weight", FLOAT, ["patches", TAPS])
    table = g.weight("visual.pos_embed.weight", lambda: ckpt.get("visual.pos_embed.weight"))  # [side^2, E]
    taps = g.to_f32(g.op("Gather", table, index, axis=0))  # [S, 4, E]
    with g.fp32():
        pos = g.op("ReduceSum", g.op("Mul", taps, g.op("Unsqueeze", weight, g.const([2]))), g.const([1]), keepdims=0)
    return g.to_act(pos)


def _merger(g: Graph, x: str, ckpt: Checkpoint, norm_name: str, linears: tuple[str, str], shuffled: bool) -> str:
    """[F, S, E] -> [F, S/m^2, hidden]: norm, merge_size^2 neighbours side by side, linear, exact GELU, linear. The
    norm runs over E before the shuffle (the final merger), or over E * m^2 after it (`shuffled`: DeepStack's)."""
    vc = ckpt.config.vision
    width = vc.embed_dim * vc.spatial_merge_size ** 2
    h = x if shuffled else norm(g, x, ckpt, norm_name)
    h = g.op("Reshape", h, g.const([0, -1, width]))  # [F, S/m^2, E*m^2]
    if shuffled:
        h = norm(g, h, ckpt, norm_name)
    fc1, fc2 = linears
    h = g.linear(h, ckpt.get(f"{fc1}.weight"), ckpt.get(f"{fc1}.bias"), fc1)
    return g.linear(activation(g, h, "gelu"), ckpt.get(f"{fc2}.weight"), ckpt.get(f"{fc2}.bias"), fc2)


def build_vision_encoder(g: Graph, ckpt: Checkpoint, progress=None) -> None:
    vc = ckpt.config.vision
    pixels = g.input("pixel_values", FLOAT, ["frames", "patches", vc.patch_dim])
    cos = g.input("rotary_cos", FLOAT, ["patches", vc.head_dim])
    sin = g.input("rotary_sin", FLOAT, ["patches", vc.head_dim])
    if g.target.llm_ops:  # RotaryEmbedding takes cos/sin [F, S, hd/2] (the table's halves are equal)
        frames = g.op("Concat", g.shape_dim(pixels, 0), g.const([1, 1]), axis=0)  # [F, 1, 1]: broadcast to F
        cos, sin = (g.op("Expand", g.op("Unsqueeze", g.slice(t, 0, vc.head_dim // 2, 1), g.const([0])), frames)
                    for t in (cos, sin))
    else:
        cos, sin = (g.op("Unsqueeze", t, g.const([1])) for t in (cos, sin))  # [S, 1, hd] against [F, S, nh, hd]
    # Conv3d with kernel == stride over a flattened patch is a matmul with the flattened kernel.
    w = ckpt.get("visual.patch_embed.proj.weight").reshape(vc.embed_dim, -1)
    bias = "visual.patch_embed.proj.bias"  # Qwen3-VL's Conv3d has one
    # kept in float: 1176 input channels rarely divide a quantization block, and the layer is small
    x = g.linear(g.to_act(pixels), w, ckpt.get(bias) if bias in ckpt else None, "visual.patch_embed.proj",
                 quantize=False)  # [F, S, E]
    if ckpt.config.family.pos_table:
        x = g.op("Add", x, _position_embedding(g, ckpt))  # [S, E] against [F, S, E]
    windows = Windows.inputs(g, ckpt, g.shape_dim(pixels, 0)) if ckpt.config.family.windowed else None
    names, deepstack = WEIGHT_NAMES[ckpt.config.model_type], []
    for i in range(vc.depth):
        x = _block(g, x, ckpt, i, cos, sin, windows)
        if i in vc.deepstack_visual_indexes:
            j = vc.deepstack_visual_indexes.index(i)
            linears = (f"{names.deepstack}.{j}.linear_fc1", f"{names.deepstack}.{j}.linear_fc2")
            deepstack.append(_merger(g, x, ckpt, f"{names.deepstack}.{j}.norm", linears, shuffled=True))
        if progress:
            progress.update(1)
    h = _merger(g, x, ckpt, names.merger_norm, names.merger, shuffled=False)
    merged = ["frames", "merged_patches", vc.hidden_size]
    g.output(g.to_f32(h), "image_embeds", FLOAT, merged)
    if deepstack:  # [K, F, S/m^2, hidden]
        stacked = g.op("Concat", *[g.op("Unsqueeze", g.to_f32(d), g.const([0])) for d in deepstack], axis=0)
        g.output(stacked, "deepstack_features", FLOAT, [len(deepstack), *merged])
