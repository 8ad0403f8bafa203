"""The torch-free runtime: messages -> patches, tokens, M-RoPE positions -> ONNX / TensorRT graphs -> text."""

from .errors import ArtifactError, ConfigError, InputError
from .pipeline import GenerationResult, Qwen2VLPipeline

__all__ = ["ArtifactError", "ConfigError", "GenerationResult", "InputError", "Qwen2VLPipeline"]
