"""Video files decoded lazily (PyAV): sampling as qwen-vl-utils, only the sampled frames decoded, budget checked
on the metadata before decoding, http(s) sources, timestamps in the result."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from conftest import assert_varied
from qwen2vl_edge.runtime import InputError, media
from qwen2vl_edge.runtime.preprocess import process_video_timed, smart_nframes
from qwen2vl_edge.runtime.video import read_video

av = pytest.importorskip("av")

W, H = 64, 48


def write_video(path, n: int, fps: int, gop: int = 12, faststart: bool = False, size: tuple[int, int] = (W, H)):
    """Grey frames whose index is written in the picture: left half (i // 16) * 16, right half (i % 16) * 16."""
    width, height = size
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"g": str(gop), "crf": "0"}
        for i in range(n):
            arr = np.empty((height, width, 3), np.uint8)
            arr[:, :width // 2], arr[:, width // 2:] = (i // 16) * 16, (i % 16) * 16
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def frame_index(image) -> int:
    a = np.asarray(image, np.float64)
    return int(round(a[8:-8, 8:W // 2 - 8].mean() / 16)) * 16 + int(round(a[8:-8, W // 2 + 8:-8].mean() / 16))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """20 s at 12 fps, a keyframe every second."""
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", 240, 12)


@pytest.mark.parametrize("opts", [dict(nframes=6), dict(fps=0.5), dict(nframes=4, video_start=3.3, video_end=9.0),
                                  dict(fps=1.0, video_start=12.5)])
def test_sampled_frames_follow_qwen_vl_utils_and_only_they_are_decoded(clip, opts):
    torch = pytest.importorskip("torch")
    from qwen_vl_utils.vision_process import calculate_video_frame_range
    from qwen_vl_utils.vision_process import smart_nframes as ref_nframes

    start, end, count = calculate_video_frame_range(opts, 240, 12.0)
    n = ref_nframes(opts, total_frames=count, video_fps=12.0)
    expected = torch.linspace(start, end, n).round().long().tolist()

    sampled = read_video(clip, lambda total, rate: smart_nframes(total, rate, opts.get("fps"), opts.get("nframes")),
                         lambda info, n: None, opts.get("video_start"), opts.get("video_end"))
    assert [frame_index(f) for f in sampled.frames] == expected
    assert sampled.timestamps == pytest.approx([i / 12 for i in expected])
    assert sampled.sampled_fps == n / count * 12.0  # qwen-vl-utils' sample_fps: Qwen2.5-VL's second_per_grid_ts
    span = expected[-1] - expected[0] + 1
    if len(expected) * 24 < span:  # sparse: seeks land on the keyframe before each sampled frame
        assert sampled.decoded <= len(expected) * 12
    assert sampled.decoded < 240


def test_an_over_budget_video_fails_from_its_metadata(tmp_path):
    """The frames of this file are cut off: only the metadata (written first) can be read, so the budget
    check must come before any decoding to give its message."""
    path = write_video(tmp_path / "cut.mp4", 240, 12, faststart=True)
    data = path.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")
    path.write_bytes(data[:data.find(b"mdat") + 64])
    with pytest.raises(InputError, match=r"would take \d+ tokens, over the 100 .*fps, nframes.*max_pixels, "
                                         r"total_pixels"):
        process_video_timed(str(path), nframes=32, max_tokens=100)
    with pytest.raises(InputError, match="select no frames"):
        process_video_timed(str(path), video_start=30.0)


class _Handler(BaseHTTPRequestHandler):
    body = b""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        try:
            self.wfile.write(self.body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


def test_http_video_urls_with_the_image_urls_limits(clip, monkeypatch):
    _Handler.body = clip.read_bytes()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/clip.mp4"
    try:
        a = process_video_timed(url, nframes=4)
        b = process_video_timed(str(clip), nframes=4)
        assert a[1] == b[1] and np.array_equal(a[0], b[0]) and a[2] == b[2]
        monkeypatch.setattr(media, "URL_MAX_BYTES", 1000)
        with pytest.raises(InputError, match="over the 1000-byte limit"):
            process_video_timed(url, nframes=4)
    finally:
        httpd.shutdown()


def test_timestamps_come_with_the_result(pipe, clip):
    conv = [{"role": "user", "content": [{"type": "video", "video": str(clip), "nframes": 4},
                                         {"type": "text", "text": "What happens?"}]}]
    result = pipe.generate(conv, max_new_tokens=2)
    assert result.video_timestamps == [pytest.approx([0.0, 80 / 12, 159 / 12, 239 / 12])]  # linspace(0, 239, 4)


def _read_whole_video(path, start_pts=0.0, end_pts=None, pts_unit="sec", output_format="TCHW"):
    """torchvision.io.read_video as torchvision 0.21 had it (PyAV, every frame; gone from later torchvision): the
    reader qwen-vl-utils' torchvision backend calls. Whole files only."""
    import torch

    assert (start_pts, end_pts, pts_unit, output_format) == (0.0, None, "sec", "TCHW")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(stream)]
        fps = float(stream.average_rate)
    return torch.stack(frames).permute(0, 3, 1, 2), torch.empty(1, 0), {"video_fps": fps}


@pytest.fixture(scope="module")
def clip_336(tmp_path_factory):
    """4 s at 12 fps, 336 x 336: frames inside the video pixel budget, so neither side resamples them."""
    return write_video(tmp_path_factory.mktemp("video") / "clip336.mp4", 48, 12, size=(336, 336))


@pytest.fixture(scope="module")
def clip_384(tmp_path_factory):
    """As clip_336 for Qwen3-VL: multiples of 32, above its 128-token floor for a frame."""
    return write_video(tmp_path_factory.mktemp("video") / "clip384.mp4", 48, 12, size=(384, 384))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_a_video_file_generates_as_transformers(family_ckpt, family_pipe, clip_336, clip_384, family, monkeypatch):
    """4 of the file's 48 frames, sampled at 1 fps: Qwen2.5-VL's temporal groups sit 2 s apart
    (second_per_grid_ts 2, not a list of frames' 1 s nor the 1/12 s transformers assumes without metadata);
    Qwen3-VL writes each pair of frames after its timestamp, the mean of the pair's times in the file (frames 0, 16,
    31 and 47 at 12 fps: 0.7 and 3.2 s). The reference reads the file with qwen-vl-utils and passes its metadata
    to transformers."""
    torchvision = pytest.importorskip("torchvision")
    from reference import ref_inputs
    from test_export_parity import N_NEW, _reference_generate

    monkeypatch.setattr(torchvision.io, "read_video", _read_whole_video, raising=False)
    clip = clip_384 if family == "qwen3_vl" else clip_336
    conv = [{"role": "user", "content": [{"type": "video", "video": str(clip), "nframes": 4},
                                         {"type": "text", "text": "What happens?"}]}]
    pipe = family_pipe(family, "portable")
    inputs, ref_in = pipe.processor(conv), ref_inputs(family_ckpt(family), [conv])
    assert inputs["input_ids"].tolist() == ref_in["input_ids"].tolist()
    if family == "qwen3_vl":
        prompt = pipe.processor.decode(inputs["input_ids"][0].tolist(), skip_special_tokens=False)
        assert "<0.7 seconds><|vision_start|>" in prompt and "<3.2 seconds><|vision_start|>" in prompt
        assert "second_per_grid_ts" not in inputs
    else:
        assert inputs["second_per_grid_ts"].tolist() == [2.0]  # 2 frames a group, at 1 fps
    if family == "qwen2_5_vl":  # the reference's, from qwen-vl-utils' metadata
        assert ref_in["second_per_grid_ts"].tolist() == [2.0]
    ours = pipe.generate(conv, max_new_tokens=N_NEW, min_new_tokens=N_NEW)
    ref = _reference_generate(family_ckpt(family), [conv], N_NEW)[0]
    assert_varied(ref)
    assert ours.token_ids == ref
