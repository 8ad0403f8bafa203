"""What GET /openapi.json (and the /docs page drawn from it) says about POST /v1/chat/completions: the request
as the models in protocol.py validate it, the response and stream chunks as protocol.py writes them, and the
error body of errors.py. The route reads its body itself (size limit, JSON depth, OpenAI's error statuses), so
FastAPI cannot derive these; they are added here, and a test checks that the server's answers fit them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import models_json_schema

from .protocol import ChatRequest

REF = "#/components/schemas/{model}"


class _Described(BaseModel):
    model_config = ConfigDict(extra="forbid")  # the test that validates real answers then catches a drift


class Box(_Described):
    """A grounding box (extension): the object's label, x1, y1, x2, y2 in the original image's pixels, the
    model's own 0-1000 grid, and the index of the image it refers to."""
    label: str | None
    box: tuple[float, float, float, float] | None
    grid: tuple[int, int, int, int]
    image: int | None


class CalledFunction(_Described):
    name: str
    arguments: str  # JSON text following the tool's parameters


class ToolCall(_Described):
    id: str
    type: Literal["function"]
    function: CalledFunction


class AssistantMessage(_Described):
    role: Literal["assistant"]
    content: str | None  # null: a reply of tool calls only
    tool_calls: list[ToolCall] | None = None
    boxes: list[Box] | None = None


class PromptTokensDetails(_Described):
    cached_tokens: int


class Usage(_Described):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_prompt_tokens: int | None = None  # prompt tokens a kept session had in its KV cache
    prompt_tokens_details: PromptTokensDetails | None = None


FinishReason = Literal["stop", "length", "tool_calls"]


class Choice(_Described):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None


class ChatCompletion(_Described):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class FunctionDelta(_Described):
    name: str | None = None  # in a call's first delta only
    arguments: str  # a fragment: a call's fragments join to its arguments


class ToolCallDelta(_Described):
    """A streamed call: its first delta has the id, type and name (once: clients join repeated strings), the
    next ones fragments of its arguments."""
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class Delta(_Described):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    boxes: list[Box] | None = None


class ChunkChoice(_Described):
    index: int
    delta: Delta
    finish_reason: FinishReason | None
    logprobs: None


class ChatCompletionChunk(_Described):
    """One server-sent event of a streamed reply (`data: {chunk}`); the stream ends with `data: [DONE]`."""
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ErrorDetail(_Described):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Described):
    error: ErrorDetail


ERRORS = {400: "invalid request: a field's type or range, an unsupported field, JSON that is invalid or nested "
               "too deep, an image the model refuses, a schema or grammar that cannot be enforced", 401: "missing or wrong API key",
          404: "the model is not served here", 413: "the body, an image or its pixels over the server's limits",
          503: "the queue is full, or the server is shutting down"}


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": REF.format(model=model.__name__)}


def chat_route_docs() -> dict[str, Any]:
    """Keyword arguments of the route's decorator: its request body, responses and their descriptions."""
    return {
        "openapi_extra": {"requestBody": {"required": True,
                                          "content": {"application/json": {"schema": _ref(ChatRequest)}}}},
        "responses": {200: {"description": "the reply; with `stream`, server-sent events of chunks",
                            "content": {"application/json": {"schema": _ref(ChatCompletion)},
                                        "text/event-stream": {"schema": _ref(ChatCompletionChunk)}}},
                      **{status: {"description": what, "content": {"application/json": {"schema": _ref(ErrorResponse)}}}
                         for status, what in ERRORS.items()}},
    }


def add_schemas(schema: dict) -> dict:
    """FastAPI's document with the request, response and error models added to its components."""
    _, top = models_json_schema([(ChatRequest, "validation")] + [
        (m, "serialization") for m in (ChatCompletion, ChatCompletionChunk, ErrorResponse)], ref_template=REF)
    schema.setdefault("components", {}).setdefault("schemas", {}).update(top["$defs"])
    return schema
