"""Tool calls: OpenAI function tools rendered into the prompt, the calls constrained, then parsed from the reply.

A tool format is data plus functions (`ToolFormat`), chosen by name (`FORMATS`):
- "qwen": Qwen2-VL's own, Qwen-Agent's `fncall_prompt_type="qwen"`
  (QwenLM/Qwen-Agent, qwen_agent/llm/fncall_prompts/qwen_fncall_prompt.py): `✿FUNCTION✿: name` /
  `✿ARGS✿: {json}` in the assistant's text; results continue the same assistant message after `✿RESULT✿: `,
  and the reply to them after `✿RETURN✿`.
- "hermes": Qwen-Agent's `nous` prompt (qwen_agent/llm/fncall_prompts/nous_fncall_prompt.py), the form of
  Qwen2.5-VL's and Qwen3's templates: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
  results as a user turn of `<tool_response>` blocks.
The prompts below are written from those files (English variants); the code is ours.

A call is text the model writes, but never free text: `grammar` turns the tools and `tool_choice` into an
llguidance Lark grammar. "auto" leaves the text free until the call marker (a lazy trigger), then the name is
one of the tools' and the arguments follow that tool's `parameters`; "required" and a named function force a
call from the first token.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from . import chat
from .constraints import json_lark
from .errors import InputError

TOOL_CHOICES = ("auto", "none", "required")
RAW = "raw"  # an assistant message's key: its content is the reply's text as generated (a chat session's history)


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # the JSON text as generated (OpenAI's `function.arguments`)

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# -- the caller's tools ------------------------------------------------------------------------

def functions(tools: Any) -> list[dict]:
    """OpenAI tools ([{"type": "function", "function": {"name", "description", "parameters"}}], or the bare
    function dicts) -> [{"name", "description", "parameters"}], checked."""
    if not isinstance(tools, (list, tuple)) or not tools:
        raise InputError("tools must be a non-empty list of {'type': 'function', 'function': {'name': ..., "
                         "'description': ..., 'parameters': {JSON schema}}}")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or (isinstance(tool, dict) and tool.get("type", "function") != "function"):
            raise InputError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., ...}}}}")
        name, params = fn.get("name"), fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(name, str) or not name or any(c in name for c in "\n\"✿<>"):
            raise InputError(f"tools[{i}]: a function needs a 'name' without quotes, markup or newlines, "
                             f"got {name!r}")
        if not isinstance(params, dict):
            raise InputError(f"tools[{i}] ({name}): 'parameters' must be a JSON schema object")
        out.append({"name": name, "description": str(fn.get("description", "")), "parameters": params})
    names = [f["name"] for f in out]
    if len(set(names)) != len(names):
        raise InputError(f"tools have repeated names: {names}")
    return out


def chosen(tool_choice: Any, names: list[str]) -> str:
    """tool_choice -> "auto" | "none" | "required", or the one function's name."""
    if tool_choice is None:
        return "auto"
    if isinstance(tool_choice, str) and tool_choice in TOOL_CHOICES:
        return tool_choice
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(fn, dict) or tool_choice.get("type") != "function" or fn.get("name") not in names:
        raise InputError(f"tool_choice must be 'auto', 'none', 'required' or {{'type': 'function', 'function': "
                         f"{{'name': <one of {names}>}}}}, got {tool_choice!r}")
    return fn["name"]


# -- formats -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ToolFormat:
    name: str
    marker: str  # opens a call; the lazy trigger
    separator: str  # between parallel calls
    results_continue: bool  # tool results continue the assistant message (no generation prompt after them)
    system: Callable[[list[dict], bool], str]  # (functions, parallel) -> the tools' system prompt
    call: Callable[[str, str], str]  # (name, arguments) -> the call's text, marker included
    body: Callable[[dict], str]  # function -> Lark for one call after the marker: its name and arguments
    results: Callable[[list[dict], list[dict]], None]  # (messages so far, tool messages) -> appended in place
    parse_call: Callable[[str], tuple[str, str] | None]  # text after a marker -> (name, arguments) or None
    lead: str = ""  # what a reply continuing after results starts with (Qwen-Agent strips it; so do we)
    trim: str = ""  # dropped from the end of a prompt that continues after results


def _lark(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _content_items(content: Any) -> list[dict]:
    if content is None:
        return []
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


# qwen: qwen_fncall_prompt.py's FN_* markers, FN_CALL_TEMPLATE (en, en_parallel), get_function_description
QWEN_NAME, QWEN_ARGS, QWEN_RESULT, QWEN_RETURN = "✿FUNCTION✿", "✿ARGS✿", "✿RESULT✿", "✿RETURN✿"


def _qwen_system(fns: list[dict], parallel: bool) -> str:
    descs = "\n\n".join(
        f"### {f['name']}\n\n{f['name']}: {f['description']} Parameters: "
        f"{json.dumps(f['parameters'], ensure_ascii=False)} Format the arguments as a JSON object.".rstrip()
        for f in fns)
    names = ",".join(f["name"] for f in fns)
    head = f"# Tools\n\n## You have access to the following tools:\n\n{descs}\n\n"
    if parallel:
        return head + (
            "## Insert the following command in your reply when you need to call N tools in parallel:\n\n"
            f"{QWEN_NAME}: The name of tool 1, should be one of [{names}]\n{QWEN_ARGS}: The input of tool 1\n"
            f"{QWEN_NAME}: The name of tool 2\n{QWEN_ARGS}: The input of tool 2\n...\n"
            f"{QWEN_NAME}: The name of tool N\n{QWEN_ARGS}: The input of tool N\n"
            f"{QWEN_RESULT}: The result of tool 1\n{QWEN_RESULT}: The result of tool 2\n...\n"
            f"{QWEN_RESULT}: The result of tool N\n{QWEN_RETURN}: Reply based on tool results. "
            "Images need to be rendered as ![](url)")
    return head + (
        "## When you need to call a tool, please insert the following command in your reply, which can be called "
        f"zero or multiple times according to your needs:\n\n{QWEN_NAME}: The tool to use, should be one of "
        f"[{names}]\n{QWEN_ARGS}: The input of the tool\n{QWEN_RESULT}: Tool results\n{QWEN_RETURN}: Reply based "
        "on tool results. Images need to be rendered as ![](url)")


def _qwen_call(name: str, arguments: str) -> str:
    return f"{QWEN_NAME}: {name}\n{QWEN_ARGS}: {arguments}"


def _qwen_body(fn: dict) -> str:
    head = f": {fn['name']}\n{QWEN_ARGS}: "
    return f"{_lark(head)} {json_lark(fn['parameters'])}"


def _qwen_results(messages: list[dict], results: list[dict]) -> None:
    """Each result goes into the assistant message that called: `\\n✿RESULT✿: <content>\\n✿RETURN✿: ` (the
    reference drops the previous `\\n✿RETURN✿: ` before the next result; the images of a result stay in it)."""
    if not messages or messages[-1]["role"] != "assistant":
        raise InputError("a tool message must follow the assistant message whose tool_calls it answers")
    items = _content_items(messages[-1]["content"])
    exit_ = f"\n{QWEN_RETURN}: "
    for result in results:
        if items and items[-1].get("type") == "text" and items[-1]["text"].endswith(exit_):
            items[-1] = {"type": "text", "text": items[-1]["text"][:-len(exit_)]}
        items += [{"type": "text", "text": f"\n{QWEN_RESULT}: "}, *(_content_items(result["content"]) or
                  [{"type": "text", "text": ""}]), {"type": "text", "text": exit_}]
    messages[-1] = {**messages[-1], "content": items}


def _qwen_parse_call(text: str) -> tuple[str, str] | None:
    head, sep, arguments = text.partition(f"\n{QWEN_ARGS}: ")
    if not head.startswith(": ") or not sep:
        return None
    return head[2:], arguments


# hermes: nous_fncall_prompt.py's FN_CALL_TEMPLATE, and its <tool_call> / <tool_response> rendering
HERMES_CALL, HERMES_CALL_END = "<tool_call>", "</tool_call>"


def _hermes_system(fns: list[dict], parallel: bool) -> str:
    descs = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in fns)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{descs}\n</tools>"
            "\n\nFor each function call, return a json object with function name and arguments within "
            f"{HERMES_CALL}{HERMES_CALL_END} XML tags:\n{HERMES_CALL}\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n' + HERMES_CALL_END)


def _hermes_call(name: str, arguments: str) -> str:
    # the arguments as written, not re-dumped: a session's history then renders to the ids generated
    return f'{HERMES_CALL}\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {arguments}}}\n' \
           f"{HERMES_CALL_END}"


def _hermes_body(fn: dict) -> str:
    head = '\n{"name": ' + json.dumps(fn["name"], ensure_ascii=False) + ', "arguments": '
    tail = "}\n" + HERMES_CALL_END
    return f"{_lark(head)} {json_lark(fn['parameters'])} {_lark(tail)}"


def _hermes_results(messages: list[dict], results: list[dict]) -> None:
    """Results are a user message of `<tool_response>\\n...\\n</tool_response>` blocks, one per result."""
    items: list[dict] = []
    for result in results:
        if items:
            items.append({"type": "text", "text": "\n"})
        items += [{"type": "text", "text": "<tool_response>\n"}, *_content_items(result["content"]),
                  {"type": "text", "text": "\n</tool_response>"}]
    messages.append({"role": "user", "content": items})


def _hermes_parse_call(text: str) -> tuple[str, str] | None:
    body = text.strip()
    if body.endswith(HERMES_CALL_END):
        body = body[:-len(HERMES_CALL_END)].strip()
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or "arguments" not in call:
        return None
    start = body.find('"arguments": ')  # the arguments' text as generated
    arguments = body[start + len('"arguments": '):-1] if start >= 0 else json.dumps(call["arguments"])
    return call["name"], arguments


FORMATS = {
    "qwen": ToolFormat("qwen", QWEN_NAME, "\n", True, _qwen_system, _qwen_call, _qwen_body, _qwen_results,
                       _qwen_parse_call, lead=": ", trim=": "),
    "hermes": ToolFormat("hermes", HERMES_CALL, "\n", False, _hermes_system, _hermes_call, _hermes_body,
                         _hermes_results, _hermes_parse_call),
}


def tool_format(name: str, error: type[Exception] = InputError) -> ToolFormat:
    if name not in FORMATS:
        raise error(f"unknown tool_format {name!r}: use one of {', '.join(FORMATS)}")
    return FORMATS[name]


@dataclass(frozen=True)
class ReplyPlan:
    """One row's reply: its constraint, how a stream shows it, and how it is read at the end."""

    fmt: ToolFormat
    grammar: str | None = None  # llguidance grammar text; None: free text
    calls: bool = False  # tool calls are parsed from the reply (tools given, tool_choice not "none")
    continued: bool = False  # the reply continues an assistant message (qwen, after tool results)

    @property
    def markers(self) -> tuple[str, ...]:
        """Ends of text a stream holds back: they may begin a call's markup."""
        return (f"\n{self.fmt.marker}", self.fmt.marker) if self.calls else ()

    def _unlead(self, text: str) -> str:
        lead = self.fmt.lead if self.continued else ""
        if lead and lead.startswith(text):
            return ""
        return text[len(lead):] if lead and text.startswith(lead) else text

    def visible(self, text: str) -> str:
        """What a stream may show of the reply so far: never a call's markup (cut at the first marker)."""
        text = self._unlead(text)
        if self.calls and self.fmt.marker in text:
            text = text[:text.index(self.fmt.marker)]
            text = text[:-1] if text.endswith("\n") else text
        return text

    def finish(self, text: str, reason: str) -> tuple[str, list[tuple[str, str]], str]:
        """The final reply -> (text, [(name, arguments)], finish_reason). A call cut off (by max_new_tokens) is
        not a call: its markup is dropped and the reason stays."""
        if not self.calls:
            return self._unlead(text), [], reason
        content, calls = parse(self.fmt, self._unlead(text))
        if calls and reason == "stop":
            return content, calls, "tool_calls"
        return self.visible(text), [], reason


# -- conversations -----------------------------------------------------------------------------

def _text(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(item.get("text", "") for item in content if isinstance(item, dict))


def call_fields(call: Any, i: int) -> tuple[str, str]:
    """One OpenAI tool call ({"id", "type": "function", "function": {"name", "arguments"}}) -> (name, the
    arguments' JSON text); arguments given as a dict are dumped as the templates dump JSON."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InputError(f"tool_calls[{i}] must be {{'id': ..., 'type': 'function', 'function': {{'name': ..., "
                         "'arguments': '<JSON text>'}}}}")
    arguments = fn.get("arguments", "{}")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return fn["name"], arguments


def assistant_text(fmt: ToolFormat, content: Any, calls: list) -> str:
    """An assistant turn with tool calls as the format writes it: its text, a newline, then the calls."""
    text = fmt.separator.join(fmt.call(*call_fields(c, i)) for i, c in enumerate(calls))
    before = _text(content)
    return f"{before}\n{text}" if before and text else before or text


def prepare(conversation: list[dict], fmt: ToolFormat, fns: list[dict] | None, choice: str | None,
            parallel: bool) -> tuple[list[dict], bool]:
    """A conversation with tools, assistant `tool_calls` and `tool` messages -> the plain messages the chat
    template renders, and whether the prompt continues the last assistant message (qwen, after results)."""
    if not isinstance(conversation, (list, tuple)):
        return conversation, False  # chat.validate refuses it with the fix named
    out: list[dict] = []
    results: list[dict] = []
    for i, message in enumerate(conversation):
        role = message.get("role") if isinstance(message, dict) else None
        if role == "tool":
            if "content" not in message:
                raise InputError(f"message {i}: a tool message needs 'content' (the result: text or items)")
            results.append(message)
            continue
        answered = bool(results)
        if results:
            _results(out, results, fmt)
            results = []
        if role != "assistant":
            out.append(message)
            continue
        text = assistant_text(fmt, message.get("content"), message.get("tool_calls") or [])
        if answered and fmt.results_continue:  # the reply to results continues the message that called
            if not message.get(RAW):  # as generated: the lead, and Qwen-Agent's newline before a lone call
                text = fmt.lead + (text if _text(message.get("content")) else "\n" + text)
            _continue(out[-1], text, fmt.trim)
            if message.get("prefix"):  # the merged message is the one left open
                out[-1] = {**out[-1], "prefix": True}
        elif message.get("tool_calls"):
            out.append({"role": "assistant", "content": text})
        else:
            out.append(message)
    if results:
        _results(out, results, fmt)
    continued = bool(results) and fmt.results_continue
    if continued:  # the reply is generated after the results: tokenised apart from them
        items = out[-1]["content"]
        if fmt.trim:
            items[-1] = {"type": "text", "text": items[-1]["text"][:-len(fmt.trim)]}
        out[-1] = {**out[-1], "content": [*items, _BOUNDARY], "prefix": True}
    if fns and choice != "none":
        out = _with_system(out, fmt.system(fns, parallel))
    return out, continued


_BOUNDARY = {"type": "text", "text": chat.BOUNDARY}


def _results(out: list[dict], results: list[dict], fmt: ToolFormat) -> None:
    """Tool messages after the reply that called; results that continue its message are tokenised apart from
    its text, as a session holds them after the reply's ids."""
    if fmt.results_continue and out and out[-1]["role"] == "assistant":
        out[-1] = {**out[-1], "content": [*_content_items(out[-1]["content"]), _BOUNDARY]}
    fmt.results(out, results)


def _continue(message: dict, text: str, trim: str) -> None:
    """Append a reply (its text as generated: it brings its own start) to the assistant message it continues,
    tokenised apart from the results before it; the `trim` the prompt dropped from the message's end goes
    first."""
    items = message["content"]
    if trim and items[-1]["text"].endswith(trim):
        items[-1] = {"type": "text", "text": items[-1]["text"][:-len(trim)]}
    items += [_BOUNDARY, {"type": "text", "text": text}]


def _with_system(messages: list[dict], tools_text: str) -> list[dict]:
    """The tools' prompt after the system message's text (Qwen-Agent: "\n\n" between), or as one."""
    if messages and messages[0].get("role") == "system":
        first = messages[0]
        content = (first["content"] + "\n\n" + tools_text if isinstance(first["content"], str) else
                   [*first["content"], {"type": "text", "text": "\n\n" + tools_text}])
        return [{**first, "content": content}, *messages[1:]]
    return [{"role": "system", "content": tools_text}, *messages]


def grammar(fmt: ToolFormat, fns: list[dict], choice: str, parallel: bool, continued: bool = False) -> str:
    """The Lark grammar of a reply under `choice` ("auto", "required" or a function's name)."""
    pool = [f for f in fns if choice in ("auto", "required") or f["name"] == choice]
    more = f" ({_lark(fmt.separator + fmt.marker)} call)*" if parallel else ""
    rules = ["%llguidance {}", f"calls: call{more}", "call: " + " | ".join(fmt.body(f) for f in pool)]
    if choice == "auto":  # free text; the marker switches the grammar on (a lazy lexeme ends at it)
        rules += ["start: TEXT | trig calls", f"trig[lazy]: TEXT {_lark(fmt.marker)}", "TEXT: /(.|\\n)*/"]
    else:
        lead = fmt.lead + "\n" if continued and fmt.lead else ""
        rules.append(f"start: {_lark(lead + fmt.marker)} calls")
    return "\n".join(rules) + "\n"


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return False
    return True


def parse(fmt: ToolFormat, text: str, continued: bool = False) -> tuple[str, list[tuple[str, str]]]:
    """A reply -> (its text before the calls, [(name, arguments)]). Only the calls the grammar let through
    are expected here; a marker followed by something else stays text."""
    if continued and fmt.lead and text.startswith(fmt.lead):
        text = text[len(fmt.lead):]
    at = text.find(fmt.marker)
    if at < 0:
        return text, []
    calls = []
    for part in text[at + len(fmt.marker):].split(fmt.marker):
        call = fmt.parse_call(part[:-len(fmt.separator)] if part.endswith(fmt.separator) else part)
        if call is None or not _is_json(call[1]):  # e.g. cut by a stop string
            return text, []
        calls.append(call)
    content = text[:at]
    return (content[:-1] if content.endswith("\n") else content), calls
