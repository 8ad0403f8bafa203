"""vision_encoder graph: patches of F frames of one grid -> merged features [F, S/merge^2, hidden].

Attention runs within a frame (Qwen2-VL's cu_seqlens has one segment per temporal slice), so frames
are a batch dimension: no N x N mask across images or frames ever exists. The rotary table of the
patch grid is data-dependent and comes from the runtime (runtime/rope.py: vision_rotary). With the
fused ops attention is one op per frame, no [F, heads, S, S] tensor: ONNX Attention (tensorrt from 10.15),
ONNX Runtime's MultiHeadAttention (ort-cpu).
"""

from __future__ import annotations

import numpy as np

from .checkpoint import Checkpoint
from .graph import FLOAT, Graph

LN_EPS = 1e-6


def activation(g: Graph, x: str, kind: str) -> str:
    if kind == "quick_gelu":  # x * sigmoid(1.702 x)
        return g.op("Mul", x, g.op("Sigmoid", g.op("Mul", x, g.act_const(1.702))))
    if kind == "gelu":  # exact (erf) GELU, valid at every opset and in TensorRT
        inner = g.op("Erf", g.op("Div", x, g.act_const(np.sqrt(2.0))))
        return g.op("Mul", g.op("Mul", x, g.act_const(0.5)), g.op("Add", inner, g.act_const(1.0)))
    if kind == "silu":
        return g.op("Mul", x, g.op("Sigmoid", x))
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


def _rotate_vision(g: Graph, x: str, cos: str, sin: str, hd: int) -> str:
    """Rotary on [F, S, nh, hd] (cos/sin [S, 1, hd]) -> [F, nh, S, hd]; in fp32 like transformers' vision rotary.
    With the fused ops: one RotaryEmbedding on [F, nh, S, hd] (cos/sin [F, S, hd/2])."""
    x = g.to_f32(x)
    if g.target.llm_ops:
        x = g.op("RotaryEmbedding", g.op("Transpose", x, perm=[0, 2, 1, 3]), cos, sin)
    else:
        x = g.op("Transpose", rotate(g, x, cos, sin, hd // 2), perm=[0, 2, 1, 3])
    return g.to_act(x)


def _multi_head_attention(g: Graph, q: str, k: str, v: str, nh: int, hd: int) -> str:
    """ONNX Runtime's MultiHeadAttention on q, k, v [F, S, nh, hd] -> [F, S, E]. Without mask, bias, past or
    present its fp32 CPU kernel runs flash attention (MlasFlashAttention, tiles sized to the L2 cache): memory
    linear in the patches."""
    q, k, v = (g.op("Reshape", t, g.const([0, 0, nh * hd])) for t in (q, k, v))  # [F, S, E]: frames are the batch
    return g.op("MultiHeadAttention", q, k, v, domain="com.microsoft", num_heads=nh, scale=float(hd ** -0.5))


def _block(g: Graph, x: str, ckpt: Checkpoint, i: int, cos: str, sin: str) -> str:
    vc = ckpt.config.vision
    p = f"visual.blocks.{i}"
    E, nh, hd = vc.embed_dim, vc.num_heads, vc.head_dim
    h = layer_norm(g, x, ckpt, f"{p}.norm1")
    qkv = g.linear(h, ckpt.get(f"{p}.attn.qkv.weight"), ckpt.get(f"{p}.attn.qkv.bias"), f"{p}.attn.qkv")
    qkv = g.op("Reshape", qkv, g.const([0, 0, 3, nh, hd]))  # [F, S, 3, nh, hd]
    q, k, v = (g.op("Squeeze", t, g.const([2]))
               for t in g.op("Split", qkv, g.const([1, 1, 1]), axis=2, n_out=3))  # [F, S, nh, hd]
    if g.target.typed:
        q, k = _rotate_vision(g, q, cos, sin, hd), _rotate_vision(g, k, cos, sin, hd)  # [F, nh, S, hd]
        v = g.op("Transpose", v, perm=[0, 2, 1, 3])
        if g.target.llm_ops:  # fused per frame: no [F, nh, S, S] tensor in the graph
            attn = g.op("Attention", q, k, v, scale=float(hd ** -0.5), softmax_precision=FLOAT)
        else:
            attn = attend(g, q, g.op("Transpose", k, perm=[0, 1, 3, 2]), v, hd ** -0.5)
    elif g.target.contrib:  # fused per frame (frames are the batch): no [F, nh, S, S] tensor
        attn = _multi_head_attention(g, rotate(g, q, cos, sin, hd // 2), rotate(g, k, cos, sin, hd // 2), v,
                                     nh, hd)  # [F, S, E]
    else:
        q, k = rotate(g, q, cos, sin, hd // 2), rotate(g, k, cos, sin, hd // 2)
        q = g.op("Transpose", q, perm=[0, 2, 1, 3])  # [F, nh, S, hd]
        k = g.op("Transpose", k, perm=[0, 2, 3, 1])  # [F, nh, hd, S]
        v = g.op("Transpose", v, perm=[0, 2, 1, 3])
        attn = attend(g, q, k, v, hd ** -0.5)  # [F, nh, S, hd]
    if not g.target.contrib:
        attn = g.op("Reshape", g.op("Transpose", attn, perm=[0, 2, 1, 3]), g.const([0, 0, E]))  # [F, S, E]
    x = g.op("Add", x, g.linear(attn, ckpt.get(f"{p}.attn.proj.weight"), ckpt.get(f"{p}.attn.proj.bias"),
                                 f"{p}.attn.proj"))
    h = layer_norm(g, x, ckpt, f"{p}.norm2")
    h = g.linear(h, ckpt.get(f"{p}.mlp.fc1.weight"), ckpt.get(f"{p}.mlp.fc1.bias"), f"{p}.mlp.fc1")
    h = activation(g, h, vc.hidden_act)
    h = g.linear(h, ckpt.get(f"{p}.mlp.fc2.weight"), ckpt.get(f"{p}.mlp.fc2.bias"), f"{p}.mlp.fc2")
    return g.op("Add", x, h)


def build_vision_encoder(g: Graph, ckpt: Checkpoint, progress=None) -> None:
    vc = ckpt.config.vision
    m2 = vc.spatial_merge_size ** 2
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
    # kept in float: 1176 input channels rarely divide a quantization block, and the layer is small
    x = g.linear(g.to_act(pixels), w, None, "visual.patch_embed.proj", quantize=False)  # [F, S, E]
    for i in range(vc.depth):
        x = _block(g, x, ckpt, i, cos, sin)
        if progress:
            progress.update(1)
    h = layer_norm(g, x, ckpt, "visual.merger.ln_q")
    h = g.op("Reshape", h, g.const([0, -1, vc.embed_dim * m2]))  # [F, S/m^2, E*m^2]
    h = g.linear(h, ckpt.get("visual.merger.mlp.0.weight"), ckpt.get("visual.merger.mlp.0.bias"),
                 "visual.merger.mlp.0")
    h = g.linear(activation(g, h, "gelu"), ckpt.get("visual.merger.mlp.2.weight"),
                 ckpt.get("visual.merger.mlp.2.bias"), "visual.merger.mlp.2")
    g.output(g.to_f32(h), "image_embeds", FLOAT, ["frames", "merged_patches", vc.hidden_size])
