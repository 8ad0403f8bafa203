"""Where a prefill's time goes: ONNX Runtime's profiler over the decoder graph of an artifact, per op type.

    python -m qwen2vl_edge.benchmarks.prefill_profile ARTIFACT [--tokens 274] [--threads 2] [--runs 3] [--out FILE]

One prompt of `--tokens` positions through the decoder alone (random embeddings at the checkpoint's
scale, an empty preallocated cache bound as past and present, as the backend binds it), in a session with
the backend's own options plus `enable_profiling`. The first run warms up and is left out; per op type
(MatMulNBits also per K x N) the median over the other runs of the summed kernel time, and its share; the
run's wall and process CPU time (with one thread, CPU time is the work even on a busy machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from .worker import _stats


def _feeds(session, manifest: dict, tokens: int, ort) -> tuple:
    """(io binding, the cache buffers it holds) for one prompt of `tokens` into an empty cache."""
    inputs = {i["name"]: i for i in manifest["graphs"]["decoder"]["inputs"]}
    hidden = inputs["inputs_embeds"]["shape"][-1]
    binding = session.io_binding()
    rng = np.random.default_rng(0)
    binding.bind_cpu_input("inputs_embeds", (rng.standard_normal((1, tokens, hidden)) * 0.02).astype(np.float32))
    binding.bind_cpu_input("attention_mask", np.ones((1, tokens), np.int64))
    binding.bind_cpu_input("position_ids", np.broadcast_to(np.arange(tokens), (3, 1, tokens)).copy())
    buffers = {}
    for name, spec in inputs.items():
        if name.startswith("past_key_values."):
            _, kv, _, hd = spec["shape"]
            buffers[name] = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, kv, tokens + 32, hd), spec["dtype"]))
            binding.bind_ortvalue_input(name, buffers[name])
    for out in session.get_outputs():
        past = out.name.replace("present.", "past_key_values.")
        if past in buffers:  # the preallocated cache: past and present are one buffer
            binding.bind_ortvalue_output(out.name, buffers[past])
        else:
            binding.bind_output(out.name, "cpu")
    return binding, buffers


def _shapes(decoder: Path) -> dict[str, str]:
    """MatMulNBits node name -> 'KxN'."""
    import onnx

    model = onnx.load(str(decoder), load_external_data=False)
    out = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            out[node.name] = f"MatMulNBits {attrs['K']}x{attrs['N']}"
    return out


def summarize(events: list[dict], shapes: dict[str, str]) -> dict:
    """Per op type (and MatMulNBits shape): median ms per run over the runs after the first, and the share."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    per_run = []
    for start, end in runs[1:]:
        totals = defaultdict(float)
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and start <= e["ts"] <= end:
                node = e["name"][:-len("_kernel_time")]
                totals[shapes.get(node, e["args"]["op_name"])] += e["dur"] / 1e3
        totals["(whole run)"] = (end - start) / 1e3
        per_run.append(totals)
    keys = {k for t in per_run for k in t}
    med = {k: statistics.median(t.get(k, 0.0) for t in per_run) for k in keys}
    whole = med["(whole run)"]
    return {k: {"ms": round(v, 2), "share": round(v / whole, 4)} for k, v in sorted(med.items(), key=lambda kv: -kv[1])}


def profile(artifact: Path, tokens: int, threads: int, runs: int, config: dict | None = None) -> dict:
    import onnxruntime as ort

    from qwen2vl_edge.runtime.backends.onnxruntime import session_options

    manifest = json.loads((artifact / "manifest.json").read_text())
    decoder = artifact / manifest["graphs"]["decoder"]["file"]
    with tempfile.TemporaryDirectory() as tmp:
        opts = session_options(ort, threads, shared_arena=False)
        for key, value in (config or {}).items():
            opts.add_session_config_entry(key, value)
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "prefill")
        session = ort.InferenceSession(str(decoder), opts, providers=["CPUExecutionProvider"])
        binding, _ = _feeds(session, manifest, tokens, ort)
        wall, cpu = [], []
        for _ in range(runs + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            session.run_with_iobinding(binding)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        events = json.loads(Path(session.end_profiling()).read_text())
    return {"artifact": str(artifact), "tokens": tokens, "threads": threads, "runs": runs, "config": config or {},
            "wall_s": _stats(wall[1:]),
            "cpu_s": statistics.median(cpu[1:]),  # with --threads 1 the work itself, whatever else runs
            "date": time.strftime("%Y-%m-%d %H:%M"), "load_average_1min": os.getloadavg()[0],
            "onnxruntime": ort.__version__, "ops": summarize(events, _shapes(decoder))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--tokens", type=int, default=274)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                        help="an ONNX Runtime session config entry (repeatable)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    config = dict(c.split("=", 1) for c in args.config)
    result = profile(args.artifact, args.tokens, args.threads, args.runs, config)
    print(f"prefill of {args.tokens} tokens: {result['wall_s']['median']:.3f} s wall, {result['cpu_s']:.3f} s CPU "
          f"(medians of {args.runs})")
    print("| op | ms per run | share |\n|---|---|---|")
    for name, v in result["ops"].items():
        print(f"| {name} | {v['ms']:.1f} | {100 * v['share']:.1f} % |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
