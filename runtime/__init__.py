"""The torch-free runtime: messages -> patches, tokens, M-RoPE positions -> ONNX / TensorRT graphs -> text."""

from .errors import ArtifactError, InputError
from .pipeline import GenerationResult, Qwen2VLPipeline

__all__ = ["ArtifactError", "GenerationResult", "InputError", "Qwen2VLPipeline"]
