"""`qwen2vl-edge quickstart`: the whole path on a fresh machine with no checkpoint.

Builds the tiny random checkpoint, exports it, chats about two images it draws itself, prints the
reply and timings, and checks the tokens against transformers. Random weights give nonsense text:
the point is the path and the parity, not the words.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def draw_scene(seed: int, size: tuple[int, int]) -> Image.Image:
    """A few coloured shapes on a gradient: a deterministic, non-trivial test image."""
    rng = np.random.default_rng(seed)
    w, h = size
    grad = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * rng.uniform(0.3, 1.0, 3)
    img = Image.fromarray(np.broadcast_to(grad, (h, w, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        box = (x0, y0, x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2)))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
    return img


def reference_tokens(ckpt: Path, conversation: list, max_new_tokens: int) -> list[int]:
    """transformers' greedy tokens for the same conversation (the seed pipeline)."""
    from qwen_vl_utils import process_vision_info
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    proc = AutoProcessor.from_pretrained(ckpt)
    model = Qwen2VLForConditionalGeneration.from_pretrained(ckpt).eval()
    text = proc.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    images, videos = process_vision_info(conversation)
    inputs = proc(text=[text], images=images, videos=videos, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def quickstart(directory: Path, max_new_tokens: int = 24) -> int:
    from qwen2vl_edge.runtime import Qwen2VLPipeline

    from .onnx_export import export
    from .tiny import make_tiny

    directory.mkdir(parents=True, exist_ok=True)
    ckpt, artifact = directory / "tiny-checkpoint", directory / "tiny-artifact"
    print(f"1/4 tiny random Qwen2-VL checkpoint -> {ckpt}")
    make_tiny(ckpt)
    print(f"2/4 export -> {artifact}")
    export(ckpt, artifact)
    paths = []
    for i, size in enumerate([(448, 336), (280, 420)]):
        paths.append(directory / f"scene{i}.png")
        draw_scene(i, size).save(paths[-1])
    conversation = [{"role": "user", "content": [{"type": "image", "image": str(p)} for p in paths]
                     + [{"type": "text", "text": "What differs between these two pictures?"}]}]
    print("3/4 multi-image chat (random weights: the text is nonsense by design)")
    pipe = Qwen2VLPipeline.load(artifact)
    result = pipe.generate(conversation, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
    print(f"reply: {result.text!r}")
    print("timings (s): " + json.dumps({k: round(v, 4) for k, v in result.timings.items()}))
    print(f"usage: {result.usage}")
    print("4/4 parity with transformers (greedy tokens)")
    try:
        ref = reference_tokens(ckpt, conversation, max_new_tokens)
    except ImportError as e:
        print(f"skipped: the reference needs the [test] extra ({e})")
        return 0
    same = ref == result.token_ids
    print(f"{'identical' if same else 'DIFFERENT'}: {len(result.token_ids)} tokens, "
          f"{len(set(result.token_ids))} distinct")
    return 0 if same else 1
