"""qwen2vl-edge: Qwen2-VL exported to ONNX / TensorRT and run by a lean NumPy runtime.

- `qwen2vl_edge.runtime`: numpy + onnxruntime only (the base install).
- `qwen2vl_edge.export`: torch side, the `[export]` extra.
"""

__version__ = "0.1.0"
