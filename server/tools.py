"""A streamed reply's tool calls as OpenAI's `tool_calls` deltas, read from the text as it is generated.

The runtime gives the calls with the final result; a stream shows them as they come: each call's `id`,
`type` and `function.name` once, in its first delta, then `function.arguments` fragments. (The official client
concatenates every string it receives for a call, so anything sent twice would come out doubled.)

The calls are read in the pipeline's tool format: `ToolFormat.call` written with stand-ins gives the text
around a call's name and its arguments (qwen: `✿FUNCTION✿: ` name `\\n✿ARGS✿: ` arguments; hermes:
`<tool_call>\\n{"name": "` name `", "arguments": ` arguments `}\\n</tool_call>`). The grammar lets only
well-formed calls through, and JSON as generated holds no newline, so a call's arguments end where its tail
and the next call's head begin; an end that may still become them is held back until it is known.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qwen2vl_edge.runtime.detokenize import held_back
from qwen2vl_edge.runtime.tools import ToolCall, ToolFormat, new_call_id

NAME, ARGUMENTS = "\u241fname\u241f", "\u241farguments\u241f"  # stand-ins that JSON text keeps as they are


@dataclass(frozen=True)
class CallShape:
    head: str  # before a call's name, the format's marker first
    middle: str  # between the name and the arguments
    tail: str  # after the arguments
    separator: str  # between parallel calls

    @classmethod
    def of(cls, fmt: ToolFormat) -> "CallShape":
        head, rest = fmt.call(NAME, ARGUMENTS).split(NAME)
        middle, tail = rest.split(ARGUMENTS)
        return cls(head, middle, tail, fmt.separator)

    def read(self, calls_text: str) -> list[tuple[str, str]]:
        """The reply's text from its first call -> [(name, the arguments known so far)]: a call counts once its
        name is complete; its arguments stop short of anything that may be its tail."""
        between = self.tail + self.separator + self.head  # ends a call that another follows
        calls, at = [], 0
        while calls_text.startswith(self.head, at):
            name_end = calls_text.find(self.middle, at + len(self.head))
            if name_end < 0:
                break
            name, start = calls_text[at + len(self.head):name_end], name_end + len(self.middle)
            end = calls_text.find(between, start)
            if end < 0:  # the last call so far
                arguments = calls_text[start:]
                calls.append((name, arguments[:len(arguments) - held_back(arguments, (between,))]))
                break
            calls.append((name, calls_text[start:end]))
            at = end + len(self.tail) + len(self.separator)
        return calls


@dataclass
class CallStream:
    """One streamed reply's calls: what has been sent of each, and the deltas that send the rest."""

    fmt: ToolFormat
    sent: list[str] = field(default_factory=list)  # per call announced: the arguments sent so far

    def __post_init__(self):
        self.shape = CallShape.of(self.fmt)  # read at every token: split out of the format once

    def update(self, text: str) -> list[dict]:
        """The reply's text so far (as generated) -> the deltas it adds."""
        at = text.find(self.fmt.marker)
        return [] if at < 0 else self._deltas(self.shape.read(text[at:]))

    def finish(self, calls: list[ToolCall]) -> list[dict]:
        """The final result's calls -> the deltas still to send (the held-back ends of the arguments)."""
        return self._deltas([(call.name, call.arguments) for call in calls])

    def _deltas(self, calls: list[tuple[str, str]]) -> list[dict]:
        deltas = []
        for index, (name, arguments) in enumerate(calls):
            if index == len(self.sent):
                self.sent.append("")
                deltas.append({"index": index, "id": new_call_id(), "type": "function",
                               "function": {"name": name, "arguments": ""}})
            piece = arguments[len(self.sent[index]):]  # the text only grows: what was sent is its start
            if piece:
                self.sent[index] = arguments
                deltas.append({"index": index, "function": {"arguments": piece}})
        return deltas
