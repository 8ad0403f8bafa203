"""The model configuration the runtime needs, read once into typed dataclasses.

Two config.json layouts exist in the wild and both load into the same object:
- "original" (Qwen/Qwen2-VL-*-Instruct as published, transformers 4.4x): text fields
  at the top level, `rope_scaling: {"type": "mrope", "mrope_section": [...]}`;
- "v5" (what transformers 5 saves): a `text_config` dict with `rope_parameters`.
An artifact directory carries the same object under manifest.json's "config".
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_TYPE = "qwen2_vl"


class ConfigError(ValueError):
    """The checkpoint or artifact config is missing or not a Qwen2-VL config."""


@dataclass(frozen=True)
class VisionConfig:
    depth: int
    embed_dim: int
    hidden_size: int  # width of the merger output == text hidden size
    num_heads: int
    mlp_ratio: float = 4.0
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    in_channels: int = 3
    hidden_act: str = "quick_gelu"
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: C * tps * p * p (1176 for Qwen2-VL)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    mrope_section: tuple[int, ...]
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False
    model_type: str = MODEL_TYPE
    extra: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        d["text"]["mrope_section"] = list(self.text.mrope_section)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Inverse of to_dict (the manifest form)."""
        text = dict(d["text"])
        text["mrope_section"] = tuple(text["mrope_section"])
        top = {k: v for k, v in d.items() if k not in ("text", "vision")}
        return cls(text=TextConfig(**text), vision=VisionConfig(**d["vision"]), **top)


def _pick(src: dict, cls, renames: dict[str, str] | None = None) -> dict:
    """Fields of dataclass `cls` found in `src`; unknown keys are ignored so new layouts load."""
    renames = renames or {}
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in src.items():
        key = renames.get(key, key)
        if key in names and value is not None:
            out[key] = value
    return out


def _rope_fields(text_src: dict, top: dict) -> dict:
    rope = text_src.get("rope_parameters") or text_src.get("rope_scaling") or top.get("rope_scaling") or {}
    section = rope.get("mrope_section")
    if section is None:
        raise ConfigError("config has no mrope_section (rope_scaling / rope_parameters): not a Qwen2-VL checkpoint?")
    theta = rope.get("rope_theta", text_src.get("rope_theta", top.get("rope_theta", 1000000.0)))
    return {"mrope_section": tuple(int(s) for s in section), "rope_theta": float(theta)}


def parse_hf_config(raw: dict[str, Any]) -> ModelConfig:
    """Parse a Hugging Face config.json dict of either layout."""
    if raw.get("model_type") != MODEL_TYPE:
        raise ConfigError(
            f"config.json has model_type={raw.get('model_type')!r}; qwen2vl-edge supports {MODEL_TYPE!r} "
            "(Qwen2-VL 2B/7B/72B). Qwen2.5-VL and other models are not supported."
        )
    text_src = raw.get("text_config") or raw  # v5 nests, original is flat
    text_kwargs = _pick(text_src, TextConfig)
    text_kwargs.update(_rope_fields(text_src, raw))
    if "num_key_value_heads" not in text_kwargs:
        text_kwargs["num_key_value_heads"] = text_kwargs.get("num_attention_heads")
    try:
        text = TextConfig(**text_kwargs)
    except TypeError as e:
        raise ConfigError(f"config.json text fields incomplete: {e}") from None

    vsrc = dict(raw.get("vision_config") or {})
    vrope = vsrc.get("rope_parameters") or {}
    if "rope_theta" in vrope:
        vsrc["rope_theta"] = vrope["rope_theta"]
    vision_kwargs = _pick(vsrc, VisionConfig, renames={"in_chans": "in_channels"})
    try:
        vision = VisionConfig(**vision_kwargs)
    except TypeError as e:
        raise ConfigError(f"config.json vision_config incomplete: {e}") from None

    tie = raw.get("tie_word_embeddings")
    if tie is None:
        tie = text_src.get("tie_word_embeddings", False)
    top = _pick(raw, ModelConfig)
    for k in ("text", "vision", "tie_word_embeddings", "extra"):
        top.pop(k, None)
    return ModelConfig(text=text, vision=vision, tie_word_embeddings=bool(tie), **top)


def load_config(path: str | Path) -> ModelConfig:
    """Load the config of a checkpoint directory (config.json) or an artifact dir (manifest.json)."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory: pass a Qwen2-VL checkpoint or an exported artifact directory")
    manifest = path / "manifest.json"
    if manifest.is_file():
        return ModelConfig.from_dict(json.loads(manifest.read_text())["config"])
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ConfigError(
            f"{path} has neither config.json (a Hugging Face checkpoint) nor manifest.json (an exported artifact dir)"
        )
    try:
        raw = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg} is not valid JSON: {e}") from None
    return parse_hf_config(raw)
