"""The one interface the generation loop talks to; a backend is ONNX Runtime, TensorRT, ..."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from ..errors import InputError


class Backend(Protocol):
    """Runs the three graphs. The KV cache is opaque to the loop and stays wherever the backend keeps it."""

    name: str
    hidden_size: int
    graph_seconds: float | None  # cumulative time inside graph runs; None where execution is asynchronous

    def prefill_chunk(self, batch: int) -> int | None:
        """Prompt positions per decoder run at prefill for `batch` rows (bounds what a run holds in host
        memory); None: the whole prompt in one run."""

    def check_request(self, inputs: dict, max_new_tokens: int) -> None:
        """Raise InputError before running when the request exceeds what this backend was built for."""

    def vision(self, pixel_values: np.ndarray, grid_inputs: dict[str, np.ndarray]) -> Any:
        """[F, S, patch_dim] and the grid's other encoder inputs by name (runtime/rope.py: vision_inputs; rotary
        tables [S, hd], and the window layout or position-table taps where the family has them) -> merged features
        [F, S / merge^2, hidden] (backend-native: a host array, or device memory); with DeepStack (K =
        len(deepstack_visual_indexes) > 0) the pair (those, the DeepStack features [K, F, S / merge^2, hidden])."""

    def join(self, features: list) -> Any:
        """What `vision` returned per image / video, in prompt order -> the merger's [M, hidden] input
        (backend-native); for DeepStack models the pair (vision_embeds [M, hidden], deepstack [K, M, hidden])."""

    def merge(self, input_ids: np.ndarray, vision_embeds: Any) -> Any:
        """[B, L] ids + [M, hidden] features (what `join` returned, or a host array) -> inputs_embeds
        [B, L, hidden] (backend-native). DeepStack models: what `join` returned (a bare [0, hidden] array at decode
        steps) -> an object `decode` takes that slices as the embeddings do ([:, a:b]: embeddings and visual_index
        sliced, the DeepStack features kept whole; generation.prefill_chunks)."""

    def new_cache(self, batch: int, reserve: int = 0) -> Any:
        """An empty KV cache (past length 0) for `batch` rows; `reserve`: positions the request will fill
        (prompt + max_new_tokens), for backends that preallocate."""

    def reserve(self, cache: Any, positions: int) -> Any:
        """The cache (holding P positions) with room for `positions` in all, for a chat session's next turn
        (P + new tokens + max_new_tokens); backends whose cache grows by itself return it unchanged."""

    def cache_bytes(self, cache: Any) -> int:
        """Memory the cache holds (host or device, where the backend keeps it), its unused room included."""

    def decode(self, inputs_embeds: Any, attention_mask: np.ndarray, position_ids: np.ndarray,
               cache: Any) -> tuple[np.ndarray, Any]:
        """One decoder run over L new positions after the P the cache holds (P = 0: prefill; L = 1: a decode
        step; both > 0: a chat session's next turn) -> (last-position logits [B, vocab] float32, the cache
        grown by L)."""


def split_joined(joined: Any, layers: int) -> tuple[Any, Any]:
    """join's output -> (vision_embeds [M, hidden], deepstack [K, M, hidden] or None). A bare [M, hidden] array is
    what a model without DeepStack joins, and what decode steps pass (M = 0); a DeepStack model's K features are
    then those of no vision token."""
    if isinstance(joined, tuple):
        main, deepstack = joined
        if layers and tuple(deepstack.shape[:2]) != (layers, main.shape[0]):
            raise InputError(f"DeepStack features of shape {tuple(deepstack.shape)} do not match {main.shape[0]} "
                             f"vision tokens and {layers} DeepStack layers: pass join()'s pair as it came")
        return joined
    if layers and joined.shape[0]:
        raise InputError(f"this model adds DeepStack features after {layers} decoder layers: merge needs join()'s "
                         f"(vision_embeds, deepstack) pair, got {joined.shape[0]} vision tokens without them")
    return joined, None
