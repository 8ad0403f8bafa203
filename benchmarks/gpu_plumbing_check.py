"""The TensorRT backend's GPU plumbing with REAL cuda-python, without TensorRT: one short check.

    python benchmarks/gpu_plumbing_check.py ARTIFACT [ARTIFACT ...] [--tokens 16]

Each ARTIFACT is a tiny export: portable graphs (checked as a concat KV cache), or a `--target tensorrt`
export (10.15: preallocated, written in place, built at its static cache length). For each: `build-trt` with the
fake `tensorrt` of tests/fake_tensorrt.py, then whole generations through TrtBackend, where the fake's
execute_async_v3 copies the bound device bytes to the host with cuda-python, runs the engine's source
graph with ONNX Runtime and copies the outputs back to the device. Everything else is real: device
buffers, pinned logits, the stream, the KV cache in device memory written in place, the copies, freeing.
Prints the tokens, the device memory taken and given back, and whether they equal ONNX Runtime's own run.
Exit status 0 only if every comparison agrees and close() gave all memory back.

Needs numpy, onnxruntime, tokenizers, jinja2, Pillow and cuda-python; no torch, no TensorRT, no install
of this package (it is imported from this checkout). An artifact that lacks a processor file (e.g. a
second one shipped without its 18 MB tokenizer.json) takes it from the first ARTIFACT.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def import_checkout(tmp: Path) -> None:
    """Make `qwen2vl_edge` importable from this checkout without installing it (pyproject's package-dir)."""
    import importlib.util

    if importlib.util.find_spec("qwen2vl_edge") is not None:
        return
    pkg = tmp / "shim" / "qwen2vl_edge"
    pkg.mkdir(parents=True)
    for entry in (ROOT / "cli").iterdir():
        (pkg / entry.name).symlink_to(entry)
    for sub in ("runtime", "export", "benchmarks"):
        (pkg / sub).symlink_to(ROOT / sub)
    sys.path.insert(0, str(pkg.parent))


def prepare(artifact: Path, first: Path, out: Path) -> Path:
    from trt_standin import tensorrt_standin

    export = json.loads((artifact / "manifest.json").read_text())["export"]
    if export.get("target") == "tensorrt":
        shutil.copytree(artifact, out)
    else:
        tensorrt_standin(artifact, out)
    for name in json.loads((out / "manifest.json").read_text())["files"]:
        if not (out / name).exists() and (first / name).is_file():
            shutil.copyfile(first / name, out / name)
    return out


def conversations() -> list:
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (15, 20, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((160, 120), Image.Resampling.BILINEAR)
    return [[{"role": "user", "content": [{"type": "image", "image": image},
                                          {"type": "text", "text": "Describe this image."}]}],
            [{"role": "user", "content": "Count to ten."}]]


def check(artifact: Path, tokens: int) -> bool:
    import tensorrt  # the fake, put in sys.modules by main()

    from qwen2vl_edge.export.trt_build import build_trt
    from qwen2vl_edge.runtime import Qwen2VLPipeline
    from qwen2vl_edge.runtime.backends.cuda import device_memory, gpu_identity
    from qwen2vl_edge.runtime.backends.trt_profiles import Limits

    build_trt(artifact, limits=Limits(max_image_tokens=256, max_prompt=512, max_context=640),
              timing_cache=artifact.parent / f"{artifact.name}.timing", fit_context=True)
    convs = conversations()
    free0, total = device_memory()
    pipe = Qwen2VLPipeline.load(artifact, backend="tensorrt")
    free_loaded = device_memory()[0]
    ours = [pipe.generate(c, max_new_tokens=tokens, min_new_tokens=tokens).token_ids for c in convs]
    free_ran = device_memory()[0]
    pipe.close()
    free_closed = device_memory()[0]
    ref = Qwen2VLPipeline.load(artifact).generate
    expected = [ref(c, max_new_tokens=tokens, min_new_tokens=tokens).token_ids for c in convs]
    kv = pipe.backend.kv_cache
    print(f"{artifact.name}: {kv} KV cache on {gpu_identity()[0]}, {len(tensorrt.recorder.executions)} engine runs")
    for name, a, b in zip(("image", "text"), ours, expected):
        print(f"  {name}: TrtBackend {a}\n  {name}: OrtBackend {b}  -> {'SAME' if a == b else 'DIFFERENT'}")
    print(f"  device memory: {(free0 - free_loaded) / MiB:.1f} MiB at load, {(free0 - free_ran) / MiB:.1f} MiB after "
          f"generating, {(free0 - free_closed) / MiB:.1f} MiB still taken after close() (of {total / MiB:.0f} MiB)")
    # the CUDA context may keep a little for itself; what we allocated is megabytes
    return ours == expected and free0 - free_closed < 2 * MiB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--tokens", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        import_checkout(tmp)
        sys.path.insert(0, str(ROOT / "tests"))  # the fake tensorrt and the stand-in relabeling
        from fake_tensorrt import make_fake_tensorrt

        ok = True
        for i, artifact in enumerate(args.artifacts):
            sys.modules["tensorrt"] = make_fake_tensorrt(run_onnx=True)  # real CUDA: no fake buffer check
            ok &= check(prepare(artifact, args.artifacts[0], tmp / f"art{i}-{artifact.name}"), args.tokens)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
