"""A small ONNX graph builder: named values in, node outputs out; weights streamed to external data.

Weights never gather in memory: each one is written to the artifact's shared data file as soon as it
is added, and the graph keeps only an external-data reference. All graphs of an artifact share one
`WeightStore`, so a tensor used by two graphs (the tied embedding / lm_head) is stored once.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .prequantized import QuantizedWeight, dequantized

FLOAT, INT64, INT32, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL
FLOAT16, BFLOAT16 = TensorProto.FLOAT16, TensorProto.BFLOAT16
# bf16 has no NumPy dtype: stored as the upper 16 bits of the fp32 value, rounded to nearest even
STORAGE = {"fp32": (np.float32, FLOAT), "fp16": (np.float16, FLOAT16), "bf16": (np.uint16, BFLOAT16)}
ALIGN, PAGE_ALIGN = 64, 4096
# Node-name prefix of the math that must stay fp32 in reduced-precision engines (norms, softmax,
# rotary): fp16 overflow there is the known failure of Qwen-VL TensorRT builds. trt_build reads it.
FP32_PREFIX = "fp32/"


def to_bf16_bits(array: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 as uint16 bits, round to nearest even (what torch's .to(torch.bfloat16) does)."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


@dataclass(frozen=True)
class Target:
    """What the graphs may use. portable: standard ONNX computed in fp32; ort-cpu: ONNX Runtime's contrib ops;
    tensorrt: standard ONNX, strongly typed in `precision`, for the TensorRT parser from `min_tensorrt` on."""

    name: str = "portable"
    precision: str = "fp32"  # the type of weights, activations and the KV cache (tensorrt)
    min_tensorrt: str | None = None  # "10.3" | "10.15"
    kv_length: int | None = None  # llm_ops: the KV cache's static length (export --max-context), see decoder.py

    @property
    def contrib(self) -> bool:
        return self.name == "ort-cpu"

    @property
    def typed(self) -> bool:
        """Every tensor's type is fixed by the graph (TensorRT strongly typed networks)."""
        return self.name == "tensorrt"

    @property
    def llm_ops(self) -> bool:
        """ONNX Attention, TensorScatter, RMSNormalization, RotaryEmbedding: TensorRT's parser from 10.15."""
        return self.typed and self.min_tensorrt == "10.15"

    @property
    def dtype(self) -> int:
        return STORAGE[self.precision][1] if self.typed else FLOAT


class WeightStore:
    """Appends tensors to one external-data file; the same name is written once."""

    def __init__(self, path: Path, dtype: str = "fp32"):
        self.path = Path(path)
        self.np_dtype, self.onnx_dtype = STORAGE[dtype]
        self._file = open(self.path, "wb")
        self._refs: dict[str, tuple[int, int, tuple[int, ...], int]] = {}
        self.written = 0

    def add(self, name: str, array, exact: bool = False) -> TensorProto:
        """`array` may be a zero-argument loader, called only if `name` is not stored yet. Floats are stored
        in the store's dtype unless `exact` (then the array's own dtype: packed quantized weights, scales)."""
        if name not in self._refs:
            array = array() if callable(array) else array
            if exact:
                data, onnx_dtype = array, helper.np_dtype_to_tensor_dtype(array.dtype)
            elif self.onnx_dtype == BFLOAT16:
                data, onnx_dtype = to_bf16_bits(array), BFLOAT16
            else:
                data, onnx_dtype = np.asarray(array, dtype=self.np_dtype), self.onnx_dtype
            self._write(name, np.ascontiguousarray(data).tobytes(), tuple(array.shape), onnx_dtype)
        return self._ref(name)

    def add_packed(self, name: str, data: np.ndarray, shape: tuple[int, ...], onnx_dtype: int) -> TensorProto:
        """Bytes already in ONNX's layout for `onnx_dtype` (int4: two values a byte, the first in the low nibble)."""
        if name not in self._refs:
            self._write(name, np.ascontiguousarray(data).tobytes(), tuple(shape), onnx_dtype)
        return self._ref(name)

    def _write(self, name: str, data: bytes, shape: tuple[int, ...], onnx_dtype: int) -> None:
        align = PAGE_ALIGN if len(data) >= 1 << 20 else ALIGN  # page-aligned big tensors can be mmapped
        offset = self._file.seek(0, 2)
        if offset % align:
            self._file.write(b"\0" * (align - offset % align))
            offset = self._file.tell()
        self._file.write(data)
        self._refs[name] = (offset, len(data), shape, onnx_dtype)
        self.written += len(data)

    def _ref(self, name: str) -> TensorProto:
        offset, length, shape, onnx_dtype = self._refs[name]
        tensor = TensorProto(name=name, data_type=onnx_dtype, dims=shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        return tensor

    def __contains__(self, name: str) -> bool:
        return name in self._refs

    def shape(self, name: str) -> tuple[int, ...]:
        return self._refs[name][2]

    def view(self, name: str, of: str, shape: tuple[int, ...]) -> None:
        """Register `name` as the stored bytes of `of` read with another shape (no second copy)."""
        offset, length, old_shape, onnx_dtype = self._refs[of]
        if int(np.prod(shape)) != int(np.prod(old_shape)):
            raise ValueError(f"a view of {of} {old_shape} must keep its size, got {shape}")
        self._refs.setdefault(name, (offset, length, tuple(shape), onnx_dtype))

    def close(self) -> None:
        self._file.close()


class Graph:
    """Builds one ONNX graph. `op()` returns output names; weights are cast to the compute type inside the graph
    (fp32, or the target's precision when it is typed). The builders ask `target` which ops they may use."""

    def __init__(self, name: str, store: WeightStore, opset: int, quant=None, target: Target = Target(),
                 accuracy_level: int = 4):
        self.name, self.store, self.opset = name, store, opset
        self.quant = quant  # export.quantize.QuantSpec: linears become MatMulNBits, or DequantizeLinear + MatMul
        self.target = target
        self.fused = target.contrib  # ONNX Runtime's fused contrib ops allowed (the ort-cpu target)
        self.act = target.dtype  # type of weights and activations between the fp32 islands
        self.accuracy_level = accuracy_level  # MatMulNBits of weights the checkpoint stores quantized
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.initializers: list[TensorProto] = []
        self._weights: dict[str, str] = {}
        self._ids = itertools.count()
        self._prefix = ""

    @contextlib.contextmanager
    def fp32(self):
        """Nodes made inside are named FP32_PREFIX..., so engine builds keep them in fp32."""
        outer, self._prefix = self._prefix, FP32_PREFIX
        try:
            yield
        finally:
            self._prefix = outer

    # -- values -------------------------------------------------------------------------------

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: list) -> None:
        """Expose `value` as graph output `name`: its producer is renamed rather than followed by an Identity,
        which ONNX Runtime runs as a copy when the value also feeds other nodes (the KV cache: 56 copies a step)."""
        if not any(value in n.output for n in self.nodes):  # a graph input or initializer
            self.op("Identity", value, outputs=[name])
        else:
            for node in self.nodes:
                for seq in (node.input, node.output):
                    for i, v in enumerate(seq):
                        if v == value:
                            seq[i] = name
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def const(self, value, dtype=np.int64) -> str:
        """A small constant stored inline."""
        name = f"const_{next(self._ids)}"
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def act_const(self, value) -> str:
        """A float constant in the compute type (activation math outside the fp32 islands)."""
        if self.act == FLOAT:
            return self.const(value, np.float32)
        name = f"const_{next(self._ids)}"
        array = np.asarray(value, dtype=np.float32)
        self.initializers.append(helper.make_tensor(name, self.act, array.shape, array.reshape(-1).tolist()))
        return name

    def to_f32(self, x: str) -> str:
        """x (compute type) as fp32: entering an fp32 island of a typed graph; nothing otherwise."""
        return x if self.act == FLOAT else self.op("Cast", x, to=FLOAT)

    def to_act(self, x: str) -> str:
        """x (fp32) back in the compute type."""
        return x if self.act == FLOAT else self.op("Cast", x, to=self.act)

    def weight(self, name: str, array, *, raw: bool = False, exact: bool = False) -> str:
        """A model weight in external data; returned in the compute type unless `raw` (then in storage dtype)."""
        key = (name, raw)
        if key not in self._weights:
            tensor = self.store.add(name, array, exact=exact)
            if name not in {t.name for t in self.initializers}:
                self.initializers.append(tensor)
            value = name
            if not raw and not exact and tensor.data_type != self.act:
                value = self.op("Cast", name, to=self.act)
            self._weights[key] = value
        return self._weights[key]

    def op(self, op_type: str, *inputs: str, outputs: list[str] | None = None, n_out: int = 1,
           domain: str = "", **attrs) -> str | list[str]:
        idx = next(self._ids)
        outputs = outputs or [f"{op_type.lower()}_{idx}" + (f"_{i}" if n_out > 1 else "") for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=f"{self._prefix}{op_type}_{idx}",
                                           domain=domain, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    # -- composite helpers --------------------------------------------------------------------

    def linear(self, x: str, weight, bias: np.ndarray | None, name: str, quantize: bool = True) -> str:
        """x @ weight.T + bias for a weight [out, in]: a MatMul on the pre-transposed weight, or a
        MatMulNBits on the block-quantized weight when the graph quantizes (and `quantize`).
        `weight` may be a checkpoint's quantized weight (export.prequantized.QuantizedWeight): MatMulNBits of
        its own integers where contrib ops are allowed, else its dequantized floats; or a list of weights,
        one kernel each, outputs concatenated."""
        if isinstance(weight, list) and self.fused:
            y = self.op("Concat", *[self.linear(x, w, None, f"{name}.part{i}") for i, w in enumerate(weight)], axis=-1)
        elif isinstance(weight, QuantizedWeight) and self.fused:
            from .quantize import matmul_nbits_prequantized

            y = matmul_nbits_prequantized(self, x, weight, name, self.accuracy_level)
        elif isinstance(weight, (list, QuantizedWeight)):
            return self.linear(x, dequantized(weight), bias, name, quantize)
        elif self.quant is not None and quantize:
            from .quantize import dequantize_matmul, dynamic_quant_matmul, matmul_nbits

            if self.target.typed:
                y = dequantize_matmul(self, x, weight, name, self.quant)
            else:
                y = (dynamic_quant_matmul(self, x, weight, name) if self.quant.dynamic
                     else matmul_nbits(self, x, weight, name, self.quant))
        else:
            y = self.op("MatMul", x, self.weight(f"{name}.weight.T", np.ascontiguousarray(weight.T)))
        return self.op("Add", y, self.weight(f"{name}.bias", bias)) if bias is not None else y

    def reduce_mean(self, x: str, axes: list[int]) -> str:
        if self.opset >= 18:
            return self.op("ReduceMean", x, self.const(axes), keepdims=1)
        return self.op("ReduceMean", x, axes=axes, keepdims=1)

    def slice(self, x: str, start: int, end: int, axis: int) -> str:
        return self.op("Slice", x, self.const([start]), self.const([end]), self.const([axis]))

    def shape_dim(self, x: str, axis: int) -> str:
        """Dimension `axis` of x as an int64 [1] tensor."""
        return self.op("Shape", x, start=axis, end=axis + 1)

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        opsets = [helper.make_opsetid("", self.opset)]
        if any(n.domain == "com.microsoft" for n in self.nodes):
            opsets.append(helper.make_opsetid("com.microsoft", 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="qwen2vl-edge")
        # The oldest IR version that holds these opsets (10 at least, as before): onnx writes its newest
        # by default, which older parsers refuse (onnxruntime 1.30 reads IR <= 13; onnx 1.23 writes 14).
        model.ir_version = max(10, helper.find_min_ir_version_for(opsets, ignore_unknown=True))
        return model


def value_info(v: onnx.ValueInfoProto) -> dict:
    """{'name', 'dtype', 'shape'} of a graph input/output, for the manifest."""
    t = v.type.tensor_type
    dims = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in t.shape.dim]
    return {"name": v.name, "dtype": helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}
