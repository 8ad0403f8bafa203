"""Agents: structured output (JSON schema, regex, Lark) and tool calls on the tiny random-weight model, where
only the constraint can make a reply valid; the constrained sampler's distribution at the real vocabulary."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest

from qwen2vl_edge.runtime import ConfigError, InputError, Qwen2VLPipeline
from qwen2vl_edge.runtime import chat, constraints
from qwen2vl_edge.runtime import tools as tool_formats
from qwen2vl_edge.runtime.sampling import SamplingOptions, constrained_pick, distribution

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

V = 151_936
SCHEMAS = {
    "nested": {"type": "object", "additionalProperties": False, "required": ["target"], "properties": {
        "target": {"type": "object", "additionalProperties": False, "required": ["label", "box"], "properties": {
            "label": {"type": "string", "maxLength": 8},
            "box": {"type": "object", "additionalProperties": False, "required": ["x", "y"], "properties": {
                "x": {"type": "integer", "minimum": 0, "maximum": 639},
                "y": {"type": "integer", "minimum": 0, "maximum": 479}}}}}}},
    "enum": {"type": "object", "additionalProperties": False, "required": ["action", "hand"], "properties": {
        "action": {"enum": ["grasp", "release", "wait"]}, "hand": {"type": "string", "enum": ["left", "right"]}}},
    "bounds": {"type": "object", "additionalProperties": False, "required": ["speed", "steps"], "properties": {
        "speed": {"type": "number", "minimum": 0.5, "maximum": 2.5, "multipleOf": 0.01},
        "steps": {"type": "integer", "exclusiveMinimum": 10, "maximum": 20}}},
    "array": {"type": "object", "additionalProperties": False, "required": ["waypoints"], "properties": {
        "waypoints": {"type": "array", "minItems": 2, "maxItems": 3,
                      "items": {"type": "integer", "minimum": -9, "maximum": 9}}}},
    "pattern": {"type": "object", "additionalProperties": False, "required": ["code"], "properties": {
        "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}}},
    "nullable": {"type": "object", "additionalProperties": False, "required": ["object", "count"], "properties": {
        "object": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "null"}]},
        "count": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"type": "null"}]}}},
}
TOOLS = [
    {"type": "function", "function": {"name": "move_to", "description": "Move the gripper to a pixel.",
                                      "parameters": {"type": "object", "additionalProperties": False,
                                                     "required": ["x", "y"], "properties": {
                                                         "x": {"type": "integer", "minimum": 0, "maximum": 99},
                                                         "y": {"type": "integer", "minimum": 0, "maximum": 99}}}}},
    {"type": "function", "function": {"name": "say", "description": "Say something.",
                                      "parameters": {"type": "object", "additionalProperties": False,
                                                     "required": ["text"], "properties": {
                                                         "text": {"type": "string", "maxLength": 6}}}}},
]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def _conv(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def _check_calls(result, names=None) -> None:
    assert result.finish_reason == "tool_calls" and result.tool_calls
    for call in result.tool_calls:
        assert call.id.startswith("call_") and (names is None or call.name in names)
        assert _valid(call.arguments, PARAMETERS[call.name]), call


@pytest.fixture(scope="module")
def hermes(pipe):
    """The same artifact and backend with the hermes tool format (llguidance's tokenizer shared)."""
    other = Qwen2VLPipeline(pipe.artifact, pipe.processor, pipe.backend, tool_format="hermes")
    other._grammars = pipe.grammars
    return other


@pytest.fixture(params=["qwen", "hermes"])
def agent(request, pipe, hermes):
    return pipe if request.param == "qwen" else hermes


# -- structured output ---------------------------------------------------------------------------

def test_only_the_constraint_makes_replies_valid(pipe):
    """Six schemas in one batch (a response_format per row), greedy and three seeds: the free replies parse
    as none of them, every constrained reply follows its own schema and ends by itself."""
    names = list(SCHEMAS)
    convs = [_conv(f"Reply with a JSON object for '{n}'.") for n in names]
    free = pipe.generate(convs, 40)
    for name, r in zip(names, free):
        assert not any(_valid(r.text, s) for s in SCHEMAS.values()), (name, r.text)
    formats = [{"type": "json_schema", "json_schema": {"name": n, "schema": SCHEMAS[n], "strict": True}}
               for n in names]
    for sampling in ({}, {"do_sample": True, "seed": 0}, {"do_sample": True, "seed": 1},
                     {"do_sample": True, "seed": 2, "top_k": 0, "temperature": 1.5}):
        for name, r in zip(names, pipe.generate(convs, 60, response_format=formats, **sampling)):
            assert r.finish_reason == "stop" and _valid(r.text, SCHEMAS[name]), (name, sampling, r.text)
            assert "\": " in r.text and "  " not in r.text and "\n" not in r.text  # ": ", no padding


def test_json_object_regex_and_lark(pipe):
    conv = _conv("Answer.")
    lark = 'start: "move(" NUM ", " NUM ")"\nNUM: /[0-9]{1,3}/\n'
    rows = pipe.generate([conv, conv, conv], 40, regex=[r"[A-Z][a-z]{2,5}-[0-9]{2}", None, None],
                         grammar=[None, lark, None], response_format=[None, None, {"type": "json_object"}])
    assert re.fullmatch(r"[A-Z][a-z]{2,5}-[0-9]{2}", rows[0].text), rows[0].text
    assert re.fullmatch(r"move\([0-9]{1,3}, [0-9]{1,3}\)", rows[1].text), rows[1].text
    assert isinstance(json.loads(rows[2].text), dict)
    assert all(r.finish_reason == "stop" for r in rows)


def test_batch_rows_keep_their_own_constraints(pipe):
    """A row whose grammar is complete stops as at an end of sequence, while a free row runs on."""
    conv = _conv("Count.")
    short, free, other = pipe.generate([conv, conv, conv], 24, regex=["[0-9]{3}", None, "(yes|no)"])
    assert short.text.isdigit() and len(short.text) == 3 and short.finish_reason == "stop"
    assert other.text in ("yes", "no") and other.finish_reason == "stop"
    assert free.finish_reason == "length" and len(free.token_ids) == 24
    assert free.token_ids == pipe.generate(conv, 24).token_ids  # an unconstrained row is untouched


def test_what_cannot_be_enforced_is_refused_by_name(pipe):
    with pytest.raises(InputError, match="not"):
        pipe.generate(_conv("x"), 4, response_format={"type": "json_schema", "json_schema": {
            "name": "n", "schema": {"type": "object", "not": {"required": ["a"]}}}})
    with pytest.raises(InputError, match="cannot be enforced"):
        pipe.generate(_conv("x"), 4, grammar="start: undefined_rule\n")
    with pytest.raises(InputError, match="response_format"):
        pipe.generate(_conv("x"), 4, response_format={"type": "xml"})
    with pytest.raises(InputError, match="one of"):
        pipe.generate(_conv("x"), 4, regex="a", grammar='start: "a"')
    with pytest.raises(InputError, match="tools"):
        pipe.generate(_conv("x"), 4, tools=TOOLS, regex="a")


def test_without_llguidance_the_runtime_runs_and_constraints_name_the_extra(pipe, monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance now fails
    assert pipe.generate(_conv("hi"), 3).finish_reason == "length"
    with pytest.raises(ConfigError, match=r"pip install .llguidance>=1.9. \(the \[agents\] extra\)"):
        pipe.generate(_conv("hi"), 3, regex="[0-9]+")


# -- tools -----------------------------------------------------------------------------------------

def test_tool_choices(agent):
    conv = _conv("Pick up the red cube.")
    none = agent.generate(conv, 30, tools=TOOLS, tool_choice="none")
    assert none.tool_calls == [] and none.finish_reason == "length"
    assert none.usage["prompt_tokens"] == agent.generate(conv, 1).usage["prompt_tokens"]  # tools left out
    with_tools, _ = tool_formats.prepare(conv, agent.tool_format, tool_formats.functions(TOOLS), "auto", True)
    free = agent.generate(with_tools, 30)  # the same prompt, unconstrained
    auto = agent.generate(conv, 30, tools=TOOLS)  # free text until a marker: this model writes none
    assert auto.tool_calls == [] and auto.finish_reason == "length" and agent.tool_format.marker not in auto.text
    # the same tokens as unconstrained (the lazy grammar only keeps the text valid UTF-8, which a random model
    # soon breaks)
    assert auto.token_ids[:10] == free.token_ids[:10]
    assert auto.usage["prompt_tokens"] > none.usage["prompt_tokens"]
    required = agent.generate(conv, 60, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    _check_calls(required)
    assert len(required.tool_calls) == 1 and required.text == ""
    named = agent.generate(conv, 60, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "say"}},
                           do_sample=True, seed=3, parallel_tool_calls=False)
    _check_calls(named, {"say"})


def test_an_auto_call_after_free_text(agent):
    """tool_choice auto: any text until the model writes the call marker, then the name and arguments are
    forced. The free text and the marker are fed to the matcher as a model would write them; random logits
    then pick every later token through the constraint."""
    fmt, tokenizer = agent.tool_format, agent.processor.tokenizer
    matcher = agent.grammars.matcher(tool_formats.grammar(fmt, tool_formats.functions(TOOLS), "auto", False))
    written = tokenizer.encode("I see the cube, moving there.\n" + fmt.marker).ids
    for t in written:
        assert matcher.allows(t)
        matcher.take(t)
    rng, ids = np.random.default_rng(0), list(written)
    while not matcher.done and ids[-1] not in agent.eos_ids:
        ids.append(constrained_pick(rng.standard_normal(V).astype(np.float32) * 4, SamplingOptions(), rng, matcher))
        matcher.take(ids[-1])
    text, calls, reason = tool_formats.ReplyPlan(fmt, calls=True).finish(agent.processor.decode(ids), "stop")
    assert text == "I see the cube, moving there." and reason == "tool_calls" and len(calls) == 1
    name, arguments = calls[0]
    assert _valid(arguments, PARAMETERS[name])


def test_two_parallel_calls(agent):
    conv = _conv("Move, then say where.")
    for seed in range(40):  # the random model picks between another call and the end at random
        r = agent.generate(conv, 90, tools=TOOLS, tool_choice="required", do_sample=True, seed=seed)
        if r.finish_reason == "tool_calls" and len(r.tool_calls) == 2:
            break
    _check_calls(r)
    assert len(r.tool_calls) == 2 and r.tool_calls[0].id != r.tool_calls[1].id
    plain, continued = tool_formats.prepare(
        conv + [{"role": "assistant", "content": None, "tool_calls": [c.to_openai() for c in r.tool_calls]}],
        agent.tool_format, None, "none", True)
    assert not continued and plain[-1]["content"] == agent.processor.decode(r.token_ids)  # renders as generated


def test_a_cut_off_call_is_not_a_call_and_streams_show_no_markup(agent):
    conv = _conv("Move.")
    cut = agent.generate(conv, 5, tools=TOOLS, tool_choice="required")
    assert cut.finish_reason == "length" and cut.tool_calls == [] and cut.text == ""
    pieces = list(agent.stream(conv, 60, tools=TOOLS, tool_choice="required", parallel_tool_calls=False))
    _check_calls(agent.last_result)
    assert "".join(pieces) == agent.last_result.text == ""
    conv = conv + [{"role": "assistant", "content": "Sure.\n" + agent.tool_format.marker, "prefix": True}]
    pieces = list(agent.stream(conv, 60, tools=TOOLS, parallel_tool_calls=False))
    assert all(agent.tool_format.marker not in p and "{" not in p for p in pieces)


def test_a_tool_result_turn_reuses_the_session_cache(agent):
    session = agent.chat(system="You drive a robot arm.", tools=TOOLS, max_new_tokens=60)
    first = session.send("Pick up the cube.", tool_choice="required", parallel_tool_calls=False)
    _check_calls(first)
    second = session.send(tool_results=[{"tool_call_id": first.tool_calls[0].id, "content": "done"}],
                          tool_choice="required", parallel_tool_calls=False)
    _check_calls(second)
    cached = first.usage["prompt_tokens"] + len(first.token_ids) - 1  # the prompt, all generated ids but the last
    assert second.usage["cached_prompt_tokens"] == cached
    assert second.usage["prompt_tokens"] - cached <= 24  # only the result and its framing are prefilled
    # the cache holds exactly what the conversation renders to, the forced separators included
    rendered = session._render(session._messages, False)
    assert agent.processor.decode(session.token_ids, skip_special_tokens=False) == rendered.replace(chat.BOUNDARY, "")
    shown, _ = tool_formats.prepare(session.history, agent.tool_format, tool_formats.functions(TOOLS), "auto", True)
    assert agent.processor.prompt(shown, add_generation_prompt=False) == rendered  # history in OpenAI's shape
    assert [m["role"] for m in session.history] == ["system", "user", "assistant", "tool", "assistant"]
    assert session.history[2]["tool_calls"][0]["function"] == {"name": first.tool_calls[0].name,
                                                               "arguments": first.tool_calls[0].arguments}
    last = second
    for turn in ({"tool_results": [{"tool_call_id": second.tool_calls[0].id, "content": "ok"}],  # results again
                  "max_new_tokens": 6, "tool_choice": "none"},
                 {"content": "Thanks.", "max_new_tokens": 4}):
        reply = session.send(**turn)
        assert reply.usage["cached_prompt_tokens"] == last.usage["prompt_tokens"] + len(last.token_ids) - 1
        last = reply
    rendered = session._render(session._messages, False).replace(chat.BOUNDARY, "")
    assert agent.processor.decode(session.token_ids, skip_special_tokens=False) == rendered
    held = list(session.token_ids)
    for _ in session.stream("Count.", max_new_tokens=8, min_new_tokens=8):
        break  # walked away: the cache is rebuilt at the next turn, the tool turns replayed as they were
    rebuilt = session.send("Again.", max_new_tokens=2)
    assert rebuilt.usage["cached_prompt_tokens"] == 0 and session.token_ids[:len(held)] == held


def test_a_qwen_session_tool_result_turn_equals_a_fresh_run(pipe):
    """qwen: the results continue the calling message, tokenised apart from the call's text in a fresh run as in a
    session, so the cache after a tool result holds the ids a fresh run of the whole conversation prefills, and
    the session's reply is the fresh run's, token for token (when the call's ids re-tokenise alike, as here)."""
    opts = {"tools": TOOLS, "parallel_tool_calls": False}
    session = pipe.chat(system="You drive a robot arm.", max_new_tokens=40, **opts)
    first = session.send("Pick up the cube.", tool_choice="required")
    _check_calls(first)
    second = session.send(tool_results=[{"tool_call_id": first.tool_calls[0].id, "content": "done"}],
                          max_new_tokens=12)
    conversation = session.history[:4]
    fresh = pipe.generate(conversation, 12, **opts)
    assert second.usage["cached_prompt_tokens"] == first.usage["prompt_tokens"] + len(first.token_ids) - 1
    plain, _ = pipe.plan(conversation, pipe._options(12, **opts))
    prompt = pipe.processor.encode(plain)[0]["input_ids"][0].tolist()
    assert session.token_ids[:second.usage["prompt_tokens"]] == prompt
    assert second.token_ids == fresh.token_ids and second.text == fresh.text


def test_a_tool_result_may_carry_an_image(agent, images):
    """A camera frame in a tool result: its vision tokens go into the cache with the result (qwen: inside the
    ✿RESULT✿ slot of the calling message), and the turn still reuses the cache."""
    session = agent.chat(tools=TOOLS, max_new_tokens=40, parallel_tool_calls=False)
    first = session.send("Look.", tool_choice={"type": "function", "function": {"name": "move_to"}})
    _check_calls(first, {"move_to"})
    frame = {"type": "image", "image": str(images["c"]), "max_pixels": 56 * 56}
    second = session.send(tool_results=[{"tool_call_id": first.tool_calls[0].id,
                                         "content": [{"type": "text", "text": "moved; now:"}, frame]}],
                          tool_choice="required")
    _check_calls(second)
    cached = first.usage["prompt_tokens"] + len(first.token_ids) - 1
    image_pad = agent.processor.tokenizer.token_to_id(agent.processor.special.image_pad)
    assert second.usage["cached_prompt_tokens"] == cached
    assert session.token_ids[cached:second.usage["prompt_tokens"]].count(image_pad) >= 4  # the frame's tokens
    assert session.history[2] == {"role": "tool", "tool_call_id": first.tool_calls[0].id,
                                  "content": [{"type": "text", "text": "moved; now:"}, frame]}


# -- the sampler -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def letters(pipe):
    """A matcher allowing lowercase-letter tokens (tens of thousands at the real vocabulary), and its mask."""
    matcher = pipe.grammars.matcher(constraints.grammar_text(regex="[a-z]+"))
    allowed = np.zeros(V, bool)
    allowed[matcher.allowed_ids()] = True
    return matcher, allowed


def _masked(row: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """The full-mask reference: every forbidden token's logit at -inf, the whole vocabulary kept."""
    return np.where(allowed, row, -np.inf)


def _peaked_logits(allowed: np.ndarray, seed: int) -> np.ndarray:
    """The likeliest token forbidden (the fast path rejects often), then a slope of allowed ones over a tail
    holding a few % of the mass: top-p 0.6 and top-k 2 keep one or two allowed tokens of the whole
    vocabulary, but more once the mask is on, so a fast path that skipped the mask would draw too few of those."""
    rng = np.random.default_rng(seed)
    row = (rng.standard_normal(V) - 4).astype(np.float32)
    ok, banned = np.flatnonzero(allowed), np.flatnonzero(~allowed)
    row[rng.choice(banned, 1)] = 9.0
    row[rng.choice(ok, 20, replace=False)] = np.append(8.0, np.linspace(7.0, 4.0, 19))
    return row


@pytest.mark.parametrize("opts", [SamplingOptions(do_sample=False), SamplingOptions(True, 1.0, 0, 1.0),
                                  SamplingOptions(True, 1.0, 0, 0.6), SamplingOptions(True, 1.0, 2, 1.0)])
def test_constrained_sampling_draws_from_the_masked_distribution(letters, opts):
    """Draws through the fast path (rejection) or the mask equal the full-mask reference at 151,936 tokens:
    chi-square over the likeliest allowed tokens and the rest; greedy is the masked argmax."""
    matcher, allowed = letters
    row = _peaked_logits(allowed, 0)
    reference = _masked(row, allowed)
    rng = np.random.default_rng(1)
    if not opts.do_sample:
        for seed in range(20):
            row = _peaked_logits(allowed, seed)
            assert constrained_pick(row, opts, rng, matcher) == _masked(row, allowed).argmax()
        return
    ids, probs = distribution(reference, opts)
    full = np.zeros(V)
    full[ids] = probs
    top = np.argsort(-full)[:6]
    draws = np.array([constrained_pick(row, opts, rng, matcher) for _ in range(2000)])
    assert allowed[draws].all() and (full[draws] > 0).all()  # only tokens the masked processors keep
    counts = np.array([(draws == t).sum() for t in top] + [(~np.isin(draws, top)).sum()])
    expected = np.append(full[top], 1 - full[top].sum()) * len(draws)
    keep = expected > 0
    assert ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum() < 22.5  # chi-square, <= 6 dof, p = 0.001
    assert counts[~keep].sum() == 0


# -- the command line --------------------------------------------------------------------------------

def test_cli_flags_become_the_python_options(tmp_path):
    from qwen2vl_edge.cli import UsageError, _agent_options, build_parser

    (tmp_path / "s.json").write_text(json.dumps(SCHEMAS["enum"]))
    (tmp_path / "g.lark").write_text('start: "a"\n')

    def options(*flags):
        return _agent_options(build_parser().parse_args(["run", "art", "--prompt", "x", *flags]))

    assert options("--json-schema", str(tmp_path / "s.json"))["response_format"]["json_schema"]["schema"] == \
        SCHEMAS["enum"]
    assert options("--json-schema", json.dumps(SCHEMAS["array"]))["response_format"]["json_schema"]["schema"] == \
        SCHEMAS["array"]
    assert options("--grammar", str(tmp_path / "g.lark")) == {"grammar": 'start: "a"\n'}
    assert options("--regex", "[0-9]+") == {"regex": "[0-9]+"}
    assert options("--tools", json.dumps(TOOLS), "--tool-choice", "say", "--no-parallel-tool-calls") == {
        "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "say"}},
        "parallel_tool_calls": False}
    for flags, message in ((["--regex", "a", "--grammar", "g"], "give one"), (["--tool-choice", "auto"], "--tools"),
                           (["--json-schema", "{oops"], "not valid JSON")):
        with pytest.raises(UsageError, match=message):
            options(*flags)


def test_cli_run_and_chat_print_tool_calls(tiny_artifact, tmp_path):
    import subprocess

    (tmp_path / "tools.json").write_text(json.dumps(TOOLS))
    base = [sys.executable, "-m", "qwen2vl_edge", "chat", str(tiny_artifact), "--tools", str(tmp_path / "tools.json"),
            "--tool-choice", "move_to", "--no-parallel-tool-calls", "--max-new-tokens", "40"]
    out = subprocess.run(base, input="Go.\n/result done\n", capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    calls = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(calls) == 2 and all(c["function"]["name"] == "move_to" for c in calls)  # a call, then after results
    assert _valid(calls[1]["function"]["arguments"], PARAMETERS["move_to"])
    usage = [line for line in out.stderr.splitlines() if "cached" in line]  # chat's prompt ("> ") ends stderr
    assert len(usage) == 2 and not usage[-1].startswith("[0 cached")


# -- the example -----------------------------------------------------------------------------------

def test_robot_agent_example_always_makes_valid_calls(agent, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "examples" / "robot_agent.py"
    spec = importlib.util.spec_from_file_location("robot_agent", path)
    robot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(robot)
    replies = robot.run(agent, frames=3, max_pixels=56 * 56)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in robot.TOOLS}
    for i, reply in enumerate(replies):
        assert reply.finish_reason == "tool_calls" and len(reply.tool_calls) == 1
        call = reply.tool_calls[0]
        assert _valid(call.arguments, schemas[call.name]), call
        assert (reply.usage["cached_prompt_tokens"] > 0) == (i > 0)  # later turns reuse the cache
    assert robot.to_pixels([0, 0, 1000, 1000], (320, 240)) == (160, 120)
    assert robot.to_pixels([100, 500, 300, 700], (320, 240)) == (64, 144)
