"""What `qwen2vl-edge serve` is told: plain data, picklable, so that a Ray Serve replica rebuilds the same app."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 32 * 1024 * 1024  # a request body; base64 images inflate by 4/3
    max_image_bytes: int = 16 * 1024 * 1024  # one encoded image or video frame (data URI, URL or file)
    max_image_pixels: int = 16_777_216  # one decoded image, width x height (4096 x 4096)
    max_video_frames: int = 64  # frames listed in one video part
    default_max_tokens: int = 256  # when a request names no max_tokens / max_completion_tokens
    max_queue: int = 64  # waiting requests; more are answered 503


@dataclass(frozen=True)
class ServerSettings:
    artifact: Path
    backend: str = "onnxruntime"
    threads: int | None = None
    session_cache: Path | None = None
    verify: bool = True
    model_name: str | None = None  # the `model` clients send; the artifact folder's name by default
    max_batch: int = 8
    batch_wait_s: float = 0.005  # how long the first request of a batch waits for others to join
    max_sessions: int = 8  # chat sessions kept for follow-up requests (each holds its KV cache); 0: none
    max_session_bytes: int | None = 2 * 2**30  # what their KV caches may hold in all; None: no bound
    api_key: str | None = None
    allowed_media_dir: Path | None = None  # local image/video paths are refused unless under this folder
    tool_format: str | None = None  # how tools and calls are written (runtime/tools.py): "qwen" | "hermes";
    #                                  None: the model family's own (runtime/config.py: Family.tool_format)
    limits: Limits = Limits()

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.artifact).resolve().name
