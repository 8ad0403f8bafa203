"""A recording fake of the `tensorrt` Python module, for tests only: `make_fake_tensorrt()` returns a fresh
module object to put in sys.modules["tensorrt"].

It offers only names that the TensorRT version it fakes has (tests/test_trt_api_surface.py checks that
against the bindings' data of 10.3, 10.15 and 11.4: they differ only in the engine stream reader),
returns statuses where TensorRT does, and checks the calls, never the numbers:
- the network is strongly typed; a profile gives every dynamic input a range of its rank, min <= opt <= max;
- the parser refuses a KV cache updated in place (past and present of one shape: TensorScatter, which TensorRT
  parses as KVCacheUpdate) whose sequence axis is symbolic: KVCacheUpdate's cache "must be a network input and
  have a static sequence length dimension" (TensorRT operator reference);
- contexts use user-managed memory, given a pool at least as large as the engine asks for;
- at execute: every input shape set and inside the active profile, every I/O tensor given an address,
  each input buffer covering the profile's largest shape and each output what was written (asked of
  the CUDA fake), a KV past and its present at the SAME address where the graph's shapes say the cache
  is written in place (and at different ones otherwise).

With `run_onnx=True`, execute_async_v3 also runs the engine's source ONNX graph with ONNX Runtime on the
bytes behind the bound addresses, copied through the CUDA layer (runtime/backends/cuda.py: the fake
CUDA in the test suite, real cuda-python on a GPU), and writes the outputs back there. The numbers are
then ONNX Runtime's: a generation through TrtBackend can be compared token for token with OrtBackend.
"""

from __future__ import annotations

import enum
import json
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwen2vl_edge.runtime.backends import cuda as cuda_layer
from qwen2vl_edge.runtime.backends.cuda import cuda_call

ORT_DTYPES = {"tensor(float)": "FLOAT", "tensor(float16)": "HALF", "tensor(bfloat16)": "BF16",
              "tensor(int64)": "INT64", "tensor(int32)": "INT32"}
NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32}
POOL_BYTES = 3 << 20  # what each fake engine asks for its activations


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


class IStreamReader:  # TensorRT 10.x before IStreamReaderV2; gone in 11
    def __init__(self):
        self._base_initialized = True  # pybind11 needs the base __init__ called explicitly


class IStreamReaderV2:
    def __init__(self):
        self._base_initialized = True


def _read_all(reader) -> bytes:
    """Pull an engine from a stream reader as TensorRT does, in chunks until the end."""
    if not getattr(reader, "_base_initialized", False):
        raise FakeTrtError(f"{type(reader).__name__}.__init__ must call the base class __init__")
    v2 = isinstance(reader, IStreamReaderV2)
    if v2 and not reader.seek(0, SeekPosition.SET):
        raise FakeTrtError("seek failed")
    chunks = []
    while True:
        chunk = reader.read(1 << 16, 0) if v2 else reader.read(1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(bytes(chunk))


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


@dataclass
class _Tensor:
    name: str
    dtype: DataType
    shape: tuple  # -1 for a dynamic dimension
    _dims: tuple  # the ONNX dim params (str) or values


_SESSIONS: dict = {}  # ONNX path -> InferenceSession: the graphs' I/O, and what runs them in run_onnx mode


def _session(path: str):
    """ONNX Runtime reads the graph (no `onnx` package: the GPU check runs where only onnxruntime is)."""
    import onnxruntime as ort

    if path not in _SESSIONS:
        _SESSIONS[path] = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return _SESSIONS[path]


def _tensors(values) -> list[_Tensor]:
    return [_Tensor(v.name, DataType[ORT_DTYPES[v.type]], tuple(d if isinstance(d, int) else -1 for d in v.shape),
                    tuple(v.shape)) for v in values]


class _Network:
    def __init__(self, flags: int):
        if flags != 1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED):
            raise FakeTrtError(f"create_network({flags}): the network must be strongly typed and nothing else")
        self._inputs, self._outputs, self._onnx_path = [], [], None

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
        self._network, self._errors = network, []

    def parse_from_file(self, path: str) -> bool:
        path = str(Path(path).resolve())
        session = _session(path)
        self._network._inputs, self._network._outputs = _tensors(session.get_inputs()), _tensors(session.get_outputs())
        self._network._onnx_path = path
        outputs = {t.name: t._dims for t in self._network._outputs}
        self._errors = [_ParserError(f"KVCacheUpdate: the cache {t.name} {t._dims} must have a static sequence length "
                                     "dimension") for t in self._network._inputs
                        if t.name.startswith("past_key_values.") and t._dims == outputs.get(
                            t.name.replace("past_key_values.", "present.")) and t.shape[2] == -1]
        return not self._errors

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


class _Builder:
    def __init__(self, logger: Logger, rec: Recorder):
        self._rec = rec

    def create_network(self, flags=0):
        return _Network(flags)

    def create_builder_config(self):
        return _Config(self._rec)

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network: _Network, config: _Config):
        _check_profiles(network, config._profiles)
        io = [(t.name, "INPUT", t.dtype.name, list(t.shape), list(t._dims)) for t in network._inputs]
        io += [(t.name, "OUTPUT", t.dtype.name, list(t.shape), list(t._dims)) for t in network._outputs]
        plan = {"fake_engine": 1, "onnx": network._onnx_path, "io": io, "profiles": [
            {n: [list(s) for s in v] for n, v in p.items()} for p in config._profiles]}
        self._rec.calls.append(("build", Path(network._onnx_path).name))
        return json.dumps(plan).encode()


class _Engine:
    def __init__(self, plan: dict, rec: Recorder):
        self._plan, self._rec = plan, rec
        self._io = {name: (TensorIOMode[mode], DataType[dt], tuple(shape), tuple(dims))
                   for name, mode, dt, shape, dims in plan["io"]}
        self._names = [entry[0] for entry in plan["io"]]

    num_io_tensors = property(lambda self: len(self._names))
    num_optimization_profiles = property(lambda self: len(self._plan["profiles"]))
    device_memory_size_v2 = property(lambda self: POOL_BYTES)

    def get_tensor_name(self, index):
        return self._names[index]

    def get_tensor_mode(self, name):
        return self._io[name][0]

    def get_tensor_dtype(self, name):
        return self._io[name][1]

    def get_tensor_shape(self, name):
        return self._io[name][2]

    def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC):
        if strategy != ExecutionContextAllocationStrategy.USER_MANAGED:
            raise FakeTrtError("contexts must share one user-managed pool (USER_MANAGED)")
        self._rec.calls.append(("context", self._plan["onnx"]))
        return _Context(self)


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


class _Runtime:
    def __init__(self, logger: Logger, rec: Recorder):
        self._rec = rec

    def deserialize_cuda_engine(self, serialized_engine):
        if isinstance(serialized_engine, (IStreamReader, IStreamReaderV2)):
            serialized_engine = _read_all(serialized_engine)
        try:
            plan = json.loads(bytes(serialized_engine))
        except ValueError:
            return None  # what TensorRT does with bytes that are not an engine
        return _Engine(plan, self._rec) if plan.get("fake_engine") == 1 else None


def _version(version: str) -> tuple[int, int]:
    return tuple(int(x) for x in version.split(".")[:2])


def make_fake_tensorrt(version: str = "10.15.1.29", run_onnx: bool = False, check_buffer=None) -> types.ModuleType:
    """A fresh `tensorrt` module; its `recorder` attribute holds what was called."""
    rec = Recorder(run_onnx=run_onnx, check_buffer=check_buffer)
    mod = types.ModuleType("tensorrt")
    mod.__version__ = version
    mod.recorder = rec
    classes = [DataType, TensorIOMode, MemoryPoolType, BuilderFlag, NetworkDefinitionCreationFlag,
               ExecutionContextAllocationStrategy, Logger]
    # the stream reader of the version: only IStreamReader in 10.3, only IStreamReaderV2 in 11
    classes += [IStreamReaderV2, SeekPosition] if _version(version) >= (10, 15) else [IStreamReader]
    for cls in classes:
        setattr(mod, cls.__name__, cls)
    mod.float32, mod.float16, mod.bfloat16, mod.int64, mod.int32 = (DataType.FLOAT, DataType.HALF, DataType.BF16,
                                                                    DataType.INT64, DataType.INT32)
    mod.Builder = lambda logger: _Builder(logger, rec)
    mod.Runtime = lambda logger: _Runtime(logger, rec)
    mod.OnnxParser = _OnnxParser
    return mod


def fake_classes() -> dict[str, type]:
    """TensorRT class name -> the fake standing in for it (for the API-surface test)."""
    return {"Builder": _Builder, "INetworkDefinition": _Network, "OnnxParser": _OnnxParser,
            "IOptimizationProfile": _Profile, "ITimingCache": _TimingCache, "IBuilderConfig": _Config,
            "ICudaEngine": _Engine, "IExecutionContext": _Context, "Runtime": _Runtime, "ParserError": _ParserError,
            "ITensor": _Tensor}

