"""Bad input at the edges: every image source, pixel and video option, message field and generation option
ends in a clear InputError / ArtifactError / ConfigError, and odd but valid inputs give the right pixels."""

from __future__ import annotations

import base64
import io
import socketserver
import threading
import time

import numpy as np
import pytest
from PIL import Image

from conftest import requires_torch
from qwen2vl_edge.runtime import media
from qwen2vl_edge.runtime.errors import InputError
from qwen2vl_edge.runtime.preprocess import process_image

# -- HTTP: a raw loopback server that misbehaves on request ---------------------------------------

PNG_IO = io.BytesIO()
Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(PNG_IO, "PNG")
PNG = PNG_IO.getvalue()


def _ok(body: bytes, extra: str = "") -> bytes:
    return (f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\n{extra}"
            "Connection: close\r\n\r\n").encode() + body


class RawHandler(socketserver.StreamRequestHandler):
    def handle(self):
        path = self.rfile.readline().split()[1].decode()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
        try:
            self._answer(path)
        except OSError:  # the client gave up (deadline): fine
            pass

    def _answer(self, path: str) -> None:
        w = self.wfile
        if path == "/ok.png":
            w.write(_ok(PNG))
        elif path == "/drop":  # closes without a word
            return
        elif path == "/garbage":
            w.write(b"HELLO THERE\r\n\r\n")
        elif path == "/bad-length":
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: abc\r\n\r\n" + PNG)
        elif path == "/short":
            w.write(_ok(PNG)[:-10])
        elif path == "/redirect":
            w.write(b"HTTP/1.1 302 Found\r\nLocation: /ok.png\r\nContent-Length: 0\r\n\r\n")
        elif path == "/missing":
            w.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        elif path in ("/trickle-body", "/trickle-head"):
            data = _ok(PNG)
            head = data.index(b"\r\n\r\n") + 4 if path == "/trickle-body" else 3
            w.write(data[:head])
            for i in range(head, len(data)):  # one byte every 0.5 s: never a per-read timeout
                w.write(data[i:i + 1])
                w.flush()
                time.sleep(0.5)


@pytest.fixture(scope="module")
def raw_server():
    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        allow_reuse_address = True

    httpd = Server(("127.0.0.1", 0), RawHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _load_in_thread(url: str):
    """load_image(url) in a thread; the test fails (instead of hanging) if the call outlives 30 s."""
    outcome = {}

    def target():
        try:
            outcome["image"] = media.load_image(url)
        except Exception as e:  # noqa: BLE001 (the test inspects the type)
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), f"load_image({url}) still running after 30 s"
    return outcome


def test_http_success_and_redirect(raw_server):
    for path in ("/ok.png", "/redirect"):
        out = _load_in_thread(raw_server + path)
        assert "error" not in out, out
        assert out["image"].size == (30, 20) and out["image"].getpixel((0, 0)) == (90, 90, 90)


@pytest.mark.parametrize("path,match", [
    ("/drop", "could not fetch"), ("/garbage", "could not fetch"), ("/bad-length", "invalid Content-Length"),
    ("/short", "closed after"), ("/missing", "Not Found"),
])
def test_http_failures_are_input_errors(raw_server, path, match):
    out = _load_in_thread(raw_server + path)
    assert isinstance(out.get("error"), InputError) and match in str(out["error"]), out


@pytest.mark.parametrize("path", ["/trickle-body", "/trickle-head"])
def test_http_one_deadline_for_the_whole_fetch(raw_server, monkeypatch, path):
    monkeypatch.setattr(media, "URL_TIMEOUT_S", 1.5)  # the trickle needs minutes; each byte comes in 0.5 s
    out = _load_in_thread(raw_server + path)
    assert isinstance(out.get("error"), InputError) and "timeout" in str(out["error"]), out


@pytest.mark.parametrize("url", ["http://[::1/x.png", "http://127.0.0.1:99999/x.png", "http://a..b/x.png",
                                 "http://127.0.0.1:abc/x.png", "http:///x.png"])
def test_malformed_urls(url):
    with pytest.raises(InputError, match="could not fetch"):
        media.load_image(url)


# -- image sources and modes ------------------------------------------------------------------------

def test_sixteen_bit_images_keep_their_levels(tmp_path):
    levels = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)  # a full-range ramp
    path = tmp_path / "deep.png"
    Image.fromarray(levels).save(path)  # a 16-bit grey PNG: Pillow opens it as I;16
    expected = np.round(levels / 257).astype(np.uint8)
    for source in (path, Image.open(path), Image.fromarray(levels.astype(np.int32), "I")):
        rgb = np.asarray(media.load_image(source))
        assert rgb.shape == (48, 64, 3) and np.array_equal(rgb[..., 0], expected), type(source)
        assert rgb.min() == 0 and rgb.max() == 255 and len(np.unique(rgb)) > 200  # not all white
    big_endian = Image.frombytes("I;16B", (64, 48), levels.astype(">u2").tobytes())
    assert np.array_equal(np.asarray(media.load_image(big_endian))[..., 1], expected)


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA",
                                  "La", "PA", "RGBX", "RGBa", "I;16", "I;16B"])
def test_every_pillow_mode_loads_as_rgb(mode):
    rgb = np.random.default_rng(0).integers(0, 256, (12, 16, 3), np.uint8)
    base = Image.fromarray(rgb)
    grey16 = np.asarray(base.convert("L"), np.uint16) * 257  # 16-bit data spans 0..65535
    makers = {
        "La": lambda: base.convert("LA").convert("La"), "PA": lambda: base.convert("P").convert("PA"),
        "LAB": lambda: Image.new("LAB", (16, 12), (50, 20, 30)),
        "HSV": lambda: Image.new("HSV", (16, 12), (10, 200, 150)),
        "I;16": lambda: Image.fromarray(grey16),
        "I;16B": lambda: Image.frombytes("I;16B", (16, 12), grey16.astype(">u2").tobytes()),
    }
    image = makers.get(mode, lambda: base.convert(mode))()
    out = media.load_image(image)
    assert out.mode == "RGB" and out.size == (16, 12)
    if mode in ("L", "La", "LA", "I", "I;16", "I;16B", "F"):  # grey, 8-bit levels kept
        grey = np.asarray(base.convert("L"))
        assert np.abs(np.asarray(out)[..., 0].astype(int) - grey).max() <= 1


def test_path_like_strings(tmp_path):
    folder = tmp_path / "a dir %20 ü"
    folder.mkdir()
    path = folder / "my image.png"
    Image.fromarray(np.full((10, 10, 3), 7, np.uint8)).save(path)
    from urllib.parse import quote

    for source in (str(path), "file://" + quote(str(path)), "file://localhost" + quote(str(path)),
                   path.as_uri()):
        assert media.load_image(source).getpixel((0, 0)) == (7, 7, 7), source


@pytest.mark.parametrize("source", ["x" * 5000, base64.b64encode(PNG).decode() * 20, "bad\0name.png",
                                    "file://" + "y" * 5000])
def test_long_strings_and_raw_base64_are_input_errors(source):
    with pytest.raises(InputError, match="data:image/<type>;base64"):
        media.load_image(source)


def test_data_uri_with_line_breaks():
    payload = base64.encodebytes(PNG).decode()  # 76-character lines
    assert "\n" in payload
    assert media.load_image("data:image/png;base64," + payload).size == (30, 20)


# -- pixel and video options ------------------------------------------------------------------------

IMG = np.random.default_rng(5).integers(0, 256, (60, 80, 3), np.uint8)


@pytest.mark.parametrize("opts,field", [
    ({"min_pixels": 0, "max_pixels": 0}, "max_pixels"), ({"max_pixels": 1}, "max_pixels .1. must be >= min_pixels"),
    ({"max_pixels": float("nan")}, "max_pixels"),
    ({"max_pixels": float("inf")}, "max_pixels"), ({"min_pixels": "100"}, "min_pixels"),
    ({"min_pixels": -5}, "min_pixels"), ({"min_pixels": 10**15}, "min_pixels"),
    ({"min_pixels": 5000, "max_pixels": 4000}, "min_pixels"), ({"max_pixels": True}, "max_pixels"),
    ({"resized_height": 0, "resized_width": 56}, "resized_height"),
    ({"resized_height": 56, "resized_width": float("nan")}, "resized_width"),
    ({"resized_height": 10**9, "resized_width": 56}, "resized_height"),
    ({"resized_height": "56", "resized_width": 56}, "resized_height"),
    ({"resized_height": 56}, "resized_width"), ({"resized_height": 1, "resized_width": 5000}, "resized_height"),
])
def test_pixel_options_refused_by_name(opts, field):
    with pytest.raises(InputError, match=field):
        process_image(IMG, **opts)


@pytest.mark.parametrize("opts", [{"min_pixels": 1, "max_pixels": 1}, {"min_pixels": 0, "max_pixels": 1},
                                  {"min_pixels": 0}, {"max_pixels": 1e6}, {"resized_height": 1, "resized_width": 1}])
def test_tiny_and_float_budgets_give_one_block_or_more(opts):
    patches, (t, h, w) = process_image(IMG, **opts)
    assert t == 1 and h >= 2 and w >= 2 and patches.shape[0] == h * w


@pytest.mark.parametrize("video,opts,field", [
    (7, {}, "video must be"), ({"a": 1}, {}, "video must be"), (np.zeros((4, 4, 3), np.uint8), {}, "video must"),
    ([IMG, IMG], {"fps": -1}, "fps"), ([IMG, IMG], {"fps": float("nan")}, "fps"),
    ([IMG, IMG], {"nframes": 1}, "nframes"), ([IMG, IMG], {"nframes": 2.5}, "nframes"),
    ([IMG, IMG], {"total_pixels": 0}, "total_pixels"), ([IMG, IMG], {"max_pixels": 0}, "max_pixels"),
    ([IMG, None], {}, "unsupported image source"),
])
def test_video_options_refused_by_name(video, opts, field):
    from qwen2vl_edge.runtime.preprocess import process_video

    with pytest.raises(InputError, match=field):
        process_video(video, **opts)


# -- messages, load settings ------------------------------------------------------------------------

@requires_torch
@pytest.mark.parametrize("conv,match", [
    ({"role": "user", "content": "Hi"}, "got dict: wrap a single message in a list"),
    ("Hi", "a conversation is a list .* got str"), (None, "got NoneType"), ([], "empty conversation"),
    ([{"role": "user", "content": [{"type": "text", "text": None}]}], "'text' must be a string, got NoneType"),
    ([{"role": "user", "content": [{"type": "text", "text": ["a", "b"]}]}], "'text' must be a string, got list"),
    ([{"role": None, "content": "Hi"}], "role must be a non-empty string"),
    ([{"role": "user", "content": 5}], "content must be a string or a list of items, got int"),
])
def test_malformed_messages(tiny_ckpt, conv, match):
    from qwen2vl_edge.runtime.processor import Processor

    with pytest.raises(InputError, match=match):
        Processor.from_pretrained(tiny_ckpt)(conv)


@requires_torch
@pytest.mark.parametrize("options,match", [
    ({"num_threads": "4"}, "num_threads must be an integer"), ({"num_threads": 0}, "num_threads must be >= 1"),
    ({"num_threads": 2.5}, "num_threads"), ({"backend": "cuda"}, "unknown backend 'cuda'"),
    ({"providers": "CPUExecutionProvider"}, "providers must be a list"), ({"verify": "no"}, "verify"),
    ({"backend": "tensorrt", "session_cache": "x"}, "session_cache is an ONNX Runtime"),
])
def test_bad_load_settings_are_config_errors(tiny_artifact, options, match):
    from qwen2vl_edge.runtime import ConfigError, Qwen2VLPipeline

    with pytest.raises(ConfigError, match=match):
        Qwen2VLPipeline.load(tiny_artifact, **options)


def test_truncated_and_closed_pil_images():
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), np.uint8)).save(buf, "PNG")
    truncated = Image.open(io.BytesIO(buf.getvalue()[: len(buf.getvalue()) * 3 // 4]))  # lazily decoded
    with pytest.raises(InputError, match="truncated"):
        media.load_image(truncated)
    closed = Image.open(io.BytesIO(buf.getvalue()))
    closed.close()
    with pytest.raises(InputError, match="closed"):
        media.load_image(closed)
