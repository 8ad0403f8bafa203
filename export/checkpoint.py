"""Read a Hugging Face Qwen2-VL checkpoint: config, shards, weights one tensor at a time as fp32 NumPy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from qwen2vl_edge.runtime.config import ConfigError, ModelConfig, load_config

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

    def _keys(self, shard: str) -> list[str]:
        from safetensors import safe_open

        with safe_open(str(self.dir / shard), framework="pt") as f:
            return list(f.keys())

    @property
    def shards(self) -> list[str]:
        return sorted({shard for shard, _ in self._where.values()})

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> np.ndarray:
        """One tensor as float32 NumPy (bf16/fp16 upcast); only that tensor is read from disk."""
        from safetensors import safe_open

        if name not in self._where:
            raise KeyError(f"weight {name!r} not found in {self.dir}")
        shard, key = self._where[name]
        if shard not in self._open:  # safe_open maps the file; tensors are read one at a time
            self._open[shard] = safe_open(str(self.dir / shard), framework="pt")
        return self._open[shard].get_tensor(key).float().numpy()

    def lm_head_name(self) -> str:
        """The output projection's weight: the embedding itself when tied."""
        if self.config.tie_word_embeddings or "lm_head.weight" not in self:
            return "model.embed_tokens.weight"
        return "lm_head.weight"

    def close(self) -> None:
        self._open.clear()
