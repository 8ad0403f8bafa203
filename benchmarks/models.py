"""Benchmark models: the tiny checkpoint and Qwen2-VL-2B/7B's, Qwen2.5-VL-3B's and Qwen3-VL-2B's exact shapes with
random weights.

Built once with their export and cached, since a 2B-shape checkpoint takes minutes to write.
"""

from __future__ import annotations

from pathlib import Path

# Qwen/Qwen2-VL-2B-Instruct and -7B-Instruct config.json values (no download needed for shapes)
SHAPES = {
    "2b-shape": {"text.hidden_size": 1536, "text.intermediate_size": 8960, "text.num_hidden_layers": 28,
                 "text.num_attention_heads": 12, "text.num_key_value_heads": 2, "text.vocab_size": 151936,
                 "text.mrope_section": "16,24,24", "vision.depth": 32, "vision.embed_dim": 1280,
                 "vision.num_heads": 16, "vision.hidden_size": 1536, "tie_word_embeddings": "true"},
    "7b-shape": {"text.hidden_size": 3584, "text.intermediate_size": 18944, "text.num_hidden_layers": 28,
                 "text.num_attention_heads": 28, "text.num_key_value_heads": 4, "text.vocab_size": 152064,
                 "text.mrope_section": "16,24,24", "vision.depth": 32, "vision.embed_dim": 1280,
                 "vision.num_heads": 16, "vision.hidden_size": 3584, "tie_word_embeddings": "false"},
    # Qwen/Qwen2.5-VL-3B-Instruct (its vision hidden_size is the ViT width, out_hidden_size the merger's)
    "qwen25vl-3b-shape": {"text.hidden_size": 2048, "text.intermediate_size": 11008, "text.num_hidden_layers": 36,
                          "text.num_attention_heads": 16, "text.num_key_value_heads": 2, "text.vocab_size": 151936,
                          "text.mrope_section": "16,24,24", "vision.depth": 32, "vision.hidden_size": 1280,
                          "vision.intermediate_size": 3420, "vision.num_heads": 16, "vision.out_hidden_size": 2048,
                          "vision.fullatt_block_indexes": "7,15,23,31", "tie_word_embeddings": "true"},
    # Qwen/Qwen3-VL-2B-Instruct: Qwen3-1.7B's decoder (head_dim 128 stated), a 24-block ViT of width 1024 with a
    # 48 x 48 position table and DeepStack taps at blocks 5, 11 and 17
    "qwen3vl-2b-shape": {"text.hidden_size": 2048, "text.intermediate_size": 6144, "text.num_hidden_layers": 28,
                         "text.num_attention_heads": 16, "text.num_key_value_heads": 8, "text.head_dim": 128,
                         "text.vocab_size": 151936, "text.mrope_section": "24,20,20", "text.rope_theta": 5000000.0,
                         "text.max_position_embeddings": 262144, "vision.depth": 24, "vision.hidden_size": 1024,
                         "vision.intermediate_size": 4096, "vision.num_heads": 16, "vision.out_hidden_size": 2048,
                         "vision.num_position_embeddings": 2304, "vision.deepstack_visual_indexes": "5,11,17",
                         "tie_word_embeddings": "true"},
}
SHAPE_FAMILY = {"qwen25vl-3b-shape": "qwen2_5_vl", "qwen3vl-2b-shape": "qwen3_vl"}  # the others are Qwen2-VL
# Random weights at this scale keep activations in a realistic range; speed does not depend on values.
SHAPE_INIT_STD = "0.02"


BENCH_CONTEXT = 3200  # engines' max context (bench_limits), and the 10.15 graphs' static KV cache length

# artifact variant -> export options
VARIANTS = {
    "fp32": {},
    "fp16": {"dtype": "fp16"},
    "int8": {"target": "ort-cpu", "weights": "int8", "vision_weights": "int8"},
    "int4": {"target": "ort-cpu", "weights": "int4", "vision_weights": "int8"},
    "int4-vdq": {"target": "ort-cpu", "weights": "int4", "vision_weights": "int8-dynamic"},
    # blocks of 256 everywhere (--block-size 256): faster int4 kernels, coarser scales than any peer's int4
    "int4-b256": {"target": "ort-cpu", "weights": "int4", "vision_weights": "int8", "block_size": 256},
    # TensorRT: the export, then engines built on this machine for the benchmark's largest inputs
    "trt-fp32": {"target": "tensorrt", "precision": "fp32"},  # gpu-check's parity on the tiny model
    "trt-fp16": {"target": "tensorrt", "precision": "fp16"},
    "trt-int4": {"target": "tensorrt", "precision": "fp16", "weights": "int4"},
    "trt-fp16-10.15": {"target": "tensorrt", "precision": "fp16", "min_tensorrt": "10.15",
                       "max_context": BENCH_CONTEXT},
    # gpu-check: its attention must fuse (TensorRT's IAttention is not decomposable by default)
    "trt-fp32-10.15": {"target": "tensorrt", "precision": "fp32", "min_tensorrt": "10.15",
                       "max_context": BENCH_CONTEXT},
}


def bench_limits():
    """Engine limits that hold the benchmark's inputs: 1344 px images (2,304 tokens), 2,048-token prompts."""
    from qwen2vl_edge.runtime.backends.trt_profiles import Limits

    return Limits(max_image_tokens=2304, max_prompt=3072, max_context=BENCH_CONTEXT)


def _current(art: Path, options: dict) -> bool:
    """Whether a cached artifact has this runtime's format version and the block sizes an export with `options`
    writes now (int4 on ort-cpu went from blocks of 32 to 128): a stale one would be measured silently in place
    of what export gives, or refused by the runtime."""
    import json

    from qwen2vl_edge.export.quantize import default_block
    from qwen2vl_edge.runtime.artifact import FORMAT_VERSION

    manifest = json.loads((art / "manifest.json").read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        return False

    target, weights = options.get("target", "portable"), options.get("weights", "fp32")
    formats = {"decoder": weights, "vision_encoder": options.get("vision_weights") or (
        weights if target == "tensorrt" else "fp32")}
    want = {g: options.get("block_size") or default_block(target, f)[0] for g, f in formats.items()
            if f not in ("fp32", "int8-dynamic")}
    have = manifest["export"].get("block_size")
    if not isinstance(have, dict):  # written before block sizes were recorded per graph: one for all
        have = {g: have for g in want}
    return have == want


def model_dirs(model: str, layers: int | None, cache: Path, variants=("fp32",),
               detailed: bool = False) -> tuple[Path, dict[str, Path]]:
    """(checkpoint dir, {artifact variant: dir}) for a model spec, building what is missing.

    `model` is 'tiny', a shape name, or a checkpoint directory. `detailed`: build the TensorRT variants'
    engines afresh, with ProfilingVerbosity.DETAILED (gpu-check reads their layers).
    """
    from qwen2vl_edge.export.onnx_export import export
    from qwen2vl_edge.export.tiny import make_tiny

    if model not in ("tiny", *SHAPES):
        ckpt = Path(model)
        if layers:
            raise ValueError("--layers applies to the generated shapes, not to a checkpoint dir")
        root = cache / f"ckpt-{ckpt.resolve().name}"
    else:
        root = cache / (model + (f"-L{layers}" if layers else ""))
        ckpt = root / "checkpoint"
        if not (ckpt / "config.json").is_file():
            overrides = [f"{k}={v}" for k, v in SHAPES.get(model, {}).items()]
            if model != "tiny":
                overrides.append(f"init_std={SHAPE_INIT_STD}")
            if layers:
                overrides.append(f"text.num_hidden_layers={layers}")
            print(f"building {model} checkpoint in {ckpt} (once)")
            make_tiny(ckpt, overrides=overrides, family=SHAPE_FAMILY.get(model, "qwen2_vl"))
    from qwen2vl_edge.runtime.artifact import FORMAT_VERSION

    artifacts = {}
    for variant in sorted(variants):
        # one directory per manifest version: checkouts of other versions share this cache and keep their own
        art = root / f"artifact-v{FORMAT_VERSION}-{variant}"
        if not (art / "manifest.json").is_file() or not _current(art, VARIANTS[variant]):
            export(ckpt, art, verbose=True, **VARIANTS[variant])
        if variant.startswith("trt-") and (detailed or not (art / "engines").is_dir()):
            from qwen2vl_edge.export.trt_build import build_trt

            build_trt(art, limits=bench_limits(), detailed=detailed)
        artifacts[variant] = art
    return ckpt, artifacts
