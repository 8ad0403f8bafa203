"""`qwen2vl-edge build-trt`: compile a `--target tensorrt` artifact's three ONNX graphs into TensorRT
engines, on the device.

Written for TensorRT 10.3 to 11.x (tests/test_trt_api_surface.py checks every name used here against
each version's bindings). The network is strongly typed: every tensor's type comes from the graph,
which the export fixed per precision, so no builder precision flag exists here (TensorRT 11 removed
weak typing; 10.x takes the same call). Profiles, sidecars and limits are plain data from
runtime/backends/trt_profiles.py; this module only drives TensorRT, and checks every status it returns.
Engines land in ARTIFACT/engines/ with a JSON sidecar each, and manifest.json lists them.

Host memory (a Jetson shares its 8 GB with the GPU): each engine is built in its own function scope. The
ONNX parser holds every weight it loaded, and the network keeps the parser alive (pyOnnx.cpp: OnnxParser's
py::keep_alive<2, 1>) and the builder (create_network's keep_alive<0, 1>), so parser, network, builder and
config are dropped together, when the build returns, before the plan is written. The plan (IHostMemory,
buffer protocol) goes straight into the file, with no Python copy of it; from TensorRT 10.15 no
IHostMemory is held: build_serialized_network_to_stream hands the plan to an IStreamWriter as TensorRT
writes it (NvInfer.h; the size of each piece is TensorRT's, undocumented; the bindings pass it as bytes).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from pathlib import Path

from qwen2vl_edge.runtime.artifact import MANIFEST, Artifact, load_artifact, sha256_file
from qwen2vl_edge.runtime.backends.cuda import gpu_identity
from qwen2vl_edge.runtime.errors import ArtifactError
from qwen2vl_edge.runtime.backends.tensorrt import dtype_name, tensorrt_version, version_tuple
from qwen2vl_edge.runtime.backends.trt_profiles import (
    CONCAT, ENGINES, SIDECAR_SUFFIX, Limits, Profile, check_engine_io, check_static_context, make_sidecar,
    profiles_for,
)

from .vocab import cache_dir

SUPPORTED = ((10, 3), (12, 0))  # [lowest, first unsupported): the [trt] extra's bounds
# build_serialized_network_to_stream(network, config, writer) -> bool and IStreamWriter: in the bindings
# from 10.13 (python/src/infer/pyCore.cpp); used from 10.15, the version whose names are checked here
STREAM_BUILD = (10, 15)
REEXPORT = "qwen2vl-edge export CKPT OUT --target tensorrt --precision fp16"


class BuildError(ArtifactError):
    """Engines cannot be built from this artifact here; the message names the fix (the CLI exits 2)."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise BuildError(message)


def default_timing_cache(gpu: str, cc: str, trt_version: str) -> Path:
    """Timings are only valid for one GPU and one TensorRT: one file each, outside the artifact."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-")
    return cache_dir() / "tensorrt" / f"timing-{slug}-sm{cc}-trt{trt_version}.cache"


def check_buildable(art: Artifact, trt_version: str) -> None:
    """Only `--target tensorrt` artifacts, with last-position logits, for this TensorRT or older."""
    export = art.export
    _require(export.get("target") == "tensorrt",
             f"{art.dir} was exported with --target {export.get('target', 'portable')}; TensorRT engines are built "
             f"from strongly typed graphs: re-export with `{REEXPORT}`")
    _require(export.get("logits") == "last",
             "TensorRT engines need a decoder with last-position logits: re-export without --all-logits")
    floor = version_tuple(str(export.get("min_tensorrt", "10.3")))
    version = version_tuple(trt_version)
    _require(SUPPORTED[0] <= version < SUPPORTED[1],
             f"TensorRT {trt_version} is not supported: pip install 'tensorrt>=10.3,<12' (the [trt] extra)")
    _require(version >= floor, f"these graphs need TensorRT >= {export['min_tensorrt']} (they use its fused ops), "
                               f"this is {trt_version}: upgrade, or re-export with --min-tensorrt 10.3")


def _parse(trt, network, logger, onnx_path: Path):
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads the external weights next to the file
        lines = []
        for i in range(parser.num_errors):
            err = parser.get_error(i)
            lines.append(f"  node {err.node_name()!r} ({err.node_operator()}): {err.desc()}")
        raise BuildError(f"TensorRT's ONNX parser rejected {onnx_path.name}:\n" + "\n".join(lines)
                         + "\n(`qwen2vl-edge check-trt` runs the same rules on a CPU)")
    return parser


def network_io(trt, network) -> dict[str, tuple[str, str, int]]:
    """name -> (mode, dtype, rank) of the parsed network, as check_engine_io takes it."""
    io = {}
    for mode, count, get in (("input", network.num_inputs, network.get_input),
                             ("output", network.num_outputs, network.get_output)):
        for i in range(count):
            tensor = get(i)
            io[tensor.name] = (mode, dtype_name(tensor.dtype), len(tensor.shape))
    return io


def _check_profiles_cover(engine: str, network, profiles: list[Profile]) -> None:
    """Every dynamic input has a range in every profile, of its rank; no profile names another tensor."""
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    for k, shapes in enumerate(profiles):
        for name, shape in inputs.items():
            if -1 in shape:
                _require(name in shapes, f"{engine}: input {name} {shape} is dynamic and profile {k} gives it no range")
        for name, (lo, _, _) in shapes.items():
            _require(name in inputs, f"{engine}: profile {k} names {name}, which the graph does not take")
            _require(len(lo) == len(inputs[name]), f"{engine}: profile {k} gives {name} rank {len(lo)}, the graph "
                                                   f"has {inputs[name]}")


def _config(trt, builder, precision: str, workspace_gb: float, timing_cache: bytes, detailed: bool):
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if detailed:  # the engine inspector then reports each layer's kind, tactic and tensor types
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 matmuls would loosen fp32 parity
    cache = config.create_timing_cache(timing_cache)
    _require(cache is not None and config.set_timing_cache(cache, False),
             "TensorRT refused the timing cache: delete it (--timing-cache FILE names it) and build again")
    return config


def _add_profiles(builder, config, engine: str, profiles: list[Profile]) -> None:
    for k, shapes in enumerate(profiles):
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            ok = profile.set_shape(name, lo, opt, hi)  # None where the bindings return nothing
            _require(ok is not False, f"TensorRT refused the range {lo}..{hi} of {engine} input {name} (profile "
                                      f"{k}): check the build-trt limits")
        index = config.add_optimization_profile(profile)
        _require(index == k, f"TensorRT refused optimization profile {k} of {engine} ({shapes}): check the "
                             "build-trt limits (--max-prompt < --max-context, all positive)")


def _file_writer(trt, f):
    """An IStreamWriter appending each piece TensorRT hands it (bytes, pyCore.cpp's PyStreamWriter) to `f`."""
    class Writer(trt.IStreamWriter):
        def __init__(self):
            trt.IStreamWriter.__init__(self)

        def write(self, data):
            return f.write(data)  # fewer bytes than given would make TensorRT give up (NvInferRuntime.h)
    return Writer()


def _serialize(trt, logger, art: Artifact, engine: str, limits: Limits, workspace_gb: float, timing_cache_path: Path,
               detailed: bool, stream_to: Path | None):
    """Parse and build one engine -> (plan, profiles). With `stream_to` the plan goes into that file as
    TensorRT makes it, and plan is None; else plan is the IHostMemory. The parser (with every weight it
    loaded), network, builder and config are locals: they are released when this returns."""
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    _require(network is not None, "TensorRT could not create a strongly typed network")
    _parse(trt, network, logger, art.graph_path(engine))  # the network keeps the parser alive
    check_engine_io(engine, network_io(trt, network), art.graph(engine))
    profiles = profiles_for(engine, art.config, limits, art.export.get("kv_cache", CONCAT))
    _check_profiles_cover(engine, network, profiles)
    cache = timing_cache_path.read_bytes() if timing_cache_path.is_file() else b""
    config = _config(trt, builder, art.export["precision"], workspace_gb, cache, detailed)
    _add_profiles(builder, config, engine, profiles)
    print(f"  {engine}: {network.num_layers} layers, {len(profiles)} profile(s)")
    plan = None
    if stream_to is None:
        plan = builder.build_serialized_network(network, config)
        built = plan is not None
    else:
        with open(stream_to, "wb") as f:
            built = builder.build_serialized_network_to_stream(network, config, _file_writer(trt, f))
    _require(built, f"TensorRT failed to build {engine} (see its log above); if it ran out of memory, lower "
                    "--workspace-gb or the limits (--max-prompt, --max-image-tokens)")
    timing_cache_path.parent.mkdir(parents=True, exist_ok=True)
    timing_cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return plan, profiles


def write_plan(plan, path: Path) -> None:
    """The IHostMemory's buffer straight into the file: no Python copy of the plan."""
    with open(path, "wb") as f:
        f.write(plan)


def build_engine(trt, logger, art: Artifact, engine: str, limits: Limits, workspace_gb: float,
                 timing_cache_path: Path, path: Path, detailed: bool = False) -> list[Profile]:
    """Build one engine into `path` (through PATH.partial, so a failed build leaves no engine) -> its profiles.
    Host memory at its peak: the parser's weights and the plan (before 10.15), or the weights and what
    TensorRT hands the writer at a time (from 10.15)."""
    partial = path.with_name(path.name + ".partial")
    stream = version_tuple(tensorrt_version(trt)) >= STREAM_BUILD
    plan, profiles = _serialize(trt, logger, art, engine, limits, workspace_gb, timing_cache_path, detailed,
                                partial if stream else None)
    if plan is not None:  # parser, network and builder are gone by now
        write_plan(plan, partial)
        del plan  # released before the next engine's parser loads its weights
    partial.replace(path)
    return profiles


def build_trt(artifact_dir: str | Path, *, limits: Limits = Limits(), workspace_gb: float = 4.0,
              timing_cache: str | Path | None = None, verify: bool = True, detailed: bool = False,
              fit_context: bool = False) -> Path:
    """Build the three engines into ARTIFACT/engines/ and list them in the manifest. `detailed`: build with
    ProfilingVerbosity.DETAILED, so that the engine inspector reports each layer (gpu-check). `fit_context`:
    graphs with a static KV cache (10.15) are built at its length, whatever limits.max_context says (build-trt
    without --max-context); otherwise the two must agree."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BuildError("building engines needs TensorRT: pip install 'tensorrt>=10.3,<12' (the [trt] extra) "
                         "on the target device (JetPack ships it on Jetson)") from None
    limits.validate()
    art = load_artifact(artifact_dir, verify=verify)
    version = tensorrt_version(trt)
    check_buildable(art, version)
    if fit_context and art.static_kv_length:
        limits = replace(limits, max_context=art.static_kv_length)
    check_static_context(limits, art.static_kv_length)
    out = art.dir / "engines"
    out.mkdir(exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    gpu, cc = gpu_identity()
    cache_path = Path(timing_cache) if timing_cache else default_timing_cache(gpu, cc, version)
    precision, kv_cache = art.export["precision"], art.export.get("kv_cache", CONCAT)
    print(f"building {precision} engines ({kv_cache} KV cache) for {gpu} (sm_{cc}) with TensorRT {version}; "
          f"timing cache {cache_path}")
    manifest = dict(art.manifest)
    manifest["engines"], files = {}, dict(manifest["files"])
    for engine in ENGINES:
        started = time.perf_counter()
        path = out / f"{engine}.engine"
        profiles = build_engine(trt, logger, art, engine, limits, workspace_gb, cache_path, path, detailed)
        graph_file = art.graph(engine)["file"]
        sidecar = make_sidecar(engine, trt_version=version, gpu_name=gpu, compute_capability=cc,
                               precision=precision, kv_cache=kv_cache, limits=limits, profiles=profiles,
                               onnx_sha256=files.get(graph_file) or sha256_file(art.dir / graph_file))
        (out / f"{engine}.engine{SIDECAR_SUFFIX}").write_text(json.dumps(sidecar, indent=2))
        manifest["engines"][engine] = {"file": f"engines/{engine}.engine",
                                       "sidecar": f"engines/{engine}.engine{SIDECAR_SUFFIX}"}
        print(f"  {engine}: built in {time.perf_counter() - started:.0f} s, {path.stat().st_size / 1e6:.1f} MB")
    for entry in manifest["engines"].values():
        for key in ("file", "sidecar"):
            files[entry[key]] = sha256_file(art.dir / entry[key])
    manifest["files"] = files
    (art.dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out
