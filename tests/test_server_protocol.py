"""The server's OpenAI mapping on plain data, without a server: options, usage and extension fields."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

pytest.importorskip("fastapi", reason="the server needs the [serve] extra")

from qwen2vl_edge.runtime import GenerationResult  # noqa: E402
from qwen2vl_edge.runtime import tools  # noqa: E402
from qwen2vl_edge.runtime.generation import GenerationOptions  # noqa: E402
from qwen2vl_edge.runtime.sampling import SamplingOptions  # noqa: E402
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


def test_unset_fields_follow_the_checkpoint_as_pipe_generate_does():
    """generation_config.json's values for what a request leaves unset (Qwen2-VL-Instruct's own sample with
    a repetition penalty, which applies to greedy decoding too); temperature 0 is greedy all the same."""
    checkpoint = {"do_sample": True, "temperature": 0.01, "top_k": 1, "top_p": 0.001, "repetition_penalty": 1.05}
    unset = protocol.generation_options(request(seed=4), Limits(), 1000, checkpoint)
    assert unset.sampling == SamplingOptions(True, 0.01, 1, 0.001, 1.05) and unset.seed == 4
    warmer = protocol.generation_options(request(temperature=0.7), Limits(), 1000, checkpoint).sampling
    assert (warmer.do_sample, warmer.temperature, warmer.top_p, warmer.top_k) == (True, 0.7, 0.001, 1)
    greedy = protocol.generation_options(request(temperature=0, seed=4), Limits(), 1000, checkpoint)
    assert (greedy.sampling.do_sample, greedy.sampling.repetition_penalty, greedy.seed) == (False, 1.05, None)


def test_max_tokens_stop_and_context():
    limits = Limits(default_max_tokens=77)
    assert protocol.generation_options(request(), limits, 1000).max_new_tokens == 77
    assert protocol.generation_options(request(max_tokens=5), limits, 1000).max_new_tokens == 5
    assert protocol.generation_options(request(max_tokens=5, max_completion_tokens=9), limits, 1000).max_new_tokens == 9
    assert protocol.generation_options(request(stop="END"), limits, 1000).stop == ("END",)
    assert protocol.generation_options(request(stop=["a", "b"]), limits, 1000).stop == ("a", "b")
    with pytest.raises(APIError) as err:
        protocol.generation_options(request(stop=["END", ""]), limits, 1000)
    assert err.value.status == 400 and "stop" in err.value.message
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
    assert (e.status, e.param) == (400, "messages[0].content[0].image_url.image_url.url")
    assert e.body()["error"]["type"] == "invalid_request_error"


# OpenAI fields this server does not implement (yet): each must be refused by name, never ignored
UNSUPPORTED = {"logit_bias": {"42": 5}, "functions": [{"name": "f"}], "function_call": "auto",
               "modalities": ["audio"], "top_logprobs": 2, "no_such_field": 1}


@pytest.mark.parametrize("field", sorted(UNSUPPORTED))
def test_an_unsupported_field_is_refused_by_name(field):
    from qwen2vl_edge.server.app import parse_request

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], field: UNSUPPORTED[field]}
    with pytest.raises(APIError) as err:
        parse_request(json.dumps(body).encode())
    assert (err.value.status, err.value.param, err.value.code) == (400, field, "unsupported_parameter")
    assert err.value.message.startswith(f"{field} is not supported")


def test_unsupported_fields_inside_messages_are_refused_and_nulls_ask_for_nothing():
    from qwen2vl_edge.server.app import parse_request

    with pytest.raises(APIError) as err:
        parse_request(json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi", "name": "a"}]}).encode())
    assert (err.value.status, err.value.param) == (400, "messages[0].name")
    echoed = {"model": "m", "logit_bias": None, "tools": None, "user": "u-1", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "A cat.", "tool_calls": None,
                                            "refusal": None, "boxes": []}]}
    assert parse_request(json.dumps(echoed).encode()).messages[1].content == "A cat."


def test_a_nested_json_bomb_is_a_400():
    from qwen2vl_edge.server.app import parse_request

    with pytest.raises(APIError) as err:
        parse_request(b"[" * 100_000 + b"]" * 100_000)
    assert err.value.status == 400 and "nested too deeply" in err.value.message


def test_conversation_keys_compare_images_by_pixels():
    from PIL import Image

    from qwen2vl_edge.server.sessions import conversation_key, job_keys

    def chat(color, text="What is it?"):
        return [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (28, 28), color)},
                                             {"type": "text", "text": text}]},
                {"role": "assistant", "content": "A square."}]

    assert conversation_key(chat("red")) == conversation_key(chat("red"))  # another object, the same pixels
    assert conversation_key(chat("red")) != conversation_key(chat("blue"))
    assert conversation_key(chat("red")) != conversation_key(chat("red", "What is this?"))
    assert conversation_key([{"role": "user", "content": "hi"}]) != conversation_key(
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}])  # rendered alike, kept apart all the same
    assert conversation_key([{"role": "user", "content": [{"type": "video", "video": "clip.mp4"}]}]) is None
    follow_up = chat("red") + [{"role": "user", "content": "And?"}]
    plain = GenerationOptions()
    assert job_keys(follow_up, plain) == (conversation_key(chat("red")), False)
    assert job_keys(chat("red")[:1], plain) == (None, True)
    assert job_keys([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], plain) == (
        None, True)


def test_session_store_evicts_the_least_recently_kept():
    from qwen2vl_edge.server.sessions import Kept, SessionStore

    store = SessionStore(2)
    for key in "abc":
        store.keep(key, Kept(key, []))
    assert len(store) == 2 and not store.holds("a") and store.holds("b")
    assert store.take("b").session == "b" and store.take("b") is None  # taken out: one job at a time
    none = SessionStore(0)
    none.keep("a", Kept("a", []))
    assert len(none) == 0
    by_bytes = SessionStore(8, max_bytes=100)
    for key, nbytes in (("a", 60), ("b", 30), ("c", 40)):
        by_bytes.keep(key, Kept(key, [], nbytes))
    assert not by_bytes.holds("a") and by_bytes.holds("b") and by_bytes.holds("c") and by_bytes.nbytes == 70
    by_bytes.keep("huge", Kept("huge", [], 101))  # over the bound alone: not kept, and evicts nothing
    assert not by_bytes.holds("huge") and len(by_bytes) == 2


# -- agents: the request's agent fields, streamed calls, sessions with tools -----------------------------------

def test_agent_fields_map_one_to_one_onto_generation_options():
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "strict": True}}
    schema = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}, "strict": True}}
    opts = protocol.generation_options(request(tools=[tool], tool_choice={"type": "function", "function": {
        "name": "f"}}, parallel_tool_calls=False), Limits(), 1000)
    assert (opts.tools, opts.tool_choice, opts.parallel_tool_calls) == (
        [tool], {"type": "function", "function": {"name": "f"}}, False)
    assert protocol.generation_options(request(response_format=schema), Limits(), 1000).response_format == schema
    plain = protocol.generation_options(request(), Limits(), 1000)
    assert (plain.tools, plain.response_format, plain.parallel_tool_calls) == (None, None, True)
    with pytest.raises(APIError) as err:  # the runtime's check: a named function must be one of the tools
        protocol.generation_options(request(tools=[tool], tool_choice={"type": "function", "function": {
            "name": "g"}}), Limits(), 1000)
    assert err.value.status == 400 and "'g'" in err.value.message


def test_a_reply_with_calls_has_null_content_and_its_calls():
    from qwen2vl_edge.runtime.tools import ToolCall

    result = GenerationResult("", [1], "tool_calls", {}, {"prompt_tokens": 3, "completion_tokens": 1},
                              tool_calls=[ToolCall("call_1", "f", '{"a": 1}')])
    message = protocol.completion("id", "m", result)["choices"][0]["message"]
    assert message == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}


@pytest.mark.parametrize("fmt", sorted(tools.FORMATS))
def test_streamed_calls_are_read_from_the_text_as_it_grows(fmt):
    """Fed the reply one character at a time, the deltas announce each call once (id, type, name) and then send
    its arguments, never the format's markup; with the final calls they join to them."""
    from qwen2vl_edge.server.tools import CallStream

    form = tools.FORMATS[fmt]
    calls = [("move_to", '{"x": 1, "label": "a}b"}'), ("grasp", "{}")]
    text = "Sure." + "\n" + form.separator.join(form.call(n, a) for n, a in calls)
    stream = CallStream(form)
    deltas = [d for end in range(len(text) + 1) for d in stream.update(text[:end])]
    final = [tools.ToolCall(f"call_{i}", n, a) for i, (n, a) in enumerate(calls)]
    deltas += stream.finish(final)
    headers = [d for d in deltas if "id" in d]
    assert [(d["index"], d["type"], d["function"]["name"]) for d in headers] == [(0, "function", "move_to"),
                                                                                 (1, "function", "grasp")]
    assert all("id" not in d and set(d["function"]) == {"arguments"} for d in deltas if d not in headers)
    joined = ["".join(d["function"]["arguments"] for d in deltas if d["index"] == i) for i in range(2)]
    assert joined == [a for _, a in calls]
    assert len([d for d in deltas if d["index"] == 0]) > 3  # in pieces, as the text grew


def test_sessions_with_tools_are_keyed_by_them_in_either_format():
    from qwen2vl_edge.server.sessions import conversation_key, job_keys

    tool = {"type": "function", "function": {"name": "f"}}
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    history = [{"role": "user", "content": "Go."}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    result = [{"role": "tool", "tool_call_id": "call_1", "content": "done"}]
    with_tools = GenerationOptions(tools=[tool])
    key = conversation_key(history, [[tool], True])
    assert job_keys(history + result, with_tools) == (key, False)
    assert job_keys(history + result + [{"role": "user", "content": "And?"}], with_tools) == (key, False)
    assert job_keys(history + [{"role": "user", "content": "And?"}], with_tools) == (key, False)
    assert key != conversation_key(history, [[tool], False]) != conversation_key(history)  # the prompt differs
    other_call = [*history[:1], {**history[1], "tool_calls": [{**call, "function": {"name": "f", "arguments": "{ }"}}]}]
    assert conversation_key(other_call, [[tool], True]) != key
    renamed = [*history[:1], {**history[1], "tool_calls": [{**call, "id": "call_2"}]}]
    assert conversation_key(renamed, [[tool], True]) == key  # ids are not rendered
    # tools left out of the prompt: no session
    assert job_keys(history[:1], GenerationOptions(tools=[tool], tool_choice="none")) == (None, False)


def test_a_batch_takes_a_constraint_per_row():
    from qwen2vl_edge.server.batcher import Job, batch_options

    schema = {"type": "json_object"}
    tool = {"type": "function", "function": {"name": "f"}}
    rows = [{"response_format": {"type": "text"}}, {"regex": "[0-9]+"}, {}, {"response_format": schema}]
    jobs = [Job([], GenerationOptions(max_new_tokens=4, **row), loop=None) for row in rows]
    assert len({repr(job.batch_key) for job in jobs}) == 1  # they batch together
    opts = batch_options(jobs)
    assert opts.response_format == [None, None, None, schema] and opts.regex == [None, "[0-9]+", None, None]
    assert opts.grammar == [None] * 4
    opts.validate()
    plain = [Job([], GenerationOptions(max_new_tokens=4, **row), loop=None) for row in rows[:1] + rows[2:3]]
    assert batch_options(plain) is plain[0].options
    unused = [Job([], GenerationOptions(tools=[tool], tool_choice="none", **row), loop=None) for row in rows[1:]]
    batch_options(unused).validate()  # tools that may not be called leave each row its constraint
