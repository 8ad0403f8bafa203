"""`qwen2vl-edge gpu-check`: the one command for a machine with an NVIDIA GPU and TensorRT.

What only a real TensorRT can tell, in one short run (sized for about 15 minutes on one H100; not run in
this project yet: no GPU with TensorRT here):
- builds: every TensorRT export below builds, with ProfilingVerbosity.DETAILED (the inspector reports
  layers in detail only then). Among them the fp32 10.15 export, whose attention must fuse (IAttention is
  not decomposable by default) and the 10.15 decoders, whose cache TensorRT's KVCacheUpdate must accept;
- layers: each engine's layer information (IEngineInspector, LayerInformationFormat.JSON) goes to
  OUT/<model>-<variant>-<engine>.layers.json, and is read for: attention run as a fused kernel, int4
  weights kept as int4 (int4 exports), and the device memory each engine asks for (device_memory_size_v2,
  and per optimization profile);
- parity: greedy tokens of the engines against ONNX Runtime running the graphs they were built from;
- speed: `ours-trt-fp16` and `ours-trt-int4` on the 2B shape (time to first token, decode tokens/s).
It prints one summary line per check and writes everything to OUT/gpu_check.json.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from qwen2vl_edge.export.vocab import cache_dir

from .models import VARIANTS, model_dirs

CHECKED = {"tiny": ("trt-fp32", "trt-fp16", "trt-fp32-10.15", "trt-fp16-10.15"),
           "2b-shape": ("trt-fp16", "trt-int4", "trt-fp16-10.15")}
PARITY = {"tiny": ("trt-fp32", "trt-fp16", "trt-fp32-10.15"), "2b-shape": ("trt-fp16",)}
MUST_MATCH = ("trt-fp32", "trt-fp32-10.15")  # fp32 engines (TF32 off) match ONNX Runtime token for token
ATTENTION_ENGINES = ("vision_encoder", "decoder")
# What a fused attention kernel is called in the inspector's layers. Myelin's fused MHA is a layer and a
# tactic named "_gemm_mha_v2..." (inspector output quoted in NVIDIA/TensorRT issue #4397; on TensorRT 10.3
# on Orin in #4167), and a TensorRT maintainer: "If the MHA is fused, there should be kernel names with
# `_mha`" (#3243). Unfused attention shows as gemm and softmax layers named after the graph's MatMul
# nodes ("[MATRIX_MULTIPLY]_[scaled_dot_product_attention]...", #3665): "attention" alone means nothing.
# IAttention's fused kernels (10.15) are not named in the documentation: "fmha" and "flash" are guesses,
# which is why the layer files are kept for a person to read.
FUSED_ATTENTION = ("_mha", "fmha", "flash")
MiB = 1 << 20


def _tensors(layer: dict) -> list[dict]:
    return [t for key in ("Inputs", "Outputs") for t in layer.get(key, []) if isinstance(t, dict)]


def summarize_layers(info: dict) -> dict:
    """The inspector's JSON (one engine) -> what gpu-check reports: layer count and kinds, the layers that
    are fused attention kernels, the layers with an int4 tensor or int4 weights."""
    layers = info.get("Layers", [])
    if any(not isinstance(layer, dict) for layer in layers):
        raise ValueError("the engine holds layer names only: build it with ProfilingVerbosity.DETAILED "
                         "(build_trt(..., detailed=True))")
    fused = [layer["Name"] for layer in layers
             if any(m in f"{layer.get('Name', '')} {layer.get('TacticName', '')}".lower() for m in FUSED_ATTENTION)]
    int4 = [layer["Name"] for layer in layers
            if any("int4" in str(t.get("Format/Datatype", "")).lower() for t in _tensors(layer))
            or str(layer.get("Weights", {}).get("Type", "")).lower() == "int4"]
    return {"layers": len(layers), "layer_types": dict(Counter(layer.get("LayerType", "?") for layer in layers)),
            "fused_attention_layers": fused, "int4_layers": int4}


def inspect_engines(artifact: Path, out: Path, label: str) -> dict:
    """Each engine of `artifact`: its layer information into OUT/LABEL-ENGINE.layers.json, and a summary
    with the device memory it asks for."""
    import tensorrt as trt

    from qwen2vl_edge.runtime.artifact import load_artifact
    from qwen2vl_edge.runtime.backends.tensorrt import read_engine

    art = load_artifact(artifact, verify=False)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    report = {}
    for name, entry in art.manifest["engines"].items():
        engine = read_engine(trt, runtime, art.dir / entry["file"])
        inspector = engine.create_engine_inspector()
        info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
        layers_file = out / f"{label}-{name}.layers.json"
        layers_file.write_text(json.dumps(info, indent=1))
        report[name] = {**summarize_layers(info), "layers_file": layers_file.name,
                        "engine_file_bytes": (art.dir / entry["file"]).stat().st_size,
                        "device_memory_bytes": int(engine.device_memory_size_v2),
                        "device_memory_per_profile_bytes": [int(engine.get_device_memory_size_for_profile_v2(k))
                                                            for k in range(engine.num_optimization_profiles)]}
    return report


def check_lines(label: str, variant: str, result: dict) -> list[str]:
    """One line per check of one built variant."""
    if "build_error" in result:
        return [f"build {label}: FAILED: {result['build_error']}"]
    lines = [f"build {label}: ok in {result['build_seconds']:.0f} s"]
    for engine, s in result["engines"].items():
        if engine in ATTENTION_ENGINES:
            fused = s["fused_attention_layers"]
            lines.append(f"attention {label} {engine}: " + (
                f"FUSED, {len(fused)} layer(s), e.g. {fused[0]}" if fused
                else f"NOT fused (no layer named like {', '.join(FUSED_ATTENTION)})"))
        if engine == "decoder" and VARIANTS[variant].get("weights") == "int4":
            int4 = s["int4_layers"]
            lines.append(f"int4 {label} decoder: " + (f"kept, {len(int4)} layer(s) with int4 tensors" if int4
                                                      else "NOT kept: no layer has an int4 tensor (dequantized)"))
        lines.append(f"device memory {label} {engine}: {s['device_memory_bytes'] / MiB:.1f} MiB for activations "
                     f"(profiles {[round(b / MiB, 1) for b in s['device_memory_per_profile_bytes']]}), engine file "
                     f"{s['engine_file_bytes'] / MiB:.1f} MiB")
    return lines


def _image_conv():
    import numpy as np
    from PIL import Image

    base = np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    return [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(base).resize((448, 448))},
                                         {"type": "text", "text": "Describe this image."}]}]


TEXT = [{"role": "user", "content": "Describe the weather on a summer day in three sentences."}]


def parity(artifact: Path, new_tokens: int) -> dict:
    """Greedy tokens of the TensorRT engines against ONNX Runtime running the graphs they were built from."""
    from qwen2vl_edge.runtime import Qwen2VLPipeline
    from qwen2vl_edge.runtime.backends.cuda import device_memory

    convs = {"text": TEXT, "image": _image_conv()}
    free0 = device_memory()[0]
    out = {}
    with Qwen2VLPipeline.load(artifact, backend="tensorrt", verify=False) as trt_pipe:
        out["device_memory_at_load_bytes"] = free0 - device_memory()[0]
        ours = {name: trt_pipe.generate(c, max_new_tokens=new_tokens, min_new_tokens=new_tokens).token_ids
                for name, c in convs.items()}
    ort_pipe = Qwen2VLPipeline.load(artifact, verify=False)
    for name, conv in convs.items():
        ref = ort_pipe.generate(conv, max_new_tokens=new_tokens, min_new_tokens=new_tokens).token_ids
        agree = next((i for i, (a, b) in enumerate(zip(ours[name], ref)) if a != b), len(ref))
        out[name] = {"tensorrt": ours[name], "onnxruntime": ref, "first_agreeing": agree}
    out["device_memory_after_close_bytes"] = free0 - device_memory()[0]
    return out


def check_variant(model: str, variant: str, out: Path, new_tokens: int) -> dict:
    """Export (cached) and build one variant with detailed layers, inspect its engines, compare its tokens."""
    from qwen2vl_edge.export.trt_build import BuildError

    started = time.perf_counter()
    try:
        _, artifacts = model_dirs(model, None, cache_dir() / "bench", (variant,), detailed=True)
    except BuildError as e:  # a finding, not the end of the check: the other variants still run
        return {"build_error": str(e).splitlines()[0]}
    result = {"build_seconds": time.perf_counter() - started,
              "engines": inspect_engines(artifacts[variant], out, f"{model}-{variant}")}
    if variant in PARITY.get(model, ()):
        result["parity"] = parity(artifacts[variant], new_tokens)
    return result


def parity_lines(label: str, p: dict | None) -> list[str]:
    return [] if not p else [f"parity {label} {name}: first {p[name]['first_agreeing']} of "
                             f"{len(p[name]['onnxruntime'])} greedy tokens agree with ONNX Runtime"
                             for name in ("text", "image")]


def _passed(report: dict, new_tokens: int) -> bool:
    """Every variant built, and the fp32 engines give ONNX Runtime's tokens."""
    for variants in report["models"].values():
        for variant, result in variants.items():
            if "build_error" in result:
                return False
            p = result.get("parity")
            if p and variant in MUST_MATCH and min(p[k]["first_agreeing"] for k in ("text", "image")) < new_tokens:
                return False
    return True


def gpu_check(out: Path, models: list[str] = ("tiny", "2b-shape"), new_tokens: int = 32) -> int:
    from .bench import run_bench

    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "models": {}, "checks": []}
    for model in models:
        report["models"][model] = {}
        for variant in CHECKED[model]:
            result = check_variant(model, variant, out, new_tokens)
            report["models"][model][variant] = result
            label = f"{model} {variant}"
            lines = check_lines(label, variant, result) + parity_lines(label, result.get("parity"))
            report["checks"] += lines
            print("\n".join(lines), flush=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    built = report["models"].get("2b-shape", {})
    if all(v in built and "build_error" not in built[v] for v in ("trt-fp16", "trt-int4")):
        run_bench("2b-shape", "ours-trt-fp16,ours-trt-int4", None, 2, new_tokens, 1, out / "2b-shape",
                  resolutions=[448, 896, 1344], contexts=[512, 2048])
    ok = _passed(report, new_tokens)
    verdict = "every build and the fp32 parity passed" if ok else "a build or the fp32 parity FAILED"
    print(f"written to {out}/gpu_check.json; {verdict}")
    return 0 if ok else 1
