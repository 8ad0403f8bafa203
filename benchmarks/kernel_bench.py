"""The decoder's linear kernels per shape: which ONNX Runtime op, block size and accuracy level is fastest where.

    python -m qwen2vl_edge.benchmarks.kernel_bench [--threads 2] [--repeats 5] [--ms 1,16,64,274,512,1024,2048]
        [--shapes qkv,gate_up,...] [--kernels int4-b32-acc4,...] [--out results/kernels/NAME.json (and NAME.md)]

Each kernel is one linear y = x @ W.T written by the export's own writers (export/quantize.py) into a
one-node graph, one ONNX Runtime session per kernel and shape, `--threads` intra-op threads:
MatMulNBits 4-bit at blocks of 32/64/128 with accuracy level 4 (int8 activations, quantized per block
on the fly) and 1 (fp32), 2 and 3 (fp16 / bf16) at blocks of 128, MatMulNBits 8-bit, DynamicQuantizeMatMul (u8 activations per tensor x s8
weights per output channel) and fp32 MatMul. Shapes are Qwen2-VL-2B's decoder linears (K x N), the
q/k/v and gate/up ones also as the ort-cpu export packs them. Warm-up excluded; the kernels of a shape
are timed in turns (one run each per round), so a busy machine slows them alike; median and fastest wall
time and the median process CPU time (spinning off, so that CPU time is work).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from . import machine
from .models import SHAPES

MS = (1, 16, 64, 274, 512, 1024, 2048)
# kernel -> (weight format, block size, accuracy level); None: fp32 MatMul
KERNELS = {
    **{f"int4-b{b}-acc{a}": ("int4", b, a) for b in (32, 64, 128) for a in (4, 1)},
    "int4-b256-acc4": ("int4", 256, 4),
    # fp16 / bf16 math: MLAS has no such int4 path on x86, so these run at the fp32 rate (docs/benchmarks.md)
    "int4-b128-acc2": ("int4", 128, 2),
    "int4-b128-acc3": ("int4", 128, 3),
    "int8-b32-acc4": ("int8", 32, 4),
    "dqmm-u8s8": ("int8-dynamic", 32, 4),
    "fp32": None,
}


def linear_shapes(shape: str = "2b-shape") -> dict[str, tuple[int, int]]:
    """name -> (K, N) of the decoder's linears, from the model's config values."""
    c = SHAPES[shape]
    hidden, inter = c["text.hidden_size"], c["text.intermediate_size"]
    kv = hidden // c["text.num_attention_heads"] * c["text.num_key_value_heads"]
    return {"q_o": (hidden, hidden), "k_v": (hidden, kv), "qkv": (hidden, hidden + 2 * kv),
            "gate_up": (hidden, inter), "gate_up_packed": (hidden, 2 * inter), "down": (inter, hidden)}


def _session(kernel: str, k: int, n: int, threads: int, tmp: Path):
    """One-linear graph as the ort-cpu export writes it -> ONNX Runtime session."""
    import onnx
    import onnxruntime as ort

    from qwen2vl_edge.export.graph import FLOAT, Graph, Target, WeightStore
    from qwen2vl_edge.export.quantize import QuantSpec

    spec = KERNELS[kernel]
    store = WeightStore(tmp / f"{kernel}-{k}-{n}.data")
    g = Graph("g", store, 17, quant=QuantSpec.of(*spec) if spec else None, target=Target("ort-cpu"))
    weight = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32) * 0.02
    g.output(g.linear(g.input("x", FLOAT, ["m", k]), weight, None, "lin"), "y", FLOAT, ["m", n])
    store.close()
    path = tmp / f"{kernel}-{k}-{n}.onnx"
    onnx.save_model(g.model(), path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # CPU time without spinning
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _time_s(session, x: np.ndarray) -> tuple[float, float]:
    """(wall, process CPU) seconds of one run: with one thread and no spinning, CPU time is the kernel's
    cost even while other work holds the cores."""
    t0, c0 = time.perf_counter(), time.process_time()
    session.run(None, {"x": x})
    return time.perf_counter() - t0, time.process_time() - c0


def bench_shape(k: int, n: int, kernels: list[str], ms: list[int], threads: int, repeats: int) -> dict:
    """{kernel: {M: {"ms", "gop_s"}}} for one (K, N)."""
    rng = np.random.default_rng(1)
    out = {kern: {} for kern in kernels}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {kern: _session(kern, k, n, threads, Path(tmp)) for kern in kernels}
        for m in ms:
            x = rng.standard_normal((m, k)).astype(np.float32)
            times = {kern: [] for kern in kernels}
            for i in range(repeats + 1):  # round 0 warms up
                for kern in kernels:
                    t = _time_s(sessions[kern], x)
                    if i:
                        times[kern].append(t)
            for kern in kernels:
                wall, cpu = zip(*times[kern])
                t = statistics.median(wall)
                out[kern][m] = {"ms": t * 1e3, "min_ms": min(wall) * 1e3, "cpu_ms": statistics.median(cpu) * 1e3,
                                "gop_s": 2 * m * k * n / t / 1e9, "best_gop_s": 2 * m * k * n / min(wall) / 1e9}
    return out


def run(shapes: list[str], kernels: list[str], ms: list[int], threads: int, repeats: int) -> dict:
    known = linear_shapes()
    result = {"machine": {"cpu": machine.cpu_model(), "threads": threads, "date": time.strftime("%Y-%m-%d %H:%M"),
                          "onnxruntime": machine.versions().get("onnxruntime"),
                          "load_average_1min_start": os.getloadavg()[0]},
              "repeats": repeats, "shapes": {}}
    for name in shapes:
        k, n = known[name]
        print(f"{name} (K={k}, N={n}) ...", flush=True)
        result["shapes"][name] = {"k": k, "n": n, "kernels": bench_shape(k, n, kernels, ms, threads, repeats)}
    result["machine"]["load_average_1min_end"] = os.getloadavg()[0]
    return result


def markdown(result: dict) -> str:
    """One table per shape, per kernel and M: GOP per second of process CPU time (the work, robust to a busy
    machine; with one thread, the kernel's rate on one core) and the median wall ms."""
    lines = []
    for name, s in result["shapes"].items():
        ms = list(next(iter(s["kernels"].values())))
        lines += [f"\n**{name}** (K={s['k']}, N={s['n']}): GOP per CPU-second (median wall ms)\n",
                  "| kernel | " + " | ".join(f"M={m}" for m in ms) + " |", "|---" * (len(ms) + 1) + "|"]
        for kern, by_m in s["kernels"].items():
            cells = [f"{2 * int(m) * s['k'] * s['n'] / v['cpu_ms'] / 1e6:.0f} ({v['ms']:.2f})" for m, v in by_m.items()]
            lines.append(f"| {kern} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ms", default=",".join(map(str, MS)))
    parser.add_argument("--shapes", default=",".join(linear_shapes()))
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = parser.parse_args()
    split = lambda s: [v.strip() for v in s.split(",") if v.strip()]  # noqa: E731
    for value, known, flag in ((split(args.shapes), linear_shapes(), "--shapes"), (split(args.kernels), KERNELS,
                                                                                      "--kernels")):
        unknown = [v for v in value if v not in known]
        if unknown:
            parser.error(f"{flag}: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    result = run(split(args.shapes), split(args.kernels), [int(m) for m in split(args.ms)], args.threads,
                 args.repeats)
    print(markdown(result))
    print(json.dumps(result["machine"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        args.out.with_suffix(".md").write_text(markdown(result) + "\n")


if __name__ == "__main__":
    main()
