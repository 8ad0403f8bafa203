"""`qwen2vl-edge gpu-check`: the one command for a machine with an NVIDIA GPU and TensorRT.

For each model (tiny, 2b-shape): export `--target tensorrt` (fp32 for the tiny one, fp16 for both),
build the engines, run greedy generations through the TensorRT backend and through ONNX Runtime on the
same graphs, and report how many tokens agree; then benchmark `ours-trt-fp16` and `ours-trt-int4` on
the 2B shape (time to first token, decode tokens/s, device memory) into OUT/. Sized for about 10
minutes on one H100: one repeat, short sweeps. Not run in this project yet (no GPU with TensorRT here).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from qwen2vl_edge.export.vocab import cache_dir

from .models import model_dirs

PARITY = {"tiny": ("trt-fp32", "trt-fp16"), "2b-shape": ("trt-fp16",)}
TEXT = [{"role": "user", "content": "Describe the weather on a summer day in three sentences."}]


def _image_conv():
    import numpy as np
    from PIL import Image

    base = np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    return [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(base).resize((448, 448))},
                                         {"type": "text", "text": "Describe this image."}]}]


def parity(artifact: Path, new_tokens: int) -> dict:
    """Greedy tokens of the TensorRT engines against ONNX Runtime running the graphs they were built from."""
    from qwen2vl_edge.runtime import Qwen2VLPipeline
    from qwen2vl_edge.runtime.backends.cuda import device_memory

    free0 = device_memory()[0]
    out = {}
    with Qwen2VLPipeline.load(artifact, backend="tensorrt", verify=False) as trt_pipe:
        out["device_memory_at_load_bytes"] = free0 - device_memory()[0]
        ours = {name: trt_pipe.generate(c, max_new_tokens=new_tokens, min_new_tokens=new_tokens).token_ids
                for name, c in (("text", TEXT), ("image", _image_conv()))}
    ort_pipe = Qwen2VLPipeline.load(artifact, verify=False)
    for name, conv in (("text", TEXT), ("image", _image_conv())):
        ref = ort_pipe.generate(conv, max_new_tokens=new_tokens, min_new_tokens=new_tokens).token_ids
        agree = next((i for i, (a, b) in enumerate(zip(ours[name], ref)) if a != b), len(ref))
        out[name] = {"tensorrt": ours[name], "onnxruntime": ref, "first_agreeing": agree}
        print(f"  {artifact.name} {name}: first {agree} of {len(ref)} greedy tokens agree")
    out["device_memory_after_close_bytes"] = free0 - device_memory()[0]
    return out


def gpu_check(out: Path, models: list[str] = ("tiny", "2b-shape"), new_tokens: int = 32) -> int:
    from .bench import run_bench

    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "models": {}}
    for model in models:
        started = time.perf_counter()
        _, artifacts = model_dirs(model, None, cache_dir() / "bench", set(PARITY.get(model, ("trt-fp16",))))
        report["models"][model] = {v: parity(a, new_tokens) for v, a in artifacts.items()}
        report["models"][model]["seconds"] = time.perf_counter() - started
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    if "2b-shape" in models:
        run_bench("2b-shape", "ours-trt-fp16,ours-trt-int4", None, 2, new_tokens, 1, out / "2b-shape",
                  resolutions=[448, 896, 1344], contexts=[512, 2048])
    fp32 = report["models"].get("tiny", {}).get("trt-fp32", {})
    ok = all(fp32[k]["first_agreeing"] == new_tokens for k in ("text", "image")) if fp32 else True
    print(f"written to {out}/gpu_check.json; tiny fp32 engines {'match' if ok else 'DO NOT match'} ONNX Runtime")
    return 0 if ok else 1
