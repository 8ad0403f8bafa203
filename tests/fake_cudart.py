"""A recording fake of cuda-python's runtime module (`cuda.bindings.runtime`), for tests only.

"Device" memory is host memory, so that bytes written by one fake call can be read by the next. It
checks what a GPU would punish: every copy stays inside a live allocation, streams are live, nothing
is freed twice, and `live()` lists what was not freed. Its functions take the same parameters as
cuda-python's (tests/test_trt_fakes.py compares them with the installed cuda-python).
"""

from __future__ import annotations

import ctypes
import enum
import os
from dataclasses import dataclass, field

import numpy as np


# On a machine with a GPU, QWEN2VL_EDGE_REAL_CUDA=1 runs the TensorRT backend tests on its memory (CheckedCudart)
REAL_CUDA = os.environ.get("QWEN2VL_EDGE_REAL_CUDA") == "1"


def for_tests() -> "FakeCudart":
    return CheckedCudart.real() if REAL_CUDA else FakeCudart()


class cudaError_t(enum.IntEnum):  # noqa: N801 (cuda-python's names)
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidResourceHandle = 400


class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3


class cudaStream_t:  # noqa: N801
    def __init__(self, handle: int):
        self.handle = handle

    def __int__(self) -> int:
        return self.handle


@dataclass
class _Props:
    name: bytes = b"Fake GPU"
    major: int = 9
    minor: int = 0


class FakeCudaError(AssertionError):
    """A call a real GPU would fail or corrupt memory with."""


@dataclass
class FakeCudart:
    total: int = 80 << 30
    allocations: dict = field(default_factory=dict)  # ptr -> (np.ndarray backing, nbytes, "device"|"host")
    streams: set = field(default_factory=set)
    calls: list = field(default_factory=list)
    errors: list = field(default_factory=list)  # also raised, but finalizers only print what they raise
    cudaError_t = cudaError_t
    cudaMemcpyKind = cudaMemcpyKind

    # -- checks -------------------------------------------------------------------------------

    def owner(self, ptr: int, nbytes: int, kind: str = "device") -> int:
        """The allocation holding [ptr, ptr + nbytes); FakeCudaError if none does."""
        for base, (_, size, k) in self.allocations.items():
            if k == kind and base <= ptr and ptr + nbytes <= base + max(size, 1):
                return base
        raise FakeCudaError(f"{nbytes} bytes at {ptr:#x} are not inside one live {kind} allocation")

    def _stream(self, stream) -> None:
        if int(stream) not in self.streams:
            raise FakeCudaError(f"stream {int(stream)} is not a live stream")

    def live(self) -> list:
        return [(ptr, size, kind) for ptr, (_, size, kind) in self.allocations.items()] + sorted(self.streams)

    def _copy(self, dst: int, src: int, count: int, kind, stream=None) -> None:
        kind = cudaMemcpyKind(kind)
        if kind in (cudaMemcpyKind.cudaMemcpyHostToDevice, cudaMemcpyKind.cudaMemcpyDeviceToDevice):
            self.owner(dst, count)
        if kind in (cudaMemcpyKind.cudaMemcpyDeviceToHost, cudaMemcpyKind.cudaMemcpyDeviceToDevice):
            self.owner(src, count)
        self._move(dst, src, count, kind, stream)

    # -- what a GPU does: host memory here, the real GPU's in CheckedCudart ----------------------------

    def _move(self, dst: int, src: int, count: int, kind: cudaMemcpyKind, stream) -> None:
        ctypes.memmove(dst, src, count)

    def _allocate(self, size: int, kind: str) -> tuple[int, object]:
        """-> (pointer, what keeps the memory alive)."""
        backing = np.zeros(size, np.uint8)
        return backing.ctypes.data, backing

    def _deallocate(self, ptr: int, kind: str) -> None:
        pass

    def _new_stream(self) -> int:
        return 0x5000 + len(self.calls)

    def _end_stream(self, handle: int) -> None:
        pass

    # -- cuda-python's functions ------------------------------------------------------------------

    def _alloc(self, size, kind):
        if not isinstance(size, int) or size < 1:
            raise FakeCudaError(f"allocation of {size!r} bytes")
        if kind == "device" and size > self.cudaMemGetInfo()[1]:
            return cudaError_t.cudaErrorMemoryAllocation, 0
        ptr, backing = self._allocate(size, kind)
        self.allocations[ptr] = (backing, size, kind)
        self.calls.append((f"alloc-{kind}", size))
        return cudaError_t.cudaSuccess, ptr

    def _release(self, ptr, kind):
        entry = self.allocations.get(int(ptr))
        if entry is None or entry[2] != kind:
            self.errors.append(f"free of {int(ptr):#x}, which is not a live {kind} allocation")
            raise FakeCudaError(self.errors[-1])
        del self.allocations[int(ptr)]
        self._deallocate(int(ptr), kind)
        self.calls.append((f"free-{kind}", entry[1]))
        return (cudaError_t.cudaSuccess,)

    def cudaMalloc(self, size):  # noqa: N802
        return self._alloc(size, "device")

    def cudaFree(self, devPtr):  # noqa: N802, N803
        return self._release(devPtr, "device")

    def cudaMallocHost(self, size):  # noqa: N802
        return self._alloc(size, "host")

    def cudaFreeHost(self, ptr):  # noqa: N802
        return self._release(ptr, "host")

    def pinned(self, ptr: int, nbytes: int) -> bool:
        """Whether [ptr, ptr + nbytes) lies in page-locked host memory (cudaMallocHost)."""
        try:
            return self.owner(ptr, nbytes, "host") is not None
        except FakeCudaError:
            return False

    def cudaMemcpyAsync(self, dst, src, count, kind, stream):  # noqa: N802
        self._stream(stream)
        self._copy(int(dst), int(src), int(count), kind, int(stream))
        # ("copy", kind, dst, bytes, from pinned memory): the async copies a test can tell apart; the fake
        # TensorRT's own reads and writes of the bound buffers go through the synchronous cudaMemcpy
        self.calls.append(("copy", cudaMemcpyKind(kind).name, int(dst), int(count), self.pinned(int(src), int(count))))
        return (cudaError_t.cudaSuccess,)

    def cudaMemcpy(self, dst, src, count, kind):  # noqa: N802
        self._copy(int(dst), int(src), int(count), kind)
        return (cudaError_t.cudaSuccess,)

    def cudaStreamCreate(self):  # noqa: N802
        handle = self._new_stream()
        self.streams.add(handle)
        self.calls.append(("stream", handle))
        return cudaError_t.cudaSuccess, cudaStream_t(handle)

    def cudaStreamDestroy(self, stream):  # noqa: N802
        self._stream(stream)
        self.streams.discard(int(stream))
        self._end_stream(int(stream))
        return (cudaError_t.cudaSuccess,)

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        self._stream(stream)
        return (cudaError_t.cudaSuccess,)

    def cudaGetDeviceProperties(self, device):  # noqa: N802
        return cudaError_t.cudaSuccess, _Props()

    def cudaMemGetInfo(self):  # noqa: N802
        used = sum(size for _, size, kind in self.allocations.values() if kind == "device")
        return cudaError_t.cudaSuccess, self.total - used, self.total


@dataclass
class CheckedCudart(FakeCudart):
    """The GPU's own memory, copies and streams (cuda-python's runtime), behind the fake's bookkeeping: a copy
    outside a live allocation, a double free, a dead stream or what close() leaves behind is still caught, and
    what the fake TensorRT computes is read from and written to real device memory. For a machine with a GPU:
    QWEN2VL_EDGE_REAL_CUDA=1 makes the TensorRT backend tests use it (tests/test_tensorrt.py: fakes)."""

    rt: object = None  # cuda.bindings.runtime
    handles: dict = field(default_factory=dict)  # our int handle -> cuda-python's cudaStream_t

    @classmethod
    def real(cls) -> "CheckedCudart":
        from cuda.bindings import runtime

        return cls(rt=runtime)

    def _call(self, result, what: str):
        err, *values = result
        if int(err) != 0:
            raise FakeCudaError(f"{what}: {err}")
        return values[0] if len(values) == 1 else tuple(values) or None

    def _move(self, dst, src, count, kind, stream):
        kind = getattr(self.rt.cudaMemcpyKind, kind.name)
        if stream is None:
            self._call(self.rt.cudaMemcpy(dst, src, count, kind), "cudaMemcpy")
        else:
            self._call(self.rt.cudaMemcpyAsync(dst, src, count, kind, self.handles[stream]), "cudaMemcpyAsync")

    def _allocate(self, size, kind):
        alloc = self.rt.cudaMalloc if kind == "device" else self.rt.cudaMallocHost
        return int(self._call(alloc(size), f"allocation of {size} bytes ({kind})")), None

    def _deallocate(self, ptr, kind):
        self._call((self.rt.cudaFree if kind == "device" else self.rt.cudaFreeHost)(ptr), "free")

    def _new_stream(self):
        stream = self._call(self.rt.cudaStreamCreate(), "cudaStreamCreate")
        self.handles[int(stream)] = stream
        return int(stream)

    def _end_stream(self, handle):
        self._call(self.rt.cudaStreamDestroy(self.handles.pop(handle)), "cudaStreamDestroy")

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        self._stream(stream)
        self._call(self.rt.cudaStreamSynchronize(self.handles[int(stream)]), "cudaStreamSynchronize")
        return (cudaError_t.cudaSuccess,)

    def cudaGetDeviceProperties(self, device):  # noqa: N802
        return cudaError_t.cudaSuccess, self._call(self.rt.cudaGetDeviceProperties(device), "properties")

    def cudaMemGetInfo(self):  # noqa: N802
        free, total = self._call(self.rt.cudaMemGetInfo(), "cudaMemGetInfo")
        return cudaError_t.cudaSuccess, free, total
