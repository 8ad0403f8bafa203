"""TensorRT backend: the engines of `build-trt`, device memory and a stream through cuda-python.

- Engines are deserialized from their files (`read_engine`: streamed from TensorRT 10.9 on, from a
  read-only mmap before); each one's I/O (names, modes, dtypes, ranks) is checked against the manifest,
  and its sidecar against this TensorRT, this GPU and the manifest's graphs.
- One device-memory pool, sized at the largest engine, is shared by the four execution contexts
  (user-managed allocation): they run one after another on one stream.
- I/O buffers are allocated once for the engines' limits (sizes from trt_memory.io_buffers); logits
  come back through pinned host memory, last position only. Each decode step's host inputs (ids, mask,
  positions) go up through pinned staging buffers, asynchronously.
- Vision features stay on the device: each encoder run writes into a device buffer of its own (two with
  DeepStack: the features and the DeepStack features), `join` copies them, in prompt order, into the merger's
  input buffer (and the DeepStack ones into the decoder's deepstack_embeds buffer [K, M, hidden]), and merge
  reads them there. The DeepStack features wait for the decoder beside the merger's visual_index [B, L]; a
  decode step binds the same buffers with M = 0 and uploads nothing to them.
- The KV cache lives in the object `new_cache` returns, in the engine's dtype: preallocated graphs (10.15)
  fix its length (export --max-context) and bind past and present to the same buffer, written in place;
  concat graphs size it for the request, read the past from one buffer set and write the present into
  the other, and the two swap each step.
- `close()` (or `with`) frees every allocation, the stream, the contexts and the engines.
"""

from __future__ import annotations

import json
import mmap
import os
import weakref
from dataclasses import dataclass, replace

import numpy as np

from ..artifact import Artifact
from ..errors import ArtifactError, InputError
from .base import split_joined
from .cuda import DeviceBuffer, PinnedArray, Stream, gpu_identity
from .trt_memory import DTYPE_BYTES, io_buffers, kv_cache_bytes
from .trt_profiles import (
    CONCAT, DECODE, ENGINES, PREALLOCATED, PREFILL, check_engine_io, check_request, check_shape, check_sidecar,
    decoder_profile, kv_names, limits_of, profile_of,
)

_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "INT32": "int32",
           "INT8": "int8", "UINT8": "uint8", "BOOL": "bool", "FP8": "float8", "INT4": "int4"}
STAGED = ("input_ids", "attention_mask", "position_ids")  # uploaded every decode step: through pinned memory
# each encoder run's outputs get a device buffer of their own (VisionFeatures)
PER_CALL = ("image_embeds", "deepstack_features")
CONTEXTS = {"vision_encoder": ("vision_encoder", 0), "embedding_merger": ("embedding_merger", 0),
            "prefill": ("decoder", PREFILL), "decode": ("decoder", DECODE)}  # context -> (engine, profile)
DECODER_CONTEXTS = {PREFILL: "prefill", DECODE: "decode"}  # decoder profile -> its context


def dtype_name(dtype) -> str:
    """numpy-style name of a tensorrt.DataType (what the manifest records)."""
    return _DTYPES.get(dtype.name, dtype.name.lower())


def tensorrt_version(trt) -> str:
    return trt.__version__


def version_tuple(version: str) -> tuple[int, int]:
    """(major, minor) of a TensorRT version string."""
    return tuple(int(x) for x in version.split(".")[:2])


# Reading engines. TensorRT's bindings (python/src/infer/pyCore.cpp, PyStreamReaderV2::read, per release
# branch): up to 10.8 the trampoline calls the Python `read` once per request and memcpy's what came back,
# even where TensorRT asked for device memory, so a chunked reader gives a short read and a device
# destination crashes; from 10.9 it loops until the request is met and copies to device memory with
# cuMemcpyHtoD. The V1 IStreamReader saves host memory only with weight streaming (NvInferRuntime.h:
# "This deserialization path will reduce host memory usage when weight streaming is enabled"), and its
# trampoline wants a bytes object of each requested size. Below 10.9 the buffer overload of
# deserialize_cuda_engine (py::buffer, every 10.x and 11.x) is given a read-only mmap of the file instead:
# its pages are the file's, clean and reclaimable, and no Python copy of the engine exists. The binding
# keeps the runtime alive for the engine (keep_alive<0, 1>), not the buffer: the map closes after the call.
STREAM_READER_LOOPS = (10, 9)
READ_CHUNK = 64 << 20  # what one read hands TensorRT (a Python bytes object of this size at most)
_WHENCE = {"SET": os.SEEK_SET, "CUR": os.SEEK_CUR, "END": os.SEEK_END}


def engine_reader(trt, f):
    """An IStreamReaderV2 over an open engine file, for TensorRT >= 10.9: TensorRT pulls the engine in
    chunks of READ_CHUNK, so no Python copy of the whole engine exists next to TensorRT's."""
    class Reader(trt.IStreamReaderV2):
        def __init__(self):
            trt.IStreamReaderV2.__init__(self)

        def read(self, num_bytes, stream):
            return f.read(min(num_bytes, READ_CHUNK))

        def seek(self, offset, where):
            f.seek(offset, _WHENCE[where.name])
            return True
    return Reader()


def read_engine(trt, runtime, path) -> object:
    """Deserialize one engine file: streamed where the bindings' reader loops (>= 10.9), else from a
    read-only mmap (see above). None where TensorRT cannot read it."""
    if version_tuple(tensorrt_version(trt)) >= STREAM_READER_LOOPS:
        with open(path, "rb") as f:
            return runtime.deserialize_cuda_engine(engine_reader(trt, f))
    if os.path.getsize(path) == 0:  # mmap refuses an empty file
        return None
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as pages:
        return runtime.deserialize_cuda_engine(pages)


class KvBuffers:
    """The device buffers of one request's KV cache; freed by `free()`, by the backend's close(), or when
    the last cache object holding them is collected."""

    def __init__(self, sets: list[dict[str, DeviceBuffer]], capacity: int):
        self.sets, self.capacity = sets, capacity  # per set: past input name -> [B, kv, capacity, hd]
        self._finalizer = weakref.finalize(self, KvBuffers._free, sets)
        self._finalizer.atexit = False  # at interpreter exit the CUDA context goes anyway

    @staticmethod
    def _free(sets) -> None:
        for s in sets:
            for buf in s.values():
                buf.free()

    def free(self) -> None:
        self._finalizer()


@dataclass(frozen=True)
class TrtCache:
    kv: KvBuffers
    length: int  # P: positions held
    batch: int
    current: int = 0  # concat: the set holding the past (the present goes to the other)

    @property
    def capacity(self) -> int:
        return self.kv.capacity


@dataclass(frozen=True)
class DeviceEmbeds:
    shape: tuple[int, int, int]  # [B, L, hidden], in the backend's inputs_embeds buffer
    stamp: int  # which merge wrote it: a later merge overwrites the buffer
    # DeepStack models: [K, M, hidden] in the deepstack_embeds buffer (M = 0 at decode steps: nothing uploaded), and
    # the join that wrote them (a later join overwrites them); the merger wrote visual_index [B, L] beside the embeds
    deepstack: tuple[int, int, int] | None = None
    join_stamp: int = 0


class VisionFeatures:
    """One encoder run's features [F, S / merge^2, hidden] (or its DeepStack features [K, F, S / merge^2, hidden])
    float32, in a device buffer of their own; freed when the last reference goes, or by the backend's close()."""

    def __init__(self, buf: DeviceBuffer, shape: tuple[int, ...]):
        self.buf, self.shape = buf, shape
        self._finalizer = weakref.finalize(self, buf.free)
        self._finalizer.atexit = False  # at interpreter exit the CUDA context goes anyway

    def free(self) -> None:
        self._finalizer()


@dataclass(frozen=True)
class JoinedFeatures:
    shape: tuple[int, ...]  # [M, hidden] in the backend's vision_embeds buffer, or [K, M, hidden] in `buffer`
    stamp: int  # which join wrote it: a later join overwrites the buffer
    buffer: str = "vision_embeds"  # the I/O buffer that holds it (DeepStack's: the decoder's deepstack_embeds)


def join_on_device(features: list[VisionFeatures], dst: DeviceBuffer, shape: tuple[int, ...], stream: Stream) -> None:
    """The features' rows copied, in order, into `dst` laid out as `shape`: [M, hidden], or [K, M, hidden] where tap
    k of a DeepStack feature [K, F * S / merge^2, hidden] goes to row k * M + the rows of the features before it."""
    taps, tap_bytes, offset = int(np.prod(shape[:-2])), shape[-2] * shape[-1] * 4, 0
    for f in features:
        n = f.buf.nbytes // taps  # one tap of this feature
        for k in range(taps):
            dst.copy_from(f.buf, n, stream, k * tap_bytes + offset, k * n)
        offset += n


class TrtBackend:
    name = "tensorrt"

    def __init__(self, artifact: Artifact):
        try:
            import tensorrt as trt
        except ImportError:
            raise ArtifactError("backend='tensorrt' needs TensorRT: pip install 'tensorrt>=10.3,<12' "
                                "'cuda-python>=12.8,<14' (the [trt] extra)") from None
        self._trt, self.cfg = trt, artifact.config
        self.kv_pairs = kv_names(self.cfg)  # (past input, present output) per layer and kind, bound every step
        self.hidden_size = self.cfg.text.hidden_size
        self.deepstack_layers = len(self.cfg.vision.deepstack_visual_indexes)  # K: DeepStack features per token
        self.graph_seconds = None  # execute_async_v3 returns before the GPU is done
        self.kv_cache = artifact.export.get("kv_cache", CONCAT)
        self._buffers: list = []
        self._caches: weakref.WeakSet = weakref.WeakSet()  # KvBuffers and VisionFeatures alive
        self._staged: set[str] = set()  # staging buffers a queued copy may still read
        self.engines, self.sidecars = self._load_engines(trt, artifact)
        self.io = {name: self._check_io(name, artifact) for name in ENGINES}
        self.kv_dtype = next(v["dtype"] for v in artifact.graph("decoder")["inputs"]
                             if v["name"].startswith("past_key_values."))
        limits = {name: limits_of(s) for name, s in self.sidecars.items()}
        if len(set(limits.values())) != 1:
            raise ArtifactError(f"the engines were built with different limits ({limits}): rebuild them together")
        self.limits = limits["decoder"]
        self._stamp = self._join_stamp = 0
        try:
            self.stream = self._keep(Stream())
            self._allocate()
            self._create_contexts(trt)
        except Exception:  # give back what was allocated before the failure, then re-raise it
            self.close()
            raise

    # -- loading ------------------------------------------------------------------------------

    def _load_engines(self, trt, artifact: Artifact) -> tuple[dict, dict]:
        entries = artifact.manifest.get("engines")
        if not entries:
            raise ArtifactError(f"{artifact.dir} has no TensorRT engines: run `qwen2vl-edge build-trt {artifact.dir}`")
        gpu, cc = gpu_identity()
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engines, sidecars = {}, {}
        export = artifact.export
        for name in ENGINES:
            sidecars[name] = json.loads((artifact.dir / entries[name]["sidecar"]).read_text())
            graph_file = artifact.graph(name)["file"]
            check_sidecar(sidecars[name], trt_version=tensorrt_version(trt), gpu_name=gpu, compute_capability=cc,
                          precision=export.get("precision"), kv_cache=self.kv_cache,
                          onnx_sha256=artifact.manifest.get("files", {}).get(graph_file))
            engines[name] = read_engine(trt, self.runtime, artifact.dir / entries[name]["file"])
            if engines[name] is None:
                raise ArtifactError(f"TensorRT could not deserialize {entries[name]['file']}: rebuild it with "
                                    "`qwen2vl-edge build-trt`")
        return engines, sidecars

    def _check_io(self, name: str, artifact: Artifact) -> dict[str, tuple[str, str, int]]:
        engine, found = self.engines[name], {}
        for i in range(engine.num_io_tensors):
            tensor = engine.get_tensor_name(i)
            mode = "input" if engine.get_tensor_mode(tensor) == self._trt.TensorIOMode.INPUT else "output"
            found[tensor] = (mode, dtype_name(engine.get_tensor_dtype(tensor)), len(engine.get_tensor_shape(tensor)))
        check_engine_io(name, found, artifact.graph(name))
        return found

    def _keep(self, allocation):
        self._buffers.append(allocation)
        return allocation

    def _allocate(self) -> None:
        lim, t = self.limits, self.cfg.text
        sizes = io_buffers(self.cfg, lim)
        self.buf = {name: self._keep(DeviceBuffer.alloc(n, name))
                    for name, n in sizes.items() if name not in PER_CALL}
        self.staging = {name: self._keep(PinnedArray((sizes[name],), np.uint8, f"{name} staging")) for name in STAGED}
        self.logits = self._keep(PinnedArray((lim.max_batch, t.vocab_size), np.float32, "logits"))

    def _create_contexts(self, trt) -> None:
        """Four contexts without their own activation memory, sharing one pool sized at the largest engine."""
        pool = max(int(e.device_memory_size_v2) for e in self.engines.values())
        self.pool = self._keep(DeviceBuffer.alloc(pool, "activation pool"))
        self.ctx = {}
        for key, (engine, profile) in CONTEXTS.items():
            ctx = self.engines[engine].create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if ctx is None:
                raise ArtifactError(f"TensorRT could not create an execution context for {engine}")
            ctx.set_device_memory(self.pool.ptr, self.pool.nbytes)
            if profile and not ctx.set_optimization_profile_async(profile, self.stream.handle):
                raise ArtifactError(f"TensorRT refused optimization profile {profile} of {engine}: rebuild the engines")
            self.ctx[key] = ctx
        self.profiles = {key: profile_of(self.sidecars[engine], profile) for key, (engine, profile) in CONTEXTS.items()}

    # -- running ------------------------------------------------------------------------------

    def _run(self, key: str, shapes: dict, addresses: dict[str, int], uploads: dict[str, np.ndarray]) -> None:
        """Shapes checked against the profile (a named InputError) before anything is copied; then the
        `uploads` into their I/O buffers (pageable host memory is staged before the copy call returns)."""
        engine, ctx = CONTEXTS[key][0], self.ctx[key]
        for name, shape in shapes.items():
            shape = tuple(int(d) for d in shape)
            check_shape(engine, name, shape, self.profiles[key][name])
            if not ctx.set_input_shape(name, shape):
                raise InputError(f"TensorRT refused shape {shape} for {engine} input {name}")
        for name, array in uploads.items():
            if array.size:
                self._upload(name, array)
        missing = set(self.io[engine]) - set(addresses)
        if missing:  # a tensor without memory would be undefined behaviour, not an error, in TensorRT
            raise RuntimeError(f"{engine}: no buffer bound for {', '.join(sorted(missing))}")
        for name, ptr in addresses.items():
            if not ctx.set_tensor_address(name, ptr):
                raise RuntimeError(f"TensorRT refused the address of {engine} tensor {name}")
        if not ctx.execute_async_v3(self.stream.handle):
            raise RuntimeError(f"TensorRT failed to run {engine} ({key}) with shapes {shapes}")

    def _upload(self, name: str, array: np.ndarray) -> None:
        staging = self.staging.get(name)
        if name in self._staged:  # a queued copy may still read this staging buffer: let it finish first
            self.stream.synchronize()
            self._staged.clear()
        self.buf[name].upload(array, self.stream, staging)
        if staging is not None:
            self._staged.add(name)

    def prefill_chunk(self, batch: int) -> None:
        """The prompt in one run: the engines' profiles bound it already."""
        return None

    def check_request(self, inputs: dict, max_new_tokens: int) -> None:
        grids = [tuple(int(x) for x in g) for key in ("image_grid_thw", "video_grid_thw") for g in inputs.get(key, [])]
        check_request(self.limits, self.cfg, batch=inputs["input_ids"].shape[0],
                      prompt_len=inputs["input_ids"].shape[1], max_new_tokens=max_new_tokens, image_grids=grids)

    def _features(self, name: str, shape: tuple[int, ...]) -> VisionFeatures:
        out = VisionFeatures(DeviceBuffer.alloc(int(np.prod(shape)) * 4, name), shape)
        self._caches.add(out)
        return out

    def vision(self, pixel_values, grid_inputs) -> VisionFeatures | tuple[VisionFeatures, VisionFeatures]:
        """The encoder's features (and DeepStack features), left on the device in buffers of their own."""
        F, S, _ = pixel_values.shape
        b, m2 = self.buf, self.cfg.vision.spatial_merge_size ** 2
        shape = (F, S // m2, self.hidden_size)  # [F, S / merge^2, hidden]
        outs = {"image_embeds": self._features("image_embeds", shape)}
        if self.deepstack_layers:
            outs["deepstack_features"] = self._features("deepstack_features", (self.deepstack_layers, *shape))
        feeds = {"pixel_values": np.asarray(pixel_values, np.float32), **grid_inputs}
        self._run("vision_encoder", {k: v.shape for k, v in feeds.items()},
                  {**{name: b[name].ptr for name in feeds}, **{name: f.buf.ptr for name, f in outs.items()}}, feeds)
        return tuple(outs.values()) if self.deepstack_layers else outs["image_embeds"]

    def join(self, features: list) -> JoinedFeatures | np.ndarray | tuple:
        """The images' and videos' features in prompt order, copied on the device into the merger's input
        buffer -> [M, hidden] there (an empty host array when there are none); with DeepStack the pair (that,
        [K, M, hidden] in the decoder's deepstack_embeds buffer)."""
        mains = [f[0] for f in features] if self.deepstack_layers else features
        rows, H = sum(f.shape[0] * f.shape[1] for f in mains), self.hidden_size
        if not rows:
            empty = np.zeros((0, H), np.float32)
            return (empty, np.zeros((self.deepstack_layers, 0, H), np.float32)) if self.deepstack_layers else empty
        check_shape("embedding_merger", "vision_embeds", (rows, H), self.profiles["embedding_merger"]["vision_embeds"])
        self._join_stamp += 1
        main = JoinedFeatures((rows, H), self._join_stamp)
        join_on_device(mains, self.buf[main.buffer], main.shape, self.stream)
        if not self.deepstack_layers:
            return main
        deep = JoinedFeatures((self.deepstack_layers, rows, H), self._join_stamp, "deepstack_embeds")
        join_on_device([f[1] for f in features], self.buf[deep.buffer], deep.shape, self.stream)
        return main, deep

    def merge(self, input_ids, joined) -> DeviceEmbeds:
        """[B, L] ids and join's output -> embeddings on the device. The vision features: joined on the device, or a
        host array; for DeepStack models a pair (vision_embeds, deepstack [K, M, hidden]), each joined on the device
        (a JoinedFeatures in the vision_embeds / deepstack_embeds buffer) or a host array, or a bare empty array (decode
        steps: the decoder then reads no row of the deepstack buffer, and nothing is uploaded)."""
        vision_embeds, deepstack = split_joined(joined, self.deepstack_layers)
        names = ("input_ids", "vision_embeds", "inputs_embeds") + (("visual_index",) if self.deepstack_layers else ())
        uploads = {"input_ids": np.asarray(input_ids, np.int64)}
        for name, features in (("vision_embeds", vision_embeds), ("deepstack_embeds", deepstack)):
            if isinstance(features, JoinedFeatures):
                if features.stamp != self._join_stamp:
                    raise InputError("these vision features were overwritten by a later join(): merge right after it")
            elif features is not None:
                uploads[name] = np.asarray(features, np.float32)
        if any(uploads[n].size for n in ("vision_embeds", "deepstack_embeds") if n in uploads):
            self._join_stamp += 1  # the upload overwrites what the last join left in the buffers
        self._run("embedding_merger", {"input_ids": input_ids.shape, "vision_embeds": vision_embeds.shape},
                  {name: self.buf[name].ptr for name in names}, uploads)
        self._stamp += 1
        layers = (self.deepstack_layers, vision_embeds.shape[0], self.hidden_size) if self.deepstack_layers else None
        return DeviceEmbeds((*input_ids.shape, self.hidden_size), self._stamp, layers, self._join_stamp)

    def new_cache(self, batch: int, reserve: int = 0) -> TrtCache:
        """Room for `reserve` positions (prompt + max_new_tokens; the engines' max context if not given). The
        preallocated graphs fix the cache's length (export --max-context, which build-trt made the engines' max
        context): every request's cache is that long, and never grows."""
        lim = self.limits.max_context
        capacity = lim if self.kv_cache == PREALLOCATED else min(reserve or lim, lim)
        return TrtCache(self._kv_buffers(batch, capacity), 0, batch)

    def _kv_buffers(self, batch: int, capacity: int) -> KvBuffers:
        sets = 2 if self.kv_cache == CONCAT else 1
        per_tensor = kv_cache_bytes(self.cfg, batch, capacity, self.kv_dtype, self.kv_cache) // (
            sets * 2 * self.cfg.text.num_hidden_layers)
        kv = KvBuffers([{past: DeviceBuffer.alloc(per_tensor, past) for past, _ in self.kv_pairs}
                        for _ in range(sets)], capacity)
        self._caches.add(kv)
        return kv

    def _room(self, cache: TrtCache, total: int) -> TrtCache:
        """The cache with capacity for `total` positions: doubled (up to the engines' max context) if outgrown. Only
        concat caches grow: a preallocated one holds the max context from the start."""
        if total <= cache.capacity:
            return cache
        if total > self.limits.max_context:
            raise InputError(f"{total} positions exceed the engines' max context {self.limits.max_context}: "
                             "rebuild with `build-trt --max-context N`")
        t, item = self.cfg.text, DTYPE_BYTES[self.kv_dtype]
        capacity = min(max(total, 2 * cache.capacity), self.limits.max_context)
        grown = self._kv_buffers(cache.batch, capacity)
        rows = cache.batch * t.num_key_value_heads  # the past is packed [B, kv, P, hd]
        for name, old in cache.kv.sets[cache.current].items():
            grown.sets[0][name].copy_from(old, rows * cache.length * t.head_dim * item, self.stream)
        return TrtCache(grown, cache.length, cache.batch, 0)

    def cache_bytes(self, cache: TrtCache) -> int:
        return sum(buf.nbytes for buffers in cache.kv.sets for buf in buffers.values())

    def reserve(self, cache: TrtCache, positions: int) -> TrtCache:
        """A chat session's next turn: the cache with room for `positions` in all (a concat cache doubled, up to
        the engines' max context, when outgrown, so a growing session copies it O(log n) times; a preallocated
        one holds the max context from the start)."""
        if positions > self.limits.max_context:
            raise InputError(f"the chat session needs {positions} positions, over the engines' max context "
                             f"{self.limits.max_context}: reset() the session, lower max_new_tokens, or rebuild with "
                             "`build-trt --max-context N`")
        return self._room(cache, positions)

    def decode(self, inputs_embeds: DeviceEmbeds, attention_mask, position_ids, cache: TrtCache):
        if inputs_embeds.stamp != self._stamp:
            raise InputError("these embeddings were overwritten by a later merge(): decode right after merge")
        deepstack = inputs_embeds.deepstack
        if deepstack and deepstack[1] and inputs_embeds.join_stamp != self._join_stamp:
            raise InputError("these DeepStack features were overwritten by a later join(): decode right after merge")
        B, L, H = inputs_embeds.shape
        t, b = self.cfg.text, self.buf
        cache = self._room(cache, cache.length + L)
        P = cache.length
        shapes = {"inputs_embeds": (B, L, H), "attention_mask": attention_mask.shape,
                  "position_ids": position_ids.shape}
        if deepstack:  # the buffers merge (and join) wrote: decode steps bind them as they are, M = 0
            shapes.update(visual_index=(B, L), deepstack_embeds=deepstack)
        addresses = {name: b[name].ptr for name in (*shapes, "logits")}
        past_set = cache.kv.sets[cache.current]
        present_set = past_set if self.kv_cache == PREALLOCATED else cache.kv.sets[1 - cache.current]
        past_len = cache.capacity if self.kv_cache == PREALLOCATED else P
        for past, present in self.kv_pairs:
            shapes[past] = (B, t.num_key_value_heads, past_len, t.head_dim)
            addresses[past], addresses[present] = past_set[past].ptr, present_set[past].ptr
        self._run(DECODER_CONTEXTS[decoder_profile(P, L)], shapes, addresses,
                  {"attention_mask": np.asarray(attention_mask, np.int64),
                   "position_ids": np.asarray(position_ids, np.int64)})
        logits = b["logits"].download_into(self.logits.array[:B], self.stream).copy()  # [B, vocab]
        self._staged.clear()  # the stream synchronized: no queued copy reads a staging buffer
        current = cache.current if self.kv_cache == PREALLOCATED else 1 - cache.current
        return logits, replace(cache, length=P + L, current=current)

    # -- freeing ------------------------------------------------------------------------------

    def close(self) -> None:
        """Free every device and pinned allocation, the caches still alive, the stream, contexts and engines."""
        if not self._buffers:
            return
        self.stream.synchronize()  # the stream is the first allocation: it exists if anything does
        for held in list(self._caches):
            held.free()
        self.ctx, self.engines, self.runtime = {}, {}, None  # contexts before engines before the runtime
        for allocation in reversed(self._buffers):
            allocation.free()
        self._buffers = []

    def __enter__(self) -> "TrtBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
