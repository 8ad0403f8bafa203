"""`qwen2vl-edge check-trt`: will TensorRT's ONNX parser take these graphs? Runs on the CPU, no TensorRT.

Rules come from data/tensorrt_onnx_ops.json (TensorRT's own operator support matrix, version and
source recorded in the file): every op supported, its data type accepted, the opset in range,
constant-only inputs constant, no data-dependent output shapes, no custom-domain ops.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import onnx
from onnx import TensorProto

TRT_TYPES = {TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
             TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.BOOL: "BOOL",
             TensorProto.INT8: "INT8", TensorProto.UINT8: "UINT8", TensorProto.DOUBLE: "DOUBLE"}


@dataclass(frozen=True)
class Problem:
    graph: str
    node: str
    op: str
    message: str

    def __str__(self) -> str:
        return f"{self.graph}: node {self.node!r} ({self.op}): {self.message}"


def load_rules() -> dict:
    return json.loads(resources.files(__package__).joinpath("data/tensorrt_onnx_ops.json").read_text())


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.input) + list(g.output) + list(g.value_info)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def check_model(model: onnx.ModelProto, name: str, rules: dict) -> list[Problem]:
    problems = []
    ops, lo, hi = rules["operators"], rules["opset_min"], rules["opset_max"]
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and not lo <= imp.version <= hi:
            problems.append(Problem(name, "<model>", "opset", f"opset {imp.version} outside TensorRT "
                                    f"{rules['tensorrt_version']}'s parser range {lo}..{hi}"))
    types = _types(model)
    constants = {t.name for t in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    for node in model.graph.node:
        where = (name, node.name or node.output[0], node.op_type)
        if node.domain not in ("", "ai.onnx"):
            problems.append(Problem(*where, f"custom domain {node.domain!r}: TensorRT's parser needs a plugin"))
            continue
        if node.op_type not in ops:
            problems.append(Problem(*where, f"not supported by TensorRT {rules['tensorrt_version']}'s ONNX parser"))
            continue
        if node.op_type in rules["data_dependent_shape"]:
            problems.append(Problem(*where, "output shape depends on data: give it a static bound"))
        idx = rules["data_input"].get(node.op_type, 0)
        if idx < len(node.input) and node.input[idx]:
            dtype = TRT_TYPES.get(types.get(node.input[idx], 0))  # None: not inferable (after a custom op)
            if dtype is not None and dtype not in ops[node.op_type]:
                problems.append(Problem(*where, f"input {node.input[idx]!r} is {dtype}; TensorRT takes "
                                        f"{', '.join(ops[node.op_type])} for {node.op_type}"))
        for pos, why in rules["constant_inputs"].get(node.op_type, {}).items():
            pos = int(pos)
            if pos < len(node.input) and node.input[pos] and node.input[pos] not in constants:
                problems.append(Problem(*where, why))
        if node.op_type == "LayerNormalization" and len([o for o in node.output if o]) > 1:
            problems.append(Problem(*where, rules["attribute_rules"]["LayerNormalization"]))
    return problems


def check_artifact(artifact: str | Path) -> list[Problem]:
    from qwen2vl_edge.runtime.artifact import load_artifact

    art = load_artifact(artifact, verify=False)
    rules = load_rules()
    problems = []
    for name in art.manifest["graphs"]:
        model = onnx.load(str(art.graph_path(name)), load_external_data=False)
        problems += check_model(model, name, rules)
    return problems


def main(artifact: str | Path, trt_version: str | None = None) -> int:
    rules = load_rules()
    if trt_version and trt_version != rules["tensorrt_version"]:
        print(f"note: rules are for TensorRT {rules['tensorrt_version']} ({rules['source']}); "
              f"you asked about {trt_version}", file=sys.stderr)
    problems = check_artifact(artifact)
    for p in problems:
        print(p)
    if problems:
        print(f"check-trt: {len(problems)} problem(s): TensorRT {rules['tensorrt_version']} would not parse "
              "these graphs as they are", file=sys.stderr)
        return 1
    print(f"check-trt: all graphs fit TensorRT {rules['tensorrt_version']}'s ONNX parser ({rules['source']})")
    return 0
