"""Checkpoint inputs the export must take: the real vocabulary, sharded and bf16 safetensors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import assert_varied, export_artifact, random_image, requires_torch

pytestmark = requires_torch


def test_real_qwen2_vocabulary(tiny_ckpt):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_ckpt / "tokenizer.json"))
    assert tok.encode("Hello, world!").ids == [9707, 11, 1879, 0]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
    assert [tok.token_to_id(t) for t in specials] == [151643, 151644, 151645, 151652, 151653, 151654, 151655, 151656]
    assert tok.get_vocab_size() == 151643 + 14


def _resave(src, dst, **save_kwargs):
    """The same weights written by transformers in another form (shards, dtype); processor files copied."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(src)
    if save_kwargs.pop("bf16", False):
        model = model.to(torch.bfloat16)
    model.save_pretrained(dst, **save_kwargs)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.json",
                 "generation_config.json"):
        shutil.copyfile(src / name, dst / name)
    return dst


def test_sharded_and_bf16_checkpoints_export(tiny_ckpt, workdir, pipe):
    from reference import hf_model, ref_inputs
    from qwen2vl_edge.runtime import Qwen2VLPipeline

    conv = [{"role": "user", "content": [{"type": "image", "image": random_image(np.random.default_rng(4), 200, 160)},
                                         {"type": "text", "text": "Describe."}]}]
    sharded = _resave(tiny_ckpt, workdir / "tiny-sharded", max_shard_size="8MB")
    assert len(list(sharded.glob("model-*.safetensors"))) > 1 and (sharded / "model.safetensors.index.json").is_file()
    art = export_artifact(sharded, workdir / "art-sharded")
    ours = Qwen2VLPipeline.load(art).generate(conv, max_new_tokens=16, min_new_tokens=16).token_ids
    assert_varied(ours, "sharded export's output")
    assert ours == pipe.generate(conv, max_new_tokens=16, min_new_tokens=16).token_ids

    half = _resave(tiny_ckpt, workdir / "tiny-bf16", bf16=True, max_shard_size="8MB")
    art = export_artifact(half, workdir / "art-bf16")  # bf16 weights upcast to fp32 while exporting
    ours = Qwen2VLPipeline.load(art).generate(conv, max_new_tokens=16, min_new_tokens=16).token_ids
    import torch

    model = hf_model(str(half)).to(torch.float32)  # transformers upcasts the same bf16 values
    inputs = ref_inputs(half, [conv])
    ref = model.generate(**inputs, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    ref = ref[0, inputs["input_ids"].shape[1]:].tolist()
    assert_varied(ref)
    assert ours == ref
