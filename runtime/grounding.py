"""Grounding output -> boxes in the pixels of the original image.

Qwen2-VL grounds objects as `<|object_ref_start|>a cup<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`
with coordinates on a 0-1000 grid over the image it was shown (the resized image has the original's aspect,
so the grid maps onto the original pixels directly). One reference may be followed by several boxes.
Malformed spans are skipped, never raised: this is model output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GRID = 1000
_NO_TAG = r"(?:(?!<\|).)*?"  # an unclosed span must not swallow the next one
_REF = rf"<\|object_ref_start\|>(?P<label>{_NO_TAG})<\|object_ref_end\|>"
_BOX = rf"<\|box_start\|>(?P<body>{_NO_TAG})<\|box_end\|>"
_SPAN = re.compile(f"{_REF}|{_BOX}", re.S)
_POINTS = re.compile(r"^\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*$")


@dataclass(frozen=True)
class Box:
    label: str | None  # the object reference just before the box, if any
    box: tuple[float, float, float, float] | None  # x1, y1, x2, y2 in the original image's pixels
    grid: tuple[int, int, int, int]  # as emitted: 0-1000 grid
    image: int | None  # index of the image it refers to, in order of appearance in the conversation


def _grid_box(body: str) -> tuple[int, int, int, int] | None:
    m = _POINTS.match(body)
    if not m:
        return None
    x1, y1, x2, y2 = (int(v) for v in m.groups())
    if max(x1, y1, x2, y2) > GRID or x1 > x2 or y1 > y2:
        return None
    return x1, y1, x2, y2


def parse_boxes(text: str, image_sizes: list[tuple[int, int]]) -> list[Box]:
    """`text` decoded with its special tokens; `image_sizes`: (width, height) of each image of the
    conversation. Boxes refer to the last image shown (the model cannot say which one it means)."""
    image = len(image_sizes) - 1 if image_sizes else None
    boxes, label, last_end = [], None, 0
    for m in _SPAN.finditer(text):
        if m.group("label") is not None:
            label, last_end = m.group("label").strip(), m.end()
            continue
        if text[last_end:m.start()].strip():  # text between: the reference no longer applies
            label = None
        last_end = m.end()
        grid = _grid_box(m.group("body"))
        if grid is None:
            continue
        box = None
        if image is not None:
            w, h = image_sizes[image]
            box = (grid[0] * w / GRID, grid[1] * h / GRID, grid[2] * w / GRID, grid[3] * h / GRID)
        boxes.append(Box(label, box, grid, image))
    return boxes
