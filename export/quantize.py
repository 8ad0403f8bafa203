"""Weight-only block quantization for ONNX Runtime's CPU kernels (com.microsoft MatMulNBits).

Symmetric, per block of `block_size` input channels, one fp32 scale per block; no zero-point
tensor, so the kernel uses its default (2^(bits-1)). With accuracy_level 4 the kernel quantizes
activations to int8 on the fly and runs int8 dot products (VNNI) instead of dequantizing to fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits accuracy_level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8
BITS = {"int8": 8, "int4": 4}


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    block_size: int = 32
    accuracy_level: int = 4

    def validate(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"weights must be int4 or int8, got {self.bits} bits")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"--block-size must be a power of two >= 16, got {self.block_size}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise ValueError(f"unknown --accuracy-level {self.accuracy_level}: use one of {ACCURACY_LEVELS} "
                             "(4 = int8 activations, the fast path on CPUs with VNNI)")


def quantize_blocks(weight: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """weight [N, K] fp32 -> (packed uint8 [N, K/block, block*bits/8], scales fp32 [N, K/block]).

    q = round(w / scale) in [-(2^(bits-1) - 1), 2^(bits-1) - 1], stored offset by 2^(bits-1);
    4-bit values pack two per byte, the first in the low nibble.
    """
    n, k = weight.shape
    blocks = weight.astype(np.float32).reshape(n, k // block_size, block_size)
    qmax = 2 ** (bits - 1) - 1
    scales = np.abs(blocks).max(axis=-1) / qmax
    safe = np.where(scales == 0, 1.0, scales)[..., None]
    q = (np.clip(np.rint(blocks / safe), -qmax, qmax) + 2 ** (bits - 1)).astype(np.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return q, scales.astype(np.float32)


def dequantize_blocks(packed: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of quantize_blocks -> fp32 [N, K] (for tests and accuracy reports)."""
    if bits == 4:
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    else:
        q = packed
    values = (q.astype(np.float32) - 2 ** (bits - 1)) * scales[..., None]
    return values.reshape(values.shape[0], -1)


def matmul_nbits(g, x: str, weight: np.ndarray, name: str, spec: QuantSpec) -> str:
    """x [..., K] @ weight[N, K].T as one MatMulNBits node (weight stored quantized, never transposed)."""
    n, k = weight.shape
    if k % spec.block_size:
        raise ValueError(f"--block-size {spec.block_size} does not divide the input dimension {k} of {name}: "
                         "choose a block size that divides it (e.g. 32 or 16)")
    packed, scales = quantize_blocks(weight, spec.bits, spec.block_size)
    b = g.weight(f"{name}.weight.q{spec.bits}", packed, exact=True)
    s = g.weight(f"{name}.weight.scales", scales.reshape(-1), exact=True)
    return g.op("MatMulNBits", x, b, s, domain="com.microsoft", K=k, N=n, bits=spec.bits,
                block_size=spec.block_size, accuracy_level=spec.accuracy_level)
