"""add_vision_id, OpenAI-style image_url items and generation_config.json's sampling defaults, against transformers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import random_image, requires_torch
from qwen2vl_edge.runtime import InputError
from qwen2vl_edge.runtime.generation import checkpoint_sampling

pytestmark = requires_torch
N = 12


def _two_images():
    rng = np.random.default_rng(8)
    return [{"role": "user", "content": [{"type": "image", "image": random_image(rng, 200, 150)},
                                         {"type": "image", "image": random_image(rng, 150, 200)},
                                         {"type": "text", "text": "Which is brighter?"}]}]


def _reference(ckpt, conv, add_vision_id=False, **generation):
    from reference import hf_model, ref_inputs

    inputs = ref_inputs(ckpt, [conv], add_vision_id=add_vision_id)
    out = hf_model(str(ckpt)).generate(**inputs, max_new_tokens=N, min_new_tokens=N, **generation)
    return inputs["input_ids"][0].tolist(), out[0, inputs["input_ids"].shape[1]:].tolist()


def test_add_vision_id_matches_transformers(tiny_ckpt, pipe):
    conv = _two_images()
    ids, reply = _reference(tiny_ckpt, conv, add_vision_id=True, do_sample=False)
    assert pipe.processor(conv, add_vision_id=True)["input_ids"][0].tolist() == ids
    assert "Picture 2:" in pipe.processor.tokenizer.decode(ids)
    assert pipe.generate(conv, N, min_new_tokens=N, add_vision_id=True).token_ids == reply
    session = pipe.chat(add_vision_id=True, max_new_tokens=N, min_new_tokens=N)
    assert session.send(conv[0]["content"]).token_ids == reply


def test_openai_image_url_items(pipe):
    import base64
    import io

    buf = io.BytesIO()
    random_image(np.random.default_rng(3), 120, 90).save(buf, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    plain = pipe.processor([{"role": "user", "content": [{"type": "image", "image": uri}]}])
    for item in ({"type": "image_url", "image_url": uri}, {"type": "image_url", "image_url": {"url": uri}}):
        ours = pipe.processor([{"role": "user", "content": [item]}])
        assert np.array_equal(ours["pixel_values"], plain["pixel_values"])
        assert np.array_equal(ours["input_ids"], plain["input_ids"])
    with pytest.raises(InputError, match=r"\{'url': "):
        pipe.processor([{"role": "user", "content": [{"type": "image_url", "image_url": {"href": uri}}]}])


def test_generation_config_defaults_apply_as_in_transformers(tiny_ckpt, pipe, tmp_path):
    import copy

    from reference import hf_model
    from qwen2vl_edge.runtime import Qwen2VLPipeline

    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": False, "repetition_penalty": 0.2, "temperature": 0.01, "top_k": 1, "eos_token_id": 1}))
    defaults = checkpoint_sampling(tmp_path)
    assert defaults == {"do_sample": False, "repetition_penalty": 0.2, "temperature": 0.01, "top_k": 1}
    tuned = Qwen2VLPipeline(pipe.artifact, pipe.processor, pipe.backend)
    tuned.sampling_defaults = defaults
    conv = [{"role": "user", "content": "Hello!"}]  # a penalty below 1 favours the prompt's tokens: visible here

    gen_config = copy.deepcopy(hf_model(str(tiny_ckpt)).generation_config)
    for k, v in defaults.items():
        setattr(gen_config, k, v)
    _, reply = _reference(tiny_ckpt, conv, generation_config=gen_config)  # greedy with the penalty
    ours = tuned.generate(conv, N, min_new_tokens=N)
    assert ours.token_ids == reply
    assert ours.token_ids != pipe.generate(conv, N, min_new_tokens=N).token_ids  # the penalty took effect
    assert tuned.generate(conv, N, min_new_tokens=N, repetition_penalty=1.0).token_ids == \
        pipe.generate(conv, N, min_new_tokens=N).token_ids  # the call overrides the checkpoint


def test_session_and_checkpoint_defaults_get_the_typed_checks(pipe, tmp_path):
    from qwen2vl_edge.runtime import ArtifactError

    with pytest.raises(InputError, match="top_k must be an integer, got float 2.5"):
        pipe.chat(top_k=2.5)  # refused when the session is made, not at its first turn
    with pytest.raises(InputError, match="temperature must be a number, got str 'hot'"):
        pipe.chat(do_sample=True).send("Hi", temperature="hot")
    with pytest.raises(InputError, match="do_sample must be True or False"):
        pipe.generate([{"role": "user", "content": "Hi"}], do_sample="yes")
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_k": "50"}))
    with pytest.raises(ArtifactError, match="generation_config.json: top_k must be an integer, got str '50'"):
        checkpoint_sampling(tmp_path)
