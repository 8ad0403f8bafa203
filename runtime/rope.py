"""Qwen2-VL rotary positions in NumPy: 3-D M-RoPE ids for the decoder, 2-D tables for the vision encoder."""

from __future__ import annotations

import numpy as np

from .config import ModelConfig, VisionConfig
from .errors import InputError

TEXT, IMAGE, VIDEO = 0, 1, 2


def token_types(input_ids: np.ndarray, config: ModelConfig) -> np.ndarray:
    """TEXT / IMAGE / VIDEO per token (transformers' mm_token_type_ids)."""
    ids = np.asarray(input_ids)
    return np.where(ids == config.image_token_id, IMAGE, np.where(ids == config.video_token_id, VIDEO, TEXT))


def runs(types: np.ndarray) -> list[tuple[int, int, int]]:
    """(type, start, end) of each run of equal values."""
    if len(types) == 0:
        return []
    edges = np.flatnonzero(np.diff(types)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [len(types)]])
    return [(int(types[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def _vision_positions(start: int, grid: np.ndarray, merge: int) -> np.ndarray:
    """[3, t*h*w/merge^2]: temporal, height, width ids of one image/video, offset by `start`."""
    t, h, w = int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + start


def segment_positions(ids: np.ndarray, grids: dict, config: ModelConfig, start: int = 0) -> np.ndarray:
    """M-RoPE ids [3, n] of one row's real tokens `ids` [n], the first text token at `start`.

    Text advances all three rows by one per token; an image/video of grid (t, h, w) takes
    t*h*w/merge^2 tokens laid out on its (t, h/merge, w/merge) grid, and the text after it
    resumes at start + max(h, w)/merge (transformers' rule). `grids`: {IMAGE: iterator, VIDEO: iterator}
    of (t, h, w), consumed in order. A later chat turn continues at the cache's next position.
    """
    merge = config.vision.spatial_merge_size
    names = {IMAGE: "image", VIDEO: "video"}
    pieces, pos = [], start
    for kind, s, e in runs(token_types(ids, config)):
        if kind == TEXT:
            pieces.append(np.broadcast_to(np.arange(e - s) + pos, (3, e - s)))
            pos += e - s
            continue
        grid = next(grids[kind], None)
        if grid is None:
            raise InputError(f"more {names[kind]} placeholder runs in input_ids than {names[kind]} grids")
        p = _vision_positions(pos, grid, merge)
        if p.shape[1] != e - s:
            raise InputError(
                f"{names[kind]} grid {tuple(int(g) for g in grid)} needs {p.shape[1]} placeholder tokens, "
                f"input_ids has {e - s}"
            )
        pieces.append(p)
        pos += max(int(grid[1]), int(grid[2])) // merge
    return np.concatenate(pieces, axis=1).astype(np.int64) if pieces else np.zeros((3, 0), np.int64)


def grid_iterators(image_grid_thw: np.ndarray | None, video_grid_thw: np.ndarray | None) -> dict:
    return {IMAGE: iter(np.zeros((0, 3)) if image_grid_thw is None else np.asarray(image_grid_thw)),
            VIDEO: iter(np.zeros((0, 3)) if video_grid_thw is None else np.asarray(video_grid_thw))}


def get_rope_index(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    image_grid_thw: np.ndarray | None,
    video_grid_thw: np.ndarray | None,
    config: ModelConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """input_ids [B, L] -> position_ids int64 [3, B, L], rope_deltas int64 [B, 1].

    Rows start at 0 (see segment_positions); padding (mask 0) gets position 0.
    """
    input_ids = np.asarray(input_ids)
    B, L = input_ids.shape
    mask = np.ones((B, L), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = grid_iterators(image_grid_thw, video_grid_thw)
    position_ids = np.zeros((3, B, L), np.int64)
    deltas = np.zeros((B, 1), np.int64)
    for b in range(B):
        ids = input_ids[b][mask[b]]
        llm = segment_positions(ids, grids, config)
        position_ids[:, b, mask[b]] = llm
        deltas[b, 0] = (llm.max() + 1 - len(ids)) if llm.size else 0
    return position_ids, deltas


def decode_positions(real_lengths: np.ndarray, rope_deltas: np.ndarray) -> np.ndarray:
    """Positions [3, B, 1] of the next token: tokens already in the cache (padding excluded) + delta."""
    pos = np.asarray(real_lengths, np.int64).reshape(-1, 1) + np.asarray(rope_deltas, np.int64).reshape(-1, 1)
    return np.broadcast_to(pos[None], (3, *pos.shape)).copy()


def vision_rotary(grid_thw: tuple[int, int, int], vision: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32 [h*w, head_dim] for one frame of a grid, in patch order (merge blocks adjacent).

    Frames of a video share the table, which is why the encoder takes it per frame.
    """
    _, h, w = grid_thw
    m = vision.spatial_merge_size
    hpos, wpos = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    hpos = hpos.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).ravel()
    wpos = wpos.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).ravel()
    half = vision.head_dim // 2
    inv_freq = np.float32(1.0) / (np.float32(vision.rope_theta) ** (np.arange(0, half, 2, dtype=np.float32) / half))
    freqs = np.concatenate([hpos[:, None].astype(np.float32) * inv_freq, wpos[:, None].astype(np.float32) * inv_freq],
                           axis=1)
    emb = np.concatenate([freqs, freqs], axis=1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)
