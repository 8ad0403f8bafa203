"""Checkpoint -> artifact directory: three ONNX graphs sharing one weight file, processor files, manifest."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time
import warnings
from dataclasses import replace
from pathlib import Path

import onnx

import qwen2vl_edge
from qwen2vl_edge.runtime.artifact import FORMAT, FORMAT_VERSION, GRAPHS, MANIFEST, PROCESSOR_FILES, sha256_file
from qwen2vl_edge.runtime.backends.trt_profiles import MIN_TENSORRT, PRECISIONS, Limits
from qwen2vl_edge.runtime.chat import find_template
from qwen2vl_edge.runtime.errors import ConfigError

from .checkpoint import Checkpoint
from .decoder import build_decoder
from .decoder import preallocated
from .graph import Graph, Target, WeightStore, value_info
from .merger import build_embedding_merger
from .quantize import QuantSpec, default_block
from .trt_check import load_rules
from .vision import build_vision_encoder

WEIGHTS_FILE = "weights.data"
# Why --target tensorrt takes no int8 weights. TensorRT documents weight-only quantization (the weights quantized,
# activations in fp16/bf16) for int4 blocks (W4A16: "Working with Quantized Types", TensorRT developer guide, and
# the onnx-tensorrt operator matrix's blocked DequantizeLinear); int8 runs as int8 GEMMs only with activations
# quantized too (W8A8: Model Optimizer's support matrix lists int8 for TensorRT as per-channel weights with
# per-tensor int8 activations, SmoothQuant: nvidia.github.io/Model-Optimizer/guides/0_support_matrix.html).
# A per-channel int8 DequantizeLinear into an fp16 MatMul is no documented pattern: TensorRT may fold it back to
# fp16 weights (no memory saved) or dequantize before every GEMM (slower than fp16).
# IAttention (what the 10.15 parser makes of ONNX Attention) takes fp32, fp16 or bf16 and "by default is not
# decomposable": TensorRT looks for one fused kernel (NvInfer.h, IAttention; the Fused Attention page of the TensorRT
# developer guide). No page lists which GPUs have an fp32 one, so an fp32 10.15 build may fail there: warn.
FP32_FUSED_ATTENTION = ("--precision fp32 --min-tensorrt 10.15: TensorRT runs ONNX Attention as IAttention, which is "
                        "not decomposable by default, so the build needs a fused fp32 attention kernel for this GPU; "
                        "NVIDIA documents fp32 as an accepted type but not on which GPUs such a kernel exists. If "
                        "build-trt fails on the attention layers, export --precision fp16 (or --min-tensorrt 10.3)")
TRT_INT8 = ("--weights int8 / --vision-weights int8 are not offered with --target tensorrt: TensorRT documents "
            "weight-only quantization for int4 blocks (W4A16) only, and runs int8 as int8 GEMMs only with quantized "
            "activations (W8A8), which these graphs do not have; per-channel int8 weights would be folded back to "
            "fp16 or dequantized before every GEMM. Use --weights int4 (weights in int4 blocks, about a quarter of "
            "fp16) or --weights fp32 (weights in --precision, fp16 by default)")
MIN_OPSET = 17
TARGETS = ("portable", "ort-cpu", "tensorrt")
WEIGHTS = ("fp32", "int8", "int4")
VISION_WEIGHTS = WEIGHTS + ("int8-dynamic",)  # the decoder's table is shared block-quantized with its lm_head
# onnxruntime each contrib op (op, weight bits) needs on CPU, as tried: SkipSimplifiedLayerNormalization
# and 4-bit MatMulNBits run on 1.20; 1.20 and 1.21 refuse 8-bit MatMulNBits ("Only 4b quantization is
# supported"), 1.22 runs it; GatherBlockQuantized on packed uint8 takes `bits` from 1.23 (1.22:
# "Unrecognized attribute: bits"); GroupQueryAttention with attention_bias (our left padding) from 1.22.
# MultiHeadAttention (the vision encoder) takes its CPU flash-attention path (onnxruntime PR 20805, 1.19) on
# 1.20: peak memory linear in the patches there as on 1.32 (docs/export.md).
CONTRIB_MIN_ONNXRUNTIME = {("SkipSimplifiedLayerNormalization", 0): (1, 20), ("GroupQueryAttention", 0): (1, 22),
                           ("MultiHeadAttention", 0): (1, 20),
                           ("DynamicQuantizeMatMul", 0): (1, 20),
                           ("MatMulNBits", 4): (1, 20),
                           ("MatMulNBits", 8): (1, 22), ("GatherBlockQuantized", 4): (1, 23),
                           ("GatherBlockQuantized", 8): (1, 23)}


def _contrib_ops(target: str, quant: dict) -> list[tuple[str, int]]:
    """(op, bits) of every contrib op the graphs use; the merger gathers from the decoder's quantized table."""
    if target != "ort-cpu":
        return []
    ops = [("SkipSimplifiedLayerNormalization", 0), ("GroupQueryAttention", 0), ("MultiHeadAttention", 0)]
    ops += [(q.op, 0 if q.dynamic else q.bits) for q in quant.values() if q]
    if quant["decoder"] is not None:
        ops.append(("GatherBlockQuantized", quant["decoder"].bits))
    return ops


def _quant_specs(target: str, weights: str, vision_weights: str, block_size: int | None, accuracy_level: int) -> dict:
    """Per graph, the QuantSpec its linears use (None: float)."""
    if target not in TARGETS:
        raise ValueError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    for flag, value, allowed in (("--weights", weights, WEIGHTS), ("--vision-weights", vision_weights, VISION_WEIGHTS)):
        if value not in allowed:
            raise ValueError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
    if target == "portable" and (weights, vision_weights) != ("fp32", "fp32"):
        raise ValueError("quantized weights use ONNX Runtime contrib ops: add --target ort-cpu "
                         "(portable graphs stay standard ONNX for TensorRT and other runtimes)")
    if target == "tensorrt" and vision_weights == "int8-dynamic":
        raise ValueError("--vision-weights int8-dynamic is an ONNX Runtime contrib op: use int4 or fp32 with "
                         "--target tensorrt")
    if target == "tensorrt" and "int8" in (weights, vision_weights):
        raise ConfigError(TRT_INT8)
    specs = {"vision_encoder": None, "embedding_merger": None, "decoder": None}
    for graph, value in (("decoder", weights), ("vision_encoder", vision_weights)):
        if value != "fp32":
            block, fit = default_block(target, value) if block_size is None else (block_size, False)
            specs[graph] = QuantSpec.of(value, block, accuracy_level, fit)
            specs[graph].validate()
    return specs


def default_max_context(cfg) -> int:
    """The static KV cache length of a 10.15 export without --max-context: build-trt's default max context (4096:
    117 MB of fp16 cache for the 2B model, 235 MB for the 7B, which an 8 GB Jetson holds), or the model's own
    context where that is shorter. A default export and a default build-trt then agree."""
    return min(cfg.text.max_position_embeddings, Limits().max_context)


def _with_kv_length(tgt: Target, cfg, max_context: int | None) -> Target:
    """The target with the KV cache's static length: 10.15 graphs only (TensorScatter -> KVCacheUpdate needs one,
    decoder.py)."""
    if not tgt.llm_ops:
        if max_context is not None:
            raise ValueError("--max-context fixes the KV cache length of --min-tensorrt 10.15 graphs; 10.3 graphs "
                             "grow their cache per request, up to build-trt --max-context: drop --max-context")
        return tgt
    if max_context is None:
        return replace(tgt, kv_length=default_max_context(cfg))
    if not 1 < max_context <= cfg.text.max_position_embeddings:
        raise ValueError(f"--max-context must be 2..{cfg.text.max_position_embeddings} (the model's context), "
                         f"got {max_context}")
    return replace(tgt, kv_length=max_context)


def _target(target: str, precision: str | None, min_tensorrt: str | None, weights: str, opset: int,
            dtype: str, max_context: int | None = None) -> tuple[Target, int]:
    """The graph target and the opset it is written at. tensorrt: at least the opset its ops need (24 for
    TensorScatter from 10.15, 21 for int4 DequantizeLinear blocks), never above what that parser takes."""
    if target != "tensorrt":
        if precision not in (None, "fp32") or min_tensorrt is not None or max_context is not None:
            raise ValueError("--precision, --min-tensorrt and --max-context choose the strongly typed graphs of "
                             f"--target tensorrt; --target {target} computes in fp32 (--dtype fp16 halves its "
                             "stored weights)")
        return Target(target), opset
    precision = precision or "fp16"
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    min_tensorrt = min_tensorrt or MIN_TENSORRT[0]
    if min_tensorrt not in MIN_TENSORRT:
        raise ValueError(f"--min-tensorrt must be one of {', '.join(MIN_TENSORRT)}, got {min_tensorrt!r}")
    if dtype != "fp32":
        raise ValueError("--target tensorrt stores its weights in --precision (fp16 or bf16): drop --dtype")
    needed = (21 if weights == "int4" else MIN_OPSET) if min_tensorrt == "10.3" else 24
    opset = max(opset, needed)
    top = load_rules(min_tensorrt)["opset_max"]
    if opset > top:
        raise ValueError(f"--opset {opset} is above what TensorRT {min_tensorrt}'s parser takes ({top})")
    if precision == "fp32" and min_tensorrt == "10.15":
        warnings.warn(FP32_FUSED_ATTENTION, stacklevel=3)
    return Target("tensorrt", precision, min_tensorrt), opset


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="layer", leave=False, disable=not enabled)


def _versions() -> dict[str, str]:
    versions = {"qwen2vl_edge": qwen2vl_edge.__version__, "onnx": onnx.__version__}
    for name in ("torch", "safetensors", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return versions


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _token_ids(value) -> list[int]:
    return [int(t) for t in (value if isinstance(value, list) else [value])]


def _generation_settings(ckpt_dir: Path) -> dict:
    """eos and pad ids, read from the checkpoint as transformers' generate() finds them: generation_config.json,
    then config.json (top level or text_config); pad falls back to the tokenizer's pad_token, then to the
    first eos id (what generate() does when no pad id is set)."""
    gen, cfg = _read_json(ckpt_dir / "generation_config.json"), _read_json(ckpt_dir / "config.json")
    sources = [gen, cfg, cfg.get("text_config") or {}]
    eos = next((s["eos_token_id"] for s in sources if s.get("eos_token_id") is not None), None)
    if eos is None:
        raise ValueError(f"{ckpt_dir}: no eos_token_id in generation_config.json or config.json; the runtime "
                         "stops on it: add it to generation_config.json")
    pad = next((s["pad_token_id"] for s in sources if s.get("pad_token_id") is not None), None)
    if pad is None:
        pad = _tokenizer_pad_id(ckpt_dir)
    eos = _token_ids(eos)
    return {"eos_token_id": eos, "pad_token_id": eos[0] if pad is None else int(pad)}


def _tokenizer_pad_id(ckpt_dir: Path) -> int | None:
    from tokenizers import Tokenizer

    pad = _read_json(ckpt_dir / "tokenizer_config.json").get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    if not pad or not (ckpt_dir / "tokenizer.json").is_file():
        return None
    return Tokenizer.from_file(str(ckpt_dir / "tokenizer.json")).token_to_id(pad)


def export(checkpoint: str | Path, out: str | Path, *, dtype: str = "fp32", opset: int = MIN_OPSET,
           all_logits: bool = False, target: str = "portable", weights: str = "fp32", vision_weights: str | None = None,
           block_size: int | None = None, accuracy_level: int = 4, precision: str | None = None,
           min_tensorrt: str | None = None, max_context: int | None = None, check: bool = True,
           verbose: bool = True) -> Path:
    """Export `checkpoint` to the artifact directory `out`; returns `out`.

    target 'portable': standard ONNX ops only (TensorRT, any runtime). target 'ort-cpu': the linears
    of the decoder / vision encoder may be int8/int4 MatMulNBits for ONNX Runtime's CPU kernels.
    target 'tensorrt': standard ONNX, strongly typed in `precision`, for TensorRT >= `min_tensorrt`
    (10.3: explicit attention, KV cache by Concat; 10.15: ONNX Attention, TensorScatter into a
    preallocated cache of `max_context` positions, RMSNormalization, RotaryEmbedding); int4 weights as
    DequantizeLinear + MatMul.
    """
    vision_weights = vision_weights or (weights if target == "tensorrt" else "fp32")  # tensorrt: every linear
    quant = _quant_specs(target, weights, vision_weights, block_size, accuracy_level)
    quantized = [q for q in quant.values() if q is not None]
    contrib = _contrib_ops(target, quant)
    tgt, opset = _target(target, precision, min_tensorrt, "int4" if "int4" in (weights, vision_weights) else weights,
                         opset, dtype, max_context)  # int4 anywhere: blocked DequantizeLinear (opset 21)
    if opset < MIN_OPSET:
        raise ValueError(f"--opset must be >= {MIN_OPSET} (LayerNormalization), got {opset}")
    if dtype not in ("fp32", "fp16"):
        raise ValueError(f"--dtype must be fp32 or fp16, got {dtype!r}")
    started = time.perf_counter()
    ckpt = Checkpoint(checkpoint)
    cfg = ckpt.config
    tgt = _with_kv_length(tgt, cfg, max_context)
    prequantized = ckpt.quant is not None and target == "ort-cpu"  # its GPTQ/AWQ layers: MatMulNBits as they are
    if prequantized:
        QuantSpec(ckpt.quant.bits, accuracy_level=accuracy_level).validate()
        contrib.append(("MatMulNBits", ckpt.quant.bits))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = print if verbose else (lambda *a, **k: None)
    say(f"exporting {ckpt.dir} ({len(ckpt.shards)} shard(s), {dtype}) -> {out}")
    store_dtype = tgt.precision if tgt.typed else dtype
    store = WeightStore(out / WEIGHTS_FILE, store_dtype)
    graphs = {}
    builders = {
        "vision_encoder": (lambda g, p: build_vision_encoder(g, ckpt, p), cfg.vision.depth),
        # the tensorrt target gathers from the float table its lm_head reads
        "embedding_merger": (lambda g, p: build_embedding_merger(g, ckpt, None if tgt.typed else quant["decoder"]), 0),
        "decoder": (lambda g, p: build_decoder(g, ckpt, all_logits=all_logits, progress=p), cfg.text.num_hidden_layers),
    }
    try:
        for name in GRAPHS:
            build, steps = builders[name]
            g = Graph(name, store, opset, quant=quant[name], target=tgt, accuracy_level=accuracy_level)
            with _progress(steps, f"{name}: weights", verbose) as bar:
                build(g, bar)
            model = g.model()
            if name == "decoder":
                kv_cache = "preallocated" if preallocated(g) else "concat"
            onnx.save_model(model, out / f"{name}.onnx")
            graphs[name] = {"file": f"{name}.onnx", "inputs": [value_info(v) for v in model.graph.input],
                            "outputs": [value_info(v) for v in model.graph.output]}
            say(f"  {name}: {len(model.graph.node)} nodes")
    finally:
        store.close()
        ckpt.close()
    if check:
        for name in GRAPHS:
            onnx.checker.check_model(str(out / f"{name}.onnx"), full_check=True)
    for f in PROCESSOR_FILES:
        if (ckpt.dir / f).is_file():
            shutil.copyfile(ckpt.dir / f, out / f)
    (out / "chat_template.jinja").write_text(find_template(ckpt.dir))
    if not (out / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{ckpt.dir} has no tokenizer.json: the runtime needs it")
    files = sorted(p.name for p in out.iterdir() if p.is_file() and p.name != MANIFEST)
    from tqdm.auto import tqdm

    hashes = {f: sha256_file(out / f) for f in tqdm(files, desc="hashing", leave=False, disable=not verbose)}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": cfg.to_dict(),
        "export": {"dtype": store_dtype, "compute_dtype": tgt.precision, "opset": opset,
                   "logits": "all" if all_logits else "last",
                   "target": target, "precision": tgt.precision, "min_tensorrt": tgt.min_tensorrt,
                   "weights": weights, "vision_weights": vision_weights,
                   # per quantized graph; the largest where a linear's input size asks for a smaller one
                   "block_size": {n: q.block_size for n, q in quant.items() if q and not q.dynamic} or None,
                   "accuracy_level": accuracy_level if (quantized or prequantized) and not tgt.typed else None,
                   # GPTQ/AWQ checkpoints: method, format, bits, group_size of the decoder linears' own weights
                   "source_quantization": ckpt.quant.to_manifest() if ckpt.quant else None,
                   "contrib_ops": list(dict.fromkeys(op for op, _ in contrib)),
                   "requires_onnxruntime": (">=" + ".".join(map(str, max(CONTRIB_MIN_ONNXRUNTIME[c] for c in contrib)))
                                            if contrib else None),
                   # preallocated: past and present are one buffer [B, kv, capacity, hd] updated in place
                   "kv_cache": kv_cache,
                   # that capacity when the graphs fix it (tensorrt from 10.15: export --max-context), else None
                   "max_context": tgt.kv_length,
                   "weights_file": WEIGHTS_FILE, "source": str(ckpt.dir.resolve()),
                   "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                   "versions": _versions()},
        "generation": _generation_settings(ckpt.dir),
        "graphs": graphs,
        "files": hashes,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    say(f"done in {time.perf_counter() - started:.1f} s: {store.written / 1e6:.1f} MB of weights in {WEIGHTS_FILE}")
    return out
