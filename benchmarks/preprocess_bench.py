"""Preprocessing speed: ours (NumPy + Pillow) vs transformers' PIL and torchvision Qwen2-VL processors.

    python -m qwen2vl_edge.benchmarks.preprocess_bench [--repeats 20] [--threads 2]

Each side gets the same decoded input (a 1280x960 image; 16 frames of 640x480) and does the same
work: smart resize, rescale, normalise, patchify. Medians of warm runs; ratio = theirs / ours.
Needs the [test] extra (transformers, torchvision) for the comparison.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
from PIL import Image

from qwen2vl_edge.runtime.preprocess import PreprocessorConfig, process_image, process_video


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    base = lambda w, h: Image.fromarray(rng.integers(0, 256, (h // 16, w // 16, 3), np.uint8)).resize(  # noqa: E731
        (w, h), Image.Resampling.BILINEAR)
    return base(1280, 960), [base(640, 480) for _ in range(16)]


def run(repeats: int = 20, threads: int = 2) -> dict:
    import torch
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    torch.set_num_threads(threads)
    image, frames = _inputs()
    pp = PreprocessorConfig(min_pixels=3136, max_pixels=12845056)
    size = {"shortest_edge": pp.min_pixels, "longest_edge": pp.max_pixels}
    video_size = {"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28}  # qwen-vl-utils' video budget
    pil_proc, tv_proc = Qwen2VLImageProcessorPil(size=size), Qwen2VLImageProcessor(size=size)
    video_proc = Qwen2VLVideoProcessor(size=video_size)
    video_tensor = torch.from_numpy(np.stack([np.asarray(f).transpose(2, 0, 1) for f in frames]))
    results = {
        "image_1280x960": {
            "ours": _median_s(lambda: process_image(image, preprocessor=pp), repeats),
            "transformers_pil": _median_s(lambda: pil_proc(images=[image], return_tensors="np"), repeats),
            "transformers_torchvision": _median_s(lambda: tv_proc(images=[image], return_tensors="pt"), repeats),
        },
        "video_16x640x480": {
            "ours": _median_s(lambda: process_video(frames, preprocessor=pp), repeats),
            "transformers_torchvision": _median_s(
                lambda: video_proc(videos=[video_tensor], return_tensors="pt", do_sample_frames=False,
                                   cap_pixels_per_frame=True), repeats),
        },
    }
    for case in results.values():
        fastest = min(v for k, v in case.items() if k != "ours")
        case["ratio_fastest_reference_over_ours"] = fastest / case["ours"]
    results["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": threads,
                          "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    results = run(args.repeats, args.threads)
    for name, case in results.items():
        if name == "machine":
            continue
        print(f"{name}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in case.items() if not k.startswith("ratio"))
              + f"  -> fastest reference / ours = {case['ratio_fastest_reference_over_ours']:.2f}x")
    print(json.dumps(results["machine"]))


if __name__ == "__main__":
    main()
