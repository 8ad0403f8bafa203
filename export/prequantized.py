"""Checkpoints quantized by their publisher (GPTQ, AWQ GEMM): each linear layer's integers, scales, zero
points and groups read back as plain data, never re-quantized.

Formats, as their writers pack them (int32 words, the first value in the lowest bits):
- GPTQ (AutoGPTQ / optimum / GPTQModel `QuantLinear`): qweight [K*bits/32, N] packed along K, qzeros
  [G, N*bits/32] packed along N, scales fp16 [G, N], g_idx int32 [K] (the group of each input channel;
  permuted under desc_act). Format "gptq" (v1) stores zero - 1 (GPTQ's stored-zero offset); "gptq_v2" the zero.
- AWQ GEMM (AutoAWQ `WQLinear_GEMM`): qweight [K, N*bits/32] and qzeros [G, N*bits/32], both packed along N
  in the interleaved order AWQ_ORDER; scales fp16 [G, N]; groups are contiguous.
In both, W[n, k] = (q[n, k] - zero[n, g_idx[k]]) * scale[n, g_idx[k]].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qwen2vl_edge.runtime.config import ConfigError

SUPPORTED = ("GPTQ (quant_method 'gptq', checkpoint_format 'gptq' or 'gptq_v2', bits 4 or 8) and "
             "AWQ (quant_method 'awq', version 'gemm', bits 4)")
# GPTQ checkpoint_format -> what is added to a stored zero point
GPTQ_ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}
GPTQ_BITS, AWQ_BITS = (4, 8), (4,)
# AutoAWQ's GEMM packing: slot i of each 8-value word holds output column AWQ_ORDER[i] of its 8
AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])
TENSORS = ("qweight", "qzeros", "scales", "g_idx")  # g_idx: GPTQ only, and optional there (then contiguous groups)


@dataclass(frozen=True)
class QuantScheme:
    """config.json's quantization_config, checked. Which layers it covers is read from the tensors: a layer
    with a qweight is quantized, one with a weight is float (vision tower, lm_head, modules_to_not_convert)."""

    method: str  # "gptq" | "awq"
    bits: int
    group_size: int  # -1: one group over all input channels
    checkpoint_format: str  # "gptq", "gptq_v2", "gemm"
    desc_act: bool = False
    sym: bool = False

    @property
    def zero_offset(self) -> int:
        return GPTQ_ZERO_OFFSET.get(self.checkpoint_format, 0)

    def to_manifest(self) -> dict:
        return {"method": self.method, "format": self.checkpoint_format, "bits": self.bits,
                "group_size": self.group_size, "desc_act": self.desc_act, "sym": self.sym}


def read_scheme(qc: dict) -> QuantScheme:
    """quantization_config (or AutoGPTQ's quantize_config.json) -> QuantScheme; ConfigError for what we cannot read."""
    method = str(qc.get("quant_method", "gptq")).lower()
    bits, group_size = qc.get("bits"), int(qc.get("group_size", 128))
    if method == "gptq":
        fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
        if qc.get("is_marlin_format"):  # AutoGPTQ's older flag for the same repacking
            fmt = "marlin"
        if fmt not in GPTQ_ZERO_OFFSET:
            raise ConfigError(f"GPTQ checkpoint_format {fmt!r} is not supported (exllama v2 / marlin / bitblas "
                              f"layouts are repacked for one kernel); supported: {SUPPORTED}")
        allowed_bits = GPTQ_BITS
    elif method == "awq":
        fmt = str(qc.get("version") or qc.get("format") or "gemm").lower()
        if fmt != "gemm":
            raise ConfigError(f"AWQ version {fmt!r} is not supported; supported: {SUPPORTED}")
        if qc.get("zero_point") is False:
            raise ConfigError(f"AWQ without zero points is not a GEMM checkpoint AutoAWQ writes; supported: {SUPPORTED}")
        allowed_bits = AWQ_BITS
    else:
        raise ConfigError(f"quant_method {method!r} is not supported; supported: {SUPPORTED}")
    if bits not in allowed_bits:
        raise ConfigError(f"{method.upper()} with {bits} bits is not supported (ONNX Runtime's MatMulNBits and "
                          f"our readers take {' or '.join(map(str, allowed_bits))}); supported: {SUPPORTED}")
    if group_size != -1 and group_size <= 0:
        raise ConfigError(f"quantization_config group_size must be positive or -1, got {group_size}")
    return QuantScheme(method, bits, group_size, fmt, bool(qc.get("desc_act", False)), bool(qc.get("sym", False)))


@dataclass(frozen=True)
class QuantizedWeight:
    """One linear weight [N out, K in] as the checkpoint defines it, unpacked:
    W[n, k] = (q[n, k] - zeros[n, g_idx[k]]) * scales[n, g_idx[k]]. Plain data for any writer
    (MatMulNBits, DequantizeLinear, or dequantized floats)."""

    q: np.ndarray  # [N, K] uint8 in [0, 2^bits)
    scales: np.ndarray  # [N, G] fp32 (the checkpoint's fp16 values, exactly)
    zeros: np.ndarray  # [N, G] uint8 in [0, 2^bits), offset convention already applied
    g_idx: np.ndarray  # [K] int32, the group of each input channel
    bits: int
    group_size: int  # as the checkpoint states it; the groups themselves are g_idx

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    def dequantize(self) -> np.ndarray:
        """fp32 [N, K]; exact: an fp16 scale times a small integer fits fp32's mantissa."""
        return (self.q.astype(np.float32) - self.zeros[:, self.g_idx]) * self.scales[:, self.g_idx]

    def block_layout(self) -> tuple[np.ndarray | None, int]:
        """(order, block): input channels sorted by group (None when already sorted), and the largest power-of-two
        block >= 16 that holds one group in that order, as MatMulNBits needs; ConfigError if none does."""
        order = np.argsort(self.g_idx, kind="stable")
        groups = self.g_idx[order]
        k = len(groups)
        block = 1 << (k.bit_length() - 1)
        while block >= 16:
            if k % block == 0 and (groups.reshape(-1, block) == groups[::block, None]).all():
                return (None if (order == np.arange(k)).all() else order.astype(np.int64)), block
            block //= 2
        raise ConfigError(f"the groups of a {k}-input {self.bits}-bit layer (group_size {self.group_size}) fit no "
                          "power-of-two block >= 16, as ONNX Runtime's MatMulNBits needs: export with --target portable")


def join_outputs(weights: list) -> np.ndarray | QuantizedWeight | list:
    """The weights of linears that share an input, as one weight of their concatenated outputs when they can be:
    float arrays, or quantized ones with the same bits and groups. Otherwise the list (one kernel each)."""
    if all(isinstance(w, np.ndarray) for w in weights):
        return np.concatenate(weights)
    first = weights[0]
    if all(isinstance(w, QuantizedWeight) and w.bits == first.bits and np.array_equal(w.g_idx, first.g_idx)
           for w in weights):
        cat = lambda field: np.concatenate([getattr(w, field) for w in weights])  # noqa: E731
        return QuantizedWeight(cat("q"), cat("scales"), cat("zeros"), first.g_idx, first.bits, first.group_size)
    return list(weights)


def dequantized(weight) -> np.ndarray:
    """Float [N, K] of any weight join_outputs returns."""
    if isinstance(weight, list):
        return np.concatenate([dequantized(w) for w in weight])
    return weight.dequantize() if isinstance(weight, QuantizedWeight) else weight


def unpack_words(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """int32 words -> uint8 values along `axis` (32/bits per word, the first in the lowest bits)."""
    u = np.moveaxis(words.view(np.uint32), axis, -1)
    shifts = np.arange(0, 32, bits, dtype=np.uint32)
    values = (u[..., None] >> shifts) & np.uint32((1 << bits) - 1)  # [..., words, 32/bits]
    return np.moveaxis(values.reshape(*u.shape[:-1], -1).astype(np.uint8), -1, axis)


def _zeros(stored: np.ndarray, scheme: QuantScheme, name: str) -> np.ndarray:
    limit = 1 << scheme.bits
    if scheme.zero_offset and (stored.astype(np.int32) + scheme.zero_offset >= limit).any():
        # a true zero of 0 stored as -1: AutoGPTQ reads 2^bits, GPTQModel carries into the next value
        raise ConfigError(f"{name}.qzeros holds {limit - 1}, a zero point GPTQ's v1 format cannot store (readers "
                          "disagree on it); re-save the checkpoint with checkpoint_format 'gptq_v2'")
    return (stored + scheme.zero_offset).astype(np.uint8)


def unpack(scheme: QuantScheme, tensors: dict[str, np.ndarray], name: str) -> QuantizedWeight:
    """The packed tensors of linear `name` (qweight, qzeros, scales[, g_idx]) -> QuantizedWeight.
    AWQ's groups are contiguous: a g_idx is ignored there."""
    if scheme.method == "awq":
        tensors = {k: v for k, v in tensors.items() if k != "g_idx"}
    scales = tensors["scales"].astype(np.float32).T  # [N, G]
    n, groups = scales.shape
    if scheme.method == "gptq":
        q = unpack_words(tensors["qweight"], scheme.bits, axis=0).T  # [N, K]
        stored = unpack_words(tensors["qzeros"], scheme.bits, axis=1)[:, :n].T  # [N, G]
    else:
        slots = len(AWQ_ORDER)

        def natural(words):  # [rows, N/8] words -> [rows, N] in output order
            v = unpack_words(words, scheme.bits, axis=1).reshape(words.shape[0], -1, slots)
            out = np.empty_like(v)
            out[..., AWQ_ORDER] = v
            return out.reshape(words.shape[0], -1)

        q, stored = natural(tensors["qweight"]).T, natural(tensors["qzeros"])[:, :n].T
    k = q.shape[1]
    g_idx = tensors.get("g_idx", np.arange(k) // (scheme.group_size if scheme.group_size > 0 else k)).astype(np.int32)
    if q.shape[0] != n or len(g_idx) != q.shape[1] or g_idx.min() < 0 or g_idx.max() >= groups:
        raise ConfigError(f"{name}: qweight {tensors['qweight'].shape}, scales {tensors['scales'].shape} and g_idx "
                          f"do not fit a {scheme.method.upper()} {scheme.bits}-bit layer")
    return QuantizedWeight(np.ascontiguousarray(q), np.ascontiguousarray(scales), _zeros(stored, scheme, name),
                           g_idx, scheme.bits, scheme.group_size)
