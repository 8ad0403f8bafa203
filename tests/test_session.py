"""Chat sessions against transformers: the cache holds the conversation as the template renders it, with
each reply as the ids it was generated with, and every greedy reply is transformers' reply to exactly those ids."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import random_image, requires_torch

pytestmark = requires_torch

N = 8
REPLY = "<|quad_start|>"  # a special token that stands for a reply in the reference rendering, then is spliced


def _reference_ids(ckpt, messages, replies, generation_prompt):
    """transformers' processor on the conversation with each reply replaced by its generated ids."""
    from reference import hf_processor, patch_size, vision_info

    proc = hf_processor(str(ckpt))
    shown = [m if m["role"] != "assistant" else {"role": "assistant", "content": REPLY} for m in messages]
    text = proc.apply_chat_template(shown, tokenize=False, add_generation_prompt=generation_prompt)
    out = proc(text=[text], return_tensors="pt", **vision_info(shown, patch_size(str(ckpt))))
    marker = proc.tokenizer.convert_tokens_to_ids(REPLY)
    ids, k = [], 0
    for t in out["input_ids"][0].tolist():
        if t == marker:
            ids += replies[k]
            k += 1
        else:
            ids.append(t)
    assert k == len(replies)
    return ids, out


def _with_ids(model, ids, out):
    import torch

    input_ids = torch.tensor([ids])
    cfg = model.config
    types = (input_ids == cfg.image_token_id).long() + 2 * (input_ids == cfg.video_token_id).long()
    kwargs = {k: out[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw",
                                  "second_per_grid_ts") if k in out}
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), mm_token_type_ids=types, **kwargs)


def _reference_reply(ckpt, ids, out):
    from reference import hf_model

    model = hf_model(str(ckpt))
    generated = model.generate(**_with_ids(model, ids, out), max_new_tokens=N, min_new_tokens=N, do_sample=False)
    return generated[0, len(ids):].tolist()


# Frames and images the reference does not resample again after qwen-vl-utils: multiples of 28 (Qwen2) or 32 above
# Qwen3-VL processor's floors (test_export_parity: convs)
SIZES = {"frame": {"qwen3_vl": (384, 384)}, "image": {"qwen3_vl": (256, 320)}}


@pytest.fixture(scope="module")
def turns():
    def make(family: str) -> list:
        rng = np.random.default_rng(21)
        frame, image = (SIZES[k].get(family, default) for k, default in (("frame", (336, 336)), ("image", (200, 300))))
        return [
            ("send", [{"type": "image", "image": random_image(rng, 320, 240)},
                      {"type": "text", "text": "What is it?"}]),
            ("send", "Tell me more about the colours."),
            ("append", [{"type": "video", "video": [random_image(rng, *frame) for _ in range(4)], "sample_fps": 4.0}]),
            ("append", [{"type": "video", "video": [random_image(rng, *frame) for _ in range(2)]}]),  # camera chunks
            ("send", [{"type": "image", "image": random_image(rng, *image)},
                      {"type": "text", "text": "Compare the picture with the clip."}]),
        ]
    return make


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("cache_kind", ["growing", "preallocated"])
def test_session_turns_match_transformers(family_ckpt, family_pipe, turns, cache_kind, family, monkeypatch):
    from reference import hf_model

    tiny_ckpt = family_ckpt(family)
    p = family_pipe(family, "portable" if cache_kind == "growing" else "ort-cpu")
    fed = []  # position ids of every decoder run, to check M-RoPE over the whole conversation
    decode = p.backend.decode
    monkeypatch.setattr(p.backend, "decode", lambda e, m, pos, c: (fed.append(pos), decode(e, m, pos, c))[1])
    session = p.chat(system="You look at pictures.", max_new_tokens=N, min_new_tokens=N)
    messages, replies = [{"role": "system", "content": "You look at pictures."}], []
    pending = 0  # after a reply: its last id and the end of turn (<|im_end|>, newline), fed with the next turn
    for kind, content in turns(family):
        messages.append({"role": "user", "content": content})
        cached = len(session.token_ids)
        if kind == "append":
            info = session.append(content)
            assert info["cached_prompt_tokens"] == cached - pending
        else:
            prompt, out = _reference_ids(tiny_ckpt, messages, replies, generation_prompt=True)
            assert prompt[:cached] == session.token_ids, "the cache must be a prefix of the next prompt"
            result = session.send(content)
            ref = _reference_reply(tiny_ckpt, prompt, out)
            assert len(set(ref)) > N // 2, "reference reply degenerate: parity would prove nothing"
            assert result.token_ids == ref
            assert result.usage == {"prompt_tokens": len(prompt), "cached_prompt_tokens": cached - pending,
                                    "completion_tokens": N}
            replies.append(result.token_ids)
            messages.append({"role": "assistant", "content": result.text})
        pending = 3 if kind == "send" else 0
        expected, out = _reference_ids(tiny_ckpt, messages, replies, generation_prompt=False)
        assert session.token_ids == expected  # replies as generated, each followed by the template's end of turn
    assert [m["role"] for m in session.history] == [m["role"] for m in messages]

    model = hf_model(str(tiny_ckpt))
    ref_pos, _ = model.model.get_rope_index(**{k: v for k, v in _with_ids(model, expected, out).items()
                                               if k not in ("pixel_values", "pixel_values_videos")})
    ours = np.concatenate([f[:, 0, :] for f in fed], axis=1)  # [3, every token fed, in order]
    assert ours.shape[1] == len(expected) - pending  # each id was fed exactly once, but the last reply's end
    np.testing.assert_array_equal(ours, ref_pos.numpy()[:, 0, :ours.shape[1]])


@pytest.mark.parametrize("cache_kind", ["growing", "preallocated"])
def test_cache_bytes_are_what_the_cache_holds(pipe, pipe_ort, cache_kind):
    """What the server bounds its kept sessions by: a growing cache holds its positions, a preallocated one the
    room it reserved (prompt + max_new_tokens, doubled as the conversation outgrows it)."""
    from qwen2vl_edge.runtime.backends.trt_memory import kv_cache_bytes
    from qwen2vl_edge.runtime.backends.trt_profiles import PREALLOCATED

    p = pipe if cache_kind == "growing" else pipe_ort
    per_position = kv_cache_bytes(p.artifact.config, 1, 1, p.backend.kv_dtype.name, PREALLOCATED)  # K, V; all layers
    session = p.chat(max_new_tokens=N, min_new_tokens=N)
    assert session.cache_bytes == 0
    expected = []
    for question in ("Hello there!", "Tell me a story about the sea, please."):
        result = session.send(question)
        if cache_kind == "growing":  # the ids in the cache: all but the reply's last id and the end of turn
            expected.append((len(session.token_ids) - 3) * per_position)
        else:  # room for the prompt and max_new_tokens; the second turn outgrows it and doubles it
            room = result.usage["prompt_tokens"] + N
            expected.append(max(room, 2 * expected[-1] // per_position if expected else 0) * per_position)
        assert session.cache_bytes == expected[-1]


def _small_context(p, tokens):
    """The same graphs behind a model card that claims a `tokens`-long context."""
    from dataclasses import replace

    from qwen2vl_edge.runtime import Qwen2VLPipeline

    cfg = p.artifact.config
    artifact = replace(p.artifact, config=replace(cfg, text=replace(cfg.text, max_position_embeddings=tokens)))
    return Qwen2VLPipeline(artifact, p.processor, p.backend)


@pytest.mark.parametrize("overflow", ["error", "slide"])
def test_overflow_error_names_the_fix_or_slides_to_the_latest_turns(tiny_ckpt, pipe_ort, turns, overflow):
    from qwen2vl_edge.runtime import InputError

    small = _small_context(pipe_ort, 180)
    session = small.chat(overflow=overflow, max_new_tokens=N, min_new_tokens=N)
    first = session.send(turns("qwen2_vl")[0][1])
    session.send("Tell me more about the colours.")
    held = session.token_ids
    assert len(held) < 180
    question = "And what about the shapes in it?"
    if overflow == "error":
        with pytest.raises(InputError, match=r"holds \d+ of the model's 180-token context .*overflow='slide'"):
            session.send(question)
        assert session.token_ids == held  # refused before touching the cache
        return
    result = session.send(question)
    history = session.history
    assert history[0]["content"] == "Tell me more about the colours."  # the image turn and its reply dropped
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    replies = [session._entries[1].reply_ids, result.token_ids]  # the kept replies, as generated
    assert first.token_ids not in replies
    expected, out = _reference_ids(tiny_ckpt, history, replies, generation_prompt=False)
    assert session.token_ids == expected
    prompt, out = _reference_ids(tiny_ckpt, history[:3], replies[:1], generation_prompt=True)
    assert result.token_ids == _reference_reply(tiny_ckpt, prompt, out)
    assert result.usage["cached_prompt_tokens"] == 0  # started over


def test_a_stream_stopped_early_leaves_a_usable_session(tiny_ckpt, pipe):
    session = pipe.chat(max_new_tokens=N, min_new_tokens=N)
    session.send("Hello!")
    for _ in session.stream("Count to ten."):
        break  # the consumer walks away: that turn is forgotten, the cache rebuilt at the next turn
    result = session.send("Say something else.")
    messages = session.history
    assert [m["content"] for m in messages if m["role"] == "user"] == ["Hello!", "Say something else."]
    replies = [session._entries[1].reply_ids, result.token_ids]
    expected, _ = _reference_ids(tiny_ckpt, messages, replies, generation_prompt=False)
    assert session.token_ids == expected
    prompt, out = _reference_ids(tiny_ckpt, messages[:3], replies[:1], generation_prompt=True)
    assert result.token_ids == _reference_reply(tiny_ckpt, prompt, out)


def test_session_defaults_apply_and_a_stopped_reply_stays_as_generated(pipe):
    free = pipe.chat(max_new_tokens=12, min_new_tokens=12).send("Hello!")
    piece = free.text[3:6]
    assert piece.strip(), "need some generated text to stop on"
    session = pipe.chat(max_new_tokens=12, min_new_tokens=12, stop=[piece])  # defaults for every turn
    stopped = session.send("Hello!")
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) < 12
    assert free.token_ids[:len(stopped.token_ids)] == stopped.token_ids and piece not in stopped.text
    cached = session.token_ids
    at = len(cached) - len(stopped.token_ids) - 2  # the reply, then <|im_end|> and a newline
    assert cached[at:at + len(stopped.token_ids)] == stopped.token_ids  # every generated id, the stop's too
    assert session.send("Again?", stop=["\x00never"]).finish_reason == "length"  # the call overrides


def test_a_turn_over_the_memory_limit_is_refused_before_it_runs(pipe):
    """As pipe.generate refuses a request estimated over memory_limit, a session refuses such a turn, with
    its cache counted, before any graph runs."""
    from qwen2vl_edge.runtime import InputError, Qwen2VLPipeline

    limited = Qwen2VLPipeline(pipe.artifact, pipe.processor, pipe.backend)
    limited.memory_limit = 1
    session = limited.chat(max_new_tokens=4)
    with pytest.raises(InputError, match="GB of memory at its peak"):
        session.send("Hello!")
    assert session.token_ids == []


def test_a_reply_returns_without_a_decoder_run_after_its_last_token(pipe_ort, monkeypatch):
    """A preallocated cache: the turn's prefill makes it with room for the reply; the reply's end waits for the
    next turn (no decoder run after the last token, no second reserve), whose prefill feeds it."""
    backend, calls = pipe_ort.backend, []
    new_cache, reserve, decode = backend.new_cache, backend.reserve, backend.decode
    monkeypatch.setattr(backend, "new_cache", lambda *a, **k: (calls.append("new_cache"), new_cache(*a, **k))[1])
    monkeypatch.setattr(backend, "reserve", lambda c, n: (calls.append("reserve"), reserve(c, n))[1])
    monkeypatch.setattr(backend, "decode", lambda e, m, pos, c: (calls.append(pos.shape[-1]), decode(e, m, pos, c))[1])
    session = pipe_ort.chat(max_new_tokens=N, min_new_tokens=N)
    first = session.send("Hello!")
    # the prompt's prefill, then one run per chosen token but the last: nothing after the reply's last token
    assert calls == ["new_cache", first.usage["prompt_tokens"]] + [1] * (N - 1)
    assert session.cache.capacity < 2 * (first.usage["prompt_tokens"] + N)  # no doubling
    calls.clear()
    second = session.send("And then?")
    new = second.usage["prompt_tokens"] - second.usage["cached_prompt_tokens"]
    assert second.usage["cached_prompt_tokens"] == first.usage["prompt_tokens"] + N - 1
    # one prefill feeds the first reply's end (its last id, <|im_end|>, a newline) and the new message
    assert calls[:2] == ["reserve", new] and len(session.token_ids) == second.usage["prompt_tokens"] + N + 2
