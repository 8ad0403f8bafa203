"""The little of CUDA the TensorRT backend needs, through cuda-python (NVIDIA's bindings), no torch."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np


@functools.lru_cache(maxsize=1)
def cudart():
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart as runtime  # older cuda-python
        except ImportError:
            raise ImportError("the TensorRT backend needs cuda-python: pip install 'qwen2vl-edge[trt]'") from None
    return runtime


def cuda_call(result):
    """Unpack a cuda-python (err, *values) tuple; raise on any error code."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else (tuple(values) or None)


@dataclass
class DeviceBuffer:
    """One cudaMalloc'ed allocation of `nbytes`; holds whatever contiguous tensor fits in it."""

    ptr: int
    nbytes: int

    @classmethod
    def alloc(cls, nbytes: int) -> "DeviceBuffer":
        return cls(int(cuda_call(cudart().cudaMalloc(max(nbytes, 1)))), nbytes)

    def upload(self, array: np.ndarray, stream) -> None:
        array = np.ascontiguousarray(array)
        if array.nbytes > self.nbytes:
            raise ValueError(f"{array.nbytes} bytes do not fit a {self.nbytes}-byte device buffer")
        rt = cudart()
        cuda_call(rt.cudaMemcpyAsync(self.ptr, array.ctypes.data, array.nbytes,
                                     rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def download(self, shape: tuple[int, ...], dtype, stream) -> np.ndarray:
        out = np.empty(shape, dtype)
        rt = cudart()
        cuda_call(rt.cudaMemcpyAsync(out.ctypes.data, self.ptr, out.nbytes,
                                     rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
        cuda_call(rt.cudaStreamSynchronize(stream))
        return out

    def free(self) -> None:
        if self.ptr:
            cuda_call(cudart().cudaFree(self.ptr))
            self.ptr = 0


def gpu_identity(device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability 'major.minor') of a device: what engine sidecars record."""
    prop = cuda_call(cudart().cudaGetDeviceProperties(device))
    name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
    return name.rstrip("\x00"), f"{prop.major}.{prop.minor}"
