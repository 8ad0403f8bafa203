"""Weight-only quantization: ONNX Runtime's CPU kernels (com.microsoft MatMulNBits) or standard ONNX
DequantizeLinear + MatMul (the tensorrt target).

MatMulNBits: symmetric, per block of `block_size` input channels, one fp32 scale per block; no zero-point
tensor, so the kernel uses its default (2^(bits-1)). With accuracy_level 4 the kernel quantizes
activations to int8 on the fly and runs int8 dot products (VNNI) instead of dequantizing to fp32.
Weights a checkpoint stores quantized (GPTQ, AWQ) keep their own integers, scales and zero points
(matmul_nbits_prequantized).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits accuracy_level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8
# weight format -> (bits, dynamic). "int8-dynamic": DynamicQuantizeMatMul, see dynamic_quant_matmul
FORMATS = {"int8": (8, False), "int4": (4, False), "int8-dynamic": (8, True)}
# The smallest positive normal of each scale dtype: every scale is at least this. TensorRT's parser refuses a
# scale <= 0 ("Scale coefficients must all be positive", QuantDequantLinearHelper in onnx-tensorrt's
# builtin_op_importers.cpp), which an all-zero block (max 0) or an fp16 scale below 2^-24 would give. bf16 has
# fp32's exponent range, so fp32's smallest normal.
SCALE_FLOOR = {"fp32": float(np.finfo(np.float32).tiny), "bf16": float(np.finfo(np.float32).tiny),
               "fp16": float(np.finfo(np.float16).tiny)}


def default_block(target: str, weight_format: str) -> tuple[int, bool]:
    """(block size, fit) when --block-size is not given. int4 on ort-cpu: blocks of 128 (benchmarks/kernel_bench.py,
    prefill_profile.py: the 2B shape's 274-token prefill costs 1.39x less CPU time than with blocks of 32, and
    its artifact 8 % fewer bytes; OpenVINO's int4 default group is 128 too), fitted: a linear whose input size
    128 does not divide takes the largest power of two that does. Otherwise 32: int8 blocks and the tensorrt
    target were not measured at other sizes."""
    return (128, True) if (target, weight_format) == ("ort-cpu", "int4") else (32, False)


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    block_size: int = 32
    accuracy_level: int = 4
    dynamic: bool = False  # per-channel int8 weights, activations quantized per tensor at run time
    fit: bool = False  # block_size is the largest block: smaller (a power of two >= 16) where it does not divide K

    @classmethod
    def of(cls, weight_format: str, block_size: int, accuracy_level: int, fit: bool = False) -> "QuantSpec":
        bits, dynamic = FORMATS[weight_format]
        return cls(bits, block_size, accuracy_level, dynamic, fit)

    def block(self, k: int, name: str) -> int:
        """The block along the input channels of a linear with `k` of them."""
        block = self.block_size
        while self.fit and k % block and block > 16:
            block //= 2
        if k % block:
            raise ValueError(f"--block-size {self.block_size} does not divide the input dimension {k} of {name}: "
                             "choose a block size that divides it (e.g. 32 or 16)")
        return block

    @property
    def op(self) -> str:
        return "DynamicQuantizeMatMul" if self.dynamic else "MatMulNBits"

    def validate(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"weights must be int4 or int8, got {self.bits} bits")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"--block-size must be a power of two >= 16, got {self.block_size}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise ValueError(f"unknown --accuracy-level {self.accuracy_level}: use one of {ACCURACY_LEVELS} "
                             "(4 = int8 activations, the fast path on CPUs with VNNI)")


def symmetric(values: np.ndarray, bits: int, floor: float = SCALE_FLOOR["fp32"]) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantization over the last axis -> (q int16 in [-(2^(bits-1) - 1), 2^(bits-1) - 1],
    scales fp32 [...], each at least `floor`: the smallest positive normal of the dtype it is stored in
    (SCALE_FLOOR). An all-zero group gets q 0 (still exact); a group whose values are all below the floor's
    resolution rounds to 0 as it would against any scale its dtype can hold."""
    qmax = 2 ** (bits - 1) - 1
    scales = np.maximum(np.abs(values).max(axis=-1).astype(np.float32) / qmax, np.float32(floor))
    return np.clip(np.rint(values / scales[..., None]), -qmax, qmax).astype(np.int16), scales


def quantize_blocks(weight: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """weight [N, K] fp32 -> (packed uint8 [N, K/block, block*bits/8], scales fp32 [N, K/block]).

    q = round(w / scale) in [-(2^(bits-1) - 1), 2^(bits-1) - 1], stored offset by 2^(bits-1);
    4-bit values pack two per byte, the first in the low nibble.
    """
    n, k = weight.shape
    q, scales = symmetric(weight.astype(np.float32).reshape(n, k // block_size, block_size), bits)
    return pack_values((q + 2 ** (bits - 1)).astype(np.uint8), bits), scales.astype(np.float32)


def pack_values(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 values [..., M] -> bytes as MatMulNBits packs them: 4-bit two per byte, the first in the low nibble
    (an odd M gets a zero high nibble last); 8-bit as they are."""
    if bits == 8:
        return q
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros((*q.shape[:-1], 1), np.uint8)], axis=-1)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def dequantize_blocks(packed: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of quantize_blocks -> fp32 [N, K] (for tests and accuracy reports)."""
    if bits == 4:
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    else:
        q = packed
    values = (q.astype(np.float32) - 2 ** (bits - 1)) * scales[..., None]
    return values.reshape(values.shape[0], -1)


def _stored(g, key: str, weight, spec: QuantSpec) -> tuple[str, str, int, int, int]:
    """Quantize `weight` [N, K] (array or loader) into the store once under `key` -> names, N, K, block.

    Stored as MatMulNBits reads it: packed [N, K/block, block*bits/8], scales flat [N*K/block].
    """
    packed_name, scales_name = f"{key}.q{spec.bits}", f"{key}.scales{spec.bits}"
    if packed_name not in g.store:
        w = weight() if callable(weight) else weight
        packed, scales = quantize_blocks(w, spec.bits, spec.block(w.shape[1], key))
        g.store.add(packed_name, packed, exact=True)
        g.store.add(scales_name, scales.reshape(-1), exact=True)
    n, blocks, blob = g.store.shape(packed_name)
    return packed_name, scales_name, n, blocks * blob * 8 // spec.bits, blob * 8 // spec.bits


def dequantize_matmul(g, x: str, weight: np.ndarray, name: str, spec: QuantSpec) -> str:
    """x [..., K] @ weight[N, K].T as DequantizeLinear + MatMul on a constant int4 weight stored [K, N] in blocks
    of `block_size` input channels, scales [K/block, N] in the graph's precision (at least its smallest positive
    normal), no zero point (symmetric): the weight-only pattern (W4A16) TensorRT runs as one GEMM. int8 weights
    have no such documented pattern (export/onnx_export.py: TRT_INT8)."""
    n, k = weight.shape
    if spec.bits != 4:
        raise ValueError(f"{name}: the tensorrt target quantizes weights to int4 blocks only, not {spec.bits} bits")
    block = spec.block(k, name)
    q, scales = symmetric(weight.astype(np.float32).reshape(n, k // block, block), 4, SCALE_FLOOR[g.target.precision])
    nibbles = q.reshape(n, k).T.reshape(-1).astype(np.uint8) & 0x0F  # [K, N] row-major, two's complement
    g.store.add_packed(f"{name}.weight.int4", pack_values(nibbles, 4), (k, n), TensorProto.INT4)
    w = g.op("DequantizeLinear", g.weight(f"{name}.weight.int4", None, exact=True),
             g.weight(f"{name}.weight.scales4", np.ascontiguousarray(scales.T), raw=True),  # [K/block, N]
             axis=0, block_size=block)
    return g.op("MatMul", x, w)


def dynamic_quant_matmul(g, x: str, weight: np.ndarray, name: str) -> str:
    """x [..., K] @ weight[N, K].T as DynamicQuantizeMatMul: weights int8, symmetric per output channel,
    stored [K, N]; activations quantized to uint8 per tensor at run time, then ONNX Runtime's u8s8 GEMM
    (VNNI). Measured at M=1024, K=1280, N=5120 on 2 threads: 9.1 ms against 22.4 ms for MatMulNBits int8
    (accuracy level 4) and 27.8 ms for fp32 -- at the price of one activation scale per tensor."""
    q, scales = symmetric(weight.astype(np.float32), 8)  # one scale per output channel
    b = g.weight(f"{name}.weight.dq8", np.ascontiguousarray(q.T.astype(np.int8)), exact=True)
    s = g.weight(f"{name}.weight.dqscales", scales, exact=True)
    return g.op("DynamicQuantizeMatMul", x, b, s, domain="com.microsoft")


def matmul_nbits(g, x: str, weight, name: str, spec: QuantSpec, key: str | None = None) -> str:
    """x [..., K] @ weight[N, K].T as one MatMulNBits node (weight stored quantized, never transposed).
    `key` names the stored tensor when another graph shares it (the tied embedding)."""
    packed, scales, n, k, block = _stored(g, key or f"{name}.weight", weight, spec)
    return g.op("MatMulNBits", x, g.weight(packed, None, exact=True), g.weight(scales, None, exact=True),
                domain="com.microsoft", K=k, N=n, bits=spec.bits, block_size=block,
                accuracy_level=spec.accuracy_level)


def matmul_nbits_prequantized(g, x: str, weight, name: str, accuracy_level: int) -> str:
    """x [..., K] @ W.T for a checkpoint's own quantized weight (export.prequantized.QuantizedWeight): its integers,
    scales and zero points as MatMulNBits blocks, not re-quantized. MatMulNBits' g_idx input is deprecated (and
    only a slow 4-bit path on CPU), so act-order (desc_act) weights get their input channels sorted by group
    instead, and x is gathered in that order."""
    order, block = weight.block_layout()
    n, k = weight.shape
    q = weight.q if order is None else weight.q[:, order]
    first = weight.g_idx[np.arange(0, k, block) if order is None else order[::block]]  # group of each block
    packed = pack_values(q.reshape(n, k // block, block), weight.bits)  # [N, K/block, block*bits/8]
    b = g.weight(f"{name}.weight.q{weight.bits}.ckpt", packed, exact=True)
    s = g.weight(f"{name}.weight.scales.ckpt", np.ascontiguousarray(weight.scales[:, first]), exact=True)  # [N, K/block]
    zp = g.weight(f"{name}.weight.zero_points.ckpt", pack_values(weight.zeros[:, first], weight.bits),
                  exact=True)  # [N, ceil(K/block * bits/8)]
    if order is not None:
        x = g.op("Gather", x, g.weight(f"{name}.input_order", order, exact=True), axis=-1)
    return g.op("MatMulNBits", x, b, s, zp, domain="com.microsoft", K=k, N=n, bits=weight.bits, block_size=block,
                accuracy_level=accuracy_level)


def gather_block_quantized(g, ids: str, table, key: str, spec: QuantSpec) -> str:
    """Rows of the block-quantized table [N, K] -> fp32 [..., K]; the same stored bytes as a MatMulNBits
    of that table (the tied lm_head), seen as [N, K*bits/8] packed along K with [N, K/block] scales."""
    packed, scales, n, k, block = _stored(g, key, table, spec)
    g.store.view(f"{packed}.rows", packed, (n, k * spec.bits // 8))
    g.store.view(f"{scales}.rows", scales, (n, k // block))
    return g.op("GatherBlockQuantized", g.weight(f"{packed}.rows", None, exact=True),
                ids, g.weight(f"{scales}.rows", None, exact=True), domain="com.microsoft",
                bits=spec.bits, block_size=block, gather_axis=0, quantize_axis=1)
