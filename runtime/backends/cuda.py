"""The little of CUDA the TensorRT backend needs, through cuda-python (NVIDIA's bindings), no torch.

Every call goes through `cuda_call`, which raises on any error code with CUDA's own name for it;
every allocation is an object with `free()`, so that the backend can give all of it back.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import numpy as np


@functools.lru_cache(maxsize=1)
def cudart():
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.8 (the [trt] extra's floor)
    except ImportError:
        raise ImportError("the TensorRT backend needs cuda-python >= 12.8: pip install 'cuda-python>=12.8,<14' "
                          "(the [trt] extra)") from None
    return runtime


class CudaError(RuntimeError):
    pass


def cuda_call(result, what: str = "CUDA call"):
    """Unpack a cuda-python (err, *values) tuple; raise CudaError naming the error on any failure."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        name = getattr(err, "name", None) or f"error {int(err)}"
        raise CudaError(f"{what} failed: {name}")
    return values[0] if len(values) == 1 else (tuple(values) or None)


def _copy_kind(name: str):
    return getattr(cudart().cudaMemcpyKind, name)


class Stream:
    """One CUDA stream; `handle` is the integer TensorRT's execute_async_v3 takes."""

    def __init__(self):
        self.stream = cuda_call(cudart().cudaStreamCreate(), "cudaStreamCreate")
        self.handle = int(self.stream)

    def synchronize(self) -> None:
        cuda_call(cudart().cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def free(self) -> None:
        if self.stream is not None:
            cuda_call(cudart().cudaStreamDestroy(self.stream), "cudaStreamDestroy")
            self.stream = None


def _check_fits(nbytes: int, capacity: int, what: str) -> None:
    if nbytes > capacity:
        raise ValueError(f"{nbytes} bytes do not fit the {capacity}-byte {what}")


@dataclass
class DeviceBuffer:
    """One cudaMalloc'ed allocation of `nbytes`; holds whatever contiguous tensor fits in it."""

    ptr: int
    nbytes: int
    name: str = "buffer"  # what it holds, for error messages

    @classmethod
    def alloc(cls, nbytes: int, name: str = "buffer") -> "DeviceBuffer":
        ptr = cuda_call(cudart().cudaMalloc(max(int(nbytes), 1)), f"cudaMalloc of {nbytes} bytes for {name}")
        return cls(int(ptr), int(nbytes), name)

    def _fits(self, nbytes: int) -> None:
        _check_fits(nbytes, self.nbytes, f"device buffer {self.name}")

    def upload(self, array: np.ndarray, stream: Stream, staging: "PinnedArray | None" = None) -> None:
        """Copy `array` to the device on `stream`. From pageable memory the driver stages the copy before the
        call returns, which stalls the host; with `staging` (a pinned byte array) the bytes go there first
        and the copy runs asynchronously from it: the caller leaves `staging` alone until the stream has
        synchronized."""
        array = np.ascontiguousarray(array)
        self._fits(array.nbytes)
        source = array.ctypes.data
        if staging is not None:
            staging.fits(array.nbytes)
            staging.array[:array.nbytes] = array.reshape(-1).view(np.uint8)
            source = staging.ptr
        cuda_call(cudart().cudaMemcpyAsync(self.ptr, source, array.nbytes, _copy_kind("cudaMemcpyHostToDevice"),
                                           stream.stream), f"upload to {self.name}")

    def download_into(self, out: np.ndarray, stream: Stream) -> np.ndarray:
        """Copy the first out.nbytes bytes into `out` (pinned host memory for speed) and wait."""
        self._fits(out.nbytes)
        cuda_call(cudart().cudaMemcpyAsync(out.ctypes.data, self.ptr, out.nbytes,
                                           _copy_kind("cudaMemcpyDeviceToHost"), stream.stream),
                  f"download from {self.name}")
        stream.synchronize()
        return out

    def copy_from(self, src: "DeviceBuffer", nbytes: int, stream: Stream, offset: int = 0,
                  src_offset: int = 0) -> None:
        """Copy `nbytes` of `src` from `src_offset` to `offset` bytes into this buffer, on the device."""
        self._fits(offset + nbytes)
        src._fits(src_offset + nbytes)
        cuda_call(cudart().cudaMemcpyAsync(self.ptr + offset, src.ptr + src_offset, nbytes,
                                           _copy_kind("cudaMemcpyDeviceToDevice"), stream.stream),
                  f"copy into {self.name}")

    def free(self) -> None:
        if self.ptr:
            cuda_call(cudart().cudaFree(self.ptr), f"cudaFree of {self.name}")
            self.ptr = 0


class PinnedArray:
    """A page-locked host array (cudaMallocHost): copies to and from the device run at full speed and
    asynchronously with it."""

    def __init__(self, shape: tuple[int, ...], dtype, name: str = "pinned"):
        dtype = np.dtype(dtype)
        self.name = name
        self.nbytes = int(np.prod(shape)) * dtype.itemsize
        self.ptr = int(cuda_call(cudart().cudaMallocHost(max(self.nbytes, 1)), f"cudaMallocHost for {name}"))
        raw = (ctypes.c_byte * max(self.nbytes, 1)).from_address(self.ptr)
        self.array = np.frombuffer(raw, dtype, count=int(np.prod(shape))).reshape(shape)

    def fits(self, nbytes: int) -> None:
        _check_fits(nbytes, self.nbytes, f"pinned buffer {self.name}")

    def free(self) -> None:
        if self.ptr:
            self.array = None
            cuda_call(cudart().cudaFreeHost(self.ptr), "cudaFreeHost")
            self.ptr = 0


def gpu_identity(device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability 'major.minor') of a device: what engine sidecars record."""
    prop = cuda_call(cudart().cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
    return name.rstrip("\x00"), f"{prop.major}.{prop.minor}"


def device_memory() -> tuple[int, int]:
    """(free, total) bytes of the current device."""
    return cuda_call(cudart().cudaMemGetInfo(), "cudaMemGetInfo")
