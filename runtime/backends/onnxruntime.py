"""ONNX Runtime backend: CPU by default, CUDA / TensorRT execution providers when installed.

The KV cache lives in OrtValues bound with I/O binding, never copied into NumPy between steps.
Portable graphs: each step's present tensors become the next step's past (and stay on the GPU with
a GPU provider). Preallocated caches (ort-cpu; tensorrt from 10.15): one buffer per layer is bound as both
past and present, and GroupQueryAttention / TensorScatter write the new positions into it in place. The
cache is in the dtype the manifest records for it (float16 on a tensorrt fp16 export).

Session cache (CPU, opt-in): ONNX Runtime spends most of its start-up optimizing the graphs and
re-packing the weights for this CPU's kernels. With `session_cache=DIR` the first start saves the
optimized graphs with their pre-packed weights under DIR (keyed by artifact, onnxruntime version
and CPU), and later starts map them instead of packing again.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..artifact import GRAPHS, Artifact
from ..errors import ArtifactError, ConfigError, InputError
from .base import split_joined

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
# prompt positions per decoder run at prefill on the CPU (generation.prefill_chunks): prompts up to this long
# run at once as before; a 16k-token one (a 12 MP photo) holds a chunk's activations, mask bias and attention
# buffers [B, heads, chunk, T] instead of the whole prompt's
PREFILL_CHUNK = 2048
BOUNDED_FROM = 8192  # patches of one vision run from which its session bounds its activations (_vision_for)


@dataclass
class OrtCache:
    values: dict  # past input name -> OrtValue: [B, kv, P, hd], or a preallocated buffer [B, kv, capacity, hd]
    length: int  # P: positions held
    reserve: int = 0  # positions the request asked room for (prompt + max_new_tokens)
    buffers: dict | None = None  # preallocated cache: the NumPy arrays behind `values` (GroupQueryAttention
    #                              writes the new positions into them in place)

    @property
    def capacity(self) -> int:
        return next(iter(self.buffers.values())).shape[2] if self.buffers else 0


@dataclass(frozen=True)
class DeepStackEmbeds:
    """What merge returns for a DeepStack model (Qwen3-VL) and decode takes: the embeddings, where each position's
    vision feature came from, and the DeepStack features those indices point into. It slices as the embeddings do
    (generation.prefill_chunks: [:, a:b]); the features stay whole, since a chunk's indices still rank among all M."""

    embeds: np.ndarray  # [B, L, hidden] float32
    visual_index: np.ndarray  # [B, L] int64: 1-based rank among the M vision tokens, 0 at text
    deepstack: np.ndarray  # [K, M, hidden] float32

    @property
    def shape(self) -> tuple[int, ...]:
        return self.embeds.shape

    def __getitem__(self, key) -> "DeepStackEmbeds":
        return replace(self, embeds=self.embeds[key], visual_index=self.visual_index[key[:2]])

    def feeds(self) -> dict[str, np.ndarray]:
        return {"inputs_embeds": self.embeds, "visual_index": self.visual_index, "deepstack_embeds": self.deepstack}


def _cpu_identity() -> str:
    """What pre-packed weights depend on: the architecture and the instruction sets."""
    try:
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags}"


def session_cache_dir(root: str | Path, artifact: Artifact, ort_version: str) -> Path:
    """The subdirectory of `root` for this artifact on this onnxruntime and CPU."""
    key = hashlib.sha256("\n".join([(artifact.dir / "manifest.json").read_text(), ort_version, _cpu_identity()])
                         .encode()).hexdigest()[:16]
    return Path(root).expanduser() / key


def _each_graph(make) -> dict:
    """{graph: make(graph)} for the three graphs, side by side: session creation (graph optimization,
    weight packing) releases the GIL. From the 2B int4 session cache on 2 cores: 1.0 s instead of 1.35 s."""
    with ThreadPoolExecutor(len(GRAPHS)) as pool:
        return dict(zip(GRAPHS, pool.map(make, GRAPHS)))


def _register_shared_cpu_arena(ort) -> None:
    """One CPU arena for the three graphs (what the vision encoder freed, prefill reuses), grown by what is
    requested rather than to the next power of two. Measured on the 2B shape, int4, 2 threads: a
    1,948-token prompt's time to first token 14.0 s instead of 26.5 s with ONNX Runtime's per-session
    arenas, peak RSS 3.0 GB instead of 4.8 GB. Registering again (a second pipeline) is harmless."""
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg({"arena_extend_strategy": 1}))  # kSameAsRequested


def _bounded_activations(opts) -> None:
    """The vision encoder's session for large images: its tensors straight from malloc (no arena; above 32 MB
    glibc maps each one and unmaps it when freed) and no buffer handed on to a later tensor of the same size
    (the planner's memory reuse keeps freed buffers alive across blocks). Its live activations then stay
    about 11 widths of embed_dim a patch instead of 23-30 (2B shape, 16,384 patches, onnxruntime 1.32;
    benchmarks/results/vision-memory-photo.json), so a 12 MP photo at the checkpoint's max_pixels fits."""
    opts.enable_cpu_mem_arena = False
    opts.enable_mem_reuse = False


def _prefill_run_options(ort):
    """Run options for the decoder's runs over many positions (prefill, its chunks, a session's next turn): the
    CPU arena hands its free regions back to the system when the run ends. Without it the arena keeps its
    largest size for the life of the process and grows again over fragments: the 2B int4 export, 6,409-token
    prompts, held 3.2 GB of RSS after the first request and 4.7 GB after the second and third, 2.5 GB with it
    (1.98 GB with the heap trimmed as well, pipeline._steps), at the same speed (docs/cpu.md, "What a request leaves
    behind"). Decode steps allocate little and keep it."""
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options


def _check_graphs_are_the_manifests(artifact: Artifact, sessions: dict) -> None:
    """A graph file swapped for another (verify=False lets that through) is refused before it runs."""
    for name, session in sessions.items():
        want = [i["name"] for i in artifact.graph(name)["inputs"]]
        got = [i.name for i in session.get_inputs()]
        if got != want:
            raise ArtifactError(f"{artifact.graph(name)['file']} is not the {name} graph the manifest describes "
                                f"(inputs {got[:4]}, expected {want[:4]}): restore it or re-export")


# Session config entries every session gets unless the caller's `session_config` says otherwise.
# allow_spinning 0: idle intra-op threads sleep instead of spinning. With the threads on every core and other
# work on the machine, a spinning thread takes the core its own session's other thread needs: 2B shape int4,
# 2 threads, on the 2-core build machine under a load of 8-12, decode ran 12.7 tok/s (median of 5 fresh
# processes) against 5.9 with spinning, faster in every one of 5 interleaved rounds
# (benchmarks/decode_spread.py; docs/benchmarks.md, "Decode from one process to the next"). On the idle machine
# spinning was 7 % faster (44.2 against 41.3 tok/s): a small loss there against a collapse under load.
DEFAULT_SESSION_CONFIG = {"session.intra_op.allow_spinning": "0"}


def session_options(ort, num_threads: int | None, shared_arena: bool, config: dict | None = None,
                    bounded: bool = False):
    """The options every session of the backend gets (the benchmarks' profiler takes them too); `config`:
    further ONNX Runtime session config entries, over ours (DEFAULT_SESSION_CONFIG); `bounded`: a large
    image's vision session (_bounded_activations), outside the shared arena."""
    opts = ort.SessionOptions()
    if num_threads:
        opts.intra_op_num_threads = int(num_threads)
    if bounded:
        _bounded_activations(opts)
    elif shared_arena:
        opts.add_session_config_entry("session.use_env_allocators", "1")
    for key, value in {**DEFAULT_SESSION_CONFIG, **(config or {})}.items():
        opts.add_session_config_entry(key, value)
    return opts


def join_features(features: list, hidden: int, deepstack: int) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """What `vision` returned per image / video, in prompt order -> [M, hidden]; with K = `deepstack` > 0 the pairs'
    parts each joined -> ([M, hidden], [K, M, hidden]) (the merger's input, the decoder's deepstack_embeds)."""
    if not deepstack:
        flat = [f.reshape(-1, hidden) for f in features]  # [F * S / merge^2, hidden] each
        return np.concatenate(flat) if flat else np.zeros((0, hidden), np.float32)
    main = join_features([m for m, _ in features], hidden, 0)
    stacks = [d.reshape(deepstack, -1, hidden) for _, d in features]  # [K, F * S / merge^2, hidden] each
    return main, np.concatenate(stacks, axis=1) if stacks else np.zeros((deepstack, 0, hidden), np.float32)


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, artifact: Artifact, providers: list | None = None, num_threads: int | None = None,
                 shared_arena: bool = True, session_cache: str | Path | None = None,
                 session_config: dict | None = None):
        import onnxruntime as ort

        available = ort.get_available_providers()
        providers = list(providers or ["CPUExecutionProvider"])
        names = [p[0] if isinstance(p, tuple) else p for p in providers]  # (name, options) or name
        for name in names:
            if name not in available:
                raise ConfigError(f"onnxruntime provider {name} is not available here (have: {', '.join(available)}); "
                                 "install onnxruntime-gpu for CUDA/TensorRT")
        self.device = "cuda" if names[0] in GPU_PROVIDERS else "cpu"
        self.preallocated = artifact.export.get("kv_cache") == "preallocated"
        self.static_length = artifact.static_kv_length  # tensorrt graphs from 10.15: every cache is this long
        if self.preallocated and self.device != "cpu":
            raise ConfigError(f"{artifact.dir} keeps its KV cache in preallocated buffers that this backend holds in "
                              "host memory: run it with the CPU provider, or export --target portable for CUDA")
        if artifact.export.get("precision") == "bf16" and self.device == "cpu":
            raise ArtifactError(f"{artifact.dir} is a bf16 tensorrt export: ONNX Runtime's CPU kernels have no bf16 "
                                "MatMul, Add or Softmax, so it cannot run here. Build it with TensorRT "
                                "(`qwen2vl-edge build-trt`), or export --precision fp16 / fp32 to run it on the CPU")
        if session_cache is not None and self.device != "cpu":
            raise ConfigError("session_cache holds weights packed for this CPU: use it with the CPU provider only")

        shared_arena = shared_arena and self.device == "cpu"
        if shared_arena:
            _register_shared_cpu_arena(ort)

        options = lambda bounded=False: session_options(  # noqa: E731
            ort, num_threads, shared_arena, session_config, bounded)
        self._ort = ort
        self._prefill_run = _prefill_run_options(ort) if self.device == "cpu" else None
        self.graph_seconds = 0.0  # inside session runs; the loop reports the rest as per-step overhead
        cache = None if session_cache is None else session_cache_dir(session_cache, artifact, ort.__version__)
        try:
            if cache is None:
                self.sessions = _each_graph(lambda name: ort.InferenceSession(str(artifact.graph_path(name)),
                                                                              options(), providers=providers))
            else:
                self.sessions = self._cached_sessions(artifact, options, cache)
        except Exception as e:  # onnxruntime raises its own exception types
            contrib = artifact.export.get("contrib_ops") or []
            hint = (f" This artifact uses ONNX Runtime contrib ops ({', '.join(contrib)}); it needs onnxruntime"
                    f"{artifact.export.get('requires_onnxruntime', '')} with its CPU contrib kernels (here: "
                    f"onnxruntime {ort.__version__}), or re-export with --weights fp32." if contrib else "")
            raise ArtifactError(f"onnxruntime could not load the graphs of {artifact.dir}: {e}.{hint}") from None
        _check_graphs_are_the_manifests(artifact, self.sessions)
        # the vision encoder's session as made for large images (see vision()): from the same file as the first
        graph_file = artifact.graph_path("vision_encoder") if cache is None else cache / "vision_encoder.onnx"
        self._vision_session = lambda bounded: self._session(graph_file, options(bounded), optimized=cache is not None)
        self._vision_bounded = False
        cfg = artifact.config.text
        self.hidden_size = cfg.hidden_size
        self.deepstack_layers = len(artifact.config.vision.deepstack_visual_indexes)  # K
        self._no_deepstack = np.zeros((self.deepstack_layers, 0, cfg.hidden_size), np.float32)  # decode steps
        self.kv_shape = (cfg.num_key_value_heads, cfg.head_dim)
        self.max_positions = cfg.max_position_embeddings
        dec = self.sessions["decoder"]
        self.past_names = [i.name for i in dec.get_inputs() if i.name.startswith("past_key_values.")]
        dtypes = {v["name"]: v["dtype"] for v in artifact.graph("decoder")["inputs"]}
        self.kv_dtype = np.dtype(dtypes[self.past_names[0]])  # [B, kv, P | capacity, hd] in the graph's precision
        self.output_names = [o.name for o in dec.get_outputs()]
        self.present_for = {p: p.replace("past_key_values.", "present.") for p in self.past_names}
        self.past_for = {present: past for past, present in self.present_for.items()}

    def _cached_sessions(self, artifact: Artifact, options, cache: Path) -> dict:
        ort = self._ort
        if all((cache / f"{name}.onnx").is_file() for name in GRAPHS):
            return _each_graph(lambda name: self._session(cache / f"{name}.onnx", options(), optimized=True))
        # First start: build in a private directory, publish it whole (a killed start leaves no half cache).
        tmp = cache.with_name(f"{cache.name}.tmp-{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)

        def build(name):
            opts = options()
            opts.optimized_model_filepath = str(tmp / f"{name}.onnx")
            opts.log_severity_level = 3  # its warning says the file is for this machine only: the key says so too
            for key, value in (("session.optimized_model_external_initializers_file_name", f"{name}.data"),
                               ("session.optimized_model_external_initializers_min_size_in_bytes", "1024"),
                               ("session.save_external_prepacked_constant_initializers", "1")):
                opts.add_session_config_entry(key, value)
            return ort.InferenceSession(str(artifact.graph_path(name)), opts, providers=["CPUExecutionProvider"])

        sessions = _each_graph(build)
        try:
            tmp.rename(cache)
        except OSError:  # another process published it first
            shutil.rmtree(tmp, ignore_errors=True)
        return sessions

    def prefill_chunk(self, batch: int) -> int | None:
        """Prompt positions per decoder run at prefill: PREFILL_CHUNK on the CPU, except for a batch on
        GroupQueryAttention (the preallocated cache), whose CPU kernel takes several new positions after
        past ones for one row only; None: the whole prompt in one run."""
        return PREFILL_CHUNK if self.device == "cpu" and (batch == 1 or not self.preallocated) else None

    def check_request(self, inputs: dict, max_new_tokens: int) -> None:
        """Graphs have dynamic shapes: only the model's context limits a request (checked by the pipeline)."""

    def _run(self, graph: str, feeds: dict) -> np.ndarray:
        return self._outputs(graph, feeds)[0]

    def _outputs(self, graph: str, feeds: dict) -> list[np.ndarray]:
        t0 = time.perf_counter()
        out = self.sessions[graph].run(None, feeds)
        self.graph_seconds += time.perf_counter() - t0
        return out

    def _session(self, path: Path, opts, optimized: bool):
        if optimized:  # a session cache's graph: optimized already
            opts.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return self._ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def _vision_for(self, patches: int) -> None:
        """Large images (BOUNDED_FROM patches or more) run in a session with bounded activations, the others in
        the shared arena (measured at 448 px: 0.08-0.13 MB a patch there against 0.3-0.4 MB from malloc, whose
        heap keeps what small tensors freed). The session is swapped, not doubled: its weights once; the swap
        costs a session start (seconds) next to minutes of encoder at those sizes."""
        bounded = self.device == "cpu" and patches >= BOUNDED_FROM
        if bounded != self._vision_bounded:
            del self.sessions["vision_encoder"]  # its packed weights go before the other's are made
            self.sessions["vision_encoder"] = self._vision_session(bounded)
            self._vision_bounded = bounded

    def vision(self, pixel_values, grid_inputs):
        """[F, S / merge^2, hidden]; with DeepStack the pair (that, [K, F, S / merge^2, hidden])."""
        self._vision_for(int(np.prod(pixel_values.shape[:2])))  # [F, S, D]
        outputs = self._outputs("vision_encoder", {"pixel_values": pixel_values, **grid_inputs})
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def join(self, features: list) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        return join_features(features, self.hidden_size, self.deepstack_layers)

    def merge(self, input_ids, joined):
        """[B, L] ids and join's output -> inputs_embeds [B, L, hidden]; for DeepStack models a DeepStackEmbeds
        (decode steps, which join nothing, get the one empty [K, 0, hidden] the backend keeps)."""
        vision_embeds, deepstack = split_joined(joined, self.deepstack_layers)
        outputs = self._outputs("embedding_merger", {"input_ids": input_ids, "vision_embeds": vision_embeds})
        if not self.deepstack_layers:
            return outputs[0]
        return DeepStackEmbeds(outputs[0], outputs[1], self._no_deepstack if deepstack is None else deepstack)

    def new_cache(self, batch: int, reserve: int = 0) -> OrtCache:
        if self.preallocated:  # buffers are made at the first decode
            return OrtCache({}, 0, reserve, {name: np.zeros((batch, *self._kv(0)), self.kv_dtype)
                                             for name in self.past_names})
        empty = self._ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, *self._kv(0)), self.kv_dtype), self.device)
        return OrtCache({name: empty for name in self.past_names}, 0)

    def _kv(self, positions: int) -> tuple[int, int, int]:
        return self.kv_shape[0], positions, self.kv_shape[1]

    def reserve(self, cache: OrtCache, positions: int) -> OrtCache:
        """Growing OrtValues need no room. A preallocated cache too small for `positions` is copied into one at
        least twice its size (up to the model's context), so that a session growing turn after turn copies
        its cache O(log n) times, not at every turn."""
        if not self.preallocated or positions <= cache.capacity:
            return cache
        return self._room(cache, positions, capacity=max(positions, min(2 * cache.capacity, self.max_positions)))

    def cache_bytes(self, cache: OrtCache) -> int:
        if cache.buffers:
            return sum(buf.nbytes for buf in cache.buffers.values())
        return sum(int(np.prod(value.shape())) for value in cache.values.values()) * self.kv_dtype.itemsize

    def _room(self, cache: OrtCache, total: int, capacity: int | None = None) -> OrtCache:
        """The cache with capacity for `total` positions: `capacity`, else the request's reserve, doubled when
        outgrown; graphs that fix the cache's length get exactly that (decode reads the whole buffer, and the
        graphs' mask hides the rows past P + L)."""
        if total <= cache.capacity:
            return cache
        if self.static_length is not None:
            if total > self.static_length:
                raise InputError(f"{total} positions exceed the {self.static_length} that these graphs' KV cache "
                                 "holds (export --max-context): lower max_new_tokens, reset() the chat session, or "
                                 "re-export with a larger --max-context")
            capacity = self.static_length
        capacity = capacity or max(total, cache.reserve, 2 * cache.capacity)
        buffers = {}
        for name, old in cache.buffers.items():
            buffers[name] = np.zeros((old.shape[0], *self._kv(capacity)), self.kv_dtype)
            buffers[name][:, :, :cache.length] = old[:, :, :cache.length]
        values = {name: self._ort.OrtValue.ortvalue_from_numpy(buf) for name, buf in buffers.items()}
        return OrtCache(values, cache.length, cache.reserve, buffers)

    def decode(self, inputs_embeds, attention_mask, position_ids, cache: OrtCache):
        binding = self.sessions["decoder"].io_binding()
        feeds = inputs_embeds.feeds() if isinstance(inputs_embeds, DeepStackEmbeds) else {"inputs_embeds": inputs_embeds}
        for name, array in feeds.items():
            dtype = np.int64 if name == "visual_index" else np.float32
            binding.bind_cpu_input(name, np.ascontiguousarray(array, dtype))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, np.int64))
        total = cache.length + inputs_embeds.shape[1]
        if self.preallocated:
            cache = self._room(cache, total)
        for name, value in cache.values.items():
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:  # in graph order, so that get_outputs() lines up with output_names
            if name == "logits":
                binding.bind_output(name, "cpu")
            elif self.preallocated:  # past and present: the same buffer, written in place
                binding.bind_ortvalue_output(name, cache.values[self.past_for[name]])
            else:
                binding.bind_output(name, self.device)
        t0 = time.perf_counter()
        self.sessions["decoder"].run_with_iobinding(binding, self._prefill_run if inputs_embeds.shape[1] > 1 else None)
        self.graph_seconds += time.perf_counter() - t0
        outputs = dict(zip(self.output_names, binding.get_outputs()))
        if self.preallocated:
            new = replace(cache, length=total)
        else:
            new = OrtCache({p: outputs[self.present_for[p]] for p in self.past_names}, total)
        return outputs["logits"].numpy()[:, -1, :], new
