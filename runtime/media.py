"""Image and video sources -> decoded RGB Pillow images, with clear errors for bad input."""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InputError

URL_TIMEOUT_S = 20.0  # for the whole fetch: connection, headers and body
URL_MAX_BYTES = 64 * 1024 * 1024
URL_MAX_REDIRECTS = 5
PREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}  # Pillow cannot convert these to RGB directly


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as qwen-vl-utils converts (RGBA composited on white, other modes through convert()), except where
    convert() fails or saturates: premultiplied modes, and 16-bit grey (I;16*, or I above 255), which
    convert() clips to white; it is scaled to 8 bits instead."""
    image = image.convert(PREMULTIPLIED[image.mode]) if image.mode in PREMULTIPLIED else image
    if image.mode.startswith("I;16") or image.mode == "I" and image.getextrema()[1] > 255:
        levels = np.asarray(image).astype(np.float64)  # [H, W]
        image = Image.fromarray(np.clip(np.round(levels / 257), 0, 255).astype(np.uint8))  # 65535 -> 255
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        return background
    return image.convert("RGB")


class _Deadline:
    """One deadline for a whole fetch: when it passes, every socket of the fetch is shut down, which ends a
    blocking read at once (a server that trickles bytes never trips a per-read timeout)."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> "_Deadline":
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()

    def remaining(self) -> float:
        return max(self.end - time.monotonic(), 0.001)

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shutdown(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed: nothing left to interrupt
        pass


def _opener(deadline: _Deadline) -> urllib.request.OpenerDirector:
    """urllib (proxies from the environment, redirects between http and https only) whose connections
    report their sockets to `deadline`."""

    def tracked(base):
        class Connection(base):
            def connect(self):
                self.timeout = deadline.remaining()
                super().connect()
                deadline.track(self.sock)
        return Connection

    class Http(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(tracked(http.client.HTTPConnection), req)

    class Https(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(tracked(http.client.HTTPSConnection), req, context=self._context)

    class Redirects(urllib.request.HTTPRedirectHandler):
        max_redirections = URL_MAX_REDIRECTS

    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), Http(), Https(), Redirects(),
                    urllib.request.HTTPDefaultErrorHandler(), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


def fetch_url(url: str, *, timeout: float | None = None, max_bytes: int | None = None,
              content_prefix: str | tuple[str, ...] = "image/", what: str = "an image") -> bytes:
    """GET `url` within one deadline and a byte cap (module defaults) and refuse a response whose
    Content-Type does not start with `content_prefix` (a prefix or a tuple of them), naming `what` was
    expected. Every network failure is an InputError naming the URL."""
    timeout = URL_TIMEOUT_S if timeout is None else timeout
    max_bytes = URL_MAX_BYTES if max_bytes is None else max_bytes
    with _Deadline(timeout) as deadline:
        try:
            return _fetch(url, deadline, max_bytes, content_prefix, what)
        except InputError:
            raise
        except (OSError, http.client.HTTPException, ValueError, UnicodeError) as e:
            if deadline.expired or isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None),
                                                                              TimeoutError):
                raise InputError(f"{url}: not fetched within {timeout:g} s (timeout); check the server, or "
                                 "download the file and pass its path") from None
            reason = e.reason if isinstance(e, urllib.error.URLError) else e
            raise InputError(f"could not fetch {url}: {type(reason).__name__}: {reason}") from None


def _fetch(url: str, deadline: _Deadline, max_bytes: int, content_prefix: str | tuple[str, ...],
           what: str) -> bytes:
    with _opener(deadline).open(url, timeout=deadline.remaining()) as response:
        ctype = response.headers.get("Content-Type", "")
        if not ctype.startswith(content_prefix):
            raise InputError(f"{url} answered with Content-Type {ctype!r}, not {what}")
        length = response.headers.get("Content-Length")
        if length is not None and not length.strip().isdigit():
            raise InputError(f"{url} answered with an invalid Content-Length {length!r}")
        if length is not None and int(length) > max_bytes:
            raise InputError(f"{url} is {int(length)} bytes, over the {max_bytes}-byte limit")
        chunks, size = [], 0
        while size <= max_bytes:
            chunk = response.read1(64 * 1024)  # whatever arrived: a trickle returns, and the deadline is seen
            if deadline.expired:  # the shut-down socket reads as a clean end
                raise TimeoutError
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    if size > max_bytes:
        raise InputError(f"{url} is over the {max_bytes}-byte limit")
    if length is not None and size != int(length):
        raise InputError(f"{url}: the connection closed after {size} of {int(length)} bytes")
    return b"".join(chunks)


def local_path(source: str | Path) -> Path:
    """A path, or a file URL: 'file:///abs/path', 'file://localhost/abs/path', percent-escapes decoded.
    'file://rel/path' stays the relative path qwen-vl-utils reads there (it drops the 'file://')."""
    s = str(source)
    if not s.startswith("file:"):
        return Path(s)
    parts = urllib.parse.urlsplit(s)
    path = urllib.request.url2pathname(parts.path)
    return Path(path if parts.netloc in ("", "localhost") else parts.netloc + path)


def _open(data: io.BytesIO | Path, what: str) -> Image.Image:
    return _decoded(lambda: Image.open(data), what)


def _decoded(open_image: Callable[[], Image.Image], what: str) -> Image.Image:
    """Decode now, so that a truncated or closed image fails here with an InputError, not deep in numpy."""
    try:
        image = open_image()
        image.load()
    except Image.DecompressionBombError as e:
        raise InputError(f"{what} is too large to decode safely (Pillow's decompression-bomb guard): {e}") from None
    except UnidentifiedImageError:
        raise InputError(f"{what} is not an image Pillow can decode") from None
    except (OSError, SyntaxError, ValueError) as e:  # ValueError: a closed PIL image
        raise InputError(f"{what} could not be decoded (truncated or corrupt, or a closed PIL image?): {e}") from None
    return image


def _from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise InputError(f"numpy images must be uint8 HWC (or HW), got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[2] in (3, 4) or array.ndim == 2:
        if 0 in array.shape:
            raise InputError(f"numpy image has an empty dimension: shape {array.shape}")
        return Image.fromarray(array)
    raise InputError(f"numpy images must be HxW, HxWx3 or HxWx4 uint8, got shape {array.shape}")


IMAGE_FORMS = ("An image is a path, a file:// or http(s):// URL, a 'data:image/<type>;base64,<data>' URI (raw "
               "base64 needs that prefix), a PIL.Image or a uint8 numpy array")


def existing_file(source: str, kind: str = "image", forms: str = IMAGE_FORMS) -> Path:
    """The local file a path or file:// URL names, or an InputError naming it and the forms `kind` takes."""
    path = local_path(source)
    try:
        found = path.is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte
        found = False
    if not found:
        shown = source if len(source) < 200 else f"a {len(source)}-character string starting {source[:40]!r}"
        raise InputError(f"{kind} file not found: {shown}. {forms}")
    return path


def load_image(source: Any) -> Image.Image:
    """Path, 'file://', 'http(s)://', 'data:image/...;base64,', PIL.Image or uint8 ndarray -> RGB image."""
    if isinstance(source, Image.Image):
        image = _decoded(lambda: source, "the PIL image")
    elif isinstance(source, np.ndarray):
        image = _from_array(source)
    elif isinstance(source, (str, Path)):
        s = str(source)
        if s.startswith(("http://", "https://")):
            image = _open(io.BytesIO(fetch_url(s)), s)
        elif s.startswith("data:image"):
            if "base64," not in s:
                raise InputError("data URI images must be base64: 'data:image/<type>;base64,<data>'")
            try:  # line breaks inside the payload are common and harmless
                raw = base64.b64decode("".join(s.split("base64,", 1)[1].split()), validate=True)
            except (binascii.Error, ValueError):
                raise InputError("data URI image: the base64 payload is invalid") from None
            image = _open(io.BytesIO(raw), "data URI image")
        else:
            image = _open(existing_file(s), s if len(s) < 200 else s[:60] + "...")
    else:
        raise InputError(
            f"unsupported image source of type {type(source).__name__}: pass a path, URL, data URI, "
            "PIL.Image or uint8 numpy array"
        )
    if image.width < 1 or image.height < 1:
        raise InputError(f"image is {image.width}x{image.height} pixels: it must be at least 1x1")
    return to_rgb(image)
