"""Incremental detokenisation, stop strings and stream() against generate(), on the real Qwen vocabulary."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer

from conftest import requires_torch
from qwen2vl_edge.runtime import generation
from qwen2vl_edge.runtime.detokenize import IncrementalText, held_back

pytestmark = requires_torch
TEXT = "Grüße aus 東京 🚀🚀 — naïve café, 12345 ¥€ done."


@pytest.fixture(scope="module")
def tokenizer(tiny_ckpt) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))


def test_incremental_text_equals_the_full_decode_with_short_windows(tokenizer):
    ids = tokenizer.encode(TEXT * 20).ids
    windows = []

    def decode(window):
        windows.append(len(window))
        return tokenizer.decode(window)

    inc = IncrementalText(decode)
    pieces = [inc.push(t) for t in ids]
    assert "".join(pieces) == inc.text == tokenizer.decode(ids) == TEXT * 20
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # some tokens end inside a character and wait for the next one
    assert max(windows) <= 8 < len(ids)  # never the whole reply


def test_held_back():
    assert held_back("hello wor", ("world",)) == 3
    assert held_back("hello w", ("xx", "w!")) == 1
    assert held_back("hello", ("world",)) == 0
    assert held_back("", ("ab",)) == 0


def _scripted(monkeypatch, tokens):
    """The sampler replaced by a fixed token sequence: the test is about what stream() does with them."""
    script = iter(tokens)
    monkeypatch.setattr(generation, "choose", lambda logits, *a, **k: np.full(len(logits), next(script), np.int64))


HI = [{"role": "user", "content": "Hi"}]


def test_stream_keeps_the_incomplete_tail(pipe, tokenizer, monkeypatch):
    # "京" is E4 BA AC in UTF-8; byte-level BPE spells byte E4 as "ä": the reply ends inside a character
    script = tokenizer.encode("ok 東").ids + [tokenizer.token_to_id("ä")]
    _scripted(monkeypatch, script)
    pieces = list(pipe.stream(HI, max_new_tokens=len(script)))
    _scripted(monkeypatch, script)
    whole = pipe.generate(HI, max_new_tokens=len(script))
    assert whole.text.endswith("\ufffd") and whole.text.startswith("ok 東")
    assert "".join(pieces) == whole.text
    assert pieces[-1].endswith("\ufffd")


def test_stream_never_shows_a_stop_string(pipe, tokenizer, monkeypatch):
    script = tokenizer.encode("one two three END four five").ids
    _scripted(monkeypatch, script)
    pieces = list(pipe.stream(HI, max_new_tokens=len(script), stop=["three END", "zzz"]))
    _scripted(monkeypatch, script)
    whole = pipe.generate(HI, max_new_tokens=len(script), stop=["three END", "zzz"])
    assert whole.text == "one two " and whole.finish_reason == "stop"
    assert "".join(pieces) == whole.text
    assert not any("three" in p for p in pieces)


def test_session_stream_holds_back_a_stop_prefix_and_keeps_the_tail(pipe, tokenizer, monkeypatch):
    """A chat session streams through the same pieces as stream(): a possible stop string is held back, the
    incomplete last character comes as the tail, and the pieces join to send()'s text."""
    script = tokenizer.encode("one two three EN").ids + [tokenizer.token_to_id("ä")]
    _scripted(monkeypatch, script)
    pieces = list(pipe.chat().stream("Hi", max_new_tokens=len(script), stop=["three END"]))
    _scripted(monkeypatch, script)
    whole = pipe.chat().send("Hi", max_new_tokens=len(script), stop=["three END"])
    assert whole.text == "one two three EN\ufffd" and whole.finish_reason == "length"
    assert "".join(pieces) == whole.text
    assert not any("three" in p for p in pieces[:-1]) and pieces[-1].endswith("three EN\ufffd")
