"""Constrained decoding with llguidance: a grammar per row narrows the token choice (a sampling step).

The caller's constraint (a JSON schema, OpenAI's `response_format`, a regular expression, a Lark grammar, or a
tool-call grammar from runtime/tools.py) becomes llguidance grammar text; `Grammars` (one per pipeline) turns
that text into a matcher per row. llguidance is optional (the `agents` extra): it is imported only when a
constraint is asked for, so the base runtime imports and runs without it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConfigError, InputError

EXTRA = "agents"
# JSON as the chat templates and Qwen-Agent write it (json.dumps: ", " and ": ") and no free whitespace: a small
# model given unbounded whitespace pads until max_new_tokens.
JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
ANY_JSON_OBJECT = {"type": "object"}
RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def llguidance():
    """The llguidance module, or a ConfigError naming the extra that installs it."""
    try:
        import llguidance as llg
        import llguidance.numpy  # noqa: F401 - the bitmask helpers
    except ImportError:
        raise ConfigError(f"constrained decoding (response_format, regex, grammar, tools) needs llguidance: "
                          f"pip install 'llguidance>=1.9' (the [{EXTRA}] extra)") from None
    return llg


def json_schema_grammar(schema: Any) -> str:
    """A JSON schema (dict or JSON text) -> llguidance grammar text, with the template's separators."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise InputError(f"the JSON schema is not valid JSON ({e})") from None
    if not isinstance(schema, dict):
        raise InputError(f"a JSON schema must be an object, got {type(schema).__name__}")
    return llguidance().LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)


def json_lark(schema: dict) -> str:
    """A schema as an inline Lark `%json` body, with the template's separators (runtime/tools.py embeds it)."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS})


def response_format_grammar(response_format: Any) -> str | None:
    """OpenAI's response_format -> grammar text; None for {"type": "text"}."""
    if not isinstance(response_format, dict) or response_format.get("type") not in RESPONSE_FORMATS:
        raise InputError(f"response_format must be {{'type': 'text' | 'json_object' | 'json_schema', ...}}, got "
                         f"{response_format!r}")
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_grammar(ANY_JSON_OBJECT)
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise InputError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}, "
                         f"'strict': ...}}, got {spec!r}")
    # every schema is enforced, strict or not: the model's reply follows it or generation fails loudly
    return json_schema_grammar(spec.get("schema", ANY_JSON_OBJECT))


def grammar_text(response_format: Any = None, regex: str | None = None, grammar: str | None = None) -> str | None:
    """The one constraint a call asks for as llguidance grammar text, or None."""
    given = [name for name, v in (("response_format", response_format), ("regex", regex), ("grammar", grammar))
             if v is not None]
    if len(given) > 1:
        raise InputError(f"give one of response_format, regex and grammar, not {' and '.join(given)}")
    if regex is not None:
        if not isinstance(regex, str) or not regex:
            raise InputError(f"regex must be a non-empty string, got {regex!r}")
        return llguidance().LLMatcher.grammar_from_regex(regex)
    if grammar is not None:
        if not isinstance(grammar, str) or not grammar.strip():
            raise InputError(f"grammar must be a Lark grammar (text with a 'start:' rule), got {grammar!r}")
        return llguidance().LLMatcher.grammar_from_lark(grammar)
    return None if response_format is None else response_format_grammar(response_format)


class Grammars:
    """One pipeline's llguidance state: the tokenizer (built on first use, ~1.3-2.2 s at the Qwen vocabulary;
    llguidance cannot serialize it, so it is not kept on disk) and the grammars compiled so far, by text."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids: list[int]):
        self._tokenizer_json, self.vocab_size, self.eos_ids = tokenizer_json, vocab_size, list(eos_ids)
        self._tokenizer = None
        self._compiled: dict[str, Any] = {}  # grammar text -> a matcher at its start, copied per row

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = llguidance().LLTokenizer(self._tokenizer_json, n_vocab=self.vocab_size,
                                                       eos_token=self.eos_ids)
        return self._tokenizer

    def matcher(self, grammar: str) -> "Matcher":
        """A fresh matcher at the start of `grammar`; a grammar that does not compile is an InputError naming
        llguidance's reason."""
        start = self._compiled.get(grammar)
        if start is None:
            start = llguidance().LLMatcher(self.tokenizer, grammar, log_level=0)
            if start.is_error():
                raise InputError(f"the constraint cannot be enforced: {start.get_error()}")
            self._compiled[grammar] = start
        return Matcher(start.deep_copy(), self.vocab_size)


@dataclass
class Matcher:
    """One row's grammar state over plain arrays: which tokens may come next, and the tokens taken so far."""

    state: Any  # llguidance.LLMatcher
    vocab_size: int

    def allows(self, token: int) -> bool:
        """Whether `token` may come next (checked without taking it)."""
        return self.state.validate_tokens([int(token)]) == 1

    def allowed_ids(self) -> np.ndarray:
        """The token ids that may come next, ascending [n]."""
        words = np.empty((1, (self.vocab_size + 31) // 32), np.int32)  # one bit per token
        llguidance().numpy.fill_next_token_bitmask(self.state, words, 0)
        return np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little")[:self.vocab_size])

    def take(self, token: int) -> None:
        if not self.state.consume_token(int(token)):
            # choose() only picks allowed tokens: reaching this is a bug of ours, not the caller's input
            raise RuntimeError(f"token {token} broke the constraint: {self.state.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete and nothing may follow: the row ends as at an end-of-sequence token."""
        return self.state.is_stopped()
