"""The server's OpenAI mapping on plain data, without a server: options, usage and extension fields."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

pytest.importorskip("fastapi", reason="the server needs the [serve] extra")

from qwen2vl_edge.runtime import GenerationResult  # noqa: E402
from qwen2vl_edge.server import Limits  # noqa: E402
from qwen2vl_edge.server import protocol  # noqa: E402
from qwen2vl_edge.server.errors import APIError  # noqa: E402


def request(**fields) -> protocol.ChatRequest:
    return protocol.ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                **fields})


@pytest.mark.parametrize("fields, sample, temperature, top_p", [
    ({}, False, 1.0, 1.0),
    ({"temperature": 0}, False, 1.0, 1.0),
    ({"temperature": 0, "top_p": 0.5}, False, 1.0, 1.0),
    ({"temperature": 0.7}, True, 0.7, 1.0),
    ({"top_p": 0.9}, True, 1.0, 0.9),
    ({"temperature": 1.3, "top_p": 0.8, "seed": 3}, True, 1.3, 0.8),
])
def test_sampling_follows_openai_fields(fields, sample, temperature, top_p):
    opts = protocol.generation_options(request(**fields), Limits(), context=1000)
    assert (opts.sampling.do_sample, opts.sampling.temperature, opts.sampling.top_p) == (sample, temperature, top_p)
    assert opts.seed == (fields.get("seed") if sample else None)  # a seed only matters when sampling


def test_max_tokens_stop_and_context():
    limits = Limits(default_max_tokens=77)
    assert protocol.generation_options(request(), limits, 1000).max_new_tokens == 77
    assert protocol.generation_options(request(max_tokens=5), limits, 1000).max_new_tokens == 5
    assert protocol.generation_options(request(max_tokens=5, max_completion_tokens=9), limits, 1000).max_new_tokens == 9
    assert protocol.generation_options(request(stop="END"), limits, 1000).stop == ("END",)
    with pytest.raises(APIError) as err:
        protocol.generation_options(request(max_tokens=1000), limits, 1000)
    assert (err.value.status, err.value.code) == (400, "context_length_exceeded")


def test_usage_and_boxes_pass_through():
    @dataclass
    class Box:
        label: str
        xyxy: tuple

    @dataclass
    class WithBoxes(GenerationResult):  # the shape a grounding-aware runtime result takes
        boxes: list | None = None

    result = WithBoxes(text="a cat", token_ids=[1, 2], finish_reason="stop", timings={},
                       usage={"prompt_tokens": 10, "completion_tokens": 2, "cached_prompt_tokens": 6},
                       boxes=[Box("cat", (1, 2, 3, 4))])
    body = protocol.completion("id", "m", result)
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12,
                             "cached_prompt_tokens": 6, "prompt_tokens_details": {"cached_tokens": 6}}
    assert body["choices"][0]["message"]["boxes"] == [{"label": "cat", "xyxy": (1, 2, 3, 4)}]
    plain = protocol.completion("id", "m", GenerationResult("x", [1], "length", {}, {"prompt_tokens": 3,
                                                                                      "completion_tokens": 1}))
    assert "boxes" not in plain["choices"][0]["message"] and "prompt_tokens_details" not in plain["usage"]


def test_validation_error_names_the_deepest_field():
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        protocol.ChatRequest.model_validate({"model": "m", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"uri": "x"}}]}]})
    e = protocol.validation_error(err.value.errors())
    assert (e.status, e.param) == (422, "messages[0].content[0].image_url.image_url.url")
