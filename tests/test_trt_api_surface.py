"""The TensorRT and cuda-python names the builder and the backend use exist in every supported version.

scripts/data/api_surface.json holds the names read out of NVIDIA's bindings wheels (TensorRT 10.3, 10.8,
10.9, 10.15, 11.4; cuda-python 12.8, 13.5) by scripts/trt_api_surface.py. The builder and the backend run in the test
suite only against the fakes (tests/fake_tensorrt.py, fake_cudart.py), so every TensorRT or CUDA name
they use is one the fakes offer (anything else is an AttributeError in tests/test_tensorrt.py). Here:
every name the fakes offer is in every version's data, and the weak-typing names TensorRT 11 removed
appear nowhere in our code.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import inspect
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(Path(__file__).parent))

from fake_cudart import FakeCudart  # noqa: E402
from fake_tensorrt import fake_classes, make_fake_tensorrt  # noqa: E402

SURFACE = json.loads((ROOT / "scripts" / "data" / "api_surface.json").read_text())
OURS = [ROOT / "export" / "trt_build.py", ROOT / "runtime" / "backends" / "tensorrt.py",
        ROOT / "runtime" / "backends" / "cuda.py"]
WEAK_TYPING = ("FP16", "BF16", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS", "set_output_type",
               "precision")  # builder flags, ILayer.set_output_type, ILayer.precision
NOT_TENSORRT = {"recorder"}  # the fake's own record


def present(name: str, names: list[str]) -> bool:
    """In the binary as its own string, or as the tail of a longer one (the linker merges "set_shape"
    into "reset_shape": the bytes are there, the string is not on its own)."""
    return name in names or any(n.endswith(name) for n in names)


def fake_tensorrt_names(version: str) -> set[str]:
    mod = make_fake_tensorrt(version)
    names = {n for n in vars(mod) if not n.startswith("_")} - NOT_TENSORRT
    for value in vars(mod).values():
        if isinstance(value, type) and issubclass(value, enum.Enum):
            names |= set(value.__members__)
        elif isinstance(value, type):
            names |= {n for n in vars(value) if not n.startswith("_") and n.isupper()}  # Logger severities
    for cls in fake_classes(version).values():
        names |= {n for n in dir(cls) if not n.startswith("_")}
        names |= {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")} if dataclasses.is_dataclass(
            cls) else set()
    return names


@pytest.mark.parametrize("version", list(SURFACE["tensorrt"]))
def test_every_tensorrt_name_we_use_exists(version):
    names = SURFACE["tensorrt"][version]["names"]
    missing = sorted(n for n in fake_tensorrt_names(version) if not present(n, names))
    assert not missing, f"TensorRT {version} has no {missing}"


@pytest.mark.parametrize("version", list(SURFACE["tensorrt"]))
def test_engine_reading_and_writing_use_what_each_version_has(version):
    """runtime/backends/tensorrt.py: read_engine streams through an IStreamReaderV2 from 10.9 on (TensorRT calls
    back read and seek on it), and below that hands the buffer overload of deserialize_cuda_engine an mmap;
    export/trt_build.py builds to an IStreamWriter from 10.15 on. The fake offers the readers and the writer
    exactly where the bindings have them."""
    from qwen2vl_edge.export.trt_build import STREAM_BUILD
    from qwen2vl_edge.runtime.backends.tensorrt import STREAM_READER_LOOPS, version_tuple

    names = SURFACE["tensorrt"][version]["names"]
    fake = make_fake_tensorrt(version)
    for cls in ("IStreamReader", "IStreamReaderV2", "IStreamWriter"):
        assert hasattr(fake, cls) == present(cls, names), cls
    used = {"Runtime", "deserialize_cuda_engine"}
    if version_tuple(version) >= STREAM_READER_LOOPS:
        used |= {"IStreamReaderV2", "SeekPosition", "read", "seek", "SET", "CUR", "END"}
    if version_tuple(version) >= STREAM_BUILD:
        used |= {"IStreamWriter", "write", "build_serialized_network_to_stream"}
    else:
        used |= {"build_serialized_network"}
    assert not sorted(n for n in used if not present(n, names))


@pytest.mark.parametrize("version", list(SURFACE["cuda_python"]))
def test_every_cuda_python_name_we_use_exists(version):
    names = SURFACE["cuda_python"][version]["names"]
    used = {n for n in vars(FakeCudart) if n.startswith("cuda")}
    used |= {m for cls in (FakeCudart.cudaError_t, FakeCudart.cudaMemcpyKind) for m in cls.__members__}
    assert not sorted(n for n in used if n not in names)


def test_fake_cuda_takes_cuda_pythons_parameters():
    runtime = pytest.importorskip("cuda.bindings.runtime")
    for name in (n for n in vars(FakeCudart) if n.startswith("cuda") and callable(getattr(FakeCudart, n))):
        if name in ("cudaError_t", "cudaMemcpyKind"):
            continue
        real = [p.name for p in inspect.signature(getattr(runtime, name)).parameters.values()]
        fake = [p for p in inspect.signature(getattr(FakeCudart, name)).parameters][1:]  # without self
        assert fake == real, name


def test_weak_typing_is_gone_in_tensorrt_11_and_unused_here():
    newest = SURFACE["tensorrt"][max(SURFACE["tensorrt"], key=lambda v: tuple(map(int, v.split("."))))]["names"]
    oldest = SURFACE["tensorrt"]["10.3"]["names"]
    for name in ("FP16", "OBEY_PRECISION_CONSTRAINTS", "set_output_type"):
        assert present(name, oldest) and not present(name, newest), name  # what made the old builder break
    for path in OURS:
        tree = ast.parse(path.read_text())
        used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        assert not used & set(WEAK_TYPING), f"{path.name} uses {used & set(WEAK_TYPING)}"
        assert "STRONGLY_TYPED" in used or path.name != "trt_build.py"
