"""Conversations: validation, the checkpoint's chat template (jinja2 sandbox), vision items in order."""

from __future__ import annotations

import json
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

from jinja2 import ext
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .config import MODEL_TYPE, load_config
from .errors import InputError

VISION_KEYS = {"image": ("image", "image_url"), "video": ("video",)}
CUT = "\x00qwen2vl-edge-cut\x00"  # marks where a continued assistant message is cut
# marks where the rendered text is tokenised apart: between a reply's text and the tool results that continue its
# message (the qwen format), so that a fresh run prefills the ids a session holds (the reply as generated, then
# the results) and no merge crosses from the reply into the results (`}` `\n` against `}\n`)
BOUNDARY = "\x00qwen2vl-edge-boundary\x00"
CONTENT_TYPES = ("text", "image", "image_url", "video")


# the Instruct checkpoints' own templates, for checkpoints that ship none (Qwen2.5-VL's is Qwen2-VL's); Qwen3-VL's
# differs: no default system prompt, tools and tool responses in the Hermes form
BUILTIN_TEMPLATES = {"qwen2_vl": "qwen2_vl_chat_template.jinja", "qwen2_5_vl": "qwen2_vl_chat_template.jinja",
                     "qwen3_vl": "qwen3_vl_chat_template.jinja"}


def builtin_template(model_type: str = MODEL_TYPE) -> str:
    """The Instruct checkpoint's template of a family (config.json's model_type)."""
    text = resources.files(__package__).joinpath(BUILTIN_TEMPLATES[model_type]).read_text()
    return text.rstrip("\n")


def find_template(directory: str | Path, model_type: str | None = None) -> str:
    """The chat template a checkpoint or artifact dir ships, in transformers' lookup order; else the family's
    built-in one (`model_type`, or the family of the directory's config)."""
    d = Path(directory)
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        if (d / name).is_file():
            template = json.loads((d / name).read_text()).get("chat_template")
            if isinstance(template, str):
                return template
    return builtin_template(model_type or load_config(d).model_type)


def _raise(message: str):
    raise TemplateError(message)


def compile_template(source: str):
    """Compile as transformers does: sandboxed, trim_blocks + lstrip_blocks, loopcontrols."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def item_kind(item: dict) -> str:
    """'text', 'image' or 'video' for one content item, in qwen-vl-utils' precedence."""
    if not isinstance(item, dict):
        raise InputError(f"content items must be dicts like {{'type': 'text', 'text': ...}}, got {type(item).__name__}")
    kind = item.get("type")
    if kind is not None and kind not in CONTENT_TYPES:
        raise InputError(f"unknown content type {kind!r}: use one of {', '.join(CONTENT_TYPES)}")
    if "image" in item or "image_url" in item or kind in ("image", "image_url"):
        if not ("image" in item or "image_url" in item):
            raise InputError("an image item needs an 'image' key (path, URL, data URI, PIL.Image or array)")
        return "image"
    if "video" in item or kind == "video":
        if "video" not in item:
            raise InputError("a video item needs a 'video' key (file path or list of frames)")
        return "video"
    if "text" in item:
        return "text"
    raise InputError(f"content item {sorted(item)} has no 'text', 'image' or 'video'")


def image_source(item: dict) -> Any:
    """The image of an image item: 'image', or OpenAI's 'image_url' as a string or {"url": ...}."""
    if "image" in item:
        return item["image"]
    url = item["image_url"]
    if isinstance(url, dict):
        if not isinstance(url.get("url"), str):
            raise InputError("an 'image_url' item must be a string or {'url': '<http(s) URL, data URI or path>'}")
        return url["url"]
    return url


def validate(conversation: Any) -> list[dict]:
    """Check one conversation's shape and field types; returns it unchanged."""
    if not isinstance(conversation, (list, tuple)):
        hint = ": wrap a single message in a list" if isinstance(conversation, dict) else ""
        raise InputError(f"a conversation is a list of {{'role': ..., 'content': ...}} messages, got "
                         f"{type(conversation).__name__}{hint}")
    if len(conversation) == 0:
        raise InputError("empty conversation: pass a list of {'role': ..., 'content': ...} messages")
    for i, message in enumerate(conversation):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise InputError(f"message {i} must be a dict with 'role' and 'content'")
        if not isinstance(message["role"], str) or not message["role"]:
            raise InputError(f"message {i}: role must be a non-empty string such as 'user', got {message['role']!r}")
        content = message["content"]
        if isinstance(content, str):
            continue
        if not isinstance(content, (list, tuple)):
            raise InputError(f"message {i}: content must be a string or a list of items, got {type(content).__name__}")
        for item in content:
            if item_kind(item) == "text" and not isinstance(item["text"], str):
                raise InputError(f"message {i}: a text item's 'text' must be a string, got "
                                 f"{type(item['text']).__name__}")
    return list(conversation)


def vision_items(conversation: list[dict]) -> list[tuple[str, dict]]:
    """('image' | 'video', item) in order of appearance."""
    out = []
    for message in conversation:
        if isinstance(message["content"], str):
            continue
        for item in message["content"]:
            kind = item_kind(item)
            if kind != "text":
                out.append((kind, item))
    return out


def continues(conversation: list[dict]) -> bool:
    """A conversation whose last message is an assistant message with "prefix": True (Mistral's and vLLM's
    convention): the prompt continues that message instead of closing it (the qwen tool format after results)."""
    last = conversation[-1] if conversation else {}
    return last.get("role") == "assistant" and last.get("prefix") is True


def render(template, conversation: list[dict], *, add_generation_prompt: bool = True,
           add_vision_id: bool = False) -> str:
    if continues(conversation):  # rendered closed, with a mark where its content ends, then cut there
        last = conversation[-1]
        items = [{"type": "text", "text": last["content"]}] if isinstance(last["content"], str) else last["content"]
        marked = {**last, "content": [*items, {"type": "text", "text": CUT}], "prefix": False}
        text = render(template, [*conversation[:-1], marked], add_generation_prompt=False, add_vision_id=add_vision_id)
        return text[:text.index(CUT)]
    try:
        return template.render(messages=conversation, add_generation_prompt=add_generation_prompt,
                               add_vision_id=add_vision_id)
    except TemplateError as e:
        raise InputError(f"the chat template refused this conversation: {e}") from None
