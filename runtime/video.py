"""Video files, decoded lazily with PyAV: metadata first, then only the sampled frames, seeking between them.

Sampling follows qwen-vl-utils' frame-index readers (decord, torchcodec): `video_start` / `video_end`
(seconds) pick a frame range (`calculate_video_frame_range`), `smart_nframes` how many frames, and
linspace(start, end, n).round() which ones. Frame counts and rates come from the container's metadata,
so a request's size is known, and refused, before anything is decoded.
"""

from __future__ import annotations

import math
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from .errors import InputError
from .media import existing_file, fetch_url, to_rgb

# Seeking lands on the keyframe before a target and decodes forward from there; when the next sampled frame
# is this close to where decoding stands, reading on is cheaper than a seek.
SEEK_GAP_S = 2.0


@dataclass(frozen=True)
class VideoInfo:
    frames: int  # in the whole stream
    fps: float
    width: int
    height: int

    @property
    def duration(self) -> float:
        return self.frames / self.fps


def _av():
    try:
        import av
    except ImportError:
        raise InputError("reading video files needs PyAV: pip install 'av>=18.1' (the [video] extra)") from None
    return av


@contextmanager
def _local_file(source: str | Path) -> Iterator[Path]:
    """A path to read: the file itself, or an http(s) download kept under the image URLs' time and size limits."""
    s = str(source)
    if not s.startswith(("http://", "https://")):
        yield existing_file(s, "video", "A video is a path, a file:// or http(s):// URL, or a list of frames")
        return
    data = fetch_url(s, content_prefix=("video/", "application/octet-stream"), what="a video")
    fd, name = tempfile.mkstemp(suffix=Path(s.split("?")[0]).suffix or ".mp4")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        del data
        yield Path(name)
    finally:
        os.unlink(name)


def probe(stream) -> VideoInfo:
    """Frame count and rate from the container's metadata; the count estimated from the duration where the
    container does not store it (Matroska, WebM)."""
    rate = float(stream.average_rate or stream.guessed_rate or 0)
    if rate <= 0:
        raise InputError("the video stream has no frame rate in its metadata")
    frames = int(stream.frames or 0)
    if frames <= 0:
        if stream.duration is not None:
            seconds = float(stream.duration * stream.time_base)
        elif stream.container.duration is not None:
            seconds = stream.container.duration / 1_000_000  # AV_TIME_BASE
        else:
            raise InputError("the video has neither a frame count nor a duration in its metadata")
        frames = int(round(seconds * rate))
    if frames <= 0:
        raise InputError("the video has zero frames")
    return VideoInfo(frames, rate, stream.codec_context.width, stream.codec_context.height)


def frame_range(info: VideoInfo, video_start: float | None, video_end: float | None) -> tuple[int, int]:
    """First and last frame index of [video_start, video_end] seconds (qwen-vl-utils' rounding and clamping)."""
    if video_start is None and video_end is None:
        return 0, info.frames - 1
    start = math.ceil(max(0.0, min(video_start, info.duration)) * info.fps) if video_start is not None else 0
    end = (min(math.floor(max(0.0, min(video_end, info.duration)) * info.fps), info.frames - 1)
           if video_end is not None else info.frames - 1)
    if start >= end:
        raise InputError(f"video_start={video_start} / video_end={video_end} select no frames of a "
                         f"{info.duration:.2f} s video ({info.frames} frames at {info.fps:g} fps)")
    return start, end


def sample_indices(start: int, end: int, n: int) -> np.ndarray:
    """linspace(start, end, n).round(), half to even as torch rounds."""
    return np.round(np.linspace(start, end, n)).astype(np.int64) if n > 1 else np.array([start], np.int64)


@dataclass
class SampledVideo:
    frames: list[Image.Image]  # RGB, at the sampled indices
    timestamps: list[float]  # seconds from the stream's start
    decoded: int  # frames the decoder produced to reach them (seeking skips the rest)
    sampled_fps: float  # frames kept per second of the clip (transformers' VideoMetadata.sampled_fps)


def _decode_at(container, stream, indices: np.ndarray, fps: float) -> tuple[list[Image.Image], int]:
    """The frames at `indices` (sorted), found by presentation time; only these are converted to RGB.
    -> the frames, how many frames were decoded."""
    base = stream.start_time or 0
    tb = float(stream.time_base)
    index_of = lambda frame: int(round(((frame.pts or 0) - base) * tb * fps))  # noqa: E731 (constant frame rate)
    out: list[Image.Image] = []
    frames, current, position, decoded = None, None, -1, 0
    for target in indices:
        if current is None or position < target:
            if frames is None or target - position > SEEK_GAP_S * fps:
                container.seek(int(base + target / fps / tb), stream=stream, backward=True, any_frame=False)
                frames = container.decode(stream)
            for current in frames:
                decoded += 1
                position = index_of(current)
                if position >= target:
                    break
            else:  # the stream ended before `target` (metadata counted more frames): keep the last one
                frames = None
        if current is None:
            raise InputError(f"frame {int(target)} of the video could not be decoded")
        out.append(to_rgb(current.to_image()))
    return out, decoded


def read_video(source: str | Path, choose_nframes: Callable[[int, float], int],
               check: Callable[[VideoInfo, int], None], video_start: float | None = None,
               video_end: float | None = None) -> SampledVideo:
    """`choose_nframes(frames_in_range, fps)` picks how many frames; `check(info, n)` may refuse the request
    before anything is decoded."""
    av = _av()
    with _local_file(source) as path:
        try:
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise InputError(f"{source} has no video stream")
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                info = probe(stream)
                start, end = frame_range(info, video_start, video_end)
                n = choose_nframes(end - start + 1, info.fps)
                check(info, n)
                indices = sample_indices(start, end, n)
                frames, decoded = _decode_at(container, stream, indices, info.fps)
        except av.error.FFmpegError as e:
            raise InputError(f"could not decode video {source}: {e}") from None
    return SampledVideo(frames, [float(i / info.fps) for i in indices], decoded, n / (end - start + 1) * info.fps)
