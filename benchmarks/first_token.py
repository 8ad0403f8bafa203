"""Time to first token and peak RSS of one image request, in a fresh process: the 12 MP photo goal.

    python -m qwen2vl_edge.benchmarks.first_token ARTIFACT [--size 4000x3000] [--threads 2] [--out FILE.json]

The image is a deterministic drawn scene at that size, resized by the checkpoint's preprocessor (its
default max_pixels); one request, `max_new_tokens=1`, so the figures are the request's first token: peak RSS
(VmHWM, weights included) and the pipeline's timings. A 4000x3000 photo on the 2B shape's int4 export runs
its 32-block vision encoder for about 40 minutes on 2 cores (2,389.5 s to the first token, measured): run it
under `timeout`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def measure(artifact: str, width: int, height: int, threads: int) -> dict:
    from qwen2vl_edge.benchmarks.machine import cpu_model, versions
    from qwen2vl_edge.benchmarks.worker import peak_rss_bytes
    from qwen2vl_edge.export.quickstart import draw_scene
    from qwen2vl_edge.runtime import Qwen2VLPipeline

    pipe = Qwen2VLPipeline.load(artifact, num_threads=threads, verify=False)
    loaded = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "photo.png"
        draw_scene(5, (width, height)).save(path)
        r = pipe.generate([{"role": "user", "content": [{"type": "image", "image": str(path)},
                                                        {"type": "text", "text": "Describe this image."}]}],
                          max_new_tokens=1)
    return {"artifact": artifact, "image": [width, height], "prompt_tokens": r.usage["prompt_tokens"],
            "timings": r.timings, "rss_after_load_bytes": loaded, "peak_rss_bytes": peak_rss_bytes(),
            "threads": threads, "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "versions": versions()},
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--size", default="4000x3000", help="WIDTHxHEIGHT")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    width, height = (int(x) for x in args.size.split("x"))
    result = measure(args.artifact, width, height, args.threads)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
