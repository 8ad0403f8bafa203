"""The request memory estimate (runtime/memory.py) against what a request really takes.

Each request runs in a fresh child process: load the pipeline, one small warm-up request (weights
touched, the arena made), then the request; the measure is how far the resident set rose above its
level before the request, at its peak (VmHWM, reset through /proc/self/clear_refs; Linux only), and how
much of that it still holds once the request has returned.

    python -m qwen2vl_edge.benchmarks.memory_estimate ARTIFACT [--image WxH] [--words N] [--new N] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from PIL import Image
    from qwen2vl_edge.benchmarks.worker import peak_rss_bytes, reset_peak_rss, rss_bytes
    from qwen2vl_edge.runtime import Qwen2VLPipeline
    from qwen2vl_edge.runtime.memory import RequestShape, estimate

    art, width, height, words, new, threads = json.loads(sys.argv[1])
    pipe = Qwen2VLPipeline.load(art, num_threads=threads)
    pipe.generate([{"role": "user", "content": "Hi"}], max_new_tokens=2)
    content = [{"type": "text", "text": " ".join(f"word{i % 97}" for i in range(words)) or "Describe it."}]
    if width:  # a smooth gradient: deterministic, and its size is all that matters here
        y, x = np.mgrid[0:height, 0:width]
        pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1).astype(np.uint8)
        content.insert(0, {"type": "image", "image": Image.fromarray(pixels)})
    conv = [{"role": "user", "content": content}]
    inputs = pipe.processor(conv)
    est = estimate(pipe.artifact.config, pipe.artifact.export, RequestShape.of(inputs, new),
                   pipe.backend.prefill_chunk(len(inputs["input_ids"])))
    prompt = int(inputs["input_ids"].shape[1])
    del inputs
    if not reset_peak_rss():
        raise SystemExit("cannot reset the peak RSS (/proc/self/clear_refs needs Linux >= 4.0)")
    before = rss_bytes()
    pipe.generate(conv, max_new_tokens=new, min_new_tokens=new)
    grown, retained = peak_rss_bytes() - before, rss_bytes() - before
    print(json.dumps({"prompt_tokens": prompt, "estimate": est.peak, "stage": est.stage, "stages": est.stages,
                      "measured": grown, "retained": retained}))
""")


def measure(artifact: str, width: int = 0, height: int = 0, words: int = 0, new: int = 4,
            threads: int | None = None) -> dict:
    """Estimate and measured peak RSS growth (bytes) of one request, in a fresh process."""
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps([str(artifact), width, height, words, new, threads])],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"measuring child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--image", default="", help="WxH of a generated image to include")
    ap.add_argument("--words", type=int, default=0, help="words of filler text in the prompt")
    ap.add_argument("--new", type=int, default=4, help="max_new_tokens")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: its own)")
    args = ap.parse_args(argv)
    width, height = (int(x) for x in args.image.split("x")) if args.image else (0, 0)
    r = measure(args.artifact, width, height, args.words, args.new, args.threads)
    print(f"prompt {r['prompt_tokens']} tokens: estimate {r['estimate'] / 1e6:.0f} MB ({r['stage']}), "
          f"measured peak RSS growth {r['measured'] / 1e6:.0f} MB, ratio {r['estimate'] / max(r['measured'], 1):.2f}; "
          f"held after the request {r['retained'] / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
