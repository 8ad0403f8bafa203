"""Qwen2.5-VL's window layout (runtime/rope.py: vision_windows) against transformers' get_vision_window_index, and
the config loader's dispatch on the checkpoint's family."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import requires_torch
from qwen2vl_edge.runtime.config import ConfigError, load_config, parse_hf_config
from qwen2vl_edge.runtime.errors import ArtifactError
from qwen2vl_edge.runtime.preprocess import smart_resize
from qwen2vl_edge.runtime.rope import vision_windows

# Qwen2.5-VL-3B-Instruct's config.json as published (flat layout), text and vision trimmed to what is read
FLAT_25 = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "hidden_size": 2048,
    "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
    "vocab_size": 151936, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "max_position_embeddings": 128000,
    "tie_word_embeddings": True, "image_token_id": 151655, "video_token_id": 151656,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
}
VISION = parse_hf_config(FLAT_25).vision


def test_flat_published_config_reads_the_vision_fields_under_their_qwen25_names():
    cfg = parse_hf_config(FLAT_25)
    v = cfg.vision
    assert cfg.model_type == "qwen2_5_vl" and cfg.family.windowed and cfg.family.timed_video
    assert (v.embed_dim, v.hidden_size, v.mlp_dim, v.head_dim) == (1280, 2048, 3420, 80)
    assert (v.window_size, v.window_merged, v.fullatt_block_indexes, v.tokens_per_second) == (
        112, 4, (7, 15, 23, 31), 2)
    assert cfg.text.head_dim == 128 and cfg.tie_word_embeddings


@requires_torch
def test_nested_text_config_layout_loads_the_same(tmp_path):
    """The layout transformers 5 saves (text_config, rope_parameters), from transformers' own config class."""
    from transformers import Qwen2_5_VLConfig

    Qwen2_5_VLConfig(**{k: v for k, v in FLAT_25.items() if k != "architectures"}).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "text_config" in raw and "hidden_size" not in raw
    assert load_config(tmp_path) == parse_hf_config(FLAT_25)


def test_other_families_are_a_config_error_naming_the_supported_ones():
    with pytest.raises(ConfigError, match="'llava'.*supports 'qwen2_vl', 'qwen2_5_vl', 'qwen3_vl'"):
        parse_hf_config({"model_type": "llava"})


@pytest.mark.parametrize("raw", [{"model_type": "qwen3_vl_moe"},
                                 {"architectures": ["Qwen3VLMoeForConditionalGeneration"]}])
def test_qwen3_moe_is_refused_as_out_of_scope(raw):
    with pytest.raises(ConfigError, match="qwen3_vl_moe checkpoint.*out of scope for edge devices.*dense Qwen3-VL"):
        parse_hf_config(raw)


def test_architectures_pick_the_family_without_model_type():
    raw = {k: v for k, v in FLAT_25.items() if k != "model_type"}
    assert parse_hf_config(raw).model_type == "qwen2_5_vl"


def test_a_qwen25_config_without_its_window_fields_is_refused():
    raw = json.loads(json.dumps(FLAT_25))
    del raw["vision_config"]["window_size"]
    with pytest.raises(ConfigError, match="window_size"):
        parse_hf_config(raw)


def test_manifest_of_an_unknown_family_is_refused(tiny_artifact, tmp_path):
    import shutil

    from qwen2vl_edge.runtime.artifact import load_artifact

    art = shutil.copytree(tiny_artifact, tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["config"]["model_type"] = "qwen3_vl_moe"
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="model_type = 'qwen3_vl_moe' is not one of 'qwen2_vl', 'qwen2_5_vl', 'qwen3_vl'"):
        load_artifact(art, verify=False)


GRIDS = [(1, 10, 12), (1, 8, 16), (1, 24, 28), (1, 32, 32), (1, 18, 2), (2, 14, 20)]


@requires_torch
@pytest.mark.parametrize("grid", GRIDS)
def test_windows_hold_the_patches_transformers_puts_in_them(grid):
    """Our windows, pad slots dropped, are transformers' windows in transformers' order (its extra all-pad
    windows of evenly divided sides are empty and dropped by its unique_consecutive)."""
    import torch
    from transformers.vision_utils import get_vision_window_index

    t, h, w = grid
    index, cu = get_vision_window_index(torch.tensor([grid]), spatial_merge_size=2, window_size=112, patch_size=14)
    layout = vision_windows(grid, VISION)
    index_, valid = layout["window_index"], layout["window_mask"].astype(bool)
    frame = [index_[i][valid[i]][::4] // 4 for i in range(len(index_)) if valid[i].any()]  # merged ids a window
    merged = h * w // 4
    expected = np.concatenate([np.concatenate(frame) + f * merged for f in range(t)])
    np.testing.assert_array_equal(index.numpy(), expected)
    lengths = [len(x) * 4 for x in frame] * t
    np.testing.assert_array_equal(np.diff(cu.numpy()), lengths)


@pytest.mark.parametrize("grid", GRIDS)
def test_inverse_gather_returns_every_patch_once(grid):
    layout = vision_windows(grid, VISION)
    flat, valid = layout["window_index"].ravel(), layout["window_mask"].ravel().astype(bool)
    S = grid[1] * grid[2]
    np.testing.assert_array_equal(flat[layout["window_inverse"]], np.arange(S))  # back in patch order
    assert valid[layout["window_inverse"]].all()  # only real slots are read out
    assert valid.sum() == S and (flat[~valid] == 0).all()
    assert layout["window_index"].shape[1] == 64  # 4 x 4 merged tokens of 2 x 2 patches


def padding_overhead(width: int, height: int) -> float:
    """Window slots per patch - 1, for an image of width x height pixels (2B-like patching: 14 px, merge 2)."""
    h, w = smart_resize(height, width, 28, 3136, 12845056)
    layout = vision_windows((1, h // 14, w // 14), VISION)
    return layout["window_mask"].size / layout["window_mask"].sum() - 1


def test_padding_overhead_on_2b_like_grids():
    """448² and 1344² divide into whole windows (112 px): no pad slot at all; a 1280 x 720 frame pays 12 %."""
    overheads = {size: padding_overhead(*size) for size in [(448, 448), (1344, 1344), (1280, 720), (640, 480)]}
    print({f"{w}x{h}": f"{o:.1%}" for (w, h), o in overheads.items()})
    assert overheads[448, 448] == 0 and overheads[1344, 1344] == 0
    assert 0 < overheads[1280, 720] < 0.25


@pytest.mark.parametrize("grid", [(1, 2, 2), (1, 2, 640), (1, 640, 2), (1, 50, 50), (1, 36, 70), (4, 40, 64)])
def test_engine_profiles_hold_every_window_layout_under_the_limits(grid):
    """build-trt's vision profile of a windowed family takes the layout of any grid check_request lets through."""
    from qwen2vl_edge.runtime.backends.trt_memory import io_buffers
    from qwen2vl_edge.runtime.backends.trt_profiles import Limits, check_request, profiles_for

    cfg, lim = parse_hf_config(FLAT_25), Limits(max_image_tokens=640, min_image_tokens=1, max_frames=8)
    check_request(lim, cfg, batch=1, prompt_len=1, max_new_tokens=1, image_grids=[grid])
    profile = profiles_for("vision_encoder", cfg, lim)[0]
    buffers = io_buffers(cfg, lim)
    for name, array in vision_windows(grid, cfg.vision).items():
        lo, _, hi = profile[name]
        assert all(a <= d <= b for a, d, b in zip(lo, array.shape, hi)), (name, array.shape, profile[name])
        assert array.nbytes <= buffers[name]
