"""Record the Python API surface of NVIDIA's TensorRT and cuda-python bindings, per version, as data.

    python scripts/trt_api_surface.py [--wheels DIR]

Downloads (``pip download --no-deps``) the official bindings wheels of each supported version and reads
the names out of the compiled module WITHOUT importing it (the TensorRT bindings do not import without
TensorRT's libraries, which cannot be had here). Writes scripts/data/api_surface.json, which
tests/test_trt_api_surface.py checks the builder and the backend against.

What the binary tells, per TensorRT version:
- `names`: every string in the module that is one identifier (pybind11 registers each class, method,
  property and enum value under its name), plus the names of `members`. The linker may merge a
  string into the tail of a longer one ("set_output_type" into "reset_output_type"), so a name can
  hide: a used name that is only the tail of a recorded one is present too (the test allows that);
  the names the module's Python `__init__.py` defines (`__version__`, `nptype`) are added.
  Docstrings are not read: they mention removed names (11.x still cites `BuilderFlag.FP16` in prose).
- `members`: `Class.member` from pybind11's documentation symbols (`tensorrt::<Class>Doc::<member>`).
For cuda-python, `names`: the `cuda*` identifiers of cuda.bindings.runtime's module.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

OUT = Path(__file__).parent / "data" / "api_surface.json"
# version label -> pip requirement. 10.3: JetPack 6.x; 10.8: the last whose IStreamReaderV2 trampoline reads
# once (the backend reads engines from an mmap below 10.9); 10.9: the first whose trampoline loops;
# 10.15: first with the parser's fused LLM ops; 11.x: what `pip install tensorrt` gives today (weak typing removed).
TENSORRT = {"10.3": "tensorrt-cu12-bindings==10.3.0", "10.8": "tensorrt-cu12-bindings==10.8.0.43",
            "10.9": "tensorrt-cu12-bindings==10.9.0.34", "10.15": "tensorrt-cu12-bindings==10.15.1.29",
            "11.4": "tensorrt-cu13-bindings==11.4.0.106"}
CUDA_PYTHON = {"12.8": "cuda-bindings==12.8.0", "13.5": "cuda-bindings==13.5.0"}
PLATFORM = ["--only-binary=:all:", "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64",
            "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]

IDENT = re.compile(rb"^[A-Za-z_][A-Za-z0-9_]*$")
DOC_SYMBOL = re.compile(rb"_ZN8tensorrt(\d+)([A-Za-z0-9_]+)")


def download(requirement: str, into: Path) -> Path:
    before = set(into.glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", *PLATFORM, requirement,
                    "-d", str(into)], check=True)
    name, version = requirement.split("==")
    wheels = [w for w in into.glob("*.whl") if w.name.startswith(f"{name.replace('-', '_')}-{version}")]
    if not wheels:
        raise SystemExit(f"pip download gave no wheel for {requirement} (new: {set(into.glob('*.whl')) - before})")
    return wheels[0]


def strings(data: bytes, min_len: int = 2) -> list[bytes]:
    """NUL-terminated printable runs, as `strings` prints them."""
    return re.findall(rb"[\x20-\x7e\t\n]{%d,}" % min_len, data)


def doc_members(data: bytes) -> set[str]:
    """`Class.member` from mangled pybind11 documentation symbols tensorrt::<Class>Doc::<member>."""
    found = set()
    for m in DOC_SYMBOL.finditer(data):
        n, rest = int(m.group(1)), m.group(2)
        cls = rest[:n]
        if not cls.endswith(b"Doc"):
            continue
        tail = rest[n:]
        tail = tail[1:] if tail.startswith(b"L") else tail  # internal linkage
        digits = re.match(rb"\d+", tail)
        if digits:
            k = int(digits.group())
            member = tail[len(digits.group()):len(digits.group()) + k]
            found.add(f"{cls[:-3].decode()}.{member.decode()}")
    return found


def tensorrt_surface(wheel: Path) -> dict:
    with zipfile.ZipFile(wheel) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("tensorrt.so")))
        init = z.read("tensorrt_bindings/__init__.py")  # pure Python on top: __version__, nptype, ...
    runs = strings(data)
    names = {r.decode() for r in runs if IDENT.match(r) and not r.startswith(b"_Z")}
    members = doc_members(data)
    names |= {part for m in members for part in m.split(".")}
    names |= {n.decode() for n in re.findall(rb"^(?:def )?([A-Za-z_][A-Za-z0-9_]*)\s*[=(]", init, re.M)}
    return {"wheel": wheel.name, "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
            "names": sorted(names), "members": sorted(members)}


def cuda_surface(wheel: Path) -> dict:
    with zipfile.ZipFile(wheel) as z:
        so = next(n for n in z.namelist() if re.match(r"cuda/bindings/runtime\..*\.so$", n))
        data = z.read(so)
    names = {m.decode() for m in re.findall(rb"(?<![A-Za-z0-9_])cuda[A-Za-z0-9_]+(?![A-Za-z0-9_])", data)}
    return {"wheel": wheel.name, "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
            "module": "cuda.bindings.runtime", "names": sorted(names)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", help="directory to keep the wheels in (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheels = Path(args.wheels or tmp)
        wheels.mkdir(parents=True, exist_ok=True)
        data = {"source": "scripts/trt_api_surface.py: names read from NVIDIA's bindings wheels (PyPI), not imported",
                "tensorrt": {v: {"requirement": r, **tensorrt_surface(download(r, wheels))}
                             for v, r in TENSORRT.items()},
                "cuda_python": {v: {"requirement": r, **cuda_surface(download(r, wheels))}
                                for v, r in CUDA_PYTHON.items()}}
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    for kind in ("tensorrt", "cuda_python"):
        for v, d in data[kind].items():
            print(f"{kind} {v}: {len(d['names'])} names, {len(d.get('members', []))} members ({d['wheel']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
