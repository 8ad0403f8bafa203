"""The server's agent features through the official `openai` client: tool calls (streamed and not), structured
output (`.parse()` with pydantic, json_object, json_schema), what is refused with a 400, and kept sessions across
a tool turn.

conftest's `server` (the default qwen tool format, shared with test_server.py) serves most of it; the hermes
kept-session test runs a second app in this process on a uvicorn of its own, in the hermes format, over the same
graphs.
Replies of the tiny random-weight model are random tokens: only the constraint makes them parse.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Literal

import pytest

openai = pytest.importorskip("openai", reason="the server tests need the [test] extra (openai client)")
pytest.importorskip("fastapi", reason="the server tests need the [serve] extra")
pytest.importorskip("llguidance", reason="constraints need the [agents] extra")

from pydantic import BaseModel, Field  # noqa: E402

from conftest import in_process_server  # noqa: E402
from qwen2vl_edge.runtime import tools as formats  # noqa: E402
from qwen2vl_edge.server import openapi  # noqa: E402


class MoveTo(BaseModel):
    """Move the gripper over a pixel of the camera frame."""
    x: int = Field(ge=0, le=640)
    y: int = Field(ge=0, le=480)


class Grasp(BaseModel):
    """Close the gripper."""
    force: Literal["soft", "firm"]


class Sighting(BaseModel):
    label: Literal["cup", "box", "ball"]
    count: int = Field(ge=0, le=9)
    graspable: bool


TOOLS = [openai.pydantic_function_tool(MoveTo, name="move_to"), openai.pydantic_function_tool(Grasp, name="grasp")]
ASK = [{"role": "system", "content": "You control a robot arm."}, {"role": "user", "content": "Pick up the red cup."}]
CALL_ID = re.compile(r"call_[0-9a-f]{24}")  # an id sent twice would come out of the client doubled
NEW_TOKENS = 48


def _calls(message) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or ()]


def _status_of(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as err:
        call()
    return err.value.status_code, err.value.body


def test_tool_calls_streamed_equal_non_streamed_and_the_pipeline(client, model, pipe):
    options = dict(model=model, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=NEW_TOKENS,
                   temperature=0)
    whole = client.chat.completions.create(**options)
    expected = pipe.generate(ASK, max_new_tokens=NEW_TOKENS, tools=TOOLS, tool_choice="required")
    choice = whole.choices[0]
    assert choice.finish_reason == expected.finish_reason == "tool_calls"
    assert _calls(choice.message) == [(c.name, c.arguments) for c in expected.tool_calls] != []
    assert choice.message.content is None and whole.usage.completion_tokens == len(expected.token_ids)
    assert all(CALL_ID.fullmatch(c.id) for c in choice.message.tool_calls)
    openapi.ChatCompletion.model_validate(whole.model_dump(exclude_unset=True))  # as /openapi.json describes it
    with client.chat.completions.stream(**options) as stream:  # the client's own accumulation
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == "tool_calls" and not streamed.message.content
    assert _calls(streamed.message) == _calls(choice.message)
    assert all(CALL_ID.fullmatch(c.id) for c in streamed.message.tool_calls)
    for call in streamed.message.tool_calls:  # strict pydantic tools: the client parses the arguments
        assert isinstance(call.function.parsed_arguments, MoveTo if call.function.name == "move_to" else Grasp)
    # the client's joined message goes back as it is (its parsed arguments and stream indexes included)
    results = [{"role": "tool", "tool_call_id": c.id, "content": "done"} for c in streamed.message.tool_calls]
    echoed = client.chat.completions.create(**{**options, "messages": ASK + [streamed.message, *results],
                                               "tool_choice": "auto", "max_tokens": 4})
    assert echoed.choices[0].finish_reason and echoed.usage.prompt_tokens > whole.usage.prompt_tokens


def test_a_streamed_call_comes_as_one_header_then_argument_fragments(client, model, pipe):
    """On the wire: each call's id, type and name in its first delta only, then its arguments in pieces as
    they are generated; never the call's markup as text."""
    named = {"type": "function", "function": {"name": "move_to"}}
    chunks = list(client.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice=named,
                                                 parallel_tool_calls=False, max_tokens=NEW_TOKENS, temperature=0,
                                                 stream=True))
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or ()]
    headers = [d for d in deltas if d.id is not None]
    assert [(d.index, d.type, d.function.name) for d in headers] == [(0, "function", "move_to")]
    assert all(d.type is None and d.function.name is None for d in deltas if d.id is None)
    fragments = [d.function.arguments for d in deltas if d.function.arguments]
    assert len(fragments) > 2  # streamed as generated, not in one piece at the end
    expected = pipe.generate(ASK, max_new_tokens=NEW_TOKENS, tools=TOOLS, tool_choice=named,
                             parallel_tool_calls=False)
    assert "".join(fragments) == expected.tool_calls[0].arguments
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    for chunk in chunks:  # as /openapi.json describes them
        openapi.ChatCompletionChunk.model_validate(chunk.model_dump(exclude_unset=True))


def test_parse_with_pydantic_and_json_replies_that_parse(client, model, pipe):
    """Unconstrained, the tiny model's reply is no JSON; with a response_format it parses, and equals the
    pipeline's reply under the same schema."""
    messages = [{"role": "user", "content": "What do you see? Answer in JSON."}]
    free = client.chat.completions.create(model=model, messages=messages, max_tokens=NEW_TOKENS, temperature=0)
    with pytest.raises(ValueError):
        json.loads(free.choices[0].message.content)
    completion = client.chat.completions.parse(model=model, messages=messages, response_format=Sighting,
                                               max_tokens=NEW_TOKENS, temperature=0)
    parsed, parsed_usage = completion.choices[0], completion.usage
    assert isinstance(parsed.message.parsed, Sighting) and parsed.finish_reason == "stop"
    from openai.lib._parsing import type_to_response_format_param

    expected = pipe.generate(messages, max_new_tokens=NEW_TOKENS,
                             response_format=type_to_response_format_param(Sighting))
    assert parsed.message.content == expected.text
    schema = {"type": "object", "properties": {"ids": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                                   "maximum": 99},
                                                       "minItems": 1, "maxItems": 3}},
              "required": ["ids"], "additionalProperties": False}
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=NEW_TOKENS, temperature=0,
                                           response_format={"type": "json_schema", "json_schema": {
                                               "name": "ids", "schema": schema}}).choices[0]
    ids = json.loads(reply.message.content)["ids"]
    assert 1 <= len(ids) <= 3 and all(0 <= i <= 99 for i in ids) and reply.finish_reason == "stop"
    # tools that may not be called are left out of the prompt, and leave the reply to its schema
    ids_format = {"type": "json_schema", "json_schema": {"name": "ids", "schema": schema}}
    uncalled = client.chat.completions.create(model=model, messages=messages, max_tokens=NEW_TOKENS, temperature=0,
                                              tools=TOOLS, tool_choice="none", response_format=ids_format)
    assert uncalled.choices[0].message.content == pipe.generate(
        messages, max_new_tokens=NEW_TOKENS, tools=TOOLS, tool_choice="none", response_format=ids_format).text
    assert uncalled.usage.prompt_tokens == parsed_usage.prompt_tokens  # no tools in the prompt
    # any object: the tiny model writes a key until max_tokens, but JSON from the first token, as the pipeline does
    anything = client.chat.completions.create(model=model, messages=messages, max_tokens=NEW_TOKENS, temperature=0,
                                              response_format={"type": "json_object"}, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in anything if c.choices)
    assert text.startswith('{"') and text == pipe.generate(messages, max_new_tokens=NEW_TOKENS,
                                                         response_format={"type": "json_object"}).text


def test_what_cannot_be_enforced_or_mapped_is_a_400(client, model):
    ask = lambda **kw: client.chat.completions.create(**{"model": model, "max_tokens": 4, **kw})  # noqa: E731
    text = [{"role": "user", "content": "hi"}]
    negated = {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}
    conditional = {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}
    unknown = {"type": "function", "function": {"name": "fly"}}
    cases = {
        "not in a response schema": (lambda: ask(messages=text, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": negated}}), '"not"'),
        "if/then in a tool's parameters, streamed": (lambda: ask(messages=text, stream=True, tools=[
            {"type": "function", "function": {"name": "f", "parameters": conditional}}]), '"if"'),
        "a grammar that does not compile": (lambda: ask(messages=text, extra_body={"grammar": "start: ("}),
                                            "grammar"),
        "tool_choice naming no tool": (lambda: ask(messages=text, tools=TOOLS, tool_choice=unknown), "fly"),
        "tool_choice without tools": (lambda: ask(messages=text, tool_choice="required"), "needs tools"),
        "tools and a response format": (lambda: ask(messages=text, tools=TOOLS,
                                                    response_format={"type": "json_object"}), "tools"),
        "a tool message without its call id": (lambda: ask(messages=text + [
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "grasp", "arguments": "{}"}}]},
            {"role": "tool", "content": "done"}]), "tool_call_id"),
    }
    params = {"not in a response schema": "response_format", "if/then in a tool's parameters, streamed": "tools",
              "a grammar that does not compile": "grammar", "a tool message without its call id":
              "messages[2].tool_call_id"}
    for name, (call, word) in cases.items():
        status, body = _status_of(call)
        assert status == 400, (name, body)
        assert word in body["message"] or word == body.get("param"), (name, body)
        assert body["param"] == params.get(name), (name, body)
    assert ask(messages=text).choices[0].message.content  # still serving


@pytest.fixture(scope="module")
def hermes_client(pipe, tiny_artifact):
    """The app over `pipe`'s graphs with tool_format="hermes", on a uvicorn of its own in this process."""
    from qwen2vl_edge.runtime import Qwen2VLPipeline
    from qwen2vl_edge.server.app import create_app
    from qwen2vl_edge.server.settings import ServerSettings

    hermes = Qwen2VLPipeline(pipe.artifact, pipe.processor, pipe.backend, "hermes")
    with in_process_server(create_app(ServerSettings(tiny_artifact, tool_format="hermes"), hermes)) as url:
        yield hermes, openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def test_the_server_builds_llguidances_tokenizer_before_any_request(hermes_client):
    """The first constrained request does not wait for the tokenizer (seconds at the real vocabulary)."""
    pipe, _ = hermes_client  # a pipeline of its own, no request sent yet
    thread = next((t for t in threading.enumerate() if t.name == "qwen2vl-grammars"), None)
    if thread is not None:
        thread.join(120)
    assert pipe._grammars is not None and pipe._grammars._tokenizer is not None


def test_a_kept_session_serves_the_turn_after_a_tool_result(hermes_client, tiny_artifact):
    """hermes: a call, then its result (a user turn of <tool_response>): the result's turn reuses the kept
    session's cache and gets the reply a fresh run of the whole conversation gets."""
    pipe, client = hermes_client
    model = tiny_artifact.resolve().name
    look = {"type": "function", "function": {"name": "look", "description": "Look at a shelf.", "parameters": {
        "type": "object", "properties": {"shelf": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["shelf"], "additionalProperties": False}}}
    tools_ = [look, *TOOLS]
    first = client.chat.completions.create(model=model, messages=ASK, tools=tools_, max_tokens=NEW_TOKENS,
                                           tool_choice={"type": "function", "function": {"name": "look"}},
                                           parallel_tool_calls=False, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls" and call.function.name == "look"
    conversation = ASK + [first.choices[0].message, {"role": "tool", "tool_call_id": call.id,
                                                     "content": "a red cup and a box"}]
    reply = client.chat.completions.create(model=model, messages=conversation, tools=tools_, max_tokens=16,
                                           parallel_tool_calls=False, temperature=0)
    assert reply.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens
    fresh = pipe.generate(ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                                 conversation[-1]], max_new_tokens=16, tools=tools_, parallel_tool_calls=False)
    assert reply.choices[0].message.content == fresh.text and reply.choices[0].finish_reason == fresh.finish_reason
    assert reply.usage.prompt_tokens == fresh.usage["prompt_tokens"]
    assert fresh.text and formats.HERMES_CALL not in fresh.text


def test_a_kept_session_serves_a_qwen_tool_result(client, model, pipe):
    """qwen: the result continues the message that called; a fresh run tokenises it apart from the call's text,
    as the session holds it, so the result's turn reuses the kept session's cache and gets the fresh run's reply."""
    look = {"type": "function", "function": {"name": "look", "parameters": {
        "type": "object", "properties": {"shelf": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["shelf"], "additionalProperties": False}}}
    first = client.chat.completions.create(model=model, messages=ASK, tools=[look], max_tokens=NEW_TOKENS,
                                           tool_choice={"type": "function", "function": {"name": "look"}},
                                           parallel_tool_calls=False, temperature=0)  # kept: re-tokenises alike
    call = first.choices[0].message.tool_calls[0]
    conversation = ASK + [first.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": "a cup"}]
    ask = dict(model=model, tools=[look], max_tokens=NEW_TOKENS, parallel_tool_calls=False, temperature=0,
               tool_choice="required")
    reply = client.chat.completions.create(messages=conversation, **ask)
    assert reply.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens
    fresh = pipe.generate(ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                                 conversation[-1]], max_new_tokens=NEW_TOKENS, tools=[look], tool_choice="required",
                          parallel_tool_calls=False)
    again = reply.choices[0].message
    assert (again.content or "") == fresh.text and reply.choices[0].finish_reason == fresh.finish_reason == "tool_calls"
    assert _calls(again) == [(c.name, c.arguments) for c in fresh.tool_calls]
    assert reply.usage.prompt_tokens == fresh.usage["prompt_tokens"]
    # kept again (the cache holds the reopened message): the next result continues it once more
    conversation += [again, {"role": "tool", "tool_call_id": again.tool_calls[0].id, "content": "a box"}]
    last = client.chat.completions.create(messages=conversation, **{**ask, "tool_choice": "auto", "max_tokens": 4})
    assert last.usage.prompt_tokens_details.cached_tokens > reply.usage.prompt_tokens


def test_requests_with_different_constraints_share_a_batch(pipe):
    """A schema, a regular expression and free text, queued together, run as one batch (a constraint per row)
    and each get the reply they get alone."""
    import asyncio

    from qwen2vl_edge.runtime.generation import GenerationOptions
    from qwen2vl_edge.server.batcher import Batcher, Job
    from qwen2vl_edge.server.metrics import Metrics

    from openai.lib._parsing import type_to_response_format_param

    conversation = [{"role": "user", "content": "What do you see?"}]
    constraints = [{"response_format": type_to_response_format_param(Sighting)}, {"regex": "[0-9]{3}-[a-z]{2}"}, {}]

    async def answers():
        jobs = [Job(conversation, GenerationOptions(max_new_tokens=NEW_TOKENS, **c), asyncio.get_running_loop(),
                    stream=False) for c in constraints]
        for job in jobs:
            batcher.submit(job)
        return [await job.events.get() for job in jobs]

    metrics = Metrics()
    batcher = Batcher(pipe, 8, 8, 0.5, metrics)  # the first job waits half a second for the others
    try:
        got = asyncio.run(answers())
    finally:
        batcher.close()
    exposition = metrics.exposition().decode()
    assert "qwen2vl_batch_size_count 1.0" in exposition and "qwen2vl_batch_size_sum 3.0" in exposition
    for (kind, result), constraint in zip(got, constraints):
        assert kind == "done"
        assert result.text == pipe.generate(conversation, max_new_tokens=NEW_TOKENS, **constraint).text
    Sighting.model_validate_json(got[0][1].text)
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", got[1][1].text)
