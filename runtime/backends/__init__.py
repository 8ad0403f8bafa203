"""Backends, imported lazily so that `import qwen2vl_edge.runtime` needs neither onnxruntime nor TensorRT."""

from __future__ import annotations

from ..artifact import Artifact
from ..errors import ConfigError

BACKENDS = ("onnxruntime", "tensorrt")


def create_backend(artifact: Artifact, name: str = "onnxruntime", **options):
    if name == "onnxruntime":
        from .onnxruntime import OrtBackend

        return OrtBackend(artifact, **options)
    if name == "tensorrt":
        from .tensorrt import TrtBackend

        return TrtBackend(artifact, **options)
    raise ConfigError(f"unknown backend {name!r}: use one of {', '.join(BACKENDS)}")
