"""A recording fake of the `tensorrt` Python module, for tests only: `make_fake_tensorrt()` returns a fresh
module object to put in sys.modules["tensorrt"].

It offers only names that the TensorRT version it fakes has (tests/test_trt_api_surface.py checks that
against the bindings' data of 10.3, 10.8, 10.9, 10.15 and 11.4: they differ in the engine stream readers
and the stream writer), returns statuses where TensorRT does, and checks the calls, never the numbers:
- the network is strongly typed; a profile gives every dynamic input a range of its rank, min <= opt <= max;
- the parser refuses a KV cache updated in place (past and present of one shape: TensorScatter, which TensorRT
  parses as KVCacheUpdate) whose sequence axis is symbolic: KVCacheUpdate's cache "must be a network input and
  have a static sequence length dimension" (TensorRT operator reference);
- contexts use user-managed memory, given a pool at least as large as the engine asks for;
- at execute: every input shape set and inside the active profile, every I/O tensor given an address,
  each input buffer covering the profile's largest shape and each output what was written (asked of
  the CUDA fake), a KV past and its present at the SAME address where the graph's shapes say the cache
  is written in place (and at different ones otherwise).

Engines are read as TensorRT's Python bindings feed them (python/src/infer/pyCore.cpp of each release
branch): from a buffer (what is passed is recorded: the backend passes a read-only mmap below 10.9), or
through a stream reader whose trampoline calls the Python `read` ONCE per request on 10.7-10.8 (a short
answer is a short read, which the fake's core refuses) and loops until the request is met from 10.9 on.
Building records, in `recorder.calls`, the release of every parser, network, builder and serialized plan
(the network keeps its parser and its builder alive, as the bindings' keep_alive does), and each chunk
written to a stream writer. `recorder.held` is a ledger of the host memory TensorRT would hold at each
moment, and `peak_held` its peak: a parser its graph's external weights, a plan (IHostMemory) its bytes,
a stream writer's call the chunk it is handed. With `hold_weights=True` a plan also carries as many bytes
as the weights (a plan is about as large as its weights). That memory is an anonymous mmap, which
tracemalloc does not see: tracemalloc then sees only the copies Python code makes.

With `run_onnx=True`, execute_async_v3 also runs the engine's source ONNX graph with ONNX Runtime on the
bytes behind the bound addresses, copied through the CUDA layer (runtime/backends/cuda.py: the fake
CUDA in the test suite, real cuda-python on a GPU), and writes the outputs back there. The numbers are
then ONNX Runtime's: a generation through TrtBackend can be compared token for token with OrtBackend.
"""

from __future__ import annotations

import enum
import json
import mmap
import struct
import types
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwen2vl_edge.runtime.backends import cuda as cuda_layer
from qwen2vl_edge.runtime.backends.cuda import cuda_call

ORT_DTYPES = {"tensor(float)": "FLOAT", "tensor(float16)": "HALF", "tensor(bfloat16)": "BF16",
              "tensor(int64)": "INT64", "tensor(int32)": "INT32"}
NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32}
POOL_BYTES = 3 << 20  # what each fake engine asks for its activations
PLAN_MAGIC = b"FAKEPLAN"  # a fake plan: magic, the JSON's length (8 bytes), the JSON, then padding (the weights)
HEADER = len(PLAN_MAGIC) + 8


class FakeTrtError(AssertionError):
    """A call real TensorRT would refuse, or one that would be undefined behaviour on a GPU."""


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    BF16 = 7
    INT64 = 8


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


# the engine inspector's: how much the plan keeps of each layer, and how the inspector writes it
ProfilingVerbosity = enum.Enum("ProfilingVerbosity", {"LAYER_NAMES_ONLY": 0, "NONE": 1, "DETAILED": 2})
LayerInformationFormat = enum.Enum("LayerInformationFormat", {"ONELINE": 0, "JSON": 1})


class BuilderFlag(enum.Enum):  # no FP16 / BF16 / OBEY_PRECISION_CONSTRAINTS: TensorRT 11 has none
    TF32 = 6


class NetworkDefinitionCreationFlag(enum.IntEnum):
    STRONGLY_TYPED = 1


class ExecutionContextAllocationStrategy(enum.Enum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


class SeekPosition(enum.Enum):
    SET = 0
    CUR = 1
    END = 2


class IStreamReader:  # TensorRT 10.x; deprecated in 10.7 for IStreamReaderV2, gone in 11
    def __init__(self):
        self._base_initialized = True  # pybind11 needs the base __init__ called explicitly


class IStreamReaderV2:  # from 10.7
    def __init__(self):
        self._base_initialized = True


class IStreamWriter:  # from 10.13 (the bindings' PyStreamWriter)
    def __init__(self):
        self._base_initialized = True


def _trampoline_read(reader, n: int, loops: bool) -> bytes:
    """What the bindings' C++ side of `read` hands TensorRT for a request of n bytes (pyCore.cpp): V1 and
    V2 up to 10.8 call the Python read once and copy what it returned (a short answer stays short); V2
    from 10.9 calls it again until n bytes came, or it returned nothing."""
    if not getattr(reader, "_base_initialized", False):
        raise FakeTrtError(f"{type(reader).__name__}.__init__ must call the base class __init__")
    v2, got = isinstance(reader, IStreamReaderV2), b""
    while True:
        chunk = bytes(reader.read(n - len(got), 0) if v2 else reader.read(n - len(got)))[:n - len(got)]
        got += chunk
        if not loops or not chunk or len(got) == n:
            return got


def _read_plan(reader, loops: bool) -> bytes | None:
    """TensorRT's core pulling an engine from a reader: the header, then the rest in one request. None
    where a read came back short (the core cannot go on with part of an engine)."""
    if isinstance(reader, IStreamReaderV2) and not reader.seek(0, SeekPosition.SET):
        raise FakeTrtError("seek failed")
    header = _trampoline_read(reader, HEADER, loops)
    if len(header) < HEADER or not header.startswith(PLAN_MAGIC):
        return None
    rest = struct.unpack("<Q", header[len(PLAN_MAGIC):])[0]
    body = _trampoline_read(reader, rest, loops)
    return header + body if len(body) == rest else None


class Logger:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, min_severity=WARNING):
        pass


@dataclass
class Recorder:
    """What the fake saw, for the tests to assert on."""

    calls: list = field(default_factory=list)
    executions: list = field(default_factory=list)  # (engine, {name: shape}, {name: address})
    run_onnx: bool = False
    check_buffer: object = None  # (ptr, nbytes) -> None or raises: the CUDA fake's owner(); None with real CUDA
    hold_weights: bool = False  # plans carry as many bytes as their graph's weights (see the module doc)
    held: dict = field(default_factory=dict)  # (what, ONNX file name) -> host bytes TensorRT holds now
    peak_held: int = 0

    def hold(self, what: str, onnx_path, nbytes: int) -> None:
        self.held[(what, Path(onnx_path).name)] = nbytes
        self.peak_held = max(self.peak_held, sum(self.held.values()))
    v2_loops: bool = True  # the IStreamReaderV2 trampoline loops (10.9 on) or reads once (10.7-10.8)


@dataclass
class _Tensor:
    name: str
    dtype: DataType
    shape: tuple  # -1 for a dynamic dimension
    _dims: tuple  # the ONNX dim params (str) or values


_SESSIONS: dict = {}  # ONNX path -> InferenceSession: the graphs' I/O, and what runs them in run_onnx mode


def _graph_nodes(path: str) -> tuple[list[str], int]:
    """(node names, bytes of external weights) of an ONNX graph, read without its weights; ([], 0) where
    the `onnx` package is missing (the GPU plumbing check runs with onnxruntime only)."""
    try:
        import onnx
    except ImportError:
        return [], 0
    graph = onnx.load(path, load_external_data=False).graph
    weights = sum(int(e.value) for t in graph.initializer for e in t.external_data if e.key == "length")
    return [n.name or n.op_type for n in graph.node], weights


def _session(path: str):
    """ONNX Runtime reads the graph (no `onnx` package: the GPU check runs where only onnxruntime is)."""
    import onnxruntime as ort

    if path not in _SESSIONS:
        _SESSIONS[path] = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return _SESSIONS[path]


def _tensors(values) -> list[_Tensor]:
    return [_Tensor(v.name, DataType[ORT_DTYPES[v.type]], tuple(d if isinstance(d, int) else -1 for d in v.shape),
                    tuple(v.shape)) for v in values]


def _released(rec: Recorder, what: str, onnx_path) -> None:
    name = Path(onnx_path).name if onnx_path else None
    rec.calls.append(("release", what, name))
    rec.held.pop((what, name), None)


class _Network:
    def __init__(self, flags: int, builder: "_Builder"):
        if flags != 1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED):
            raise FakeTrtError(f"create_network({flags}): the network must be strongly typed and nothing else")
        self._inputs, self._outputs, self._onnx_path = [], [], None
        self._builder, self._parser, self._rec = builder, None, builder._rec  # keep_alive, as the bindings'
        self._nodes, self._weight_bytes = [], 0

    def __del__(self):
        _released(self._rec, "network", self._onnx_path)

    @property
    def num_layers(self):
        return 0  # not known without parsing the nodes

    @property
    def num_inputs(self):
        return len(self._inputs)

    @property
    def num_outputs(self):
        return len(self._outputs)

    def get_input(self, i):
        return self._inputs[i]

    def get_output(self, i):
        return self._outputs[i]


class _ParserError:
    def __init__(self, desc):
        self._desc = desc

    def desc(self):
        return self._desc

    def node_name(self):
        return "?"

    def node_operator(self):
        return "?"


class _OnnxParser:
    def __init__(self, network: _Network, logger: Logger):
        # pyOnnx.cpp: OnnxParser(network, logger) with py::keep_alive<2, 1>: the network keeps the parser,
        # not the other way round (a weak reference here, so that no cycle outlives the locals)
        self._network, self._rec, self._errors, self._path = weakref.ref(network), network._rec, [], None
        network._parser = self

    def parse_from_file(self, path: str) -> bool:
        path = str(Path(path).resolve())
        session = _session(path)
        net = self._network()
        net._inputs, net._outputs = _tensors(session.get_inputs()), _tensors(session.get_outputs())
        net._onnx_path = self._path = path
        net._nodes, net._weight_bytes = _graph_nodes(path)
        net._rec.hold("parser", path, net._weight_bytes)  # it keeps every weight it loaded for the network
        outputs = {t.name: t._dims for t in net._outputs}
        self._errors = [_ParserError(f"KVCacheUpdate: the cache {t.name} {t._dims} must have a static sequence length "
                                     "dimension") for t in net._inputs
                        if t.name.startswith("past_key_values.") and t._dims == outputs.get(
                            t.name.replace("past_key_values.", "present.")) and t.shape[2] == -1]
        return not self._errors

    def __del__(self):
        _released(self._rec, "parser", self._path)

    @property
    def num_errors(self):
        return len(self._errors)

    def get_error(self, i):
        return self._errors[i]


class _Profile:
    def __init__(self):
        self._shapes = {}

    def set_shape(self, name, min, opt, max):  # noqa: A002 (TensorRT's parameter names)
        lo, mid, hi = (tuple(int(x) for x in s) for s in (min, opt, max))
        if not (len(lo) == len(mid) == len(hi) and all(a <= b <= c for a, b, c in zip(lo, mid, hi))):
            raise FakeTrtError(f"set_shape({name}): min <= opt <= max fails for {lo}, {mid}, {hi}")
        self._shapes[name] = (lo, mid, hi)


class _TimingCache:
    def __init__(self, data: bytes):
        self._data = bytes(data) or b"fake-timing-cache"

    def serialize(self):
        return self._data


class _Config:
    def __init__(self, rec: Recorder):
        self._rec, self._profiles, self._flags_cleared, self._timing_cache = rec, [], [], None
        self.profiling_verbosity = ProfilingVerbosity.LAYER_NAMES_ONLY  # TensorRT's default

    def set_memory_pool_limit(self, pool, pool_size):
        self._rec.calls.append(("set_memory_pool_limit", pool, pool_size))

    def clear_flag(self, flag):
        self._flags_cleared.append(flag)

    def create_timing_cache(self, serialized_timing_cache):
        return _TimingCache(serialized_timing_cache)

    def set_timing_cache(self, cache, ignore_mismatch):
        self._timing_cache = cache
        return True

    def get_timing_cache(self):
        return self._timing_cache

    def add_optimization_profile(self, profile):
        self._profiles.append(dict(profile._shapes))
        return len(self._profiles) - 1


def _check_profiles(network: _Network, profiles: list[dict]) -> None:
    if not profiles:
        raise FakeTrtError("no optimization profile")
    for k, shapes in enumerate(profiles):
        for t in network._inputs:
            if -1 in t.shape:
                if t.name not in shapes:
                    raise FakeTrtError(f"profile {k} has no range for dynamic input {t.name}")
                lo, _, hi = shapes[t.name]
                if len(lo) != len(t.shape) or any(d != -1 and not a == d == b for d, a, b in zip(t.shape, lo, hi)):
                    raise FakeTrtError(f"profile {k}: {t.name} {t.shape} given {lo}..{hi}")


class _HostMemory(mmap.mmap):
    """IHostMemory: a serialized plan, read through the buffer protocol; in the ledger until released."""

    def __del__(self):
        _released(self._rec, "plan", self._onnx_path)


def _plan(rec: Recorder, network: _Network, config: _Config) -> tuple[bytes, int]:
    """(header and JSON, bytes of padding after them: the weights the plan carries)."""
    _check_profiles(network, config._profiles)
    io = [(t.name, "INPUT", t.dtype.name, list(t.shape), list(t._dims)) for t in network._inputs]
    io += [(t.name, "OUTPUT", t.dtype.name, list(t.shape), list(t._dims)) for t in network._outputs]
    plan = json.dumps({"fake_engine": 1, "onnx": network._onnx_path, "io": io, "profiles": [
        {n: [list(s) for s in v] for n, v in p.items()} for p in config._profiles],
        "verbosity": config.profiling_verbosity.name, "nodes": network._nodes}).encode()
    rec.calls.append(("build", Path(network._onnx_path).name))
    padding = network._weight_bytes if rec.hold_weights else 0
    return PLAN_MAGIC + struct.pack("<Q", len(plan) + padding) + plan, padding


class _Builder:
    def __init__(self, logger: Logger, rec: Recorder):
        self._rec, self._built = rec, None

    def create_network(self, flags=0):
        return _Network(flags, self)  # pyCore.cpp: create_network has py::keep_alive<0, 1>

    def create_builder_config(self):
        return _Config(self._rec)

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network: _Network, config: _Config):
        self._built = network._onnx_path
        head, padding = _plan(self._rec, network, config)
        plan = _HostMemory(-1, len(head) + padding)  # zeros after the head
        plan[:len(head)] = head
        plan._rec, plan._onnx_path = self._rec, network._onnx_path
        self._rec.hold("plan", network._onnx_path, len(plan))
        return plan

    def __del__(self):
        _released(self._rec, "builder", self._built)


STREAM_CHUNK = 1 << 20  # what the fake hands a stream writer at a time (TensorRT does not document its size)


class _StreamBuilder(_Builder):
    """The builder from 10.13 on: build_serialized_network_to_stream(network, config, writer) -> bool."""

    def build_serialized_network_to_stream(self, network: _Network, config: _Config, writer) -> bool:
        if not getattr(writer, "_base_initialized", False):
            raise FakeTrtError(f"{type(writer).__name__}.__init__ must call IStreamWriter.__init__")
        self._built = network._onnx_path
        head, padding = _plan(self._rec, network, config)
        pieces = [head] + [min(STREAM_CHUNK, padding - at) for at in range(0, padding, STREAM_CHUNK)]
        for piece in pieces:
            chunk = bytes(piece) if isinstance(piece, int) else piece  # the padding made one piece at a time
            self._rec.hold("chunk", network._onnx_path, len(chunk))
            written = writer.write(chunk)  # the bindings pass py::bytes and want the count back
            self._rec.held.pop(("chunk", Path(network._onnx_path).name))
            if written != len(chunk):  # NvInferRuntime.h: less than asked makes TensorRT give up
                return False
            self._rec.calls.append(("write", Path(network._onnx_path).name, len(chunk)))
        return True


class _Engine:
    def __init__(self, plan: dict, rec: Recorder):
        self._plan, self._rec = plan, rec
        self._io = {name: (TensorIOMode[mode], DataType[dt], tuple(shape), tuple(dims))
                   for name, mode, dt, shape, dims in plan["io"]}
        self._names = [entry[0] for entry in plan["io"]]

    num_io_tensors = property(lambda self: len(self._names))
    profiling_verbosity = property(lambda self: ProfilingVerbosity[self._plan["verbosity"]])
    num_optimization_profiles = property(lambda self: len(self._plan["profiles"]))
    device_memory_size_v2 = property(lambda self: POOL_BYTES)

    def get_device_memory_size_for_profile_v2(self, profile_index):
        return POOL_BYTES

    def get_tensor_name(self, index):
        return self._names[index]

    def get_tensor_mode(self, name):
        return self._io[name][0]

    def get_tensor_dtype(self, name):
        return self._io[name][1]

    def get_tensor_shape(self, name):
        return self._io[name][2]

    def create_engine_inspector(self):
        return _EngineInspector(self)

    def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC):
        if strategy != ExecutionContextAllocationStrategy.USER_MANAGED:
            raise FakeTrtError("contexts must share one user-managed pool (USER_MANAGED)")
        self._rec.calls.append(("context", self._plan["onnx"]))
        return _Context(self)


class _EngineInspector:
    """Layer information as TensorRT's inspector gives it: with DETAILED verbosity a dict per layer (here one
    per ONNX node, each its own "layer": the fake fuses nothing), otherwise the layer names only."""

    def __init__(self, engine: _Engine):
        self._engine = engine

    def get_engine_information(self, format):  # noqa: A002 (TensorRT's parameter name)
        if format != LayerInformationFormat.JSON:
            raise FakeTrtError("only the JSON format is faked")
        plan = self._engine._plan
        detailed = plan["verbosity"] == ProfilingVerbosity.DETAILED.name
        layers = [{"Name": n, "LayerType": "FakeLayer", "Inputs": [], "Outputs": [], "TacticName": "",
                   "Metadata": f"[ONNX Layer: {n}]"} if detailed else n for n in plan["nodes"]]
        return json.dumps({"Layers": layers, "Bindings": self._engine._names})


class _Context:
    def __init__(self, engine: _Engine):
        self._engine, self._rec = engine, engine._rec
        self._profile, self._shapes, self._addresses, self._memory = 0, {}, {}, None

    def set_device_memory(self, memory, size):
        if size < self._engine.device_memory_size_v2:
            raise FakeTrtError(f"device memory of {size} bytes, the engine needs {self._engine.device_memory_size_v2}")
        if self._rec.check_buffer:
            self._rec.check_buffer(int(memory), int(size))
        self._memory = (int(memory), int(size))

    def set_optimization_profile_async(self, profile_index, stream_handle):
        if not isinstance(stream_handle, int) or not 0 <= profile_index < self._engine.num_optimization_profiles:
            return False
        self._profile, self._shapes = profile_index, {}
        return True

    def set_input_shape(self, name, shape):
        lo, _, hi = self._engine._plan["profiles"][self._profile].get(name, (None, None, None))
        shape = tuple(shape)
        if lo is None or len(shape) != len(lo) or not all(a <= x <= b for a, x, b in zip(lo, shape, hi)):
            self._rec.calls.append(("refused shape", name, shape))
            return False
        self._shapes[name] = shape
        return True

    def set_tensor_address(self, name, memory):
        if name not in self._engine._io or not isinstance(memory, int) or memory == 0:
            return False
        self._addresses[name] = memory
        return True

    def execute_async_v3(self, stream_handle):
        eng = self._engine
        if self._memory is None:
            raise FakeTrtError("execute without device memory (user-managed context)")
        inputs = [n for n in eng._names if eng._io[n][0] == TensorIOMode.INPUT]
        unset = [n for n in inputs if n not in self._shapes]
        if unset:
            raise FakeTrtError(f"input shapes not set for the active profile: {unset}")
        missing = [n for n in eng._names if n not in self._addresses]
        if missing:
            raise FakeTrtError(f"no address for {missing}")
        self._check_kv_aliasing()
        self._check_inputs_covered(inputs)
        self._rec.executions.append((Path(eng._plan["onnx"]).stem, dict(self._shapes), dict(self._addresses)))
        if self._rec.run_onnx:
            self._run_onnx(stream_handle, inputs)
        return True

    def _check_kv_aliasing(self):
        for name, (mode, _, _, dims) in self._engine._io.items():
            if mode != TensorIOMode.OUTPUT or not name.startswith("present."):
                continue
            past = name.replace("present.", "past_key_values.")
            in_place = self._engine._io[past][3] == dims  # same symbolic shape: one buffer written in place
            same = self._addresses[past] == self._addresses[name]
            if in_place != same:
                raise FakeTrtError(f"{past} and {name} must be {'the same' if in_place else 'different'} buffers")

    def _check_inputs_covered(self, inputs):
        """Each input's buffer holds the profile's largest shape (the limits), the KV cache the shape bound
        (it is sized per request)."""
        if not self._rec.check_buffer:
            return
        for n in inputs:
            _, _, hi = self._engine._plan["profiles"][self._profile][n]
            shape = self._shapes[n] if n.startswith("past_key_values.") else hi
            nbytes = int(np.prod(shape)) * np.dtype(NUMPY.get(self._engine._io[n][1].name, np.uint16)).itemsize
            self._rec.check_buffer(self._addresses[n], max(nbytes, 1))

    # -- ONNX Runtime on the bound bytes --------------------------------------------------------

    def _run_onnx(self, stream_handle, inputs):
        eng, rt = self._engine, cuda_layer.cudart()  # looked up now: the test may have put a fake in
        cuda_call(rt.cudaStreamSynchronize(stream_handle), "cudaStreamSynchronize")
        feeds = {}
        for n in inputs:
            feeds[n] = np.empty(self._shapes[n], NUMPY[eng._io[n][1].name])
            if feeds[n].nbytes:
                cuda_call(rt.cudaMemcpy(feeds[n].ctypes.data, self._addresses[n], feeds[n].nbytes,
                                        rt.cudaMemcpyKind.cudaMemcpyDeviceToHost), "read input")
        names = [n for n in eng._names if eng._io[n][0] == TensorIOMode.OUTPUT]
        for n, value in zip(names, _session(eng._plan["onnx"]).run(names, feeds)):
            value = np.ascontiguousarray(value, NUMPY[eng._io[n][1].name])
            if self._rec.check_buffer and value.nbytes:
                self._rec.check_buffer(self._addresses[n], value.nbytes)
            if value.nbytes:
                cuda_call(rt.cudaMemcpy(self._addresses[n], value.ctypes.data, value.nbytes,
                                        rt.cudaMemcpyKind.cudaMemcpyHostToDevice), "write output")


def _parse_plan(data) -> dict | None:
    if len(data) < HEADER or bytes(data[:len(PLAN_MAGIC)]) != PLAN_MAGIC:
        return None
    size = struct.unpack("<Q", bytes(data[len(PLAN_MAGIC):HEADER]))[0]
    if len(data) != HEADER + size:
        return None
    decoder = json.JSONDecoder()
    try:  # the JSON, then the padding standing for the weights
        return decoder.raw_decode(bytes(data[HEADER:HEADER + min(size, 1 << 22)]).decode("latin-1"))[0]
    except ValueError:
        return None


class _Runtime:
    def __init__(self, logger: Logger, rec: Recorder):
        self._rec = rec

    def deserialize_cuda_engine(self, serialized_engine):
        """From a stream reader (pulled as the version's trampoline does) or from any buffer (pybind11's
        py::buffer: bytes, IHostMemory, a read-only mmap); records which one it was given."""
        if isinstance(serialized_engine, (IStreamReader, IStreamReaderV2)):
            v2 = isinstance(serialized_engine, IStreamReaderV2)
            self._rec.calls.append(("deserialize", "IStreamReaderV2" if v2 else "IStreamReader"))
            data = _read_plan(serialized_engine, v2 and self._rec.v2_loops)
            plan = data and _parse_plan(data)
        else:
            with memoryview(serialized_engine) as view:  # released before the caller may close an mmap
                kind = "mmap" if isinstance(serialized_engine, mmap.mmap) else type(serialized_engine).__name__
                self._rec.calls.append(("deserialize", kind, "read-only" if view.readonly else "writable"))
                plan = _parse_plan(view)
        return _Engine(plan, self._rec) if plan and plan.get("fake_engine") == 1 else None  # as TensorRT: None


def _version(version: str) -> tuple[int, int]:
    return tuple(int(x) for x in version.split(".")[:2])


def make_fake_tensorrt(version: str = "10.15.1.29", run_onnx: bool = False, check_buffer=None,
                       hold_weights: bool = False) -> types.ModuleType:
    """A fresh `tensorrt` module; its `recorder` attribute holds what was called."""
    v = _version(version)
    rec = Recorder(run_onnx=run_onnx, check_buffer=check_buffer, hold_weights=hold_weights, v2_loops=v >= (10, 9))
    mod = types.ModuleType("tensorrt")
    mod.__version__ = version
    mod.recorder = rec
    classes = [DataType, TensorIOMode, MemoryPoolType, BuilderFlag, NetworkDefinitionCreationFlag,
               ExecutionContextAllocationStrategy, Logger, ProfilingVerbosity, LayerInformationFormat]
    # pyCore.cpp of the release branches: IStreamReader up to 10.x, IStreamReaderV2 from 10.7, IStreamWriter
    # and build_serialized_network_to_stream from 10.13
    classes += [IStreamReader] if v < (11, 0) else []
    classes += [IStreamReaderV2, SeekPosition] if v >= (10, 7) else []
    classes += [IStreamWriter] if v >= (10, 13) else []
    for cls in classes:
        setattr(mod, cls.__name__, cls)
    mod.float32, mod.float16, mod.bfloat16, mod.int64, mod.int32 = (DataType.FLOAT, DataType.HALF, DataType.BF16,
                                                                    DataType.INT64, DataType.INT32)
    builder = _builder_class(version)
    mod.Builder = lambda logger: builder(logger, rec)
    mod.Runtime = lambda logger: _Runtime(logger, rec)
    mod.OnnxParser = _OnnxParser
    return mod


def _builder_class(version: str) -> type:
    return _StreamBuilder if _version(version) >= (10, 13) else _Builder


def fake_classes(version: str) -> dict[str, type]:
    """TensorRT class name -> the fake standing in for it in that version (for the API-surface test)."""
    return {"Builder": _builder_class(version), "INetworkDefinition": _Network, "OnnxParser": _OnnxParser,
            "IOptimizationProfile": _Profile, "ITimingCache": _TimingCache, "IBuilderConfig": _Config,
            "ICudaEngine": _Engine, "IExecutionContext": _Context, "Runtime": _Runtime, "ParserError": _ParserError,
            "ITensor": _Tensor, "EngineInspector": _EngineInspector}
