"""MatMulNBits as the export writes it: our int4 blocks against a GPTQ/AWQ checkpoint's own weights.

    python -m qwen2vl_edge.benchmarks.prequant_bench [--repeats 20] [--threads 2]

One Qwen2-VL-2B decoder layer's linears (packed qkv, o, packed gate/up, down; random values: speed does not
depend on them) at decode (M = 1) and prefill (M = 281, the S1 prompt) shapes, through the export's own
writers: ours (symmetric int4, blocks of 32 (the default) or 128, no zero-point input) and checkpoint layouts
(group 128 with zero points, as Qwen's GPTQ-Int4 and AWQ ship; with act order, plus the Gather of the inputs).
Accuracy level 4. Bytes are the layer's MatMulNBits initializers. Medians of warm runs, wall and process CPU
time (with --threads 1, CPU time is the kernel's cost even on a machine other work keeps busy).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

# (name, K, N) of one 2B decoder layer as the ort-cpu export packs it
LAYER = (("qkv_proj", 1536, 2048), ("o_proj", 1536, 1536), ("gate_up_proj", 1536, 17920), ("down_proj", 8960, 1536))
LAYOUTS = ("ours-int4-b32", "ours-int4-b128", "gptq-int4-g128", "gptq-int4-g128-act")


def _weight(layout: str, k: int, n: int, rng: np.random.Generator):
    from qwen2vl_edge.export.prequantized import QuantizedWeight

    if layout.startswith("ours"):
        return rng.standard_normal((n, k)).astype(np.float32)
    g_idx = np.arange(k) // 128
    if layout.endswith("act"):
        g_idx = rng.permutation(g_idx)
    return QuantizedWeight(rng.integers(0, 16, (n, k), dtype=np.uint8), rng.random((n, k // 128), np.float32),
                           rng.integers(0, 16, (n, k // 128), dtype=np.uint8), g_idx.astype(np.int32), 4, 128)


def _session(layout: str, k: int, n: int, threads: int, tmp: Path):
    """-> (ONNX Runtime session of one linear, bytes of its initializers)."""
    import onnx
    import onnxruntime as ort

    from qwen2vl_edge.export.graph import FLOAT, Graph, Target, WeightStore
    from qwen2vl_edge.export.quantize import QuantSpec

    store = WeightStore(tmp / f"{layout}-{k}-{n}.data")
    quant = QuantSpec(4, int(layout.rpartition("-b")[2]), 4) if layout.startswith("ours") else None
    g = Graph("g", store, 17, quant=quant, target=Target("ort-cpu"), accuracy_level=4)
    y = g.linear(g.input("x", FLOAT, ["m", k]), _weight(layout, k, n, np.random.default_rng(0)), None, "lin")
    g.output(y, "y", FLOAT, ["m", n])
    store.close()
    path = tmp / f"{layout}-{k}-{n}.onnx"
    onnx.save_model(g.model(), path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]), store.written


def _layer_time_s(sessions: list, inputs: list[dict]) -> tuple[float, float]:
    """(wall, process CPU) seconds of one pass; with one thread the CPU time holds on a busy machine too."""
    t0, c0 = time.perf_counter(), time.process_time()
    for sess, x in zip(sessions, inputs):
        sess.run(None, x)
    return time.perf_counter() - t0, time.process_time() - c0


def run(repeats: int = 20, threads: int = 2) -> dict:
    """Layouts are timed in turns, one layer pass each, so a busy machine slows them alike."""
    rng = np.random.default_rng(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        built = {layout: [_session(layout, k, n, threads, Path(tmp)) for _, k, n in LAYER] for layout in LAYOUTS}
        for label, m, rounds in (("decode", 1, repeats), ("prefill", 281, max(3, repeats // 4))):
            inputs = [{"x": rng.standard_normal((m, k)).astype(np.float32)} for _, k, _ in LAYER]
            times = {layout: [] for layout in LAYOUTS}
            for i in range(rounds + 2):  # two warm-up rounds
                for layout in LAYOUTS:
                    t = _layer_time_s([sess for sess, _ in built[layout]], inputs)
                    if i >= 2:
                        times[layout].append(t)
            for layout in LAYOUTS:
                wall, cpu = zip(*times[layout])
                results.setdefault(layout, {}).update({f"{label}_ms": statistics.median(wall) * 1e3,
                                                       f"{label}_cpu_ms": statistics.median(cpu) * 1e3})
        for layout in LAYOUTS:
            results[layout]["bytes"] = sum(size for _, size in built[layout])
    results["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": threads,
                          "load_average_1min": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M")}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = parser.parse_args()
    results = run(args.repeats, args.threads)
    print("| layout | decode (M=1) wall / CPU | prefill (M=281) wall / CPU | weight bytes |\n|---|---|---|---|")
    for name, r in results.items():
        if name != "machine":
            print(f"| {name} | {r['decode_ms']:.2f} / {r['decode_cpu_ms']:.2f} ms | {r['prefill_ms']:.0f} / "
                  f"{r['prefill_cpu_ms']:.0f} ms | {r['bytes'] / 1e6:.1f} MB |")
    print(json.dumps(results["machine"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
