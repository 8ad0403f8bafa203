"""TensorRT engine plans as plain data: optimization profiles from user limits, engine sidecars, the
checks that refuse an input beyond an engine's profile, and the engines' I/O against the manifest.

No TensorRT import here: the builder (export/trt_build.py) and the runtime backend both use it,
and every rule is tested on the CPU. Memory sizes live in trt_memory.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..artifact import GRAPHS
from ..config import ModelConfig
from ..errors import ArtifactError, InputError

SIDECAR_SUFFIX = ".json"
SIDECAR_FORMAT = 1  # bumped when a sidecar field changes meaning
ENGINES = GRAPHS  # one engine per exported graph
PREFILL, DECODE = 0, 1  # decoder profile indices
CONCAT, PREALLOCATED = "concat", "preallocated"  # manifest export.kv_cache (see the graphs' contract)
PRECISIONS = ("fp32", "fp16", "bf16")
POS_TAPS = 4  # bilinear taps a patch into Qwen3-VL's position table
MIN_TENSORRT = ("10.3", "10.15")


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

    def frames(self, cfg: ModelConfig) -> int:
        """Temporal slices per vision encoder call."""
        return max(1, self.max_frames // cfg.vision.temporal_patch_size)


# What 8 GB Jetson boards (Orin Nano / NX 8 GB) should build with; docs/tensorrt.md's Jetson table uses it.
JETSON_8GB = Limits(max_image_tokens=512, max_frames=4, max_prompt=1536, max_context=2048, max_batch=1)

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


def _span(lo: int, hi: int, opt: int | None = None) -> tuple[int, int, int]:
    return lo, (hi if opt is None else max(lo, min(opt, hi))), hi


def _shapes(*dims: tuple[int, int, int]) -> tuple[Shape, Shape, Shape]:
    return tuple(tuple(d[i] for d in dims) for i in range(3))  # type: ignore[return-value]


def _fixed(n: int) -> tuple[int, int, int]:
    return n, n, n


def kv_names(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(past input, present output) of every layer's keys and values, in graph order."""
    return [(f"past_key_values.{i}.{kind}", f"present.{i}.{kind}")
            for i in range(cfg.text.num_hidden_layers) for kind in ("key", "value")]


def vision_profiles(cfg: ModelConfig, lim: Limits) -> list[Profile]:
    v = cfg.vision
    m2 = v.spatial_merge_size ** 2
    frames = _span(1, lim.frames(cfg), 1)
    patches = _span(lim.min_image_tokens * m2, lim.max_image_tokens * m2)
    profile = {
        "pixel_values": _shapes(frames, patches, _fixed(v.patch_dim)),
        "rotary_cos": _shapes(patches, _fixed(v.head_dim)),
        "rotary_sin": _shapes(patches, _fixed(v.head_dim)),
    }
    if cfg.family.windowed:  # Qwen2.5-VL's window layout (runtime/rope.py: vision_windows)
        windows, slots = window_limit(cfg, lim), _fixed(v.window_merged ** 2 * m2)
        profile.update(window_index=_shapes(windows, slots), window_mask=_shapes(windows, slots),
                       window_inverse=_shapes(patches))
    if cfg.family.pos_table:  # Qwen3-VL's 4 position-table taps a patch (runtime/rope.py: vision_pos_taps)
        profile.update(pos_index=_shapes(patches, _fixed(POS_TAPS)), pos_weight=_shapes(patches, _fixed(POS_TAPS)))
    return [profile]


def window_limit(cfg: ModelConfig, lim: Limits) -> tuple[int, int, int]:
    """Windows of one frame: at least one, at most one a merged token (a window holds one at least); a square
    image at the max fills whole windows."""
    return _span(1, lim.max_image_tokens, -(-lim.max_image_tokens // cfg.vision.window_merged ** 2))


def merger_profiles(cfg: ModelConfig, lim: Limits) -> list[Profile]:
    batch, seq = _span(1, lim.max_batch, 1), _span(1, lim.max_prompt)
    return [{
        "input_ids": _shapes(batch, seq),
        # every prompt token of every row may be an image token
        "vision_embeds": _shapes(_span(0, lim.max_batch * lim.max_prompt), _fixed(cfg.text.hidden_size)),
    }]


def decoder_profiles(cfg: ModelConfig, lim: Limits, kv_cache: str = CONCAT) -> list[Profile]:
    """Prefill (L up to max_prompt, after any past: a chat session's later turn prefills after the earlier
    ones) and decode (L = 1; with DeepStack, M = 0 vision tokens). Concat: the past holds P positions (0 up to
    max_context - 1; the prefill profile is tuned for none). Preallocated: the past is the request's whole buffer,
    whose length the graphs fix (export --max-context; build-trt builds with that max_context), in both profiles.
    P + L is at most max_context in both."""
    t = cfg.text
    batch = _span(1, lim.max_batch, 1)
    layers = len(cfg.vision.deepstack_visual_indexes)

    def profile(seq, past, total, vision=_span(0, lim.max_batch * lim.max_prompt)) -> Profile:
        p = {"inputs_embeds": _shapes(batch, seq, _fixed(t.hidden_size)),
             "attention_mask": _shapes(batch, total),
             "position_ids": _shapes(_fixed(3), batch, seq)}
        if layers:  # DeepStack's features of M vision tokens: any prompt token of any row may be one
            p.update(visual_index=_shapes(batch, seq),
                     deepstack_embeds=_shapes(_fixed(layers), vision, _fixed(t.hidden_size)))
        for past_name, _ in kv_names(cfg):
            p[past_name] = _shapes(batch, _fixed(t.num_key_value_heads), past, _fixed(t.head_dim))
        return p

    if kv_cache == PREALLOCATED:
        capacity = _fixed(lim.max_context)
        return [profile(_span(1, lim.max_prompt), capacity, _span(1, lim.max_context, lim.max_prompt)),
                profile(_fixed(1), capacity, _span(2, lim.max_context, lim.max_prompt + 1), _fixed(0))]
    prefill = profile(_span(1, lim.max_prompt), _span(0, lim.max_context - 1, 0),
                      _span(1, lim.max_context, lim.max_prompt))
    decode = profile(_fixed(1), _span(1, lim.max_context - 1, lim.max_prompt),
                     _span(2, lim.max_context, lim.max_prompt + 1), _fixed(0))  # decode steps merge no vision
    return [prefill, decode]


def decoder_profile(past: int, new: int) -> int:
    """The decoder profile for a run of `new` positions after `past` cached ones: decode for one token after
    a past, prefill for the rest (a prompt, or a chat session's later turn; one token with no past too,
    which decode's ranges, tuned for the token loop, do not take)."""
    return DECODE if new == 1 and past > 0 else PREFILL


def check_static_context(lim: Limits, kv_length: int | None) -> None:
    """Graphs with a static KV cache (export --max-context) take engines of exactly that max context."""
    if kv_length is not None and lim.max_context != kv_length:
        raise ArtifactError(f"these graphs fix the KV cache at {kv_length} positions (export --max-context "
                            f"{kv_length}): build with --max-context {kv_length} (the default for them), or "
                            f"re-export with --max-context {lim.max_context}")


def profiles_for(engine: str, cfg: ModelConfig, lim: Limits, kv_cache: str = CONCAT) -> list[Profile]:
    lim.validate()
    if engine == "decoder":
        return decoder_profiles(cfg, lim, kv_cache)
    return {"vision_encoder": vision_profiles, "embedding_merger": merger_profiles}[engine](cfg, lim)


# -- the build-trt flag behind each dynamic dimension ------------------------------------------------

_BATCH, _PROMPT, _CONTEXT = "--max-batch", "--max-prompt", "--max-context"
_DIM_FLAGS = {  # input name (past_* share one entry) -> flag per dimension (None: fixed by the model)
    "pixel_values": ("--max-frames", "--max-image-tokens", None),
    "rotary_cos": ("--max-image-tokens", None), "rotary_sin": ("--max-image-tokens", None),
    "window_index": ("--max-image-tokens", None), "window_mask": ("--max-image-tokens", None),
    "window_inverse": ("--max-image-tokens",),
    "pos_index": ("--max-image-tokens", None), "pos_weight": ("--max-image-tokens", None),
    "input_ids": (_BATCH, _PROMPT), "vision_embeds": (_PROMPT, None),
    "inputs_embeds": (_BATCH, _PROMPT, None), "attention_mask": (_BATCH, _CONTEXT),
    "position_ids": (None, _BATCH, _PROMPT), "past_key_values": (_BATCH, None, _CONTEXT, None),
    "visual_index": (_BATCH, _PROMPT), "deepstack_embeds": (None, _PROMPT, None),
}


def flag_for(name: str, dim: int) -> str | None:
    flags = _DIM_FLAGS.get(name.split(".")[0], ())
    return flags[dim] if dim < len(flags) else None


def check_shape(engine: str, name: str, shape: Shape, profile: tuple[Shape, Shape, Shape]) -> None:
    """InputError naming the tensor, its shape, the profile's range and the flag that widens it."""
    lo, _, hi = profile
    if len(shape) != len(lo):
        raise InputError(f"{engine} input {name} has shape {tuple(shape)}; the engine takes rank {len(lo)}")
    for d, (x, a, b) in enumerate(zip(shape, lo, hi)):
        if not a <= x <= b:
            flag = flag_for(name, d)
            fix = f"rebuild with `build-trt {flag} N`" if flag and x > b else "this input does not fit the engine"
            raise InputError(f"{engine} input {name} of shape {tuple(shape)}: dimension {d} is {x}, the engine's "
                             f"profile takes {a}..{b} ({tuple(lo)} to {tuple(hi)}): {fix}")


# -- sidecars -------------------------------------------------------------------------------------

def make_sidecar(engine: str, *, trt_version: str, gpu_name: str, compute_capability: str, precision: str,
                 kv_cache: str, limits: Limits, profiles: list[Profile], onnx_sha256: str) -> dict[str, Any]:
    return {"format_version": SIDECAR_FORMAT, "engine": engine, "tensorrt_version": trt_version,
            "gpu_name": gpu_name, "compute_capability": compute_capability, "precision": precision,
            "kv_cache": kv_cache, "limits": asdict(limits),
            "profiles": [{k: [list(s) for s in v] for k, v in p.items()} for p in profiles],
            "onnx_sha256": onnx_sha256}


def check_sidecar(sidecar: dict[str, Any], *, trt_version: str, gpu_name: str, compute_capability: str,
                  precision: str | None = None, kv_cache: str | None = None, onnx_sha256: str | None = None) -> None:
    """Refuse an engine built by another TensorRT, on another GPU, or from other graphs than the manifest's."""
    name = sidecar.get("engine")
    if sidecar.get("format_version") != SIDECAR_FORMAT:
        raise ArtifactError(f"engine {name}'s sidecar has format {sidecar.get('format_version')!r}, this runtime "
                            f"reads {SIDECAR_FORMAT}: rebuild the engines with `qwen2vl-edge build-trt`")
    problems = []
    if sidecar.get("tensorrt_version") != trt_version:
        problems.append(f"TensorRT {sidecar.get('tensorrt_version')} (running {trt_version})")
    if sidecar.get("compute_capability") != compute_capability or sidecar.get("gpu_name") != gpu_name:
        problems.append(f"GPU {sidecar.get('gpu_name')} sm_{sidecar.get('compute_capability')} "
                        f"(running on {gpu_name} sm_{compute_capability})")
    for field, expected in (("precision", precision), ("kv_cache", kv_cache), ("onnx_sha256", onnx_sha256)):
        if expected is not None and sidecar.get(field) != expected:
            problems.append(f"{field} {sidecar.get(field)} (the manifest's graphs: {expected})")
    if problems:
        raise ArtifactError(f"engine {name} was built for " + " and ".join(problems)
                            + ": TensorRT engines are not portable across TensorRT versions or GPUs (Jetson "
                            "included) and belong to the graphs they were built from; rebuild them on this device "
                            "with `qwen2vl-edge build-trt`")


def limits_of(sidecar: dict[str, Any]) -> Limits:
    return Limits(**sidecar["limits"])


def profile_of(sidecar: dict[str, Any], index: int) -> Profile:
    return {k: tuple(tuple(s) for s in v) for k, v in sidecar["profiles"][index].items()}


# -- engine I/O against the manifest -----------------------------------------------------------------

def check_engine_io(engine: str, found: dict[str, tuple[str, str, int]], graph: dict[str, Any]) -> None:
    """`found`: name -> (mode 'input'|'output', dtype name, rank) as the engine reports them; `graph`: the
    manifest's entry with its inputs/outputs. ArtifactError listing every mismatch."""
    expected = {v["name"]: (mode, v["dtype"], len(v["shape"]))
                for mode in ("input", "output") for v in graph[f"{mode}s"]}
    problems = [f"{n}: missing from the engine" for n in expected if n not in found]
    problems += [f"{n}: not in the manifest's graph" for n in found if n not in expected]
    for n in expected.keys() & found.keys():
        for what, want, got in zip(("mode", "dtype", "rank"), expected[n], found[n]):
            if want != got:
                problems.append(f"{n}: {what} {got} in the engine, {want} in the manifest")
    if problems:
        raise ArtifactError(f"engine {engine} does not match the manifest's {engine} graph:\n  "
                            + "\n  ".join(sorted(problems))
                            + "\nthe engines were built from other graphs: rebuild them with `qwen2vl-edge build-trt`")


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
            raise InputError(f"an image/frame of {tokens} tokens ({w * v.patch_size}x{h * v.patch_size} px) exceeds "
                             f"the engines' max {lim.max_image_tokens} image tokens: pass max_pixels, or rebuild "
                             "with `build-trt --max-image-tokens N`")
        if tokens < lim.min_image_tokens:
            raise InputError(f"an image of {tokens} tokens is below the engines' min {lim.min_image_tokens}")
        if t * v.temporal_patch_size > lim.max_frames:
            raise InputError(f"a video of {t * v.temporal_patch_size} frames exceeds the engines' max "
                             f"{lim.max_frames} frames: sample fewer (nframes/fps) or rebuild with "
                             "`build-trt --max-frames N`")
