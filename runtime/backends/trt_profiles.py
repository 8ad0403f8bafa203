"""TensorRT engine plans as plain data: optimization profiles from user limits, engine sidecars,
buffer sizes, and the checks that refuse an input beyond an engine's profile.

No TensorRT import here: the builder (export/trt_build.py) and the runtime backend both use it,
and every rule is tested on the CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..artifact import GRAPHS
from ..config import ModelConfig
from ..errors import ArtifactError, InputError

SIDECAR_SUFFIX = ".json"
ENGINES = GRAPHS  # one engine per exported graph
PREFILL, DECODE = 0, 1  # decoder profile indices
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class Limits:
    """What an engine set accepts; each field is the `build-trt` flag of the same name."""

    max_image_tokens: int = 1280  # merged tokens of one image / one temporal slice of a video
    min_image_tokens: int = 4
    max_frames: int = 16  # video frames per encoder call (temporal slices = frames / temporal_patch_size)
    max_prompt: int = 2048
    max_context: int = 4096
    max_batch: int = 1

    def validate(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.max_prompt >= self.max_context:
            raise ValueError(f"--max-prompt ({self.max_prompt}) must be below --max-context ({self.max_context})")
        if self.min_image_tokens > self.max_image_tokens:
            raise ValueError("--min-image-tokens must not exceed --max-image-tokens")


Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


def _span(lo: int, hi: int, opt: int | None = None) -> tuple[int, int, int]:
    return lo, (hi if opt is None else max(lo, min(opt, hi))), hi


def _shapes(*dims: tuple[int, int, int]) -> tuple[Shape, Shape, Shape]:
    return tuple(tuple(d[i] for d in dims) for i in range(3))  # type: ignore[return-value]


def vision_profiles(cfg: ModelConfig, lim: Limits) -> list[Profile]:
    v = cfg.vision
    m2 = v.spatial_merge_size ** 2
    frames = _span(1, max(1, lim.max_frames // v.temporal_patch_size), 1)
    patches = _span(lim.min_image_tokens * m2, lim.max_image_tokens * m2)
    fixed = lambda n: (n, n, n)  # noqa: E731
    return [{
        "pixel_values": _shapes(frames, patches, fixed(v.patch_dim)),
        "rotary_cos": _shapes(patches, fixed(v.head_dim)),
        "rotary_sin": _shapes(patches, fixed(v.head_dim)),
    }]


def merger_profiles(cfg: ModelConfig, lim: Limits) -> list[Profile]:
    batch, seq = _span(1, lim.max_batch, 1), _span(1, lim.max_prompt)
    return [{
        "input_ids": _shapes(batch, seq),
        "vision_embeds": _shapes(_span(0, lim.max_prompt), (cfg.text.hidden_size,) * 3),
    }]


def decoder_profiles(cfg: ModelConfig, lim: Limits) -> list[Profile]:
    """Prefill (L up to max_prompt, nothing cached) and decode (L = 1, cache up to max_context - 1)."""
    t = cfg.text
    batch = _span(1, lim.max_batch, 1)
    fixed = lambda n: (n, n, n)  # noqa: E731

    def profile(seq, past, total) -> Profile:
        p = {"inputs_embeds": _shapes(batch, seq, fixed(t.hidden_size)),
             "attention_mask": _shapes(batch, total),
             "position_ids": _shapes(fixed(3), batch, seq)}
        for i in range(t.num_hidden_layers):
            for kind in ("key", "value"):
                p[f"past_key_values.{i}.{kind}"] = _shapes(batch, fixed(t.num_key_value_heads), past,
                                                           fixed(t.head_dim))
        return p

    prefill = profile(_span(1, lim.max_prompt), fixed(0), _span(1, lim.max_prompt))
    decode = profile(fixed(1), _span(1, lim.max_context - 1, lim.max_prompt),
                     _span(2, lim.max_context, lim.max_prompt + 1))
    return [prefill, decode]


PROFILES = {"vision_encoder": vision_profiles, "embedding_merger": merger_profiles, "decoder": decoder_profiles}


def profiles_for(engine: str, cfg: ModelConfig, lim: Limits) -> list[Profile]:
    lim.validate()
    return PROFILES[engine](cfg, lim)


# -- buffer sizes ---------------------------------------------------------------------------------

def kv_cache_bytes(cfg: ModelConfig, lim: Limits, dtype: str = "fp32") -> int:
    """Device memory of the preallocated KV cache: keys + values of every layer at max_context,
    twice over (the decoder reads the past from one buffer set and writes the present to the other)."""
    t = cfg.text
    per_set = 2 * t.num_hidden_layers * lim.max_batch * t.num_key_value_heads * lim.max_context * t.head_dim
    return 2 * per_set * DTYPE_BYTES[dtype]


# -- sidecars -------------------------------------------------------------------------------------

def make_sidecar(engine: str, *, trt_version: str, gpu_name: str, compute_capability: str, precision: str,
                 limits: Limits, profiles: list[Profile], onnx_sha256: str) -> dict[str, Any]:
    return {"engine": engine, "tensorrt_version": trt_version, "gpu_name": gpu_name,
            "compute_capability": compute_capability, "precision": precision, "limits": asdict(limits),
            "profiles": [{k: [list(s) for s in v] for k, v in p.items()} for p in profiles],
            "onnx_sha256": onnx_sha256}


def check_sidecar(sidecar: dict[str, Any], *, trt_version: str, gpu_name: str, compute_capability: str) -> None:
    """Refuse an engine built by another TensorRT or on another GPU: engines are not portable."""
    problems = []
    if sidecar.get("tensorrt_version") != trt_version:
        problems.append(f"TensorRT {sidecar.get('tensorrt_version')} (running {trt_version})")
    if sidecar.get("compute_capability") != compute_capability or sidecar.get("gpu_name") != gpu_name:
        problems.append(f"GPU {sidecar.get('gpu_name')} sm_{sidecar.get('compute_capability')} "
                        f"(running on {gpu_name} sm_{compute_capability})")
    if problems:
        raise ArtifactError(f"engine {sidecar.get('engine')} was built for " + " and ".join(problems)
                            + ": TensorRT engines are not portable across TensorRT versions or GPUs (Jetson "
                            "included); rebuild them on this device with `qwen2vl-edge build-trt`")


def limits_of(sidecar: dict[str, Any]) -> Limits:
    return Limits(**sidecar["limits"])


# -- input checks ---------------------------------------------------------------------------------

def check_request(lim: Limits, cfg: ModelConfig, *, batch: int, prompt_len: int, max_new_tokens: int,
                  image_grids: list[tuple[int, int, int]]) -> None:
    """Fail before running when an input exceeds the engines' profiles, naming the flag to raise."""
    if batch > lim.max_batch:
        raise InputError(f"batch of {batch} conversations exceeds the engines' max batch {lim.max_batch}: "
                         "rebuild with `build-trt --max-batch N`")
    if prompt_len > lim.max_prompt:
        raise InputError(f"prompt of {prompt_len} tokens exceeds the engines' max prompt {lim.max_prompt}: "
                         "rebuild with `build-trt --max-prompt N`, or use smaller images (max_pixels)")
    if prompt_len + max_new_tokens > lim.max_context:
        raise InputError(f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds the engines' max "
                         f"context {lim.max_context}: lower max_new_tokens or rebuild with "
                         "`build-trt --max-context N`")
    v = cfg.vision
    for t, h, w in image_grids:
        tokens = h * w // v.spatial_merge_size ** 2
        if tokens > lim.max_image_tokens:
            raise InputError(f"an image/frame of {tokens} tokens ({w * v.patch_size}x{h * v.patch_size} px) exceeds the engines' max "
                             f"{lim.max_image_tokens} image tokens: pass max_pixels, or rebuild with "
                             "`build-trt --max-image-tokens N`")
        if tokens < lim.min_image_tokens:
            raise InputError(f"an image of {tokens} tokens is below the engines' min {lim.min_image_tokens}")
        if t * v.temporal_patch_size > lim.max_frames:
            raise InputError(f"a video of {t * v.temporal_patch_size} frames exceeds the engines' max "
                             f"{lim.max_frames} frames: sample fewer (nframes/fps) or rebuild with "
                             "`build-trt --max-frames N`")
