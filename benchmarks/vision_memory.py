"""Peak memory of the vision encoder alone on one large image, each artifact in its own process.

    python -m qwen2vl_edge.benchmarks.vision_memory [--model 2b-shape] [--layers 1] [--size 1344]
        [--variants fp32,trt-fp16-10.15] [--threads 2] [--out benchmarks/results/vision-memory.json]

The child loads only vision_encoder.onnx into ONNX Runtime (CPU, the backend's shared arena), runs it
once on a size x size image and reports its peak RSS (VmHWM), the RSS after loading the weights, and the
time. The text decoder does not matter here, so `--layers 1` keeps the shape's checkpoint small.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from qwen2vl_edge.benchmarks.worker import peak_rss_bytes


def measure(artifact: Path, size: int, threads: int) -> dict:
    """In this process: load the vision encoder of `artifact`, run it on one size x size image."""
    import numpy as np
    import onnxruntime as ort

    from qwen2vl_edge.runtime.artifact import load_artifact
    from qwen2vl_edge.runtime.backends.onnxruntime import _register_shared_cpu_arena
    from qwen2vl_edge.runtime.preprocess import process_image
    from qwen2vl_edge.runtime.rope import vision_inputs

    art = load_artifact(artifact, verify=False)
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    patches, grid = process_image(image, resized_height=size, resized_width=size)
    _register_shared_cpu_arena(ort)  # as the backend runs it
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.use_env_allocators", "1")
    loaded_at = peak_rss_bytes()
    session = ort.InferenceSession(str(art.graph_path("vision_encoder")), opts, providers=["CPUExecutionProvider"])
    after_load = peak_rss_bytes()
    started = time.perf_counter()
    feats = session.run(None, {"pixel_values": patches.reshape(1, -1, patches.shape[-1]),
                               **vision_inputs(grid, art.config)})[0]
    return {"artifact": str(artifact),
            "export": {k: art.export.get(k) for k in ("target", "precision", "min_tensorrt")},
            "patches": int(patches.shape[0]), "features_finite": bool(np.isfinite(feats).all()),
            "rss_before_load_bytes": loaded_at, "peak_after_load_bytes": after_load,
            "peak_rss_bytes": peak_rss_bytes(), "seconds": round(time.perf_counter() - started, 2), "threads": threads}


def _address_space_limit(gb: float | None):
    """preexec_fn capping the child's address space, so that a graph too big for a shared machine fails its
    own allocation (reported) instead of waking the kernel's OOM killer on someone else's process."""
    if gb is None:
        return None

    def limit():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (int(gb * 1e9), int(gb * 1e9)))

    return limit


def run_child(artifact: Path, size: int, threads: int, timeout: float, max_gb: float | None = None) -> dict:
    """measure() in a child process. Past `timeout` the child is stopped and its peak so far reported: a lower
    bound of the whole run's peak (every block repeats the first one's transient memory)."""
    cmd = [sys.executable, "-m", "qwen2vl_edge.benchmarks.vision_memory", "--child", str(artifact),
           "--size", str(size), "--threads", str(threads)]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=_address_space_limit(max_gb))
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            peak = peak_rss_bytes(child.pid)
        except OSError:  # it ended meanwhile
            peak = None
        child.kill()
        child.communicate()
        return {"artifact": str(artifact), "error": f"stopped after {timeout:.0f} s", "peak_rss_so_far_bytes": peak}
    if child.returncode != 0:  # e.g. killed by the kernel's OOM killer: say so instead of a number
        return {"artifact": str(artifact), "error": f"exit {child.returncode}: {err.strip()[-500:]}",
            "max_gb": max_gb}
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    from qwen2vl_edge.benchmarks.machine import cpu_model, versions
    from qwen2vl_edge.benchmarks.models import model_dirs
    from qwen2vl_edge.export.vocab import cache_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="2b-shape")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--size", type=int, default=1344)
    p.add_argument("--variants", default="trt-fp16-10.15,fp32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--max-gb", type=float, default=None, help="cap each child's address space (shared machines)")
    p.add_argument("--out", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(measure(Path(args.child), args.size, args.threads)))
        return 0
    variants = args.variants.split(",")
    _, artifacts = model_dirs(args.model, args.layers, cache_dir() / "bench", variants)
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "versions": versions(), "date": time.strftime("%Y-%m-%d")}
    results = {"model": args.model, "layers": args.layers, "size": args.size, "machine": machine,
               "variants": {v: run_child(artifacts[v], args.size, args.threads, args.timeout, args.max_gb)
                            for v in variants}}
    for name, r in results["variants"].items():
        print(f"{name}: " + (f"{r['error']} (peak so far {(r.get('peak_rss_so_far_bytes') or 0) / 1e9:.2f} GB)"
                             if "error" in r else
                             f"peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB (weights loaded: "
                             f"{r['peak_after_load_bytes'] / 1e9:.2f} GB), {r['seconds']} s"))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
