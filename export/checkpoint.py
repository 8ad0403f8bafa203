"""Read a Hugging Face Qwen2-VL checkpoint: config, shards, weights one tensor at a time as fp32 NumPy; the linear
layers of GPTQ / AWQ checkpoints as their quantized integers (export/prequantized.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qwen2vl_edge.runtime.config import ConfigError, ModelConfig, load_config

from .prequantized import TENSORS, QuantizedWeight, QuantScheme, read_scheme, unpack

# Checkpoint key prefixes seen across savers -> the original layout's names.
KEY_PREFIXES = (
    ("model.language_model.", "model."),
    ("model.visual.", "visual."),
)


def canonical_key(key: str) -> str:
    for old, new in KEY_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


class Checkpoint:
    """Lazy access to the weights of a checkpoint dir; tensors are read from their shard on demand."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise ConfigError(f"checkpoint directory not found: {self.dir}")
        self.config: ModelConfig = load_config(self.dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.dir / "model.safetensors").is_file():
            weight_map = {k: "model.safetensors" for k in self._keys("model.safetensors")}
        else:
            raise ConfigError(f"{self.dir} has no model.safetensors nor model.safetensors.index.json")
        self._where = {canonical_key(k): (shard, k) for k, shard in weight_map.items()}
        self._open: dict[str, object] = {}
        self.quant: QuantScheme | None = self._quant_scheme()

    def _quant_scheme(self) -> QuantScheme | None:
        """How the linears were quantized by the publisher (None: float); only decoder layers may be."""
        config = json.loads((self.dir / "config.json").read_text())
        qc = config.get("quantization_config")
        if qc is None and (self.dir / "quantize_config.json").is_file():  # AutoGPTQ's own file
            qc = json.loads((self.dir / "quantize_config.json").read_text())
        packed = sorted(k for k in self._where if k.endswith(".qweight"))
        if any(k.endswith((".q_weight", ".q_invperm")) for k in self._where):
            raise ConfigError(f"{self.dir} holds exllama v2 (EXL2) tensors (q_weight, q_invperm): not supported; "
                              "export from a GPTQ, AWQ GEMM or float checkpoint")
        if qc is None:
            if packed:
                raise ConfigError(f"{self.dir} has quantized tensors ({packed[0]}) but no quantization_config in "
                                  "config.json")
            return None
        scheme = read_scheme(qc)
        outside = [k for k in packed if not k.startswith("model.layers.")]
        if outside:
            raise ConfigError(f"{outside[0]}: only the decoder layers' linears may be quantized (the vision tower "
                              "and lm_head must stay float, as in the published Qwen2-VL GPTQ/AWQ checkpoints)")
        return scheme

    def _keys(self, shard: str) -> list[str]:
        from safetensors import safe_open

        with safe_open(str(self.dir / shard), framework="pt") as f:
            return list(f.keys())

    @property
    def shards(self) -> list[str]:
        return sorted({shard for shard, _ in self._where.values()})

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _tensor(self, name: str):
        from safetensors import safe_open

        if name not in self._where:
            raise KeyError(f"weight {name!r} not found in {self.dir}")
        shard, key = self._where[name]
        if shard not in self._open:  # safe_open maps the file; tensors are read one at a time
            self._open[shard] = safe_open(str(self.dir / shard), framework="pt")
        return self._open[shard].get_tensor(key)

    def get(self, name: str) -> np.ndarray:
        """One tensor as float32 NumPy (bf16/fp16 upcast); only that tensor is read from disk."""
        return self._tensor(name).float().numpy()

    def linear(self, name: str) -> np.ndarray | QuantizedWeight:
        """The weight [out, in] of linear layer `name`: float32, or the checkpoint's own quantized integers."""
        if f"{name}.qweight" not in self:
            return self.get(f"{name}.weight")
        packed = {t: self._tensor(f"{name}.{t}") for t in TENSORS if f"{name}.{t}" in self}
        # int32 words kept as they are; scales (fp16, sometimes bf16) widened exactly to fp32
        packed = {t: v.float().numpy() if v.is_floating_point() else v.numpy() for t, v in packed.items()}
        return unpack(self.quant, packed, name)

    def lm_head_name(self) -> str:
        """The output projection's weight: the embedding itself when tied."""
        if self.config.tie_word_embeddings or "lm_head.weight" not in self:
            return "model.embed_tokens.weight"
        return "lm_head.weight"

    def close(self) -> None:
        self._open.clear()
