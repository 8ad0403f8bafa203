"""Video files: peak memory and preprocessing time of the lazy PyAV path, long file vs short file.

    python -m qwen2vl_edge.benchmarks.video_bench [--out bench-video] [--fps 25] [--keyint 250]

Writes a 10-minute and a 20-second 320x240 H.264 file (moving content, a keyframe every `--keyint` frames,
x264's default), then in a fresh process per case: `process_video` with nframes=32 (frames sampled, decoded,
resized, patchified), and with the default options under the 32,768-token context, which must fail from the
metadata. Reports seconds and the process's peak RSS (VmHWM, imports included).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

CASE = """
import json, sys, time
from qwen2vl_edge.benchmarks.worker import peak_rss_bytes
from qwen2vl_edge.runtime.errors import InputError
from qwen2vl_edge.runtime.preprocess import process_video_timed
path, options = sys.argv[1], json.loads(sys.argv[2])
t0 = time.perf_counter()
try:
    patches, grid, stamps, _ = process_video_timed(path, **options)
    outcome = {"grid": [int(g) for g in grid], "frames": len(stamps)}
except InputError as e:
    outcome = {"error": str(e)[:160]}
seconds = time.perf_counter() - t0
peak = peak_rss_bytes()
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak / 2**20, **outcome}))
"""


def write_clip(path: Path, seconds: float, fps: int, keyint: int, size=(320, 240)) -> Path:
    """A moving gradient with noise: every frame differs, as a camera's do."""
    import av

    if path.is_file():
        return path
    w, h = size
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 24, (8, h, w, 3), np.uint8)
    x = np.arange(w)[None, :, None]
    y = np.arange(h)[:, None, None]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"g": str(keyint), "preset": "veryfast"}
        for i in range(int(seconds * fps)):
            frame = ((x + 2 * i) % 256 + (y + i) % 64 + noise[i % 8]).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.broadcast_to(frame, (h, w, 3)).copy(),
                                                                   format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def measure(path: Path, options: dict, repeats: int) -> dict:
    """The median run of `repeats` fresh processes (so that each peak RSS is that case's alone)."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", CASE, str(path), json.dumps(options)], capture_output=True,
                             text=True, check=True)
        runs.append(json.loads(out.stdout))
    runs.sort(key=lambda r: r["seconds"])
    return {**runs[len(runs) // 2], "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-video")
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--keyint", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    long = write_clip(out / f"long-600s-{args.fps}fps-g{args.keyint}.mp4", 600, args.fps, args.keyint)
    short = write_clip(out / f"short-20s-{args.fps}fps-g{args.keyint}.mp4", 20, args.fps, args.keyint)
    result = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
              "fps": args.fps, "keyint": args.keyint,
              "long_nframes32": measure(long, {"nframes": 32}, args.repeats),
              "short_nframes32": measure(short, {"nframes": 32}, args.repeats),
              "long_defaults_over_context": measure(long, {"max_tokens": 32768}, 1)}
    result["time_ratio_long_vs_short"] = result["long_nframes32"]["seconds"] / result["short_nframes32"]["seconds"]
    (out / f"video_bench_g{args.keyint}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
