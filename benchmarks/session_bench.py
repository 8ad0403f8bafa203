"""Chat sessions: time to first token of a follow-up question vs the first turn, and vs re-running it all.

    python -m qwen2vl_edge.benchmarks.session_bench [--model tiny|2b-shape] [--variant fp32|int4] [--repeats 5]

Turn 1: a 448x448 image and a question. Turn 2: a text follow-up about it. Compared with `generate()` on
the whole conversation (what a follow-up cost before sessions: image re-encoded, whole prompt re-run).
Medians over `--repeats` fresh sessions, after one warm-up; greedy, 16 new tokens per reply.
What running turn 1 in a session costs over generate(), with the [serve] extra: the server's check before it
keeps the session (`server_keep_check`: the conversation re-rendered and re-tokenised, the new images
preprocessed again). The reply's end of turn costs nothing then: it goes in with the follow-up's prefill.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
import platform
import statistics
import sys
from pathlib import Path

import numpy as np
from PIL import Image

QUESTION = [{"type": "text", "text": "What is in this picture? Describe the objects and their colours."}]
FOLLOW_UP = "Which of them is closest to the camera?"


def _image(side: int = 448) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (side // 16, side // 16, 3), np.uint8)).resize(
        (side, side), Image.Resampling.BILINEAR)


def one_round(pipe, image, new_tokens: int) -> dict:
    session = pipe.chat(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    first = session.send([{"type": "image", "image": image}, *QUESTION])
    keep_check = _keep_check(pipe, session) if importlib.util.find_spec("fastapi") else None
    follow = session.send(FOLLOW_UP)
    whole = pipe.generate(session.history[:-1], new_tokens, min_new_tokens=new_tokens)
    return {"first_ttft": first.timings["time_to_first_token"], "follow_up_ttft": follow.timings["time_to_first_token"],
            "rerun_ttft": whole.timings["time_to_first_token"], "first_prompt_tokens": first.usage["prompt_tokens"],
            "follow_up_new_tokens": follow.usage["prompt_tokens"] - follow.usage["cached_prompt_tokens"],
            "follow_up_cached_tokens": follow.usage["cached_prompt_tokens"],
            **({"server_keep_check": keep_check} if keep_check is not None else {})}


def _keep_check(pipe, session) -> float:
    from qwen2vl_edge.server.sessions import encodes_as

    t0 = time.perf_counter()
    encodes_as(pipe, [], session.history, session.token_ids)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    from qwen2vl_edge.benchmarks.models import model_dirs
    from qwen2vl_edge.export.vocab import cache_dir
    from qwen2vl_edge.runtime import Qwen2VLPipeline

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--variant", default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--cache", type=Path, default=None,
                        help="where the benchmark's checkpoints and artifacts live (default: the bench cache)")
    parser.add_argument("--out", type=Path, default=None, help="a folder for the JSON result (default: printed only)")
    args = parser.parse_args(argv)
    _, artifacts = model_dirs(args.model, None, args.cache or cache_dir() / "bench", variants=(args.variant,))
    pipe = Qwen2VLPipeline.load(artifacts[args.variant], num_threads=args.threads)
    image = _image()
    one_round(pipe, image, args.new_tokens)  # warm-up
    rounds = [one_round(pipe, image, args.new_tokens) for _ in range(args.repeats)]
    median = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    result = {"model": args.model, "variant": args.variant, "threads": args.threads,
              "machine": platform.processor() or platform.machine(), "median": median,
              "follow_up_vs_first": median["follow_up_ttft"] / median["first_ttft"],
              "follow_up_vs_rerun": median["follow_up_ttft"] / median["rerun_ttft"]}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"session_{args.model}_{args.variant}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
