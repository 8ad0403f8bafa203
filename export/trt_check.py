"""`qwen2vl-edge check-trt`: will TensorRT's ONNX parser take these graphs? Runs on the CPU, no TensorRT.

Rules come from data/tensorrt_<version>_onnx_ops.json (TensorRT's own operator support matrix for 10.3 and
10.15, version and source recorded in each file): every op supported, its data type accepted, the opset in
range, constant-only inputs constant, no data-dependent output shapes, no custom-domain ops, the restrictions
of the fused LLM ops (Attention, TensorScatter...), a static KV cache length where TensorRT needs one, and
weight-only DequantizeLinear in a form TensorRT takes, with positive scales.
An artifact is checked against the matrix of its manifest's `min_tensorrt` (10.15 when it names none).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from qwen2vl_edge.runtime.backends.trt_profiles import MIN_TENSORRT  # the versions with a matrix here

TRT_TYPES = {TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
             TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.BOOL: "BOOL",
             TensorProto.INT8: "INT8", TensorProto.UINT8: "UINT8", TensorProto.DOUBLE: "DOUBLE",
             TensorProto.INT4: "INT4"}
DEFAULT_VERSION = "10.15"


@dataclass(frozen=True)
class Problem:
    graph: str
    node: str
    op: str
    message: str

    def __str__(self) -> str:
        return f"{self.graph}: node {self.node!r} ({self.op}): {self.message}"


def load_rules(version: str = DEFAULT_VERSION) -> dict:
    if version not in MIN_TENSORRT:
        raise ValueError(f"no operator matrix for TensorRT {version}: have {', '.join(MIN_TENSORRT)}")
    return json.loads(resources.files(__package__).joinpath(f"data/tensorrt_{version}_onnx_ops.json").read_text())


def _types(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, list]]:
    """(elem type, dims) of every value shape inference can tell; a dim is its size, or None where symbolic."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    values = list(g.input) + list(g.output) + list(g.value_info)
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update({t.name: t.data_type for t in g.initializer})
    dims = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in values if v.type.tensor_type.HasField("shape")}
    dims.update({t.name: list(t.dims) for t in g.initializer})
    return types, dims


def _static_axis(node: onnx.NodeProto, rule: dict, dims: dict[str, list]) -> list[str]:
    """The input axis that must have a fixed size (static_axes in the matrix) has a symbolic one."""
    shape = dims.get(node.input[rule["input"]]) if rule["input"] < len(node.input) else None
    if shape is None or shape[rule["axis"]] is not None:
        return []
    return [f"input {rule['input']} ({node.input[rule['input']]!r}) has a symbolic axis {rule['axis']}: {rule['why']}"]


def _scales_positive(node: onnx.NodeProto, rule: dict, initializers: dict, base_dir: Path | None) -> list[str]:
    """A constant scale with a coefficient <= 0 (NaN included); scales in external data are read from base_dir."""
    tensor = initializers.get(node.input[1])
    external = tensor is not None and tensor.data_location == TensorProto.EXTERNAL
    if tensor is None or (external and base_dir is None):
        return []
    scales = np.asarray(numpy_helper.to_array(tensor, str(base_dir) if external else None), np.float32)
    bad = int((~(scales > 0)).sum())
    return [f"{bad} of {scales.size} scale(s) in {node.input[1]!r} are not positive: {rule['positive_scales_why']}"
            ] if bad else []


def _node_rules(node: onnx.NodeProto, rule: dict, ranks: dict[str, int], types: dict[str, int]) -> list[str]:
    """Breaches of one op's restrictions (node_rules in the matrix)."""
    given = lambda seq, i: i < len(seq) and seq[i]  # noqa: E731
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    bad = [f"input {i} must be 4D, is {ranks[node.input[i]]}D" for i in rule.get("rank4_inputs", [])
           if given(node.input, i) and ranks.get(node.input[i], 4) != 4]
    bad += [f"input {i} ({node.input[i]!r}) is unsupported" for i in rule.get("absent_inputs", [])
            if given(node.input, i)]
    bad += [f"output {i} is unsupported" for i in rule.get("absent_outputs", []) if given(node.output, i)]
    bad += [f"attribute {a} is unsupported" for a in rule.get("absent_attributes", []) if a in attrs]
    bad += [f"attribute {a} must be {v}" for a, v in rule.get("attribute_values", {}).items() if attrs.get(a, v) != v]
    bad += [f"input {i} must be INT64" for i in rule.get("int64_inputs", [])
            if given(node.input, i) and types.get(node.input[i], TensorProto.INT64) != TensorProto.INT64]
    return [f"{b} ({rule['why']})" for b in bad]


def _dequantize_rules(node: onnx.NodeProto, rule: dict, constants: set[str], types: dict[str, int],
                      ranks: dict[str, int]) -> list[str]:
    """Weight-only DequantizeLinear: constant data and scales, no zero point, blocks only where TensorRT has them."""
    dtype = TRT_TYPES.get(types.get(node.input[0], 0))
    bad = [f"input {name!r} must be a constant" for name in node.input[:2] if name not in constants]
    if len(node.input) > 2 and node.input[2]:
        bad.append("a zero point is given")
    blocked = ranks.get(node.input[1], 0) > 1
    if dtype is not None and dtype not in rule["blocked" if blocked else "per_channel"]:
        bad.append(f"{'blocked' if blocked else 'per-channel'} {dtype} weights")
    return [f"{b}: {rule['why']}" for b in bad]


def check_model(model: onnx.ModelProto, name: str, rules: dict, base_dir: Path | None = None) -> list[Problem]:
    """`base_dir`: where the model's external data lies (its constant scales are read from there)."""
    problems = []
    ops, lo, hi = rules["operators"], rules["opset_min"], rules["opset_max"]
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and not lo <= imp.version <= hi:
            problems.append(Problem(name, "<model>", "opset", f"opset {imp.version} outside TensorRT "
                                    f"{rules['tensorrt_version']}'s parser range {lo}..{hi}"))
    types, dims = _types(model)
    ranks = {n: len(d) for n, d in dims.items()}
    initializers = {t.name: t for t in model.graph.initializer}
    constants = set(initializers)
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
        if node.op_type in rules["node_rules"]:
            problems += [Problem(*where, m) for m in _node_rules(node, rules["node_rules"][node.op_type], ranks, types)]
        if node.op_type in rules.get("static_axes", {}):
            problems += [Problem(*where, m) for m in _static_axis(node, rules["static_axes"][node.op_type], dims)]
        if node.op_type in rules["quantized_weights"]:
            rule = rules["quantized_weights"][node.op_type]
            problems += [Problem(*where, m) for m in _dequantize_rules(node, rule, constants, types, ranks)]
            problems += [Problem(*where, m) for m in _scales_positive(node, rule, initializers, base_dir)]
    return problems


def _artifact_and_rules(artifact: str | Path, version: str | None):
    """The artifact and the matrix that applies: `version`'s, else its manifest's min_tensorrt, else 10.15."""
    from qwen2vl_edge.runtime.artifact import load_artifact

    art = load_artifact(artifact, verify=False)
    return art, load_rules(version or art.export.get("min_tensorrt") or DEFAULT_VERSION)


def _problems(art, rules: dict) -> list[Problem]:
    problems = []
    for name in art.manifest["graphs"]:
        path = art.graph_path(name)
        model = onnx.load(str(path), load_external_data=False)
        problems += check_model(model, name, rules, path.parent)
    return problems


def check_artifact(artifact: str | Path, version: str | None = None) -> list[Problem]:
    return _problems(*_artifact_and_rules(artifact, version))


def main(artifact: str | Path, trt_version: str | None = None) -> int:
    """`trt_version`: check against that version's matrix instead of the artifact's own (10.3 or 10.15)."""
    if trt_version is not None and trt_version not in MIN_TENSORRT:
        print(f"check-trt: no operator matrix for TensorRT {trt_version}; have {', '.join(MIN_TENSORRT)}", file=sys.stderr)
        return 2
    art, rules = _artifact_and_rules(artifact, trt_version)
    problems = _problems(art, rules)
    for p in problems:
        print(p)
    if problems:
        print(f"check-trt: {len(problems)} problem(s): TensorRT {rules['tensorrt_version']} would not parse "
              "these graphs as they are", file=sys.stderr)
        return 1
    print(f"check-trt: all graphs fit TensorRT {rules['tensorrt_version']}'s ONNX parser ({rules['source']})")
    return 0
