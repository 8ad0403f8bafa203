"""A robot's camera loop: feed chunks of frames into one chat session, ask about them now and then.

    python examples/camera_loop.py ARTIFACT [--source /dev/video0 | rtsp://... | clip.mp4] [--chunk 4]
        [--every 0.5] [--ask-every 3] [--question "What changed?"] [--max-pixels 50176]

Frames come from anything PyAV opens (a V4L2 camera, an RTSP stream, a file). Every `--chunk` frames,
taken `--every` seconds apart, go into the session with `append()` as one video item of their own (its own
<|vision_start|>...<|vision_end|> span in its own user message), so each chunk costs time for its own
frames only and its M-RoPE positions continue after what the cache holds. Every `--ask-every` chunks the
loop asks `--question` with `send()`; the reply stays in the cache too. The session slides when the
context fills (overflow="slide"): it starts over from the latest turns that fit.
"""

from __future__ import annotations

import argparse
import sys
import time

from qwen2vl_edge.runtime import InputError, Qwen2VLPipeline


def frames(source: str, every: float):
    """RGB PIL images from `source`, at most one per `every` seconds of the stream's time."""
    import av

    options = {"format": "v4l2"} if source.startswith("/dev/video") else {}
    with av.open(source, **options) as container:
        stream = container.streams.video[0]
        next_time = 0.0
        for frame in container.decode(stream):
            t = float(frame.time) if frame.time is not None else next_time
            if t >= next_time:
                next_time = t + every
                yield t, frame.to_image()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--source", default="/dev/video0")
    parser.add_argument("--chunk", type=int, default=4, help="frames per appended video item (even: 2 per token row)")
    parser.add_argument("--every", type=float, default=0.5, help="seconds between kept frames")
    parser.add_argument("--ask-every", type=int, default=3, help="chunks between questions")
    parser.add_argument("--question", default="What is happening now? Has anything changed?")
    parser.add_argument("--max-pixels", type=int, default=224 * 224, help="per frame: fewer pixels, fewer tokens")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    pipe = Qwen2VLPipeline.load(args.artifact)
    session = pipe.chat(system="You are a robot's vision. Answer briefly.", overflow="slide",
                        max_new_tokens=args.max_new_tokens)
    chunk, chunks = [], 0
    for t, image in frames(args.source, args.every):
        chunk.append(image)
        if len(chunk) < args.chunk:
            continue
        try:
            # min_pixels too: the video default (128 tokens a frame) is above small max_pixels
            info = session.append([{"type": "video", "video": chunk, "max_pixels": args.max_pixels,
                                    "min_pixels": args.max_pixels // 4}])
        except InputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        chunks += 1
        print(f"[{t:7.1f} s] chunk {chunks}: {info['prompt_tokens']} tokens in "
              f"{sum(info['timings'].values()):.2f} s, {len(session.token_ids)} in the cache", file=sys.stderr)
        chunk = []
        if chunks % args.ask_every == 0:
            started = time.perf_counter()
            for piece in session.stream(args.question):
                print(piece, end="", flush=True)
            print(f"\n[{time.perf_counter() - started:.2f} s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
