"""Tiny GPTQ and AWQ checkpoints packed here, in the test suite, as their publishers' tools pack them, so that
the reader (export/prequantized.py) is checked against layouts it did not write. Packing as read (search tool):

- GPTQ: AutoGPTQ auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py `QuantLinear.pack`: qweight int32
  [K*bits/32, N], input j of each word at bit bits*j; `zeros -= 1` then qzeros int32 [G, N*bits/32] along N;
  scales fp16 [G, N]; g_idx int32 [K]. GPTQModel gptqmodel/utils/model.py `convert_gptq_v1_to_v2_format_module`:
  format "gptq_v2" stores the zero itself (v1 + 1 per value). transformers' GPTQConfig: `checkpoint_format`.
- AWQ GEMM: AutoAWQ awq/modules/linear/gemm.py `WQLinear_GEMM.from_linear`: qweight int32 [K, N/8] and
  qzeros int32 [G, N/8], slot i of word `col` holding output col*8 + order_map[i], order_map [0, 2, 4, 6, 1, 3, 5, 7];
  scales fp16 [G, N]. transformers' AwqConfig: `version` "gemm", `modules_to_not_convert`.

tests/crosscheck_publishers.py compares these packers with AutoAWQ's and AutoGPTQ's own code, by hand.
The integers come from round-to-nearest per group (not GPTQ's or AWQ's error-compensating search: only the
formats are under test). Alongside, the float checkpoint of the same weights dequantized here, for transformers.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LINEAR = re.compile(r"layers\.(\d+)\.((?:self_attn|mlp)\.\w+_proj)\.weight$")
AWQ_ORDER_MAP = (0, 2, 4, 6, 1, 3, 5, 7)


@dataclass(frozen=True)
class Variant:
    method: str  # "gptq" | "awq"
    bits: int
    group_size: int
    sym: bool = False
    desc_act: bool = False
    fmt: str = "gptq"  # GPTQ checkpoint_format; AWQ: "gemm"
    float_layers: tuple[str, ...] = ()  # left unquantized, e.g. ("self_attn.v_proj",)
    family: str = "qwen2_vl"  # whose tiny checkpoint is quantized (conftest.FAMILY_CKPTS)

    @property
    def name(self) -> str:
        act = "-act" if self.desc_act else ""
        partial = "-partial" if self.float_layers else ""
        family = "" if self.family == "qwen2_vl" else f"-{self.family}"
        return (f"{self.method}{self.bits}-g{self.group_size}-{'sym' if self.sym else 'asym'}{act}{partial}-{self.fmt}"
                f"{family}")


def rtn(w: np.ndarray, bits: int, g_idx: np.ndarray, sym: bool, min_zero: int) -> tuple:
    """w [N, K] -> q [N, K], scales fp16 [N, G], zeros [N, G] (GPTQ's quantizer grid, rounded to nearest)."""
    maxq, groups = 2 ** bits - 1, int(g_idx.max()) + 1
    scales, zeros = np.zeros((w.shape[0], groups), np.float16), np.zeros((w.shape[0], groups), np.int64)
    for g in range(groups):
        block = w[:, g_idx == g]
        if sym:
            scale, zero = 2 * np.abs(block).max(1) / maxq, np.full(w.shape[0], (maxq + 1) // 2)
        else:
            lo, hi = np.minimum(block.min(1), 0), np.maximum(block.max(1), 0)
            scale = (hi - lo) / maxq
            zero = np.clip(np.rint(-lo / scale), min_zero, maxq)
        scales[:, g], zeros[:, g] = scale.astype(np.float16), zero
    s = scales.astype(np.float32)[:, g_idx]
    q = np.clip(np.rint(w / s) + zeros[:, g_idx], 0, maxq).astype(np.int64)
    return q, scales, zeros


def pack_gptq(q, scales, zeros, g_idx, bits: int, fmt: str) -> dict[str, np.ndarray]:
    per_word = 32 // bits
    intweight = q.T.astype(np.uint32)  # [K, N]
    qweight = np.zeros((intweight.shape[0] // per_word, intweight.shape[1]), np.uint32)
    for j in range(per_word):
        qweight |= intweight[j::per_word] << np.uint32(bits * j)
    stored = (zeros.T - (1 if fmt == "gptq" else 0)).astype(np.uint32)  # [G, N]
    qzeros = np.zeros((stored.shape[0], stored.shape[1] // per_word), np.uint32)
    for j in range(per_word):
        qzeros |= stored[:, j::per_word] << np.uint32(bits * j)
    return {"qweight": qweight.view(np.int32), "qzeros": qzeros.view(np.int32),
            "scales": np.ascontiguousarray(scales.T), "g_idx": g_idx.astype(np.int32)}


def pack_awq(q, scales, zeros) -> dict[str, np.ndarray]:
    def pack(values):  # [rows, N] -> [rows, N/8]
        values = values.astype(np.uint32)
        words = np.zeros((values.shape[0], values.shape[1] // 8), np.uint32)
        for i, column in enumerate(AWQ_ORDER_MAP):
            words |= values[:, column::8] << np.uint32(4 * i)
        return words.view(np.int32)

    return {"qweight": pack(q.T), "qzeros": pack(zeros.T), "scales": np.ascontiguousarray(scales.T)}


def quantization_config(v: Variant) -> dict:
    if v.method == "awq":
        return {"quant_method": "awq", "bits": v.bits, "group_size": v.group_size, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": ["visual"]}
    quantized = [[n for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj") if n not in v.float_layers]]
    return {"quant_method": "gptq", "bits": v.bits, "group_size": v.group_size, "desc_act": v.desc_act,
            "sym": v.sym, "checkpoint_format": v.fmt, "damp_percent": 0.01, "true_sequential": True,
            "static_groups": False, "modules_in_block_to_quantize": quantized if v.float_layers else None}


def group_index(k: int, group_size: int, perm: np.ndarray | None) -> np.ndarray:
    """GPTQ's g_idx: input perm[i] (act order) belongs to group i // group_size."""
    g_idx = np.arange(k) // group_size
    if perm is None:
        return g_idx
    out = np.empty(k, np.int64)
    out[perm] = g_idx
    return out


def quantize_layer(w: np.ndarray, v: Variant, perm: np.ndarray | None) -> tuple[dict, np.ndarray]:
    """-> (the layer's packed tensors, its dequantized weight [N, K] fp32)."""
    g_idx = group_index(w.shape[1], v.group_size if v.group_size > 0 else w.shape[1], perm)
    q, scales, zeros = rtn(w, v.bits, g_idx, v.sym, min_zero=1 if v.fmt == "gptq" else 0)
    dequant = ((q - zeros[:, g_idx]) * scales.astype(np.float32)[:, g_idx]).astype(np.float32)
    packed = pack_awq(q, scales, zeros) if v.method == "awq" else pack_gptq(q, scales, zeros, g_idx, v.bits, v.fmt)
    return packed, dequant


def write_pair(src: Path, out: Path, v: Variant, seed: int = 0) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """From the float checkpoint `src`: (quantized dir, dequantized float dir, {'model.layers.i.x.y_proj': W})."""
    import torch
    from safetensors.torch import load_file, save_file

    rng = np.random.default_rng(seed)
    tensors = load_file(str(src / "model.safetensors"))
    quantized, dequantized, reference = {}, {}, {}
    perms: dict[tuple[str, str], np.ndarray] = {}
    for key, t in tensors.items():
        m = LINEAR.search(key)
        if not m or "visual" in key or m.group(2) in v.float_layers:
            quantized[key] = dequantized[key] = t
            continue
        w = t.float().numpy()
        # act order: one permutation per input, as GPTQ derives it from the input's Hessian (gate/up share one);
        # q, k, v get their own here, so the export also meets projections it cannot fuse into one kernel
        share = {"mlp.up_proj": "mlp.gate_proj"}.get(m.group(2), m.group(2))
        perm = perms.setdefault((m.group(1), share), rng.permutation(w.shape[1])) if v.desc_act else None
        packed, dequant = quantize_layer(w, v, perm)
        prefix = key[: -len(".weight")]
        quantized.update({f"{prefix}.{name}": torch.from_numpy(np.ascontiguousarray(a)) for name, a in packed.items()})
        dequantized[key] = torch.from_numpy(dequant)
        reference[f"model.layers.{m.group(1)}.{m.group(2)}"] = dequant
    dirs = []
    for suffix, weights in (("quant", quantized), ("dequant", dequantized)):
        d = out / f"{v.name}-{suffix}"
        shutil.copytree(src, d, dirs_exist_ok=True)
        save_file(weights, str(d / "model.safetensors"))
        dirs.append(d)
    config = json.loads((dirs[0] / "config.json").read_text())
    config["quantization_config"] = quantization_config(v)
    (dirs[0] / "config.json").write_text(json.dumps(config, indent=2))
    return dirs[0], dirs[1], reference
