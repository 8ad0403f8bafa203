"""Engines on the host side of TensorRT, through the recording fakes (tests/fake_tensorrt.py, fake_cudart.py):
how each version's bindings read an engine file, what `build-trt` holds in host memory while it builds and
writes, the pinned staging of each decode step's inputs, and the vision features' stay on the device."""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from conftest import random_image, requires_torch
from qwen2vl_edge.runtime.backends.trt_profiles import ENGINES, Limits

sys.path.insert(0, str(Path(__file__).parent))  # the fakes live beside this file

SMALL = Limits(max_image_tokens=256, max_prompt=512, max_context=640)
pytestmark = requires_torch  # the tiny export needs torch


@pytest.fixture
def fakes(monkeypatch):
    """Fake CUDA for this test; `fakes(version, **options)` puts in a fake tensorrt of that version."""
    from fake_cudart import for_tests
    from fake_tensorrt import make_fake_tensorrt
    from qwen2vl_edge.runtime.backends import cuda as cuda_layer

    cuda = for_tests()
    monkeypatch.setattr(cuda_layer, "cudart", lambda: cuda)

    def install(version: str, **options):
        trt = make_fake_tensorrt(version, check_buffer=cuda.owner, **options)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        return trt

    install.cuda = cuda
    return install


def _copy(src: Path, out: Path) -> Path:
    """The export, hard-linked (a build adds engines/ and rewrites manifest.json, which is copied)."""
    def link(s, d):
        (shutil.copy2 if Path(s).name == "manifest.json" else os.link)(s, d)
    return Path(shutil.copytree(src, out, copy_function=link))


def _built(src: Path, out: Path) -> Path:
    from qwen2vl_edge.export.trt_build import build_trt

    build_trt(_copy(src, out), limits=SMALL, timing_cache=out.parent / "timing.cache")
    return out


@pytest.fixture(scope="module")
def tiny_trt(trt_export) -> Path:
    """The tiny checkpoint's `--target tensorrt --precision fp32` export (TensorRT >= 10.3)."""
    return trt_export(min_tensorrt="10.3")


# -- reading engines ----------------------------------------------------------------------------------

@pytest.mark.parametrize("version", ["10.3.0", "10.8.0.43", "10.9.0.34", "11.4.0.106"])
def test_engines_are_read_as_each_versions_bindings_allow(tiny_trt, fakes, tmp_path, monkeypatch, version):
    """Below 10.9 the backend hands deserialize_cuda_engine a read-only mmap of each file; from 10.9 it streams
    them through IStreamReaderV2 in chunks (here smaller than the engines). The fake's 10.7-10.8 trampoline
    reads once, as the bindings do: a chunked reader gives it a short read, and the engine is not read."""
    from qwen2vl_edge.runtime import Qwen2VLPipeline
    from qwen2vl_edge.runtime.backends import tensorrt as backend

    monkeypatch.setattr(backend, "READ_CHUNK", 256)
    trt = fakes(version)
    art = _built(tiny_trt, tmp_path / "art")
    assert all((art / "engines" / f"{e}.engine").stat().st_size > 2 * backend.READ_CHUNK for e in ENGINES)
    streamed = backend.version_tuple(version) >= (10, 9)
    with Qwen2VLPipeline.load(art, backend="tensorrt") as pipe:
        assert set(pipe.backend.engines) == set(ENGINES)
    reads = [c for c in trt.recorder.calls if c[0] == "deserialize"]
    expected = ("deserialize", "IStreamReaderV2") if streamed else ("deserialize", "mmap", "read-only")
    assert reads == [expected] * len(ENGINES)
    if hasattr(trt, "IStreamReaderV2"):  # what the chunked reader gives on this version's trampoline
        with open(art / "engines" / "decoder.engine", "rb") as f:
            engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(backend.engine_reader(trt, f))
        assert (engine is not None) == streamed
    assert fakes.cuda.live() == []


# -- building within a Jetson's host memory --------------------------------------------------------------

@pytest.mark.parametrize("version", ["10.3.0", "10.15.1.29"])
def test_build_holds_one_engine_at_a_time_and_copies_no_plan(tiny_trt, fakes, tmp_path, monkeypatch, version):
    """Each engine in its own scope: its parser (holding the weights), network and builder are released before
    its plan is written, and the plan before the next engine's parser loads; the plan goes to the file with no
    Python copy (tracemalloc sees none: the fake's TensorRT memory is an untraced mmap, in its ledger). From
    10.15 the plan streams into the file in pieces and is never held whole."""
    from fake_tensorrt import STREAM_CHUNK, _graph_nodes
    from qwen2vl_edge.export import trt_build

    trt = fakes(version, hold_weights=True)
    rec = trt.recorder
    write_plan = trt_build.write_plan

    def recorded_write(plan, path):  # what TensorRT holds when the plan is written
        rec.calls.append(("write", path.name.split(".")[0] + ".onnx", sum(rec.held.values())))
        write_plan(plan, path)

    monkeypatch.setattr(trt_build, "write_plan", recorded_write)
    art = _copy(tiny_trt, tmp_path / "art")
    for module in ("onnx", "onnxruntime"):  # the fake imports them lazily: not inside the measured window
        importlib.import_module(module)
    tracemalloc.start()
    try:
        trt_build.build_trt(art, limits=SMALL, timing_cache=tmp_path / "timing.cache")
        python_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    weights = {e: _graph_nodes(str(art / f"{e}.onnx"))[1] for e in ENGINES}
    assert max(weights.values()) > 16 << 20  # the decoder's weights dwarf what else Python allocates
    assert python_peak < max(weights.values()) / 2  # no bytes(...) of a plan (sha256 reads 4 MiB blocks)
    streamed = version == "10.15.1.29"
    for engine in ENGINES:
        graph = f"{engine}.onnx"
        events = [c for c in rec.calls if c[-1] == graph or (c[0] == "write" and c[1] == graph)]
        kinds = [c[0] if c[0] != "release" else c[1] for c in events]
        releases = [kinds.index(k) for k in ("parser", "network", "builder")]
        writes = [i for i, k in enumerate(kinds) if k == "write"]
        assert kinds[0] == "build" and writes
        if streamed:  # written while building, in pieces; no plan object
            assert max(writes) < min(releases) and "plan" not in kinds
            assert len(writes) > 1 or weights[engine] < STREAM_CHUNK
        else:  # parser, network and builder gone, then the plan written, then released
            assert max(releases) < writes[0] < kinds.index("plan") == len(kinds) - 1
            assert events[writes[0]][2] == (art / "engines" / f"{engine}.engine").stat().st_size  # the plan only
    piece = STREAM_CHUNK if streamed else max(weights.values())
    assert rec.peak_held <= max(weights.values()) + piece + (1 << 20)  # the weights and the plan or a piece
    assert not list((art / "engines").glob("*.partial"))


# -- a generation's copies: pinned staging, vision features on the device --------------------------------

def test_steps_upload_from_pinned_memory_and_vision_features_stay_on_the_device(tiny_trt, fakes, tmp_path):
    """Two images of different sizes through TrtBackend (the fake TensorRT runs the graphs with ONNX Runtime
    on the bound device bytes) give OrtBackend's tokens. Of the backend's copies, the only ones to the host
    are the logits; the features reach the merger by device-to-device copies, one per image; and every
    upload of a step's ids, mask and positions comes from a pinned staging buffer, which close() frees."""
    from qwen2vl_edge.runtime import InputError, Qwen2VLPipeline
    from qwen2vl_edge.runtime.backends.tensorrt import STAGED

    fakes("10.3.0", run_onnx=True)
    cuda = fakes.cuda
    art = _built(tiny_trt, tmp_path / "art")
    rng = np.random.default_rng(3)
    conv = [{"role": "user", "content": [{"type": "image", "image": random_image(rng, 160, 120)},
                                         {"type": "text", "text": "and"},
                                         {"type": "image", "image": random_image(rng, 84, 140)},
                                         {"type": "text", "text": "Describe both."}]}]
    expected = Qwen2VLPipeline.load(art).generate(conv, max_new_tokens=8, min_new_tokens=8).token_ids
    with Qwen2VLPipeline.load(art, backend="tensorrt") as pipe:
        b = pipe.backend
        staged = {b.buf[name].ptr: name for name in STAGED}
        vision_in = (b.buf["vision_embeds"].ptr, b.buf["vision_embeds"].nbytes)  # close() zeroes the buffer's ptr
        start = len(cuda.calls)
        ours = pipe.generate(conv, max_new_tokens=8, min_new_tokens=8).token_ids
        copies = [c for c in cuda.calls[start:] if c[0] == "copy"]  # (copy, kind, dst, bytes, from pinned)
        inputs = pipe.processor(conv)
        first = pipe.vision_features(inputs)
        pipe.vision_features(inputs)  # a second join overwrites the merger's input buffer
        with pytest.raises(InputError, match="overwritten by a later join"):
            b.merge(inputs["input_ids"], first)
    assert ours == expected and len(set(ours)) >= 4
    to_host = [c for c in copies if c[1] == "cudaMemcpyDeviceToHost"]
    assert len(to_host) == 8 and {c[3] for c in to_host} == {pipe.artifact.config.text.vocab_size * 4}  # logits
    joined = [c for c in copies if c[1] == "cudaMemcpyDeviceToDevice"
              and vision_in[0] <= c[2] < vision_in[0] + vision_in[1]]
    assert len(joined) == 2 and joined[1][2] == vision_in[0] + joined[0][3]  # one after the other, in order
    uploads = [c for c in copies if c[1] == "cudaMemcpyHostToDevice" and c[2] in staged]
    assert {staged[c[2]] for c in uploads} == set(STAGED) and all(c[4] for c in uploads)
    assert len(uploads) >= 3 * 8  # ids, mask and positions of every step
    assert cuda.live() == [] and cuda.errors == []


def test_the_real_cuda_mode_forwards_every_call_to_the_runtime_beneath(tiny_trt, tmp_path, monkeypatch):
    """QWEN2VL_EDGE_REAL_CUDA=1 puts CheckedCudart over cuda-python on a machine with a GPU. Here it sits over the
    fake instead: a generation through it gives OrtBackend's tokens, every allocation, copy and stream reached
    the runtime beneath, and close() left nothing alive in either."""
    from fake_cudart import CheckedCudart, FakeCudart
    from fake_tensorrt import make_fake_tensorrt
    from qwen2vl_edge.runtime import Qwen2VLPipeline
    from qwen2vl_edge.runtime.backends import cuda as cuda_layer

    beneath = FakeCudart()
    checked = CheckedCudart(rt=beneath)
    monkeypatch.setattr(cuda_layer, "cudart", lambda: checked)
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt("10.3.0", run_onnx=True,
                                                                    check_buffer=checked.owner))
    art = _built(tiny_trt, tmp_path / "art")
    conv = [{"role": "user", "content": [{"type": "image", "image": random_image(np.random.default_rng(4), 120, 90)},
                                         {"type": "text", "text": "Describe it."}]}]
    expected = Qwen2VLPipeline.load(art).generate(conv, max_new_tokens=6, min_new_tokens=6).token_ids
    with Qwen2VLPipeline.load(art, backend="tensorrt") as pipe:
        assert pipe.generate(conv, max_new_tokens=6, min_new_tokens=6).token_ids == expected
        assert checked.allocations and set(checked.allocations) == set(beneath.allocations)  # the checked layer's pointers are the runtime's
    copies = [c for c in beneath.calls if c[0] == "copy"]
    assert {c[1] for c in copies} >= {"cudaMemcpyHostToDevice", "cudaMemcpyDeviceToHost", "cudaMemcpyDeviceToDevice"}
    assert checked.live() == [] and beneath.live() == [] and checked.errors == beneath.errors == []
