"""A robot's decision loop: camera frames into one chat session, the model answers with tool calls only.

    python examples/robot_agent.py ARTIFACT [--frames 5] [--tool-format qwen|hermes] [--max-pixels 12544]

Each frame goes to the session with the results of the calls the last reply made (the first frame alone). The
model must call `move_to`, `grasp` or `say` (tool_choice="required"): a constrained decoder makes every reply a
valid call, its arguments following the tool's JSON schema, even from a model that knows nothing (the tiny
random test model makes nonsense decisions, but never an invalid call). `move_to` takes a grounding box on
Qwen2-VL's 0-1000 grid, as the model grounds objects; the loop turns it into the frame's pixel coordinates before
the arm moves. Tool results may carry images: `move_to`'s result holds the next frame (the qwen format puts it in
its ✿RESULT✿ slot), so the model sees where the arm went. The cache is kept between turns: each turn prefills only
the new frame and results.

The frames are synthetic (a red cube on a grey table, drifting); swap `camera()` for your camera's frames.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from PIL import Image, ImageDraw

from qwen2vl_edge.runtime import Qwen2VLPipeline
from qwen2vl_edge.runtime.grounding import GRID

WIDTH, HEIGHT = 320, 240
BOX = {"type": "array", "minItems": 4, "maxItems": 4, "description": "x1, y1, x2, y2 on a 0-1000 grid",
       "items": {"type": "integer", "minimum": 0, "maximum": GRID}}
TOOLS = [  # bounded strings and numbers: a reply always ends, however weak the model
    {"type": "function", "function": {
        "name": "move_to", "description": "Move the gripper over the object in this box of the latest frame.",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["box"],
                       "properties": {"box": BOX}}}},
    {"type": "function", "function": {
        "name": "grasp", "description": "Close the gripper with this force.",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["force"],
                       "properties": {"force": {"enum": ["gentle", "firm"]}}}}},
    {"type": "function", "function": {
        "name": "say", "description": "Say a short sentence to the operator.",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["text"],
                       "properties": {"text": {"type": "string", "maxLength": 40}}}}},
]
SYSTEM = "You control a robot arm over a table. Pick up the red cube. Act only through the tools."


def camera(n: int, seed: int = 0):
    """`n` synthetic frames: a red cube drifting across a grey table."""
    rng = np.random.default_rng(seed)
    x, y = WIDTH // 3, HEIGHT // 2
    for _ in range(n):
        x, y = int(np.clip(x + rng.integers(-20, 21), 20, WIDTH - 40)), int(np.clip(y + rng.integers(-15, 16), 20,
                                                                                  HEIGHT - 40))
        frame = Image.new("RGB", (WIDTH, HEIGHT), (128, 128, 120))
        ImageDraw.Draw(frame).rectangle((x, y, x + 24, y + 24), fill=(200, 30, 30))
        yield frame


def to_pixels(box: list[int], size: tuple[int, int]) -> tuple[int, int]:
    """A grounding box on the 0-1000 grid -> its centre in the frame's pixels (the grid spans the whole frame)."""
    x1, y1, x2, y2 = box
    w, h = size
    return round((x1 + x2) / 2 * w / GRID), round((y1 + y2) / 2 * h / GRID)


def execute(call, frame: Image.Image, next_frame: Image.Image | None) -> dict:
    """Run one tool call on the (simulated) arm -> the tool message answering it."""
    args = json.loads(call.arguments)  # always valid: the constraint made it so
    if call.name == "move_to":
        x, y = to_pixels(args["box"], frame.size)
        content = [{"type": "text", "text": f"moved to ({x}, {y}) px; the camera now shows:"}]
        if next_frame is not None:
            content.append({"type": "image", "image": next_frame})
        print(f"  move_to box {args['box']} -> pixel ({x}, {y})")
    elif call.name == "grasp":
        content = f"gripper closed ({args['force']})"
        print(f"  grasp {args['force']}")
    else:
        content = "said"
        print(f"  say {args['text']!r}")
    return {"tool_call_id": call.id, "content": content}


def run(pipe: Qwen2VLPipeline, frames: int, max_pixels: int, max_new_tokens: int = 64) -> list:
    """The loop; returns every reply (GenerationResult), for a test to inspect."""
    session = pipe.chat(system=SYSTEM, tools=TOOLS, parallel_tool_calls=False, max_new_tokens=max_new_tokens)
    replies, results = [], None
    shots = list(camera(frames))
    for i, frame in enumerate(shots):
        image = {"type": "image", "image": frame, "max_pixels": max_pixels}
        if results is None:  # the first frame, as a user message
            reply = session.send([image, {"type": "text", "text": "Here is the table. What now?"}],
                                 tool_choice="required")
        else:  # the results of the last calls, the new frame inside move_to's result (or as a user message)
            seen = any(isinstance(r["content"], list) for r in results)
            reply = session.send(None if seen else [image, {"type": "text", "text": "What now?"}],
                                 tool_results=results, tool_choice="required")
        usage = reply.usage
        print(f"frame {i}: {reply.finish_reason}, {usage['cached_prompt_tokens']} cached + "
              f"{usage['prompt_tokens'] - usage['cached_prompt_tokens']} new prompt tokens", file=sys.stderr)
        replies.append(reply)
        next_frame = shots[i + 1] if i + 1 < len(shots) else None
        results = [execute(call, frame, next_frame) for call in reply.tool_calls] or None
    return replies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--frames", type=int, default=5, help="camera frames to run (default: 5)")
    parser.add_argument("--tool-format", choices=["qwen", "hermes"], default="qwen",
                        help="how tools and calls are written (default: qwen, Qwen2-VL's own)")
    parser.add_argument("--max-pixels", type=int, default=112 * 112, help="per frame (default: 12544)")
    args = parser.parse_args(argv)
    run(Qwen2VLPipeline.load(args.artifact, tool_format=args.tool_format), args.frames, args.max_pixels)
    return 0


if __name__ == "__main__":
    sys.exit(main())
