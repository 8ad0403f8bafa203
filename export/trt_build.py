"""`qwen2vl-edge build-trt`: compile an artifact's three ONNX graphs into TensorRT engines, on the device.

Written against TensorRT's documented Python API (10.x). Profiles, sidecars and limits are plain data
from runtime/backends/trt_profiles.py; this module only drives TensorRT. Engines land in
ARTIFACT/engines/ with a JSON sidecar each, and manifest.json lists them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from qwen2vl_edge.runtime.artifact import MANIFEST, load_artifact, sha256_file
from qwen2vl_edge.runtime.backends.cuda import gpu_identity
from qwen2vl_edge.runtime.backends.trt_profiles import (
    ENGINES, SIDECAR_SUFFIX, Limits, make_sidecar, profiles_for,
)

from .graph import FP32_PREFIX

PRECISIONS = ("fp32", "fp16", "bf16")


class BuildError(RuntimeError):
    pass


def _parse(trt, network, logger, onnx_path: Path):
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external data next to the file
        lines = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            node = getattr(err, "node_name", lambda: "?")()
            op = getattr(err, "node_operator", lambda: "?")()
            lines.append(f"  node {node!r} ({op}): {err.desc()}")
        raise BuildError(f"TensorRT's ONNX parser rejected {onnx_path.name}:\n" + "\n".join(lines)
                         + "\n(`qwen2vl-edge check-trt` runs the same rules on a CPU)")
    return parser


def _keep_fp32(trt, network) -> int:
    """Pin the layers exported under FP32_PREFIX (norms, softmax, rotary) to fp32; returns how many."""
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if FP32_PREFIX not in layer.name:
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype in (trt.float16, trt.bfloat16, trt.float32):
                layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


def _config(trt, builder, precision: str, workspace_gb: float, timing_cache: bytes):
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 matmuls would loosen fp32 parity
    else:
        flag = getattr(trt.BuilderFlag, precision.upper(), None)
        if flag is None:
            raise BuildError(f"TensorRT {trt.__version__} has no {precision.upper()} builder flag (weakly typed "
                             "networks were removed): build with --precision fp32")
        config.set_flag(flag)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    cache = config.create_timing_cache(timing_cache)
    config.set_timing_cache(cache, ignore_mismatch=False)
    return config


def build_engine(trt, logger, onnx_path: Path, engine: str, cfg, limits: Limits, precision: str,
                 workspace_gb: float, timing_cache_path: Path) -> tuple[bytes, list]:
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    _parse(trt, network, logger, onnx_path)
    cache = timing_cache_path.read_bytes() if timing_cache_path.is_file() else b""
    config = _config(trt, builder, precision, workspace_gb, cache)
    pinned = _keep_fp32(trt, network) if precision != "fp32" else 0
    profiles = profiles_for(engine, cfg, limits)
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    print(f"  {engine}: {network.num_layers} layers, {pinned} kept in fp32, {len(profiles)} profile(s)")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"TensorRT failed to build {engine} (see the log above)")
    timing_cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return bytes(serialized), profiles


def build_trt(artifact_dir: str | Path, *, precision: str = "fp16", limits: Limits = Limits(),
              workspace_gb: float = 4.0, timing_cache: str | Path | None = None) -> Path:
    try:
        import tensorrt as trt
    except ImportError:
        raise BuildError("building engines needs TensorRT: pip install 'qwen2vl-edge[trt]' on the target device "
                         "(JetPack ships it on Jetson)") from None
    if precision not in PRECISIONS:
        raise BuildError(f"--precision must be one of {', '.join(PRECISIONS)}")
    limits.validate()
    art = load_artifact(artifact_dir)
    if art.export.get("logits") != "last":
        raise BuildError("TensorRT engines need a decoder with last-position logits: re-export without --all-logits")
    out = art.dir / "engines"
    out.mkdir(exist_ok=True)
    cache_path = Path(timing_cache) if timing_cache else out / "timing.cache"
    logger = trt.Logger(trt.Logger.WARNING)
    gpu, cc = gpu_identity()
    print(f"building {precision} engines for {gpu} (sm_{cc}) with TensorRT {trt.__version__}")
    manifest = dict(art.manifest)
    manifest["engines"] = {}
    for engine in ENGINES:
        started = time.perf_counter()
        onnx_path = art.graph_path(engine)
        data, profiles = build_engine(trt, logger, onnx_path, engine, art.config, limits, precision, workspace_gb,
                                      cache_path)
        (out / f"{engine}.engine").write_bytes(data)
        sidecar = make_sidecar(engine, trt_version=trt.__version__, gpu_name=gpu, compute_capability=cc,
                               precision=precision, limits=limits, profiles=profiles,
                               onnx_sha256=sha256_file(onnx_path))
        (out / f"{engine}.engine{SIDECAR_SUFFIX}").write_text(json.dumps(sidecar, indent=2))
        manifest["engines"][engine] = {"file": f"engines/{engine}.engine",
                                       "sidecar": f"engines/{engine}.engine{SIDECAR_SUFFIX}"}
        print(f"  {engine}: built in {time.perf_counter() - started:.0f} s, {len(data) / 1e6:.1f} MB")
    for entry in manifest["engines"].values():
        for key in ("file", "sidecar"):
            manifest["files"][entry[key]] = sha256_file(art.dir / entry[key])
    (art.dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out
