"""Image sources over HTTP (a server on loopback), data URIs and arrays: what works and the errors."""

from __future__ import annotations

import base64
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from qwen2vl_edge.runtime import media
from qwen2vl_edge.runtime.errors import InputError
from qwen2vl_edge.runtime.preprocess import process_image


def _png(w=64, h=48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        routes = {"/img.png": ("image/png", PNG), "/page": ("text/html", b"<html></html>"),
                  "/big.png": ("image/png", b"\\0" * 5000)}
        if self.path == "/slow.png":
            time.sleep(1.5)
        ctype, body = routes.get(self.path, ("image/png", PNG))
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_url_image_loads_like_the_file(server, tmp_path):
    path = tmp_path / "img.png"
    path.write_bytes(PNG)
    a, grid_a = process_image(f"{server}/img.png")
    b, grid_b = process_image(str(path))
    assert grid_a == grid_b and np.array_equal(a, b)


def test_url_errors(server, monkeypatch):
    with pytest.raises(InputError, match="Content-Type 'text/html', not an image"):
        media.load_image(f"{server}/page")
    monkeypatch.setattr(media, "URL_MAX_BYTES", 1000)
    with pytest.raises(InputError, match="over the 1000-byte limit"):
        media.load_image(f"{server}/big.png")
    monkeypatch.setattr(media, "URL_TIMEOUT_S", 0.3)
    with pytest.raises(InputError, match="timeout"):
        media.load_image(f"{server}/slow.png")
    with pytest.raises(InputError, match="could not fetch"):
        media.load_image("http://127.0.0.1:9/nothing-listens-here.png")


def test_data_uri_and_arrays():
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    a, _ = process_image(uri)
    b, _ = process_image(np.asarray(Image.open(io.BytesIO(PNG))))
    assert np.array_equal(a, b)
    rgba = np.dstack([np.asarray(Image.open(io.BytesIO(PNG))), np.zeros((48, 64), np.uint8)])
    assert np.all(np.asarray(media.load_image(rgba)) == 255)  # transparent pixels composite on white
