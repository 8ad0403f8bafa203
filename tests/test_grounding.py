"""Grounding tags -> boxes in the original image's pixels; malformed spans skipped."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import random_image, requires_torch
from qwen2vl_edge.runtime.grounding import Box, parse_boxes

CUP = "<|object_ref_start|>the cup<|object_ref_end|><|box_start|>(100,200),(300,400)<|box_end|>"


def test_boxes_map_the_grid_onto_the_last_image():
    boxes = parse_boxes(f"There is {CUP} on the table.", [(640, 480), (1000, 500)])
    assert boxes == [Box("the cup", (100.0, 100.0, 300.0, 200.0), (100, 200, 300, 400), 1)]


def test_one_reference_with_several_boxes_and_boxes_without_reference():
    text = ("<|object_ref_start|>two dogs<|object_ref_end|><|box_start|>(0,0),(10,10)<|box_end|>"
            "<|box_start|>(20, 20), (30, 30)<|box_end|> and then <|box_start|>(5,5),(6,6)<|box_end|>")
    boxes = parse_boxes(text, [(1000, 1000)])
    assert [(b.label, b.grid) for b in boxes] == [("two dogs", (0, 0, 10, 10)), ("two dogs", (20, 20, 30, 30)),
                                                   (None, (5, 5, 6, 6))]


@pytest.mark.parametrize("span", ["<|box_start|>(100,200),(300<|box_end|>", "<|box_start|>(1,2),(3,4)",
                                  "<|box_start|>(300,200),(100,400)<|box_end|>",
                                  "<|box_start|>(0,0),(1001,5)<|box_end|>", "<|box_start|>cup<|box_end|>"])
def test_malformed_spans_are_skipped(span):
    assert parse_boxes(f"{span} {CUP}", [(1000, 1000)]) == [
        Box("the cup", (100.0, 200.0, 300.0, 400.0), (100, 200, 300, 400), 0)]


def test_no_image_keeps_the_grid_only():
    assert parse_boxes(CUP, []) == [Box("the cup", None, (100, 200, 300, 400), None)]


@requires_torch
def test_result_boxes_and_tags_with_skip_special_tokens_false(pipe):
    """The reply's ids as the tokenizer makes them; boxes refer to the conversation's images' original sizes."""
    img = random_image(np.random.default_rng(0), 500, 250)
    conv = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Find the cup."}]}]
    ids = pipe.processor.tokenizer.encode(CUP).ids
    opts = pipe._options(8)
    _, meta = pipe.processor.encode(conv)
    plain = pipe._result(ids, "stop", opts, {}, meta[0], {})
    tagged = pipe._result(ids, "stop", opts, {}, meta[0], {}, skip_special_tokens=False)
    assert plain.text == "the cup(100,200),(300,400)" and tagged.text == CUP
    assert plain.boxes == tagged.boxes == [Box("the cup", (50.0, 50.0, 150.0, 100.0), (100, 200, 300, 400), 0)]
    assert plain.to_dict()["boxes"] == [{"label": "the cup", "box": (50.0, 50.0, 150.0, 100.0),
                                         "grid": (100, 200, 300, 400), "image": 0}]
    free = pipe.generate(conv, max_new_tokens=6, min_new_tokens=6, skip_special_tokens=False)
    assert free.text == pipe.processor.decode(free.token_ids, skip_special_tokens=False)
