"""The machine's physical limits for this model: weight bytes per decode token, vision FLOPs."""

from __future__ import annotations

from qwen2vl_edge.runtime.config import ModelConfig


# bytes per weight before block scales
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1, "int4": 0.5,
         # llama.cpp's Q4_K_M: Q4_K (4.5 bits a weight) with attn_v, ffn_down and the tied embedding / lm_head
         # in part in Q6_K (6.56 bits); 5.08 bits a weight on the 2B shape, as llama-quantize reported it
         "q4_k_m": 5.08 / 8}


def bytes_per_weight(weight_dtype: str, block_size: int = 32) -> float:
    """Bytes per weight as the kernels read them: our int8/int4 blocks carry one fp32 scale each."""
    base = BYTES[weight_dtype]
    return base + 4 / block_size if weight_dtype in ("int8", "int4") else base


def decoder_weight_params(cfg: ModelConfig) -> int:
    """Parameters read for one decode token: every text layer plus the lm_head (embedding rows are noise)."""
    t = cfg.text
    kv = t.num_key_value_heads * t.head_dim
    attn = t.hidden_size * t.hidden_size * 2 + t.hidden_size * kv * 2 + t.hidden_size + 2 * kv  # q, o, k, v, biases
    mlp = 3 * t.hidden_size * t.intermediate_size
    norms = 2 * t.hidden_size
    return t.num_hidden_layers * (attn + mlp + norms) + t.hidden_size + t.vocab_size * t.hidden_size


def decode_roofline_tok_s(cfg: ModelConfig, weight_dtype: str, bandwidth_bytes_s: float, block_size: int = 32) -> float:
    """Best possible decode tokens/s: every weight is read once per token at the measured bandwidth."""
    return bandwidth_bytes_s / (decoder_weight_params(cfg) * bytes_per_weight(weight_dtype, block_size))


def vision_flops(cfg: ModelConfig, patches_per_frame: int, frames: int = 1) -> float:
    """FLOPs of the vision encoder for `frames` temporal slices of `patches_per_frame` patches."""
    v = cfg.vision
    E, S = v.embed_dim, patches_per_frame
    mlp_hidden = int(E * v.mlp_ratio)
    per_block = 2 * S * E * (3 * E + E + 2 * mlp_hidden) + 2 * 2 * S * S * E  # projections + QK^T, PV
    m2 = v.spatial_merge_size ** 2
    merger = 2 * (S // m2) * (E * m2) * (E * m2 + v.hidden_size)
    return frames * (2 * S * v.patch_dim * E + v.depth * per_block + merger)
