"""Tiny random Qwen2-VL, Qwen2.5-VL and Qwen3-VL checkpoints in the Hugging Face layout, with the real Qwen2 vocabulary.

Built locally with transformers (no hub). The default init (std 0.02) makes greedy decoding repeat
one token whatever the input, so `init_std` is larger: generated tokens vary and follow the image.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from qwen2vl_edge.runtime.chat import builtin_template
from qwen2vl_edge.runtime.preprocess import CLIP_MEAN, CLIP_STD
from . import vocab

TINY_TEXT = dict(
    vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=32768, rope_theta=1000000.0,
    mrope_section=[2, 3, 3],
)
TINY_VISION = dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=4, hidden_size=64, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2)
# Qwen2.5-VL: hidden_size is the ViT width, out_hidden_size the merger's; window blocks around one full block
TINY_VISION_25 = dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1],
                      tokens_per_second=2, hidden_act="silu")
# Qwen3-VL: patch 16, a perfect-square position table, DeepStack taps inside the depth (blocks 0 and 2 of 3)
TINY_VISION_3 = dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64, patch_size=16,
                     spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                     deepstack_visual_indexes=[0, 2], hidden_act="gelu_pytorch_tanh")
# Qwen3's decoder states head_dim: 32 here, not hidden / heads = 16, with a small interleaved section summing to 16
TINY_TEXT_3 = dict(TINY_TEXT, num_hidden_layers=3, head_dim=32, mrope_section=[6, 5, 5], rope_theta=5000000.0)
# family -> (its tiny vision fields, transformers' config and model class names, the processor class it ships)
FAMILY_CLASSES = {
    "qwen2_vl": (TINY_VISION, "Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "qwen2_5_vl": (TINY_VISION_25, "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    "qwen3_vl": (TINY_VISION_3, "Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"),
}
QK_NORM_GAIN = 1.5
TINY_TOP = dict(tie_word_embeddings=True, init_std=0.2)
TOKEN_IDS = dict(bos_token_id=151643, eos_token_id=151645, vision_start_token_id=151652,
                 vision_end_token_id=151653, vision_token_id=151654, image_token_id=151655, video_token_id=151656)
GENERATION_CONFIG = {"bos_token_id": 151643, "pad_token_id": 151643, "eos_token_id": [151645, 151643],
                     "do_sample": False, "transformers_version": "4.45.0"}


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        if "," in text:
            return [_parse_value(t) for t in text.split(",")]
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        return text


def apply_overrides(overrides: list[str], family: str = "qwen2_vl") -> tuple[dict, dict, dict]:
    """'text.num_hidden_layers=3', 'vision.depth=1', 'tie_word_embeddings=false' -> the three dicts."""
    text = dict(TINY_TEXT_3 if family == "qwen3_vl" else TINY_TEXT)
    vision, top = dict(FAMILY_CLASSES[family][0]), dict(TINY_TOP)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        target = {"text": text, "vision": vision}.get(key.split(".", 1)[0]) if "." in key else top
        name = key.split(".", 1)[1] if "." in key else key
        if target is None or name not in target:
            known = [f"text.{k}" for k in text] + [f"vision.{k}" for k in vision] + list(top)
            raise ValueError(f"unknown --set key {key!r}; known: {', '.join(known)}")
        target[name] = _parse_value(value)
    return text, vision, top


def original_config(text: dict, vision: dict, top: dict, family: str = "qwen2_vl") -> dict:
    """config.json exactly as Qwen/Qwen2-VL-2B-Instruct (Qwen/Qwen2.5-VL-3B-Instruct) ships it: the flat
    transformers 4.4x layout, the vision fields under their published names. Qwen3-VL ships nested."""
    t = {k: v for k, v in text.items() if k not in ("mrope_section",)}
    if family == "qwen3_vl":
        return qwen3_config(t, text["mrope_section"], vision, top)
    return {
        "architectures": [FAMILY_CLASSES[family][2]], "attention_dropout": 0.0, **TOKEN_IDS,
        "hidden_act": "silu", "initializer_range": 0.02, "max_window_layers": t["num_hidden_layers"],
        "model_type": family, "sliding_window": 32768, "tie_word_embeddings": top["tie_word_embeddings"],
        "torch_dtype": "float32", "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False,
        **t,
        "vision_config": {**vision, "in_chans": 3, "spatial_patch_size": vision["patch_size"]},
        "rope_scaling": {"type": "mrope", "mrope_section": list(text["mrope_section"])},
    }


def qwen3_config(text: dict, mrope_section: list[int], vision: dict, top: dict) -> dict:
    """config.json as Qwen/Qwen3-VL-2B-Instruct ships it (transformers 4.57): text fields nested under text_config
    with rope_scaling, the vision fields under their published names."""
    return {
        "architectures": [FAMILY_CLASSES["qwen3_vl"][2]], "model_type": "qwen3_vl",
        "image_token_id": TOKEN_IDS["image_token_id"], "video_token_id": TOKEN_IDS["video_token_id"],
        "vision_start_token_id": TOKEN_IDS["vision_start_token_id"],
        "vision_end_token_id": TOKEN_IDS["vision_end_token_id"],
        "tie_word_embeddings": top["tie_word_embeddings"], "transformers_version": "4.57.0.dev0",
        "text_config": {**text, "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
                        "eos_token_id": 151645, "hidden_act": "silu", "initializer_range": 0.02,
                        "model_type": "qwen3_vl_text", "dtype": "float32", "use_cache": True,
                        "tie_word_embeddings": top["tie_word_embeddings"],
                        "rope_scaling": {"mrope_interleaved": True, "mrope_section": list(mrope_section),
                                         "rope_type": "default"}},
        "vision_config": {**vision, "in_channels": 3, "initializer_range": 0.02, "model_type": "qwen3_vl"},
    }


# preprocessor_config.json (and video_preprocessor_config.json) as the Instruct checkpoints ship them; Qwen3-VL
# states its limits as `size` and its video processor's apart
PREPROCESSOR_FILES = {
    "qwen2_vl": {"preprocessor_config.json": {
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "rescale_factor": 1 / 255, "do_rescale": True,
        "do_normalize": True, "do_resize": True, "do_convert_rgb": True, "resample": 3,
        "image_processor_type": "Qwen2VLImageProcessor"}},
    "qwen3_vl": {"preprocessor_config.json": {
        "size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "image_processor_type": "Qwen2VLImageProcessorFast"},
        "video_preprocessor_config.json": {
        "size": {"longest_edge": 25165824, "shortest_edge": 4096}, "patch_size": 16, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "video_processor_type": "Qwen3VLVideoProcessor"}},
}
PREPROCESSOR_FILES["qwen2_5_vl"] = PREPROCESSOR_FILES["qwen2_vl"]


def write_processor_files(out: Path, family: str = "qwen2_vl") -> None:
    """Tokenizer, chat template and preprocessor settings as the family's real checkpoint ships them."""
    processor_class = FAMILY_CLASSES[family][3]
    shutil.copyfile(vocab.tokenizer_json(), out / "tokenizer.json")
    added = {str(151643 + i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                               "single_word": False, "special": True} for i, t in enumerate(vocab.SPECIAL_TOKENS)}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "added_tokens_decoder": added, "bos_token": None, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 32768, "pad_token": "<|endoftext|>",
        "padding_side": "left", "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }, indent=2))
    (out / "chat_template.json").write_text(json.dumps({"chat_template": builtin_template(family)}, indent=2))
    for name, settings in PREPROCESSOR_FILES[family].items():
        (out / name).write_text(json.dumps({**settings, "processor_class": processor_class}, indent=2))
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))


def _norm_gain(name: str) -> float:
    """Where a norm's weights centre. Qwen3's per-head q/k RMSNorm bounds each attention logit by the product of
    the two gains times sqrt(head_dim): at gain 1 a query spreads over the hundreds of tokens of an image and greedy
    replies loop on a few tokens whatever the image (9 distinct of 32 here); at 1.5 they follow the input."""
    return QK_NORM_GAIN if name.endswith(("q_norm.weight", "k_norm.weight")) else 1.0


def make_tiny(out: str | Path, *, seed: int = 0, layout: str = "original", overrides: list[str] = (),
              family: str = "qwen2_vl") -> Path:
    """Write a tiny random checkpoint of `family` (qwen2_vl, qwen2_5_vl, qwen3_vl) to `out`; returns the directory."""
    import torch
    import transformers

    if layout not in ("original", "v5"):
        raise ValueError(f"layout must be 'original' or 'v5', got {layout!r}")
    if family not in FAMILY_CLASSES:
        raise ValueError(f"family must be one of {', '.join(FAMILY_CLASSES)}, got {family!r}")
    _, config_class, model_class, _ = FAMILY_CLASSES[family]
    text, vision, top = apply_overrides(list(overrides), family)
    std = float(top["init_std"])
    t = {k: v for k, v in text.items() if k not in ("mrope_section", "rope_theta")}
    t["rope_parameters"] = {"rope_type": "default", "mrope_section": list(text["mrope_section"]),
                            "rope_theta": text["rope_theta"]}
    cfg = getattr(transformers, config_class)(
        text_config={**t, "initializer_range": std}, vision_config={**vision, "initializer_range": std},
        tie_word_embeddings=top["tie_word_embeddings"], image_token_id=TOKEN_IDS["image_token_id"],
        video_token_id=TOKEN_IDS["video_token_id"])
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(cfg).eval()
    with torch.no_grad():  # norms and biases too, so nothing sits at a degenerate 1 or 0
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name or "pos_embed" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (_norm_gain(name) if name.endswith("weight") else 0.0))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if layout == "original":
        (out / "config.json").write_text(json.dumps(original_config(text, vision, top, family), indent=2))
    write_processor_files(out, family)
    return out
