"""Images and videos -> flattened pixel patches + (t, h, w) grids, as Qwen2-VL expects.

Reproduces the reference pipeline step by step:
1. qwen-vl-utils `fetch_image` / `fetch_video` (`image_patch_size` = the checkpoint's patch size): RGB
   conversion, `smart_resize` to a multiple of patch_size * merge_size (28, Qwen3-VL's 32), Pillow BICUBIC
   (torchvision bicubic for videos in the reference);
2. transformers' image / video processor configured from preprocessor_config.json (and
   video_preprocessor_config.json where the checkpoint ships one, as Qwen3-VL does): a second `smart_resize`
   with the checkpoint's limits (Qwen2-VL: usually identity; Qwen3-VL: images under its 65536-pixel minimum
   grow to it, and its video processor bounds the whole clip), rescale, normalisation, patchify in
   transformers' exact order.
Qwen3-VL's model card passes `do_resize=False` to the processor after qwen-vl-utils; we run transformers'
default (`do_resize=True`, what the processor alone and servers built on it do), so the checkpoint's limits
hold. The two differ only for images under 65536 pixels and clips over the video limits.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from . import checks
from .errors import ConfigError, InputError
from .media import load_image
from .video import VideoInfo, read_video

MAX_RATIO = 200
MAX_SIDE = 100_000  # a requested side beyond this is a typo, and its area arithmetic would leave floats
# qwen-vl-utils budgets, counted in merged tokens of (patch_size * merge_size)^2 pixels
IMAGE_MIN_TOKENS, IMAGE_MAX_TOKENS = 4, 16384
VIDEO_MIN_TOKENS, VIDEO_MAX_TOKENS = 128, 768
VIDEO_CONTEXT_TOKENS = 128000  # qwen-vl-utils MODEL_SEQ_LEN: total_pixels default is 90 % of it
FRAME_FACTOR = 2
FPS, FPS_MIN_FRAMES, FPS_MAX_FRAMES = 2.0, 4, 768
LIST_SAMPLE_FPS = 2.0  # qwen-vl-utils: the frames per second a list of frames stands for, unless sample_fps says

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# video_preprocessor_config.json's video_processor_type whose limits bound a whole clip (t * h * w pixels, each frame
# capped at max_video_tokens merged tokens and at its share of the clip's max), not each frame
CLIP_BUDGET_PROCESSORS = ("Qwen3VLVideoProcessor",)


@dataclass(frozen=True)
class VideoLimits:
    """The video processor's second resize (video_preprocessor_config.json; without it, preprocessor_config.json's
    limits per frame, as transformers falls back)."""

    min_pixels: int
    max_pixels: int
    clip_budget: bool = False  # min/max_pixels bound t * h * w (Qwen3VLVideoProcessor); else each frame
    max_video_tokens: int = VIDEO_MAX_TOKENS  # per frame, under clip_budget (the processor's default)


@dataclass(frozen=True)
class PreprocessorConfig:
    """preprocessor_config.json of the checkpoint; defaults are what Qwen2-VL ships."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 16384
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255
    video: VideoLimits | None = None  # None: the image limits, per frame

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def video_limits(self) -> VideoLimits:
        return self.video or VideoLimits(self.min_pixels, self.max_pixels)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "PreprocessorConfig":
        size = raw.get("size") or {}
        return cls(
            min_pixels=int(raw.get("min_pixels", size.get("shortest_edge", cls.min_pixels))),
            max_pixels=int(raw.get("max_pixels", size.get("longest_edge", cls.max_pixels))),
            patch_size=int(raw.get("patch_size", cls.patch_size)),
            temporal_patch_size=int(raw.get("temporal_patch_size", cls.temporal_patch_size)),
            merge_size=int(raw.get("merge_size", cls.merge_size)),
            image_mean=tuple(raw.get("image_mean", CLIP_MEAN)),
            image_std=tuple(raw.get("image_std", CLIP_STD)),
            rescale_factor=float(raw.get("rescale_factor", 1 / 255)),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "PreprocessorConfig":
        """A checkpoint or artifact dir (its preprocessor_config.json, and video_preprocessor_config.json if
        there is one), or one preprocessor_config.json."""
        path = Path(path)
        video = path / VIDEO_FILE if path.is_dir() else None
        if path.is_dir():
            path = path / "preprocessor_config.json"
        pp = cls.from_dict(json.loads(path.read_text())) if path.is_file() else cls()
        if video is None or not video.is_file():
            return pp
        raw = json.loads(video.read_text())
        vp = cls.from_dict(raw)
        if (vp.patch_size, vp.temporal_patch_size, vp.merge_size, vp.image_mean, vp.image_std, vp.rescale_factor) != (
                pp.patch_size, pp.temporal_patch_size, pp.merge_size, pp.image_mean, pp.image_std, pp.rescale_factor):
            raise ConfigError(f"{video} and preprocessor_config.json differ in patch, merge or normalisation "
                              "settings: images and videos share them here; make the two files agree")
        limits = VideoLimits(vp.min_pixels, vp.max_pixels, raw.get("video_processor_type") in CLIP_BUDGET_PROCESSORS,
                             int(raw.get("max_video_tokens", VIDEO_MAX_TOKENS)))
        return dataclasses.replace(pp, video=limits)

    def to_dict(self) -> dict[str, Any]:
        return {
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "rescale_factor": self.rescale_factor,
        }


DEFAULT_PREPROCESSOR = PreprocessorConfig()
VIDEO_FILE = "video_preprocessor_config.json"


def _check_ratio(height: int, width: int) -> None:
    if min(height, width) < 1:
        raise InputError(f"image is {width}x{height} pixels: it must be at least 1x1")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise InputError(
            f"image aspect ratio {max(height, width) / min(height, width):.1f} (size {width}x{height}) exceeds "
            f"{MAX_RATIO}: crop or pad the image first"
        )


def smart_resize(
    height: int, width: int, factor: int, min_pixels: int, max_pixels: int, *, floor_to_factor: bool = True
) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels], aspect kept.

    Python's round() (half to even) on purpose, as the reference. The two reference variants differ
    only at the edges: qwen-vl-utils clamps the rounded size to >= factor before the budget checks,
    transformers clamps the shrunken size instead (`floor_to_factor=False` selects transformers').
    """
    _check_ratio(height, width)
    if max_pixels < min_pixels:
        raise InputError(f"max_pixels ({max_pixels}) must be >= min_pixels ({min_pixels}): give a smaller min_pixels "
                         "with a small max_pixels")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if floor_to_factor:
        h_bar, w_bar = max(factor, h_bar), max(factor, w_bar)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
        if not floor_to_factor:
            h_bar, w_bar = max(factor, h_bar), max(factor, w_bar)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class PixelOptions:
    """A content item's min_pixels / max_pixels / resized_height / resized_width, checked (None: default)."""

    min_pixels: int | None = None
    max_pixels: int | None = None
    resized_height: int | None = None
    resized_width: int | None = None

    @classmethod
    def check(cls, pp: PreprocessorConfig, min_pixels=None, max_pixels=None, resized_height=None,
              resized_width=None) -> "PixelOptions":
        """Types and ranges, each error naming its field. min_pixels is capped by the checkpoint's
        max_pixels, which bounds the final size anyway: above it, the first resize would only waste memory."""
        lo = None if min_pixels is None else int(checks.real(
            "min_pixels", min_pixels, minimum=0, maximum=pp.max_pixels, hint=" (the checkpoint's max_pixels is the "
            "most an image gets)"))
        hi = None if max_pixels is None else int(checks.real("max_pixels", max_pixels, minimum=1))
        if lo is not None and hi is not None and lo > hi:
            raise InputError(f"min_pixels ({lo}) must be <= max_pixels ({hi})")
        if (resized_height is None) != (resized_width is None):
            raise InputError("give resized_height and resized_width together, or neither")
        if resized_height is None:
            return cls(lo, hi)
        h = round(checks.real("resized_height", resized_height, minimum=1, maximum=MAX_SIDE))
        w = round(checks.real("resized_width", resized_width, minimum=1, maximum=MAX_SIDE))
        if max(h, w) / min(h, w) > MAX_RATIO:
            raise InputError(f"resized_height x resized_width ({h} x {w}) has an aspect ratio over {MAX_RATIO}")
        return cls(lo, hi, h, w)


def _resize(image: Image.Image, height: int, width: int) -> Image.Image:
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.BICUBIC)


def _requested_size(resized_height: int, resized_width: int, factor: int) -> tuple[int, int]:
    """An explicit resized_height/width, rounded as qwen-vl-utils does: under the default image budgets."""
    return smart_resize(int(resized_height), int(resized_width), factor, IMAGE_MIN_TOKENS * factor**2,
                        IMAGE_MAX_TOKENS * factor**2)


def _fit_image(image: Image.Image, factor: int, opts: PixelOptions) -> Image.Image:
    """qwen-vl-utils `fetch_image` resize step."""
    lo = IMAGE_MIN_TOKENS * factor**2 if opts.min_pixels is None else opts.min_pixels
    hi = IMAGE_MAX_TOKENS * factor**2 if opts.max_pixels is None else opts.max_pixels
    if opts.resized_height is not None:
        h, w = _requested_size(opts.resized_height, opts.resized_width, factor)
    else:
        h, w = smart_resize(image.height, image.width, factor, lo, hi)
    # qwen-vl-utils gives a 0-pixel side (and then crashes) when max_pixels is under about one factor x factor
    # block; one block is the smallest image there is
    return _resize(image, max(h, factor), max(w, factor))


def _normalize_table(pp: PreprocessorConfig, *, fused: bool) -> np.ndarray:
    """float32 [C, 256]: the normalised value of every 8-bit level, computed exactly as the reference does.

    The references round differently: the PIL image processor rescales in float64 then normalises
    in float32; the torch video processor folds the rescale into mean/std (`fused`). A table keeps
    each one's arithmetic bit for bit and turns normalisation into a gather.
    """
    levels = np.arange(256, dtype=np.uint8)[None, :]
    mean = np.asarray(pp.image_mean, dtype=np.float32)[:, None]
    std = np.asarray(pp.image_std, dtype=np.float32)[:, None]
    if fused:
        scale = np.float32(1.0 / pp.rescale_factor)
        return (levels.astype(np.float32) - mean * scale) / (std * scale)
    return ((levels.astype(np.float64) * pp.rescale_factor).astype(np.float32) - mean) / std


def patchify(frames: np.ndarray, pp: PreprocessorConfig, *, fused: bool) -> tuple[np.ndarray, tuple[int, int, int]]:
    """uint8 [T, C, H, W] -> normalised float32 [t*h*w, C*tps*p*p], (t, h, w).

    T is a multiple of temporal_patch_size, or 1 for a still image, which fills every temporal slot.
    Patch order is transformers': merge blocks row-major, the m x m patches of a block adjacent.
    Bytes are rearranged and normalised before the temporal copies are made.
    """
    p, m, tps = pp.patch_size, pp.merge_size, pp.temporal_patch_size
    T, C, H, W = frames.shape
    slots = 1 if T == 1 else tps
    gt, gh, gw = max(1, T // tps), H // p, W // p
    x = frames.reshape(gt, slots, C, gh // m, m, p, gw // m, m, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [gt, gh/m, gw/m, m, m, C, slots, p, p]
    x = np.ascontiguousarray(x).reshape(gt * gh * gw, C, slots, p * p)
    table = _normalize_table(pp, fused=fused)
    out = np.empty(x.shape, np.float32)
    for c in range(C):
        np.take(table[c], x[:, c], out=out[:, c])
    if slots != tps:
        out = np.broadcast_to(out, (gt * gh * gw, C, tps, p * p))
    return np.ascontiguousarray(out).reshape(gt * gh * gw, C * tps * p * p), (gt, gh, gw)


def _to_chw(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


def process_image(
    image: Any,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    resized_height: int | None = None,
    resized_width: int | None = None,
    preprocessor: PreprocessorConfig = DEFAULT_PREPROCESSOR,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image (path, URL, data URI, PIL image or HWC uint8 array) -> patches [N, 1176], (1, h, w)."""
    pp = preprocessor
    opts = PixelOptions.check(pp, min_pixels, max_pixels, resized_height, resized_width)
    img = _fit_image(load_image(image), pp.factor, opts)
    # transformers' processor: second smart_resize with the checkpoint's limits (usually identity)
    h, w = smart_resize(img.height, img.width, pp.factor, pp.min_pixels, pp.max_pixels, floor_to_factor=False)
    return patchify(_to_chw(_resize(img, h, w))[None], pp, fused=False)


def smart_nframes(total_frames: int, video_fps: float, fps: float | None = None, nframes: int | None = None,
                  min_frames: int = FPS_MIN_FRAMES, max_frames: int = FPS_MAX_FRAMES) -> int:
    """How many frames qwen-vl-utils samples from a decoded video."""
    if fps is not None and nframes is not None:
        raise InputError("video: give either 'fps' or 'nframes', not both")
    if nframes is not None:
        n = round(nframes / FRAME_FACTOR) * FRAME_FACTOR
    else:
        fps = FPS if fps is None else fps
        lo = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
        hi = math.floor(min(max_frames, total_frames) / FRAME_FACTOR) * FRAME_FACTOR
        n = min(max(total_frames / video_fps * fps, lo), hi, total_frames)
        n = math.floor(n / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= n <= total_frames:
        raise InputError(f"video has {total_frames} frames; cannot sample {n} (need {FRAME_FACTOR}..{total_frames})")
    return int(n)


def _video_frame_budget(ele_min: int | None, ele_max: int | None, total_pixels: float | None,
                        nframes: int, factor: int) -> tuple[int, float]:
    lo = VIDEO_MIN_TOKENS * factor**2 if ele_min is None else int(ele_min)
    total = VIDEO_CONTEXT_TOKENS * factor**2 * 0.9 if total_pixels is None else total_pixels
    hi = max(min(VIDEO_MAX_TOKENS * factor**2, total / nframes * FRAME_FACTOR), int(lo * 1.05))
    if ele_max is not None:
        hi = min(ele_max, hi)
    return lo, hi


def smart_resize_clip(frames: int, height: int, width: int, temporal_factor: int, factor: int, min_pixels: int,
                      max_pixels: int) -> tuple[int, int]:
    """Qwen3-VL's video processor resize: as smart_resize, but the limits bound the clip's frames * h * w (the
    frame count rounded to the temporal patch in the test, as transformers' video_processing_qwen3_vl does)."""
    if height < factor or width < factor:  # the reference scales a side under one block up first
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    _check_ratio(height, width)
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _processor_video_size(h: int, w: int, n: int, pp: PreprocessorConfig) -> tuple[int, int]:
    """transformers' video processor: the second resize of `n` frames of h x w, with the checkpoint's limits.
    A clip budget caps each frame as `cap_pixels_per_frame=True` does (what qwen-vl-utils' own cap stands for,
    and what the reference passes): max_video_tokens merged tokens and an even share of max_pixels, at least
    1.05 x min_pixels."""
    limits = pp.video_limits
    if not limits.clip_budget:
        return smart_resize(h, w, pp.factor, limits.min_pixels, limits.max_pixels, floor_to_factor=False)
    per_frame = max(min(limits.max_video_tokens * pp.factor**2, limits.max_pixels // n), int(limits.min_pixels * 1.05))
    return smart_resize_clip(n, h, w, pp.temporal_patch_size, pp.factor, limits.min_pixels, per_frame * n)


def _video_size(height: int, width: int, n: int, pp: PreprocessorConfig, opts: PixelOptions,
                total_pixels: float | None) -> tuple[int, int]:
    """Frame size (h, w) of a video of `n` frames: qwen-vl-utils' budget, then the processor's second resize."""
    lo, hi = _video_frame_budget(opts.min_pixels, opts.max_pixels, total_pixels, n, pp.factor)
    if opts.resized_height is not None:
        h, w = _requested_size(opts.resized_height, opts.resized_width, pp.factor)
    else:
        h, w = smart_resize(height, width, pp.factor, lo, hi)
        h, w = max(h, pp.factor), max(w, pp.factor)  # as in _fit_image: one block at least
    return _processor_video_size(h, w, n, pp)


def video_tokens(n: int, h: int, w: int, pp: PreprocessorConfig) -> int:
    """Merged tokens of `n` frames of h x w pixels (frames padded to the temporal patch)."""
    return -(-n // pp.temporal_patch_size) * (h // pp.patch_size) * (w // pp.patch_size) // pp.merge_size ** 2


def _check_video(video: Any, fps: Any, nframes: Any, total_pixels: Any, video_start: Any, video_end: Any) -> None:
    """The video item and its sampling options, before any decoding."""
    if not (isinstance(video, (str, Path, list, tuple)) or isinstance(video, np.ndarray) and video.ndim == 4):
        raise InputError(f"video must be a file path or a list of frames (or a [T, H, W, C] uint8 array), got "
                         f"{type(video).__name__}")
    if fps is not None:
        checks.real("fps", fps, above=0)
    if nframes is not None:
        checks.integer("nframes", nframes, minimum=FRAME_FACTOR)
    if total_pixels is not None:
        checks.real("total_pixels", total_pixels, above=0)
    for name, seconds in (("video_start", video_start), ("video_end", video_end)):
        if seconds is not None:  # out of the clip is clamped to it, as qwen-vl-utils does
            checks.real(name, seconds)


def process_video(video: str | Path | Sequence[Any], **options) -> tuple[np.ndarray, tuple[int, int, int]]:
    """A list of frames, or a video file (needs the [video] extra) -> patches [N, 1176], (t, h, w)."""
    patches, grid, _, _ = process_video_timed(video, **options)
    return patches, grid


def process_video_timed(
    video: str | Path | Sequence[Any],
    *,
    fps: float | None = None,
    nframes: int | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    total_pixels: float | None = None,
    resized_height: int | None = None,
    resized_width: int | None = None,
    video_start: float | None = None,
    video_end: float | None = None,
    sample_fps: float | None = None,
    max_tokens: int | None = None,
    preprocessor: PreprocessorConfig = DEFAULT_PREPROCESSOR,
) -> tuple[np.ndarray, tuple[int, int, int], list[float], float]:
    """-> patches, grid, the sampled frames' timestamps in seconds and the frames kept per second.

    A list of frames stands for `sample_fps` frames a second (2 if not given), as qwen-vl-utils assumes: its
    made-up metadata (fps = sample_fps, frame indices 0..n-1 after the padding to an even count) gives frame i
    the time i / sample_fps, which Qwen3-VL's prompt shows.

    A file is sized from its metadata first: more than `max_tokens` tokens fails before decoding."""
    pp = preprocessor
    _check_video(video, fps, nframes, total_pixels, video_start, video_end)
    if sample_fps is not None:
        checks.real("sample_fps", sample_fps, above=0)
    opts = PixelOptions.check(pp, min_pixels, max_pixels, resized_height, resized_width)
    size = lambda h, w, n: _video_size(h, w, n, pp, opts, total_pixels)  # noqa: E731
    if isinstance(video, (str, Path)):
        def check(info: VideoInfo, n: int) -> None:
            tokens = video_tokens(n, *size(info.height, info.width, n), pp)
            if max_tokens is not None and tokens > max_tokens:
                raise InputError(
                    f"video {video}: {n} frames of {info.width}x{info.height} ({info.duration:.1f} s at "
                    f"{info.fps:g} fps) would take {tokens} tokens, over the {max_tokens} this request has room "
                    "for: sample fewer frames (fps, nframes), make them smaller (max_pixels, total_pixels) or cut "
                    "the clip (video_start, video_end)")

        sampled = read_video(video, lambda total, rate: smart_nframes(total, rate, fps, nframes), check,
                             video_start, video_end)
        images, timestamps, rate = sampled.frames, sampled.timestamps, sampled.sampled_fps
    else:
        if len(video) == 0:
            raise InputError("video has zero frames: pass at least one frame")
        # qwen-vl-utils hands each listed frame to fetch_image with image_patch_size=factor, so frames are
        # first fitted to multiples of 2 * factor under the *image* budgets; we mirror that.
        f2 = 2 * pp.factor
        images = [_fit_image(load_image(f), f2, opts) for f in video]
        if len({im.size for im in images}) > 1:
            raise InputError("video frames differ in size after resizing: give frames of one size")
        images += [images[-1]] * (-len(images) % FRAME_FACTOR)
        rate = LIST_SAMPLE_FPS if sample_fps is None else float(sample_fps)
        timestamps = [i / rate for i in range(len(images))]
        # total_num_frames = n / sample_fps * fps of that metadata, read back by transformers'
        # VideoMetadata.sampled_fps with its very float operations
        rate = len(images) / (len(images) / rate * rate) * rate
    h, w = size(images[0].height, images[0].width, len(images))
    frames = np.stack([_to_chw(_resize(im, h, w)) for im in images])  # [T, C, H, W] uint8
    del images
    frames = np.concatenate([frames, np.repeat(frames[-1:], -len(frames) % pp.temporal_patch_size, axis=0)])
    patches, grid = patchify(frames, pp, fused=True)
    return patches, grid, timestamps, rate
