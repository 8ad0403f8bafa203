"""Benchmark inputs, drawn deterministically so every system sees the same pixels and prompts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from qwen2vl_edge.export.quickstart import draw_scene

SHORT = "Describe this image."
# A fixed English paragraph; repeated to reach the long-prompt length (tokens counted by the runtime).
FILLER = ("The robot crossed the warehouse floor, scanning shelves of boxes while the night shift checked "
          "inventory, charged batteries and logged every pallet that moved between the loading docks. ")


def _image(path: Path, seed: int, size: tuple[int, int]) -> str:
    if not path.is_file():
        draw_scene(seed, size).save(path)
    return str(path)


def _frames(directory: Path, n: int, size: tuple[int, int]) -> list[str]:
    out = []
    for i in range(n):
        path = directory / f"frame{i:02d}_{size[0]}x{size[1]}.png"
        if not path.is_file():  # a scene drifting sideways: frames differ like video frames do
            base = np.asarray(draw_scene(100, (size[0] + 4 * n, size[1])))
            Image.fromarray(base[:, 4 * i:4 * i + size[0]]).save(path)
        out.append(str(path))
    return out


FILLER_TOKENS = 32  # with Qwen2's vocabulary, repeated sentences included


def text_prompt(tokens: int) -> str:
    """About `tokens` tokens of text (exactly, for multiples of FILLER_TOKENS)."""
    return FILLER * max(1, round(tokens / FILLER_TOKENS))


def scenarios(directory: Path, quick: bool = False) -> dict[str, list]:
    """name -> one conversation."""
    directory.mkdir(parents=True, exist_ok=True)
    user = lambda *content: [{"role": "user", "content": list(content)}]  # noqa: E731
    img = lambda p: {"type": "image", "image": p}  # noqa: E731
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    return {
        "image_448": user(img(_image(directory / "s448.png", 1, (448, 448))), text(SHORT)),
        "three_images": user(img(_image(directory / "m1.png", 2, (640, 480))),
                             img(_image(directory / "m2.png", 3, (300, 500))),
                             img(_image(directory / "m3.png", 4, (224, 224))), text("Compare these images.")),
        # 224x224 frames at a 64-token floor: 8 temporal slices of 64 tokens (qwen-vl-utils' default floor
        # of 128 tokens would upscale them)
        "video_16_frames": user({"type": "video", "video": _frames(directory, 16, (224, 224)),
                                 "min_pixels": 64 * 28 * 28}, text("What happens in this video?")),
        "text_only": user(text("Write a short poem about edge computing.")),
        # S2: 256 + 18 tokens of chat template and instruction = 274 prompt tokens
        "text_274": user(text(text_prompt(256) + "Summarise the text above.")),
        "long_text_2k": user(text(text_prompt(256 if quick else 2000) + "Summarise the text above.")),
    }


# the TTFT-vs-resolution sweep's square image sides, up to 1792 px (4,096 merged tokens); a system that cannot
# run a size gets a cell saying why (worker.sweep_point)
SWEEP_SIDES = [224, 448, 672, 896, 1344, 1792]


def resolution_sweep(directory: Path, sizes: list[int]) -> dict[int, list]:
    return {s: [{"role": "user", "content": [{"type": "image", "image": _image(directory / f"r{s}.png", 7, (s, s))},
                                             {"type": "text", "text": SHORT}]}] for s in sizes}


def context_sweep(lengths: list[int]) -> dict[int, list]:
    return {n: [{"role": "user", "content": text_prompt(n) + "Continue."}] for n in lengths}
