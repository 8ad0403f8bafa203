"""Shared, session-scoped fixtures: tiny checkpoints and exports are built once per test run."""

from __future__ import annotations

import importlib.util
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

HAS_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None

requires_torch = pytest.mark.skipif(not HAS_TORCH, reason="needs the [export] and [test] extras (torch, transformers)")


def random_image(rng: np.random.Generator, width: int, height: int, mode: str = "RGB") -> Image.Image:
    """A smooth random image (noise alone would make resampling differences look worse than they are)."""
    base = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((width, height), Image.Resampling.BILINEAR)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-12, 13, (height, width, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if mode == "RGBA":
        alpha = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8))
        img.putalpha(alpha)
    elif mode != "RGB":
        img = img.convert(mode)
    return img


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qwen2vl")


@pytest.fixture(scope="session")
def tiny_ckpt(workdir) -> Path:
    """Original (Qwen/Qwen2-VL-2B-Instruct) layout, tied embeddings, mrope_section [2, 3, 3]."""
    if not HAS_TORCH:
        pytest.skip("building a tiny checkpoint needs the [export] extra")
    from qwen2vl_edge.export.tiny import make_tiny

    return make_tiny(workdir / "tiny-original", seed=0, layout="original")


@pytest.fixture(scope="session")
def tiny_ckpt_v5(workdir) -> Path:
    """transformers-5 layout, untied lm_head, another mrope_section."""
    if not HAS_TORCH:
        pytest.skip("building a tiny checkpoint needs the [export] extra")
    from qwen2vl_edge.export.tiny import make_tiny

    return make_tiny(workdir / "tiny-v5", seed=1, layout="v5",
                     overrides=["tie_word_embeddings=false", "text.mrope_section=4,2,2"])


@pytest.fixture(scope="session")
def tiny_ckpt_25(workdir) -> Path:
    """Qwen2.5-VL, original (flat, Qwen/Qwen2.5-VL-3B-Instruct) layout: window blocks 0 and 2 around full block 1."""
    if not HAS_TORCH:
        pytest.skip("building a tiny checkpoint needs the [export] extra")
    from qwen2vl_edge.export.tiny import make_tiny

    return make_tiny(workdir / "tiny-25-original", seed=2, layout="original", family="qwen2_5_vl")


@pytest.fixture(scope="session")
def tiny_ckpt_3(workdir) -> Path:
    """Qwen3-VL as Qwen/Qwen3-VL-2B-Instruct ships it (nested config): head_dim 32 != hidden / heads, DeepStack taps
    at vision blocks 0 and 2 of 3 feeding decoder layers 0 and 1 of 3, an 8 x 8 position table, section [6, 5, 5]."""
    if not HAS_TORCH:
        pytest.skip("building a tiny checkpoint needs the [export] extra")
    from qwen2vl_edge.export.tiny import make_tiny

    return make_tiny(workdir / "tiny-3", seed=6, layout="original", family="qwen3_vl")


FAMILY_CKPTS = {"qwen2_vl": "tiny_ckpt", "qwen2_5_vl": "tiny_ckpt_25", "qwen3_vl": "tiny_ckpt_3"}  # family -> its tiny checkpoint's fixture
# target -> export options; tensorrt targets run by ONNX Runtime (the very files TensorRT would be given)
TARGET_OPTIONS = {"portable": {}, "ort-cpu": {"target": "ort-cpu"},
                  **{f"tensorrt-{v}{suffix}": {"target": "tensorrt", "min_tensorrt": v, "precision": precision}
                     for v in ("10.3", "10.15") for suffix, precision in (("", "fp32"), ("-fp16", "fp16"))},
                  "tensorrt-10.15-fp16-int4": {"target": "tensorrt", "min_tensorrt": "10.15", "precision": "fp16",
                                               "weights": "int4"},
                  # weights quantized at export (Qwen2-VL's: test_quantized's own fixtures)
                  "ort-cpu-int8": {"target": "ort-cpu", "weights": "int8"},
                  "ort-cpu-int4": {"target": "ort-cpu", "weights": "int4", "vision_weights": "int8"},
                  "ort-cpu-int8-dynamic-vision": {"target": "ort-cpu", "vision_weights": "int8-dynamic"}}
_FAMILY_PIPES: dict = {}


@pytest.fixture
def family_ckpt(request):
    """family_ckpt("qwen2_5_vl") -> the family's tiny checkpoint (session fixtures, built once)."""
    return lambda family: request.getfixturevalue(FAMILY_CKPTS[family])


@pytest.fixture
def family_pipe(request, family_ckpt, workdir):
    """family_pipe(family, target) -> the pipeline of the family's tiny checkpoint as `target` (TARGET_OPTIONS)
    exports it, made once per run. Qwen2-VL's are the fixtures the other tests share."""
    from qwen2vl_edge.runtime import Qwen2VLPipeline

    def load(family: str, target: str):
        options = TARGET_OPTIONS[target]
        if family == "qwen2_vl" and target in ("portable", "ort-cpu"):
            return request.getfixturevalue({"portable": "pipe", "ort-cpu": "pipe_ort"}[target])
        if family == "qwen2_vl" and "min_tensorrt" in options:
            return request.getfixturevalue("trt_pipe")(**{k: v for k, v in options.items() if k != "target"})
        if (family, target) not in _FAMILY_PIPES:
            art = export_artifact(family_ckpt(family), workdir / f"art-{family}-{target}", **options)
            _FAMILY_PIPES[family, target] = Qwen2VLPipeline.load(art)
        return _FAMILY_PIPES[family, target]

    return load


@pytest.fixture(scope="session")
def images(workdir) -> dict[str, Path]:
    """A few image files of different sizes, written once."""
    rng = np.random.default_rng(1234)
    out = {}
    for name, (w, h) in {"a": (320, 240), "b": (200, 300), "c": (120, 90)}.items():
        path = workdir / f"img_{name}.png"
        random_image(rng, w, h).save(path)
        out[name] = path
    return out


def export_artifact(ckpt: Path, out: Path, **options) -> Path:
    from qwen2vl_edge.export.onnx_export import export

    return export(ckpt, out, verbose=False, **options)


@pytest.fixture(scope="session")
def tiny_artifact(tiny_ckpt, workdir) -> Path:
    return export_artifact(tiny_ckpt, workdir / "art-original")


@pytest.fixture(scope="session")
def tiny_artifact_v5(tiny_ckpt_v5, workdir) -> Path:
    return export_artifact(tiny_ckpt_v5, workdir / "art-v5")


@pytest.fixture(scope="session")
def pipe(tiny_artifact):
    from qwen2vl_edge.runtime import Qwen2VLPipeline

    return Qwen2VLPipeline.load(tiny_artifact)


@pytest.fixture(scope="session")
def pipe_v5(tiny_artifact_v5):
    from qwen2vl_edge.runtime import Qwen2VLPipeline

    return Qwen2VLPipeline.load(tiny_artifact_v5)


def assert_varied(token_ids, what: str = "reference output") -> None:
    """Parity on a repeated token proves nothing: most tokens of a reply must differ."""
    distinct = len(set(token_ids))
    assert distinct > len(token_ids) // 2, (f"{what} degenerate ({distinct} distinct of {len(token_ids)} tokens): "
                                            "parity would prove nothing")


@pytest.fixture(scope="session")
def tiny_artifact_ort(tiny_ckpt, workdir) -> Path:
    """The tiny checkpoint for the ort-cpu target, fp32: GroupQueryAttention over a preallocated cache."""
    return export_artifact(tiny_ckpt, workdir / "art-ort-fp32", target="ort-cpu")


@pytest.fixture(scope="session")
def pipe_ort(tiny_artifact_ort):
    from qwen2vl_edge.runtime import Qwen2VLPipeline

    return Qwen2VLPipeline.load(tiny_artifact_ort)


# The static KV cache length of the tests' 10.15 exports (export --max-context): the engine limits they are built
# with (tests/test_tensorrt.py: SMALL) match it, and decode reads the whole buffer, so it stays small.
TRT_MAX_CONTEXT = 640


@pytest.fixture(scope="session")
def trt_export(tiny_ckpt, tiny_ckpt_v5, workdir):
    """export --target tensorrt of a tiny checkpoint, made once per option set: trt_export(min_tensorrt=...,
    precision=..., weights=..., ckpt='original' | 'v5'); 10.15 exports hold TRT_MAX_CONTEXT positions."""
    made = {}

    def make(min_tensorrt="10.15", precision="fp32", weights="fp32", ckpt="original") -> Path:
        key = (min_tensorrt, precision, weights, ckpt)
        if key not in made:
            source = tiny_ckpt if ckpt == "original" else tiny_ckpt_v5
            made[key] = export_artifact(source, workdir / f"art-trt-{'-'.join(key)}", target="tensorrt",
                                        min_tensorrt=min_tensorrt, precision=precision, weights=weights,
                                        max_context=TRT_MAX_CONTEXT if min_tensorrt == "10.15" else None)
        return made[key]

    return make


@pytest.fixture(scope="session")
def trt_pipe(trt_export):
    """The ONNX Runtime pipeline of a tensorrt export, loaded once per option set."""
    from qwen2vl_edge.runtime import Qwen2VLPipeline

    loaded = {}

    def load(**options):
        key = tuple(sorted(options.items()))
        if key not in loaded:
            loaded[key] = Qwen2VLPipeline.load(trt_export(**options))
        return loaded[key]

    return load


# -- the OpenAI server: one process for test_server.py and test_server_agents.py -----------------------------

SERVER_KEY = "test-key"
SERVER_PIXEL_LIMIT = 70_000  # images "b" (200x300) and "c" (120x90) pass, "a" (320x240) does not


@pytest.fixture(scope="session")
def media_dir(images, workdir) -> Path:
    d = workdir / "served-media"
    d.mkdir(exist_ok=True)
    (d / "c.png").write_bytes(images["c"].read_bytes())
    return d


@pytest.fixture(scope="session")
def server(tiny_artifact, media_dir, workdir):
    """`qwen2vl-edge serve` on 127.0.0.1 with an API key and small limits (a 1 MiB body, SERVER_PIXEL_LIMIT)."""
    from qwen2vl_edge.benchmarks.serve_bench import ServerProcess

    srv = ServerProcess([str(tiny_artifact), "--api-key", SERVER_KEY, "--max-batch", "8", "--max-body-mb", "1",
                         "--max-image-pixels", str(SERVER_PIXEL_LIMIT), "--allowed-media-dir", str(media_dir)],
                        workdir / "server.log")
    assert srv.proc.poll() is None, srv.output()
    yield srv
    srv.stop()


@contextmanager
def in_process_server(app) -> Iterator[str]:
    """`app` on a uvicorn of its own in this process, on a free port of 127.0.0.1 -> its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        thread.join(0.05)
    assert server.started, "the in-process server did not start (see its log above)"
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")  # module: a test module with a `server` of its own (test_ray.py) gets its client
def client(server):
    """The official openai client of `server`."""
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=SERVER_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


@pytest.fixture
def fakes(monkeypatch):
    """Fake tensorrt (running the source graphs with ONNX Runtime) and fake CUDA (tests/fake_*.py), for one test;
    with QWEN2VL_EDGE_REAL_CUDA=1 the GPU's own memory, copies and streams under the same checks."""
    import sys

    from fake_cudart import for_tests
    from fake_tensorrt import make_fake_tensorrt
    from qwen2vl_edge.runtime.backends import cuda as cuda_layer

    cuda = for_tests()
    monkeypatch.setattr(cuda_layer, "cudart", lambda: cuda)
    trt = make_fake_tensorrt(run_onnx=True, check_buffer=cuda.owner)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt, cuda
