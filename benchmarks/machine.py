"""What the numbers were measured on: CPU, cores, RAM, memory bandwidth and matmul rate, versions, date."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def copy_bandwidth(threads: int, mib: int = 1024, repeats: int = 5) -> float:
    """Bytes per second moved by a large multi-threaded copy (read + write counted), best of `repeats`."""
    src = np.ones(mib * (1 << 20) // 8)
    dst = np.empty_like(src)
    chunks = np.array_split(np.arange(len(src)), threads)
    bounds = [(c[0], c[-1] + 1) for c in chunks]

    def part(b):
        np.copyto(dst[b[0]:b[1]], src[b[0]:b[1]])

    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(part, bounds))
            best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best


def _best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_rates(threads: int, n: int = 2048, repeats: int = 3) -> dict[str, float]:
    """fp32 FLOP/s of an n x n matmul in NumPy's BLAS and in ONNX Runtime's MLAS, best of `repeats`.

    Both, because a BLAS held to an old kernel (OPENBLAS_CORETYPE on some machines) understates the
    machine; the roofline takes the faster.
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    rates = {"numpy": 2 * n**3 / _best_time(lambda: a @ a, repeats)}
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(helper.make_model(graph).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    rates["onnxruntime"] = 2 * n**3 / _best_time(lambda: sess.run(None, {"a": a, "b": a}), repeats)
    return rates


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("qwen2vl-edge", "numpy", "onnxruntime", "torch", "transformers", "tokenizers", "pillow"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _matmul_fields(threads: int) -> dict:
    rates = matmul_rates(threads)
    return {"matmul_gflop_s": round(max(rates.values()) / 1e9, 1),
            "matmul_gflop_s_by_library": {k: round(v / 1e9, 1) for k, v in rates.items()}}


def describe(threads: int) -> dict:
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "threads": threads,
        "ram_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "copy_bandwidth_gb_s": round(copy_bandwidth(threads) / 1e9, 1),
        **_matmul_fields(threads),
        "versions": versions(), "date": time.strftime("%Y-%m-%d"), "platform": platform.platform(),
    }
