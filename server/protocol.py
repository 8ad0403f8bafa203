"""OpenAI Chat Completions on the wire <-> the runtime's conversations, options and results.

Request bodies are validated by pydantic models (type and range errors -> 400 `invalid_request_error`, named by
their JSON path); what the runtime needs is built from them as plain data: a conversation of text / image /
video items (assistant `tool_calls` and `tool` messages in OpenAI's shape), and `GenerationOptions`, whose agent
fields (response_format, tools, tool_choice, parallel_tool_calls; the regex and grammar extensions) are the
request's own, one to one. A field the models do not declare is refused by name, never ignored: the server
takes what these models declare (GET /openapi.json shows them), and supporting a field is declaring it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from qwen2vl_edge.runtime.errors import InputError
from qwen2vl_edge.runtime.generation import GenerationOptions, sampling_options, stop_strings

from . import media
from .errors import APIError, bad_request
from .settings import Limits


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an OpenAI field we do not implement is refused, never ignored

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        """A field sent as null asks for nothing, as in OpenAI's API (clients echo `"tool_calls": null` back)."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k in cls.model_fields}
        return data


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImageURL(_Model):
    url: str
    detail: str | None = None  # OpenAI's low/high/auto: the resolution is the model's own choice here


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoPart(_Model):
    """Extension: `{"type": "video", "video": [frame URL, ...], "fps": 2.0}` (frames as image URLs), or
    `"video": "path/clip.mp4"` for a file under --allowed-media-dir."""
    type: Literal["video"]
    video: Union[list[str], str]
    fps: float | None = Field(None, gt=0)


Part = Annotated[Union[TextPart, ImagePart, VideoPart], Field(discriminator="type")]


class FunctionCall(_Model):
    name: str
    arguments: str  # JSON text, as the reply gave it
    parsed_arguments: Any = None  # the openai client's parsed copy (.parse(), .stream()), echoed back: unused


class ToolCall(_Model):
    """A call an assistant message made (the client sends back the reply's `tool_calls`)."""
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall
    index: int | None = None  # a streamed call's, as the openai client's joined message keeps it: unused


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[Part], None] = None
    tool_calls: list[ToolCall] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages: the call they answer
    boxes: list[dict] | None = None  # our replies' grounding boxes, when a client sends a reply back as history
    parsed: Any = None  # the openai client's parsed copy of a .parse() reply, sent back with it: unused


class FunctionDefinition(_Model):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; every one is enforced, strict or not
    strict: bool | None = None


class Tool(_Model):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Model):
    name: str


class NamedToolChoice(_Model):
    type: Literal["function"]
    function: NamedFunction


class TextFormat(_Model):
    type: Literal["text"]


class JSONObjectFormat(_Model):
    type: Literal["json_object"]


class JSONSchema(_Model):
    model_config = ConfigDict(populate_by_name=True)
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # `schema` is a BaseModel attribute
    strict: bool | None = None


class JSONSchemaFormat(_Model):
    type: Literal["json_schema"]
    json_schema: JSONSchema


ResponseFormat = Annotated[Union[TextFormat, JSONObjectFormat, JSONSchemaFormat], Field(discriminator="type")]


class StreamOptions(_Model):
    include_usage: bool = False


class ChatRequest(_Model):
    """OpenAI's Chat Completions request, as far as this server implements it."""
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request: batch by sending requests concurrently
    presence_penalty: float = Field(0, ge=0, le=0)
    frequency_penalty: float = Field(0, ge=0, le=0)
    logprobs: Literal[False] = False  # not computed
    user: str | None = None  # OpenAI's end-user id, for the caller's own records: nothing to do with it here
    metadata: dict[str, str] | None = None  # likewise
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool | None = None
    regex: str | None = None  # extension: the reply matches this regular expression (llguidance's syntax)
    grammar: str | None = None  # extension: a Lark grammar, as llguidance reads it

    def agent_options(self) -> dict:
        """The agent fields as the runtime takes them (GenerationOptions), plain data."""
        dump = lambda model: model.model_dump(by_alias=True, exclude_none=True)  # noqa: E731
        return {"response_format": dump(self.response_format) if self.response_format else None,
                "regex": self.regex, "grammar": self.grammar,
                "tools": [dump(t) for t in self.tools] if self.tools is not None else None,
                "tool_choice": self.tool_choice if isinstance(self.tool_choice, (str, type(None)))
                else dump(self.tool_choice),
                "parallel_tool_calls": self.parallel_tool_calls is not False}


def constraint_param(req: ChatRequest) -> str | None:
    """The request's field that constrains its reply (for an error to name)."""
    return next((name for name in ("response_format", "regex", "grammar", "tools") if getattr(req, name)), None)


def max_new_tokens(req: ChatRequest, limits: Limits, context: int) -> int:
    n = req.max_completion_tokens or req.max_tokens or limits.default_max_tokens
    if n >= context:
        raise bad_request(f"max_tokens ({n}) must be below the model's context of {context} tokens",
                          "max_tokens", "context_length_exceeded")
    return n


def generation_options(req: ChatRequest, limits: Limits, context: int,
                       checkpoint: dict | None = None) -> GenerationOptions:
    """As pipe.generate reads its arguments: temperature 0 -> greedy; temperature > 0 or top_p -> sampling;
    neither -> the checkpoint's generation_config.json decides (`checkpoint`: pipe.sampling_defaults), and so
    does every sampling field the request leaves out, then transformers' defaults. A seed applies when
    sampling."""
    greedy = req.temperature == 0
    sample = not greedy and (req.temperature is not None or req.top_p is not None)
    requested = {"do_sample": False if greedy else (True if sample else None),
                 "temperature": None if greedy else req.temperature, "top_p": None if greedy else req.top_p}
    sampling = sampling_options(requested, checkpoint or {})
    opts = GenerationOptions(max_new_tokens=max_new_tokens(req, limits, context), sampling=sampling,
                             seed=req.seed if sampling.do_sample else None, stop=stop_strings(req.stop),
                             **req.agent_options())
    try:
        opts.validate()  # the runtime's checks (stop strings, tools and tool_choice; ranges pydantic checked)
    except InputError as e:
        raise bad_request(str(e)) from None
    return opts


def _content(message: Message, index: int, limits: Limits, allowed_dir: Path | None) -> str | list[dict]:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    items = []
    for j, part in enumerate(message.content):
        param = f"messages[{index}].content[{j}]"
        if isinstance(part, TextPart):
            items.append({"type": "text", "text": part.text})
        elif message.role != "user":
            raise bad_request(f"only user messages may carry images or video ({message.role} does)", param)
        elif isinstance(part, ImagePart):
            items.append({"type": "image", "image": media.load_image(part.image_url.url, limits, allowed_dir, param)})
        else:
            video = media.load_video(part.video, limits, allowed_dir, param)
            items.append({"type": "video", "video": video, **({"fps": part.fps} if part.fps else {})})
    return items


def _message(message: Message, index: int, limits: Limits, allowed_dir: Path | None) -> dict:
    role = {"developer": "system"}.get(message.role, message.role)  # OpenAI's newer name for the system role
    out = {"role": role, "content": _content(message, index, limits, allowed_dir)}
    if message.tool_calls is not None:
        if role != "assistant":
            raise bad_request(f"only assistant messages carry tool_calls ({role} does)",
                              f"messages[{index}].tool_calls")
        out["tool_calls"] = [call.model_dump(include={"id": True, "type": True, "function": {"name", "arguments"}})
                             for call in message.tool_calls]
    if role == "tool":
        if message.tool_call_id is None:
            raise bad_request("a tool message needs the tool_call_id of the call it answers",
                              f"messages[{index}].tool_call_id")
        out["tool_call_id"] = message.tool_call_id
    return out


def conversation(req: ChatRequest, limits: Limits, allowed_dir: Path | None) -> list[dict]:
    """Messages -> the runtime's conversation, with every image fetched and decoded (blocking: run it in a thread)."""
    return [_message(m, i, limits, allowed_dir) for i, m in enumerate(req.messages)]


# -- responses ---------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def usage(result) -> dict:
    """OpenAI's usage; every further key the runtime reports is passed on, and `cached_prompt_tokens`
    (KV-cache reuse) is also given as OpenAI's `prompt_tokens_details.cached_tokens`."""
    u = dict(result.usage)
    u["total_tokens"] = u["prompt_tokens"] + u["completion_tokens"]
    if "cached_prompt_tokens" in u:
        u["prompt_tokens_details"] = {"cached_tokens": u["cached_prompt_tokens"]}
    return u


def assistant_message(result) -> dict:
    """The reply as OpenAI's message; with tool calls and no text before them, `content` is null."""
    calls = [call.to_openai() for call in getattr(result, "tool_calls", ())]
    message = {"role": "assistant", "content": result.text or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    boxes = getattr(result, "boxes", None)  # grounding boxes, where the runtime finds them (extension)
    if boxes:
        message["boxes"] = _plain(boxes)
    return message


def completion(request_id: str, model: str, result) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": assistant_message(result), "finish_reason": result.finish_reason,
                         "logprobs": None}],
            "usage": usage(result)}


def chunk(request_id: str, model: str, delta: dict, finish_reason: str | None = None,
          usage_: dict | None = None) -> dict:
    choices = [] if usage_ is not None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                              "logprobs": None}]
    body = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


BRANCH_LABELS = {"str", "none", "int", "float", "bool"}  # pydantic's names for the arms of a union


def _json_path(loc: tuple) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part != "body" and "[" not in part and part not in BRANCH_LABELS:
            path += f".{part}" if path else part
    return path


def validation_error(errors: list[dict]) -> APIError:
    """pydantic's most specific error (the deepest, in a union: the arm the value came closest to), named by
    its JSON path, as a 400 `invalid_request_error` (OpenAI's and vLLM's status). A field no model declares is
    an `unsupported_parameter`, as OpenAI names a parameter a model does not take."""
    worst = max(errors, key=lambda e: len(e.get("loc", ())))
    path = _json_path(worst.get("loc", ()))
    if worst.get("type") == "extra_forbidden":
        return bad_request(f"{path} is not supported by this server: remove it (GET /openapi.json lists the "
                           "fields it takes)", path, "unsupported_parameter")
    return bad_request(f"{path}: {worst.get('msg')}" if path else str(worst.get("msg")), path or None,
                       "invalid_value")
