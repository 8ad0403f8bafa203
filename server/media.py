"""Image and video sources of a request -> decoded images, within the server's limits.

The runtime could open these itself; the server fetches the bytes first so that it can refuse what is too
big before decoding it, and refuse local paths outside `--allowed-media-dir` (a client must not read the
server's files).
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from qwen2vl_edge.runtime.errors import InputError
from qwen2vl_edge.runtime.media import fetch_url, to_rgb
from qwen2vl_edge.runtime.media import local_path as url_path

from .errors import APIError, bad_request, too_large
from .settings import Limits


def _data_uri(url: str, limits: Limits, param: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise bad_request("data URIs must be base64: 'data:image/<type>;base64,<data>'", param)
    if len(payload) * 3 // 4 > limits.max_image_bytes:  # checked before decoding it
        raise too_large(f"the image is over the {limits.max_image_bytes}-byte limit", param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("the data URI's base64 payload is invalid", param) from None


def local_path(url: str, allowed_dir: Path | None, param: str) -> Path:
    """A file:// URL or plain path, accepted only inside `allowed_dir` (symlinks resolved first)."""
    if allowed_dir is None:
        raise bad_request("local file paths are not accepted by this server (start it with --allowed-media-dir); "
                          "send the image as a data URI or an http(s) URL", param)
    path = url_path(url).resolve()  # the runtime's reading of file:// URLs (escapes, localhost)
    root = Path(allowed_dir).resolve()
    if not path.is_relative_to(root):
        raise bad_request(f"{url} is outside the allowed media folder {root}", param)
    if not path.is_file():
        raise bad_request(f"no such file under the allowed media folder: {url}", param)
    return path


def fetch_bytes(url: str, limits: Limits, allowed_dir: Path | None, param: str) -> bytes:
    if url.startswith("data:"):
        return _data_uri(url, limits, param)
    if url.startswith(("http://", "https://")):
        try:
            return fetch_url(url, max_bytes=limits.max_image_bytes)
        except InputError as e:
            raise bad_request(str(e), param) from None
    path = local_path(url, allowed_dir, param)
    if path.stat().st_size > limits.max_image_bytes:
        raise too_large(f"{url} is over the {limits.max_image_bytes}-byte limit", param)
    return path.read_bytes()


def decode_image(data: bytes, limits: Limits, param: str) -> Image.Image:
    """Bytes -> RGB image; the pixel count is checked from the header, before the pixels are decoded."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > limits.max_image_pixels:
            raise too_large(f"the image is {image.width}x{image.height} pixels, over the limit of "
                            f"{limits.max_image_pixels} pixels: send it smaller", param)
        image.load()
    except APIError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise bad_request("the image is not one Pillow can decode (PNG, JPEG, WebP, ...)", param) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise bad_request(f"the image could not be decoded (truncated or corrupt?): {e}", param) from None
    if image.width < 1 or image.height < 1:
        raise bad_request(f"the image is {image.width}x{image.height} pixels", param)
    return to_rgb(image)


def load_image(url: str, limits: Limits, allowed_dir: Path | None, param: str) -> Image.Image:
    return decode_image(fetch_bytes(url, limits, allowed_dir, param), limits, param)


def load_video(source: str | list[str], limits: Limits, allowed_dir: Path | None, param: str):
    """A list of frame URLs -> decoded frames; one string -> a video file under the allowed folder (PyAV
    decodes it in the runtime)."""
    if isinstance(source, str):
        return str(local_path(source, allowed_dir, param))
    if not source:
        raise bad_request("a video part needs at least one frame", param)
    if len(source) > limits.max_video_frames:
        raise too_large(f"{len(source)} frames, over the limit of {limits.max_video_frames}", param)
    return [load_image(url, limits, allowed_dir, f"{param}[{i}]") for i, url in enumerate(source)]
