"""Device memory of a TensorRT engine set, as plain data: ONE function (`memory_plan`) gives the weights,
the KV cache per token and at the limits, the I/O buffers and an estimate of the activations.

The TensorRT backend allocates exactly `io_buffers(...)` and `kv_cache_bytes(...)` from here; the
docs' Jetson tables are `memory_table(...)` and `static_cache_table(...)` of the same function. Activations
are an estimate from the graphs' largest tensors; the backend sizes its one shared pool from what the engines
report.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig
from .trt_profiles import CONCAT, JETSON_8GB, POS_TAPS, PREALLOCATED, Limits, window_limit

# Engine limits proposed per Jetson memory size (GB, shared by CPU and GPU) for the static-cache table; 8 GB is
# JETSON_8GB. Proposals from memory_plan, not measured on a board.
JETSON_LIMITS = {
    8: JETSON_8GB,
    16: Limits(max_image_tokens=1024, max_frames=8, max_prompt=3072, max_context=4096),
    32: Limits(max_image_tokens=1280, max_frames=16, max_prompt=6144, max_context=8192),
    64: Limits(max_image_tokens=1280, max_frames=16, max_prompt=12288, max_context=16384),
}

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "fp32": 4, "fp16": 2, "bf16": 2}
F32, I64 = 4, 8


def kv_cache_bytes(cfg: ModelConfig, batch: int, capacity: int, dtype: str, kv_cache: str = CONCAT) -> int:
    """One request's KV cache: keys + values of every layer for `capacity` positions; concat graphs
    need two buffer sets (the past is read from one, the present written to the other), preallocated
    graphs one (written in place)."""
    t = cfg.text
    per_set = 2 * t.num_hidden_layers * batch * t.num_key_value_heads * capacity * t.head_dim * DTYPE_BYTES[dtype]
    return per_set * (2 if kv_cache == CONCAT else 1)


def io_buffers(cfg: ModelConfig, lim: Limits) -> dict[str, int]:
    """Bytes of each I/O buffer the backend keeps for the engines' limits (graph I/O is fp32 / int64)."""
    t, v = cfg.text, cfg.vision
    B, F, m2, K = lim.max_batch, lim.frames(cfg), v.spatial_merge_size ** 2, len(v.deepstack_visual_indexes)
    patches = lim.max_image_tokens * m2
    extra = {}
    if cfg.family.windowed:  # [W, P] slots of the window layout, [S] its inverse
        slots = window_limit(cfg, lim)[2] * v.window_merged ** 2 * m2
        extra = {"window_index": slots * I64, "window_mask": slots * F32, "window_inverse": patches * I64}
    if cfg.family.pos_table:  # [S, 4] taps into the position table
        extra.update(pos_index=patches * POS_TAPS * I64, pos_weight=patches * POS_TAPS * F32)
    features = F * lim.max_image_tokens * t.hidden_size * F32  # [F, S / merge^2, hidden]
    if K:  # DeepStack: each encoder run's [K, F, S / merge^2, hidden]; joined, the decoder's [K, M, hidden]
        # (M <= B * L); the merger's visual_index [B, L]
        extra.update(deepstack_features=K * features,
                     deepstack_embeds=K * B * lim.max_prompt * t.hidden_size * F32,
                     visual_index=B * lim.max_prompt * I64)
    return {
        "pixel_values": F * patches * v.patch_dim * F32,  # [F, S, patch_dim]
        "rotary_cos": patches * v.head_dim * F32,  # [S, vision head_dim]
        "rotary_sin": patches * v.head_dim * F32,
        **extra,
        "image_embeds": features,
        "input_ids": B * lim.max_prompt * I64,  # [B, L]
        "vision_embeds": B * lim.max_prompt * t.hidden_size * F32,  # [M, hidden], M <= B * L
        "inputs_embeds": B * lim.max_prompt * t.hidden_size * F32,  # [B, L, hidden]
        "attention_mask": B * lim.max_context * I64,  # [B, P + L]
        "position_ids": 3 * B * lim.max_prompt * I64,  # [3, B, L]
        "logits": B * t.vocab_size * F32,  # [B, 1, vocab]; the same again in pinned host memory
    }


def vision_params(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters in matrices, parameters in vectors) of the vision encoder."""
    v, H = cfg.vision, cfg.text.hidden_size
    E, mlp, m2 = v.embed_dim, v.mlp_dim, v.spatial_merge_size ** 2
    mlps = 3 if cfg.family.vision_mlp == "gated" else 2  # gate, up, down / fc1, fc2
    K = len(v.deepstack_visual_indexes)  # DeepStack mergers: as the final one, their norm over E * m2
    matrices = v.patch_dim * E + v.depth * (4 * E * E + mlps * E * mlp) + (1 + K) * ((E * m2) ** 2 + E * m2 * H)
    vectors = v.depth * (4 * E + 4 * E + (mlps - 1) * mlp + E) + 2 * E + E * m2 + H + K * (3 * E * m2 + H)
    if cfg.family.pos_table:  # Qwen3-VL: the position table, and the patch embedding's bias
        vectors += (v.num_position_embeddings + 1) * E
    return matrices, vectors


def _weight_params(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters in matrices, parameters in vectors) of the three graphs, the tied embedding once."""
    t = cfg.text
    kvd = t.num_key_value_heads * t.head_dim
    H, I = t.hidden_size, t.intermediate_size
    vision_m, vision_v = vision_params(cfg)
    text_m = t.num_hidden_layers * (2 * H * H + 2 * H * kvd + 3 * H * I) + t.vocab_size * H
    text_m += 0 if cfg.tie_word_embeddings else t.vocab_size * H
    text_v = t.num_hidden_layers * (H + 2 * kvd + 2 * H) + H
    return vision_m + text_m, vision_v + text_v


def weight_bytes(cfg: ModelConfig, precision: str, weights: str = "fp32", block_size: int = 32) -> int:
    """Matrices in the weight format (int8/int4 blocks carry one scale in the graph precision), the rest
    in the precision; weights 'fp32' means float weights in the graph precision."""
    matrices, vectors = _weight_params(cfg)
    p = DTYPE_BYTES[precision]
    per = {"fp32": p, "int8": 1 + p / block_size, "int4": 0.5 + p / block_size}[weights]
    return int(matrices * per + vectors * p)


def activation_bytes(cfg: ModelConfig, lim: Limits, precision: str, min_tensorrt: str = "10.3") -> int:
    """Estimate of the largest engine's working tensors at the limits: the vision encoder on a full
    image (q/k/v and MLP hidden; with 10.3's explicit attention also fp32 scores and probabilities
    [F, heads, S, S]) or the decoder's prefill at --max-prompt (q/k/v, gate/up; with 10.3 scores
    [B, heads, L, P + L] and the bias [B, 1, groups*L, P + L], P + L up to --max-context: a chat session's
    later turn prefills after a past)."""
    t, v = cfg.text, cfg.vision
    a = DTYPE_BYTES[precision]
    explicit = min_tensorrt == "10.3"
    F, S = lim.frames(cfg), lim.max_image_tokens * v.spatial_merge_size ** 2
    vision = F * S * (4 * v.embed_dim + v.mlp_dim) * a
    vision += 2 * F * v.num_heads * S * S * F32 if explicit else 0
    # DeepStack: the K mergers' outputs live until the last block, then stacked in fp32
    vision += len(v.deepstack_visual_indexes) * F * lim.max_image_tokens * t.hidden_size * (a + F32)
    B, L = lim.max_batch, lim.max_prompt
    kvd = t.num_key_value_heads * t.head_dim
    prefill = B * L * (2 * t.hidden_size + 2 * kvd + 2 * t.intermediate_size) * a + B * t.vocab_size * F32
    groups = t.num_attention_heads // t.num_key_value_heads  # 10.3's fp32 bias is tiled over them
    prefill += (2 * t.num_attention_heads + groups) * B * L * lim.max_context * F32 if explicit else 0
    return max(vision, prefill)


@dataclass(frozen=True)
class MemoryPlan:
    weights: int
    kv_per_token: int  # one row, all layers, keys and values, every buffer set the graphs need
    kv_cache: int  # at max_context for max_batch rows
    io: int  # the backend's I/O buffers (pinned logits included)
    activations: int  # estimate; the backend uses the engines' own figure

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.io + self.activations


def memory_plan(cfg: ModelConfig, lim: Limits, *, precision: str, weights: str = "fp32",
                min_tensorrt: str = "10.3", block_size: int = 32) -> MemoryPlan:
    kv_cache = CONCAT if min_tensorrt == "10.3" else PREALLOCATED
    return MemoryPlan(
        weights=weight_bytes(cfg, precision, weights, block_size),
        kv_per_token=kv_cache_bytes(cfg, 1, 1, precision, kv_cache),
        kv_cache=kv_cache_bytes(cfg, lim.max_batch, lim.max_context, precision, kv_cache),
        io=sum(io_buffers(cfg, lim).values()) + lim.max_batch * cfg.text.vocab_size * F32,
        activations=activation_bytes(cfg, lim, precision, min_tensorrt),
    )


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 1e6 else f"{n / 1e3:,.1f} KB"


def memory_table(cfg: ModelConfig, lim: Limits = JETSON_8GB) -> str:
    """The docs' Jetson table: one row per (TensorRT floor, weights), fp16, at `lim`. Only the weight formats
    TensorRT is documented to keep: fp16, and int4 blocks (W4A16); --target tensorrt refuses int8."""
    rows = ["| TensorRT floor | weights | weights memory | KV per token | KV at max context | I/O buffers | "
            "activations (estimate) | total |", "|---|---|---|---|---|---|---|---|"]
    for floor in ("10.3", "10.15"):
        for weights in ("fp32", "int4"):
            p = memory_plan(cfg, lim, precision="fp16", weights=weights, min_tensorrt=floor)
            rows.append(f"| {floor} | {'fp16' if weights == 'fp32' else weights} | {_mb(p.weights)} | "
                        f"{_mb(p.kv_per_token)} | {_mb(p.kv_cache)} | {_mb(p.io)} | {_mb(p.activations)} | "
                        f"{_mb(p.total)} |")
    return "\n".join(rows)


def static_cache_table(models: dict[str, ModelConfig], boards: dict[int, Limits] | None = None) -> str:
    """What 10.15's static KV cache costs, fp16, one request (the boards' limits have max_batch 1): per Jetson
    memory size (its limits) and model, the cache every request allocates whole at --max-context, the bytes each
    decode step's attention reads (the whole buffer on 10.15; on 10.3 the P cached rows, shown at P =
    max_context / 2, a generation's average), and the engine set's total with int4 and fp16 weights."""
    rows = ["| Jetson | model | --max-context | KV cache per request, read whole by every decode step (10.15) | "
            "10.3: read at half the context | total, int4 weights | total, fp16 weights |", "|---" * 7 + "|"]
    for gb, lim in (boards or JETSON_LIMITS).items():
        for name, cfg in models.items():
            plans = {w: memory_plan(cfg, lim, precision="fp16", weights=w, min_tensorrt="10.15")
                     for w in ("int4", "fp32")}
            whole = plans["int4"].kv_cache
            half = kv_cache_bytes(cfg, 1, lim.max_context // 2, "fp16", PREALLOCATED)  # attention reads P rows once
            rows.append(f"| {gb} GB | {name} | {lim.max_context} | {_mb(whole)} | {_mb(half)} | "
                        + " | ".join(f"{_mb(p.total)} ({p.total / (gb * 1e9):.0%})" for p in plans.values()) + " |")
    return "\n".join(rows)
