"""Image and video sources -> decoded RGB Pillow images, with clear errors for bad input."""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InputError

URL_TIMEOUT_S = 20.0
URL_MAX_BYTES = 64 * 1024 * 1024


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as qwen-vl-utils converts: RGBA composited on white, every other mode through convert()."""
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        return background
    return image.convert("RGB")


def fetch_url(url: str, *, timeout: float | None = None, max_bytes: int | None = None,
              content_prefix: str | tuple[str, ...] = "image/", what: str = "an image") -> bytes:
    """GET `url` with a timeout and a byte cap (module defaults) and refuse a response not `content_prefix*`."""
    timeout = URL_TIMEOUT_S if timeout is None else timeout
    max_bytes = URL_MAX_BYTES if max_bytes is None else max_bytes
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            ctype = response.headers.get("Content-Type", "")
            if not ctype.startswith(content_prefix):
                raise InputError(f"{url} answered with Content-Type {ctype!r}, not {what}")
            length = response.headers.get("Content-Length")
            if length is not None and int(length) > max_bytes:
                raise InputError(f"{url} is {int(length)} bytes, over the {max_bytes}-byte limit")
            data = response.read(max_bytes + 1)
    except TimeoutError:
        raise InputError(f"{url}: no answer within {timeout:.0f} s (timeout)") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise InputError(f"{url}: no answer within {timeout:.0f} s (timeout)") from None
        raise InputError(f"could not fetch {url}: {e.reason}") from None
    if len(data) > max_bytes:
        raise InputError(f"{url} is over the {max_bytes}-byte limit")
    return data


def _open(data: io.BytesIO | Path, what: str) -> Image.Image:
    try:
        image = Image.open(data)
        image.load()  # decode now, so a truncated file fails here and not deep inside numpy
    except Image.DecompressionBombError as e:
        raise InputError(f"{what} is too large to decode safely (Pillow's decompression-bomb guard): {e}") from None
    except UnidentifiedImageError:
        raise InputError(f"{what} is not an image Pillow can decode") from None
    except (OSError, SyntaxError) as e:
        raise InputError(f"{what} could not be decoded (truncated or corrupt?): {e}") from None
    return image


def _from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise InputError(f"numpy images must be uint8 HWC (or HW), got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[2] in (3, 4) or array.ndim == 2:
        if 0 in array.shape:
            raise InputError(f"numpy image has an empty dimension: shape {array.shape}")
        return Image.fromarray(array)
    raise InputError(f"numpy images must be HxW, HxWx3 or HxWx4 uint8, got shape {array.shape}")


def load_image(source: Any) -> Image.Image:
    """Path, 'file://', 'http(s)://', 'data:image/...;base64,', PIL.Image or uint8 ndarray -> RGB image."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = _from_array(source)
    elif isinstance(source, (str, Path)):
        s = str(source)
        if s.startswith(("http://", "https://")):
            image = _open(io.BytesIO(fetch_url(s)), s)
        elif s.startswith("data:image"):
            if "base64," not in s:
                raise InputError("data URI images must be base64: 'data:image/<type>;base64,<data>'")
            try:
                raw = base64.b64decode(s.split("base64,", 1)[1], validate=True)
            except (binascii.Error, ValueError):
                raise InputError("data URI image: the base64 payload is invalid") from None
            image = _open(io.BytesIO(raw), "data URI image")
        else:
            path = Path(s[len("file://"):] if s.startswith("file://") else s)
            if not path.is_file():
                raise InputError(f"image file not found: {path}")
            image = _open(path, str(path))
    else:
        raise InputError(
            f"unsupported image source of type {type(source).__name__}: pass a path, URL, data URI, "
            "PIL.Image or uint8 numpy array"
        )
    if image.width < 1 or image.height < 1:
        raise InputError(f"image is {image.width}x{image.height} pixels: it must be at least 1x1")
    return to_rgb(image)
