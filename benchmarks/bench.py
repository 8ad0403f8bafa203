"""`qwen2vl-edge bench`: every stage of every system on the same weights, machine and run.

Each system runs in its own process (see worker.py); the parent describes the machine, derives the
rooflines and writes result.json, report.md and the plots.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from qwen2vl_edge.export.vocab import cache_dir
from qwen2vl_edge.runtime.config import load_config

from . import host_loop, machine, peers, report, roofline, scenarios
from .launch import run_worker
from .models import model_dirs

SYSTEMS = {  # name -> (kind, artifact variant, weight format read per decode token, ORT session cache)
    "ours-ort-cpu": ("ours", "fp32", "fp32", False),
    "ours-ort-cpu-fp16w": ("ours", "fp16", "fp16", False),  # fp16 storage, fp32 math
    # the quantized systems start as a deployed device does: from a session cache its first start wrote
    # (the fp32 ones would need twice their 8.8 GB of disk for it)
    "ours-ort-int8": ("ours", "int8", "int8", True),
    "ours-ort-int4": ("ours", "int4", "int4", True),
    "ours-ort-int4-vdq": ("ours", "int4-vdq", "int4", True),  # vision as DynamicQuantizeMatMul
    "ours-ort-int4-b256": ("ours", "int4-b256", "int4", True),  # --block-size 256
    # TensorRT engines of the `--target tensorrt` export (needs a GPU and TensorRT; see gpu_check.py)
    "ours-trt-fp16": ("ours", "trt-fp16", "fp16", False),
    "ours-trt-int4": ("ours", "trt-int4", "int4", False),
    "transformers": ("transformers", None, "fp32", False),
    "transformers-bf16": ("transformers", None, "bf16", False),
    # peers, each in its own environment (benchmarks/peers/setup_*.sh) from its conversion of the checkpoint
    "openvino-int4": ("peer", None, "int4", False),
    "llamacpp-q4km": ("peer", None, "q4_k_m", False),
}
ON_REQUEST = ("ours-ort-int4-vdq", "ours-ort-int4-b256", "ours-trt-fp16", "ours-trt-int4", *peers.PEERS)
DEFAULT_SYSTEMS = ",".join(n for n in SYSTEMS if n not in ON_REQUEST)


def backend_of(system: str) -> str:
    return "tensorrt" if SYSTEMS[system][1].startswith("trt-") else "onnxruntime"


def _dir_bytes(path: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in path.glob(pattern) if p.is_file())


def _host_loop(ckpt: Path) -> dict:
    """The sampled loop's time per step outside the graphs, on synthetic logits at the real vocabulary: one
    number for every `ours` system, since they share the loop."""
    from tokenizers import Tokenizer

    print("measuring the host loop (top_p=0.9, top_k=50, repetition_penalty=1.1) ...", flush=True)
    tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    return host_loop.host_step_ms(lambda ids: tokenizer.decode(ids))


def _decoder_block(artifact: Path | None) -> int | None:
    """The decoder's quantization block from the manifest (a number in artifacts written before blocks were
    recorded per graph); None for float weights."""
    if artifact is None:
        return None
    block = json.loads((artifact / "manifest.json").read_text())["export"].get("block_size")
    return block.get("decoder") if isinstance(block, dict) else block


def _decode_spread(spec: dict, threads: int, processes: int) -> dict | None:
    """Decode tok/s of the text-only prompt in `processes` fresh processes of the system (each the median step of
    its runs): one process's figure is not another's on a shared machine (issue 13 saw 31.7 and 43.5 tok/s)."""
    if processes < 1:
        return None
    from .decode_spread import spread

    spec = dict(spec, only="text_only")
    return spread([run_worker(spec, threads)["scenario"]["decode_tok_s"]["median"] for _ in range(processes)])


def run_bench(model: str = "tiny", systems: str = DEFAULT_SYSTEMS, layers: int | None = None, threads: int = 2,
              new_tokens: int = 32, repeats: int = 3, out: Path = Path("bench-out"), quick: bool = False,
              resolutions: list[int] | None = None, contexts: list[int] | None = None,
              decode_processes: int = 5, peers_dir: Path | None = None) -> dict:
    names = [s.strip() for s in systems.split(",") if s.strip()]
    unknown = [s for s in names if s not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown system(s) {', '.join(unknown)}; known: {', '.join(SYSTEMS)}")
    peers_root = peers.peers_dir(peers_dir)
    peers.check_installed([n for n in names if n in peers.PEERS], peers_root)  # before any measurement
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt, artifacts = model_dirs(model, layers, cache_dir() / "bench", {SYSTEMS[n][1] for n in names} - {None})
    cfg = load_config(ckpt)
    peers.check_checkpoint([n for n in names if n in peers.PEERS], ckpt)
    print("measuring the machine ...", flush=True)
    desc = machine.describe(threads)
    inputs_dir = cache_dir() / "bench" / "inputs"
    convs = scenarios.scenarios(inputs_dir, quick=quick)
    sweep_res = scenarios.resolution_sweep(inputs_dir, resolutions or ([224, 448] if quick else
                                                                      scenarios.SWEEP_SIDES))
    sweep_ctx = scenarios.context_sweep(contexts or ([64, 256] if quick else [128, 512, 1024, 2048]))
    result = {"model": model, "layers": layers, "threads": threads, "new_tokens": new_tokens, "repeats": repeats,
              "machine": desc, "systems": {}, "host_loop": _host_loop(ckpt)}
    for name in names:
        kind, variant, weight_dtype, cached = SYSTEMS[name]
        print(f"running {name} ...", flush=True)
        spec = {"system": name, "checkpoint": str(ckpt), "artifact": str(artifacts.get(variant, "")),
                "backend": backend_of(name) if kind == "ours" else None,
                "threads": threads, "new_tokens": new_tokens, "repeats": repeats, "scenarios": convs,
                "resolutions": sweep_res, "contexts": sweep_ctx}
        if kind == "peer":
            result["systems"][name] = _run_peer(name, spec, ckpt, peers_root, threads)
            continue
        first_start = None
        if cached:
            # rewritten each run; QWEN2VL_EDGE_SESSION_CACHE keeps concurrent benches' caches apart
            root = os.environ.get("QWEN2VL_EDGE_SESSION_CACHE", cache_dir() / "bench" / "session-cache")
            spec["session_cache"] = str(Path(root) / name)
            shutil.rmtree(spec["session_cache"], ignore_errors=True)
            first_start = run_worker(dict(spec, prepare=True), threads)["cold_start_ready_s"]
        r = run_worker(spec, threads)
        r["first_start_ready_s"] = first_start  # the start that wrote the session cache
        r["decode_tok_s_processes"] = _decode_spread(spec, threads, decode_processes)
        r["decoder_block_size"] = _decoder_block(artifacts.get(variant)) if kind == "ours" else None
        r["weights_on_disk_bytes"] = (_dir_bytes(artifacts[variant], "*.data") if kind == "ours" else
                                      _dir_bytes(ckpt, "*.safetensors") // (2 if weight_dtype == "bf16" else 1))
        result["systems"][name] = r
    return finish(result, cfg, out)


def _run_peer(name: str, spec: dict, ckpt: Path, root: Path, threads: int) -> dict:
    model = peers.model_dir(name, ckpt, root)
    r = run_worker(dict(spec, model_dir=str(model)), threads, peers.worker_command(name, root))
    r["first_start_ready_s"] = None  # no cache written: every start is a first start
    r["weights_on_disk_bytes"] = peers.weights_on_disk_bytes(model)
    r["conversion"] = peers.CONVERSION[name]
    return r


def finish(result: dict, cfg, out: Path) -> dict:
    """Rooflines from the measurements and the machine, then result.json, report.md and the plots."""
    bandwidth = result["machine"]["copy_bandwidth_gb_s"] * 1e9
    for name, r in result["systems"].items():
        weight_dtype, block = SYSTEMS[name][2], r.get("decoder_block_size") or 32
        best = roofline.decode_roofline_tok_s(cfg, weight_dtype, bandwidth, block)
        r["decode_roofline_tok_s"] = best
        decode = report.median(r["scenarios"]["text_only"], "decode_tok_s")
        r["decode_roofline_fraction"] = decode and decode / best
        r["weight_bytes_per_token"] = (roofline.decoder_weight_params(cfg)
                                       * roofline.bytes_per_weight(weight_dtype, block))
    s1_patches = 448 // cfg.vision.patch_size
    flops = roofline.vision_flops(cfg, s1_patches * s1_patches)
    best_s = flops / (result["machine"]["matmul_gflop_s"] * 1e9)
    vision = {n: report.median(r["scenarios"]["image_448"], "vision") for n, r in result["systems"].items()}
    result["vision_roofline"] = {"gflop": flops / 1e9, "best_s": best_s,
                                 "fraction": {n: best_s / v for n, v in vision.items() if v}}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    (out / "report.md").write_text(report.markdown(result))
    report.plots(result, out)
    print(report.markdown(result))
    print(f"written to {out}/: result.json, report.md, ttft_vs_resolution.png, decode_vs_context.png, peak_rss.png")
    return result
