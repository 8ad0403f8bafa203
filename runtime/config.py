"""The model configuration the runtime needs, read once into typed dataclasses.

Two config.json layouts exist in the wild and both load into the same object:
- "original" (Qwen/Qwen2-VL-*-Instruct and Qwen2.5-VL-*-Instruct as published, transformers 4.4x): text
  fields at the top level, `rope_scaling: {"type": "mrope", "mrope_section": [...]}`;
- "v5" (what transformers 5 saves, and how every Qwen3-VL config.json nests): a `text_config` dict with
  `rope_parameters` (or `rope_scaling`).
The checkpoint's family (`model_type`, else `architectures`) picks how its vision_config reads (FAMILIES).
An artifact directory carries the same object under manifest.json's "config".
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError  # one class for every configuration problem, exported by qwen2vl_edge.runtime

MODEL_TYPE = "qwen2_vl"


@dataclass(frozen=True)
class Family:
    """What sets a model family apart, as data: the graph builder, the front-end and the position rules read it."""

    model_type: str
    architecture: str  # config.json's architectures[0]
    vision_renames: dict  # vision_config key -> VisionConfig field
    vision_norm: str  # "layer" (LayerNorm with bias) | "rms" (RMSNorm, weight only)
    vision_mlp: str  # "fc" (fc1, act, fc2) | "gated" (down(act(gate) * up))
    windowed: bool  # blocks outside fullatt_block_indexes attend within windows (runtime/rope.py: vision_windows)
    timed_video: bool  # a video's temporal ids step by tokens_per_second * second_per_grid_ts, not by 1
    # Qwen3-VL: a learned square position table resampled to each grid (the host feeds 4 indices and weights a
    # patch); a video is one-frame grids, each after a "<t seconds>" timestamp; M-RoPE sections interleaved over
    # the frequencies (t h w t h w ...); the decoder normalises q and k per head (RMSNorm) before the rotary.
    # DeepStack (features of some vision blocks added after the first decoder layers) follows the vision config's
    # deepstack_visual_indexes, not the family.
    pos_table: bool = False
    frame_timestamps: bool = False
    mrope_interleaved: bool = False
    qk_norm: bool = False
    tool_format: str = "qwen"  # how tools and calls are written by default (runtime/tools.py): the family's own


FAMILIES = {f.model_type: f for f in (
    Family("qwen2_vl", "Qwen2VLForConditionalGeneration", {"in_chans": "in_channels"}, "layer", "fc", False, False),
    # Qwen2.5-VL's vision hidden_size is the ViT width and out_hidden_size the merger's output
    Family("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration",
           {"in_chans": "in_channels", "hidden_size": "embed_dim", "out_hidden_size": "hidden_size"},
           "rms", "gated", True, True),
    Family("qwen3_vl", "Qwen3VLForConditionalGeneration", {"hidden_size": "embed_dim", "out_hidden_size": "hidden_size"},
           "layer", "fc", False, False, pos_table=True, frame_timestamps=True, mrope_interleaved=True, qk_norm=True,
           tool_format="hermes"),
)}
# Known and refused with their own reason (family_of).
OUT_OF_SCOPE = {
    "qwen3_vl_moe": "the Qwen3-VL mixture-of-experts models (30B-A3B, 235B-A22B) are out of scope for edge devices: "
                    "use a dense Qwen3-VL (2B, 4B, 8B, 32B)",
}
OUT_OF_SCOPE_ARCHITECTURES = {"Qwen3VLMoeForConditionalGeneration": "qwen3_vl_moe"}


def family_of(raw: dict[str, Any]) -> Family:
    """The family of a config.json: its model_type, else its first architecture; ConfigError naming the supported
    ones otherwise."""
    by_arch = {f.architecture: f for f in FAMILIES.values()}
    arch = (raw.get("architectures") or [None])[0]
    refused = raw.get("model_type") if raw.get("model_type") in OUT_OF_SCOPE else OUT_OF_SCOPE_ARCHITECTURES.get(arch)
    if refused:
        raise ConfigError(f"config.json is a {refused} checkpoint: {OUT_OF_SCOPE[refused]}")
    family = FAMILIES.get(raw.get("model_type")) or by_arch.get(arch)
    if family is None:
        raise ConfigError(
            f"config.json has model_type={raw.get('model_type')!r} (architectures {raw.get('architectures')!r}); "
            f"qwen2vl-edge supports {', '.join(map(repr, FAMILIES))} (Qwen2-VL 2B/7B/72B, Qwen2.5-VL 3B/7B/32B/72B, "
            "Qwen3-VL 2B/4B/8B/32B). Other models are not supported."
        )
    return family


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
    intermediate_size: int | None = None  # Qwen2.5-VL's gated MLP; Qwen2-VL's is embed_dim * mlp_ratio
    window_size: int | None = None  # pixels a window spans (Qwen2.5-VL: 112)
    fullatt_block_indexes: tuple[int, ...] = ()  # blocks that attend over the whole frame; the others in windows
    tokens_per_second: float | None = None  # temporal ids per second of video (Qwen2.5-VL)
    num_position_embeddings: int | None = None  # entries of the learned square position table (Qwen3-VL: 48 x 48)
    deepstack_visual_indexes: tuple[int, ...] = ()  # blocks whose merged outputs the decoder adds (Qwen3-VL)

    @property
    def pos_table_side(self) -> int:
        return int(round(self.num_position_embeddings ** 0.5))

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return self.intermediate_size or int(self.embed_dim * self.mlp_ratio)

    @property
    def window_merged(self) -> int:
        """Side of a window in merged tokens (Qwen2.5-VL: 112 // 2 // 14 = 4)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

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
    head_dim: int | None = None  # stated by Qwen3 configs (may differ from hidden_size / heads); else derived

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int  # token ids come from the checkpoint: no Qwen2 vocabulary is assumed
    video_token_id: int
    vision_start_token_id: int | None = None  # recorded, not used by the runtime
    vision_end_token_id: int | None = None
    tie_word_embeddings: bool = False
    model_type: str = MODEL_TYPE
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        d["text"]["mrope_section"] = list(self.text.mrope_section)
        for name in ("fullatt_block_indexes", "deepstack_visual_indexes"):
            d["vision"][name] = list(getattr(self.vision, name))
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "ModelConfig":
        """Inverse of to_dict (the manifest form); a missing or mistyped field raises ConfigError naming it."""
        top = _typed_fields(cls, d, "config", skip=("text", "vision", "extra"))
        text = _typed_fields(TextConfig, d["text"] if "text" in d else None, "config.text")
        text["mrope_section"] = tuple(text["mrope_section"])
        vision = _typed_fields(VisionConfig, d.get("vision"), "config.vision")
        for name in ("fullatt_block_indexes", "deepstack_visual_indexes"):
            vision[name] = tuple(vision.get(name, ()))
        cfg = cls(text=TextConfig(**text), vision=VisionConfig(**vision), **top)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """The shapes the graphs are built from must divide as Qwen2-VL's do; the family's own fields are present."""
        t, v = self.text, self.vision
        if self.model_type not in FAMILIES:
            raise ConfigError(f"model_type {self.model_type!r} is not one of {', '.join(FAMILIES)}: re-export the "
                              "artifact with this version of qwen2vl-edge")
        family = self.family
        rules = ((family.qk_norm or t.hidden_size == t.num_attention_heads * t.head_dim,
                  "text hidden_size must be num_attention_heads * head_dim"),
                 (t.num_attention_heads % t.num_key_value_heads == 0,
                  "num_attention_heads must divide by num_key_value_heads"),
                 (2 * sum(t.mrope_section) == t.head_dim, "mrope_section must sum to head_dim / 2"),
                 (v.embed_dim % v.num_heads == 0, "vision embed_dim must divide by num_heads"),
                 (family.vision_mlp != "gated" or v.intermediate_size is not None,
                  f"{self.model_type} needs vision intermediate_size"),
                 (not family.windowed or (v.window_size or 0) >= v.spatial_merge_size * v.patch_size,
                  f"{self.model_type} needs a vision window_size of at least spatial_merge_size * patch_size"),
                 (all(i < v.depth for i in v.fullatt_block_indexes), "fullatt_block_indexes must be below depth"),
                 (not family.timed_video or v.tokens_per_second is not None,
                  f"{self.model_type} needs vision tokens_per_second"),
                 (not family.pos_table or (v.num_position_embeddings or 0) == v.pos_table_side ** 2 > 0,
                  f"{self.model_type} needs a square vision num_position_embeddings"),
                 (all(i < v.depth for i in v.deepstack_visual_indexes),
                  "deepstack_visual_indexes must be below the vision depth"),
                 (len(v.deepstack_visual_indexes) <= t.num_hidden_layers,
                  "deepstack_visual_indexes must not outnumber the decoder layers that take their features"))
        broken = [why for ok, why in rules if not ok]
        if broken:
            raise ConfigError(f"inconsistent model config: {'; '.join(broken)}")


_SCALARS = {"int": int, "float": (int, float), "bool": bool, "str": str}


def _typed_fields(cls, d: Any, where: str, skip: tuple[str, ...] = ()) -> dict:
    """The fields of dataclass `cls` in dict `d`, each present when it has no default and of its annotated
    type; numbers of the model's shape are positive. Raises ConfigError naming the first bad field."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(d).__name__}")
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if f.name not in d:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{where}.{f.name} is missing")
            continue
        value, kind = d[f.name], str(f.type).split(" | ")[0]
        if kind.startswith("tuple"):  # sizes are positive, indexes (fullatt_block_indexes) from 0
            low = 0 if f.name.endswith("_indexes") else 1
            ok = isinstance(value, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) and x >= low
                                                          for x in value)
        elif kind in _SCALARS:
            ok = (isinstance(value, _SCALARS[kind]) and (kind == "bool" or not isinstance(value, bool))
                  and (kind not in ("int", "float") or value > 0 or (value == 0 and f.name.endswith("_id"))))
            ok = ok or (value is None and "None" in str(f.type))
        else:
            ok = True
        if not ok:
            raise ConfigError(f"{where}.{f.name} = {value!r} is not a valid {f.type}")
        out[f.name] = value
    return out


REQUIRED_TOKEN_IDS = ("image_token_id", "video_token_id")


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
    family = family_of(raw)
    text_src = raw.get("text_config") or raw  # v5 nests, original is flat
    text_kwargs = _pick(text_src, TextConfig)
    text_kwargs.update(_rope_fields(text_src, raw))
    if "num_key_value_heads" not in text_kwargs:
        text_kwargs["num_key_value_heads"] = text_kwargs.get("num_attention_heads")
    text = TextConfig(**_typed_fields(TextConfig, text_kwargs, "config.json text config"))

    vsrc = dict(raw.get("vision_config") or {})
    vrope = vsrc.get("rope_parameters") or {}
    if "rope_theta" in vrope:
        vsrc["rope_theta"] = vrope["rope_theta"]
    vision_kwargs = _typed_fields(VisionConfig, _pick(vsrc, VisionConfig, renames=family.vision_renames),
                                  "config.json vision_config")
    for name in ("fullatt_block_indexes", "deepstack_visual_indexes"):
        vision_kwargs[name] = tuple(vision_kwargs.get(name, ()))
    vision = VisionConfig(**vision_kwargs)

    tie = raw.get("tie_word_embeddings")
    if tie is None:
        tie = text_src.get("tie_word_embeddings", False)
    top = _pick(raw, ModelConfig)
    for k in ("text", "vision", "tie_word_embeddings", "extra"):
        top.pop(k, None)
    top["model_type"] = family.model_type
    missing = [k for k in REQUIRED_TOKEN_IDS if not isinstance(top.get(k), int)]
    if missing:
        raise ConfigError(f"config.json has no integer {', '.join(missing)}: the runtime reads the vision placeholder "
                          "token ids from the checkpoint; add them as the published Qwen2-VL config.json has them")
    cfg = ModelConfig(text=text, vision=vision, tie_word_embeddings=bool(tie), **top)
    cfg.validate()
    return cfg


def load_config(path: str | Path) -> ModelConfig:
    """Load the config of a checkpoint directory (config.json) or an artifact dir (manifest.json)."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory: pass a Qwen2-VL checkpoint or an exported artifact directory")
    manifest = path / "manifest.json"
    if manifest.is_file():
        raw = _read_json(manifest)
        return ModelConfig.from_dict(raw["config"] if isinstance(raw, dict) and "config" in raw else None)
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ConfigError(
            f"{path} has neither config.json (a Hugging Face checkpoint) nor manifest.json (an exported artifact dir)"
        )
    raw = _read_json(cfg)
    if not isinstance(raw, dict):
        raise ConfigError(f"{cfg} must hold a JSON object, got {type(raw).__name__}")
    return parse_hf_config(raw)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"{path} is not valid UTF-8 JSON: {e}") from None
