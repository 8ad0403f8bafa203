"""Qwen2-VL rotary positions in NumPy: 3-D M-RoPE ids for the decoder, 2-D tables for the vision encoder, and
the window layout of Qwen2.5-VL's vision encoder: whatever follows from a grid is computed here, on the host."""

from __future__ import annotations

import numpy as np

from .config import ModelConfig, VisionConfig
from .errors import InputError

TEXT, IMAGE, VIDEO = 0, 1, 2
SECONDS = "second_per_grid_ts"  # the grids' iterator of each video's seconds per temporal group


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


def _vision_positions(start: int, grid: np.ndarray, merge: int, interval: np.float32 | None = None) -> np.ndarray:
    """[3, t*h*w/merge^2]: temporal, height, width ids of one image/video, offset by `start`. `interval`: the
    temporal id step of a timed video (Qwen2.5-VL), floor(k * interval) computed in float32 as transformers
    does; None: one per frame group."""
    t, h, w = int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge
    temporal = np.arange(t) if interval is None else (np.arange(t, dtype=np.float32) * interval).astype(np.int64)
    tt, hh, ww = np.meshgrid(temporal, np.arange(h), np.arange(w), indexing="ij")
    return np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + start


def video_interval(config: ModelConfig, seconds) -> np.float32 | None:
    """Temporal id step of the next video, whose frame groups are next(`seconds`) apart: tokens_per_second *
    second_per_grid_t in float32 (transformers multiplies the processor's float32 tensor); None where the family
    steps one id per group (Qwen2-VL, Qwen3-VL), which consumes nothing."""
    if not config.family.timed_video:
        return None
    return np.float32(config.vision.tokens_per_second) * np.float32(next(seconds))


def segment_positions(ids: np.ndarray, grids: dict, config: ModelConfig, start: int = 0) -> np.ndarray:
    """M-RoPE ids [3, n] of one row's real tokens `ids` [n], the first text token at `start`.

    Text advances all three rows by one per token; an image/video of grid (t, h, w) takes
    t*h*w/merge^2 tokens laid out on its (t, h/merge, w/merge) grid, and the text after it
    resumes at start + max(h, w)/merge (transformers' rule). `grids`: {IMAGE: iterator, VIDEO: iterator}
    of (t, h, w) and, for videos, {SECONDS: iterator} of second_per_grid_ts, consumed in order (grid_iterators).
    A Qwen3-VL video is one run per frame group, each with its one-group grid (1, h, w), so each group's
    temporal id is where its run starts, and its text (the timestamp) after it resumes at start + max(h, w)/merge.
    A later chat turn continues at the cache's next position.
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
        interval = video_interval(config, grids[SECONDS]) if kind == VIDEO else None
        p = _vision_positions(pos, grid, merge, interval)
        if p.shape[1] != e - s:
            raise InputError(
                f"{names[kind]} grid {tuple(int(g) for g in grid)} needs {p.shape[1]} placeholder tokens, "
                f"input_ids has {e - s}"
            )
        pieces.append(p)
        pos += max(int(grid[1]), int(grid[2])) // merge
    return np.concatenate(pieces, axis=1).astype(np.int64) if pieces else np.zeros((3, 0), np.int64)


def video_runs(grid, config: ModelConfig) -> int:
    """How many placeholder runs a video of `grid` (t, h, w) takes: one per frame group where the family writes
    a timestamp before each (Qwen3-VL), else one."""
    return int(grid[0]) if config.family.frame_timestamps else 1


def frame_grids(video_grid_thw: np.ndarray, config: ModelConfig) -> np.ndarray:
    """[N, 3] video grids -> one grid per placeholder run: (1, h, w) per frame group for frame-timestamp families
    (transformers' Qwen3-VL get_rope_index splits video_grid_thw so), unchanged otherwise."""
    grids = np.asarray(video_grid_thw).reshape(-1, 3)
    runs_per = [video_runs(g, config) for g in grids]
    split = np.repeat(grids, runs_per, axis=0)
    if config.family.frame_timestamps:
        split[:, 0] = 1
    return split


def grid_iterators(image_grid_thw: np.ndarray | None, video_grid_thw: np.ndarray | None, config: ModelConfig,
                   second_per_grid_ts: np.ndarray | None = None) -> dict:
    """Without second_per_grid_ts a video's groups are a second apart (transformers' get_rope_index default)."""
    videos = np.zeros((0, 3)) if video_grid_thw is None else np.asarray(video_grid_thw)
    seconds = np.ones(len(videos)) if second_per_grid_ts is None else np.asarray(second_per_grid_ts)
    return {IMAGE: iter(np.zeros((0, 3)) if image_grid_thw is None else np.asarray(image_grid_thw)),
            VIDEO: iter(frame_grids(videos, config)), SECONDS: iter(seconds)}


def get_rope_index(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    image_grid_thw: np.ndarray | None,
    video_grid_thw: np.ndarray | None,
    config: ModelConfig,
    second_per_grid_ts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """input_ids [B, L] -> position_ids int64 [3, B, L], rope_deltas int64 [B, 1].

    Rows start at 0 (see segment_positions); padding (mask 0) gets position 0.
    """
    input_ids = np.asarray(input_ids)
    B, L = input_ids.shape
    mask = np.ones((B, L), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = grid_iterators(image_grid_thw, video_grid_thw, config, second_per_grid_ts)
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


def _patch_grid(h: int, w: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column [h*w] of each patch of an h x w grid in patch order: m x m merge blocks adjacent, row-major."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return tuple(a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).ravel() for a in (rows, cols))


def vision_rotary(grid_thw: tuple[int, int, int], vision: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32 [h*w, head_dim] for one frame of a grid, in patch order (merge blocks adjacent).

    Frames of a video share the table, which is why the encoder takes it per frame.
    """
    _, h, w = grid_thw
    hpos, wpos = _patch_grid(h, w, vision.spatial_merge_size)
    half = vision.head_dim // 2
    inv_freq = np.float32(1.0) / (np.float32(vision.rope_theta) ** (np.arange(0, half, 2, dtype=np.float32) / half))
    freqs = np.concatenate([hpos[:, None].astype(np.float32) * inv_freq, wpos[:, None].astype(np.float32) * inv_freq],
                           axis=1)
    emb = np.concatenate([freqs, freqs], axis=1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def vision_windows(grid_thw: tuple[int, int, int], vision: VisionConfig) -> dict[str, np.ndarray]:
    """Qwen2.5-VL's window layout of one frame of a grid, as the encoder's gathers take it:

    window_index int64 [W, P]: the patch (patch order, as vision_rotary's) in each window slot; a slot past the
        grid's edge holds patch 0 and is never a key nor read out;
    window_mask float32 [W, P]: 1 for a patch, 0 for such a pad slot (the key mask of every block);
    window_inverse int64 [h*w]: where each patch sits in the flattened [W * P] layout (the gather back).

    A window is window_merged x window_merged merged tokens, P = window_merged^2 * merge^2 patches, merge blocks
    kept whole. Windows tile the merged grid from its top-left corner, the last row and column cut by its edge;
    transformers' get_window_index orders the same windows the same way (its extra all-pad window when a side
    divides evenly has no patch and is not made here). Frames of a video share the layout.
    """
    _, h, w = grid_thw
    m, ws = vision.spatial_merge_size, vision.window_merged
    hm, wm = h // m, w // m
    nh, nw = -(-hm // ws), -(-wm // ws)
    merged = np.full((nh * ws, nw * ws), -1, np.int64)
    merged[:hm, :wm] = np.arange(hm * wm).reshape(hm, wm)
    merged = merged.reshape(nh, ws, nw, ws).transpose(0, 2, 1, 3).reshape(nh * nw, ws * ws)  # [W, ws^2]
    valid = np.repeat(merged >= 0, m * m, axis=1)  # [W, P]: a merge block's patches are adjacent
    index = np.where(valid, np.repeat(merged, m * m, axis=1) * m * m + np.tile(np.arange(m * m), ws * ws), 0)
    inverse = np.empty(h * w, np.int64)
    inverse[index[valid]] = np.flatnonzero(valid)
    return {"window_index": index, "window_mask": valid.astype(np.float32), "window_inverse": inverse}


def _axis_taps(n: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """The 2 taps [n, 2] into a `side`-long table axis of each of n positions, and their weights [n, 2] float32:
    bilinear with align_corners=True (the ends map onto the table's ends), computed in float32 as transformers'
    _interpolation_axis_taps_weights does, so the weights are the same floats."""
    src = np.arange(n, dtype=np.float32) * np.float32(side - 1) / np.float32(max(n - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    weights = np.maximum(np.float32(1) - np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32)), 0)
    return taps, weights.astype(np.float32)


def vision_pos_taps(grid_thw: tuple[int, int, int], vision: VisionConfig) -> dict[str, np.ndarray]:
    """Qwen3-VL's learned side x side position table resampled to one frame of a grid, as 4 bilinear taps a patch:

    pos_index int64 [h*w, 4]: rows of the flattened table (row * side + column), taps (top, left), (top, right),
        (bottom, left), (bottom, right);
    pos_weight float32 [h*w, 4]: their weights (the products of the two axes' weights; they sum to 1).

    Patches in patch order (merge blocks adjacent, as vision_rotary's); frames of a video share them. The encoder's
    position embedding is sum_k table[pos_index[:, k]] * pos_weight[:, k] (transformers'
    get_vision_interpolation_indices_and_weights, bilinear, align_corners=True).
    """
    _, h, w = grid_thw
    side = vision.pos_table_side
    rows, cols = _patch_grid(h, w, vision.spatial_merge_size)
    (h_taps, h_weights), (w_taps, w_weights) = _axis_taps(h, side), _axis_taps(w, side)
    index = h_taps[rows][:, :, None] * side + w_taps[cols][:, None, :]  # [S, 2, 2]
    weight = h_weights[rows][:, :, None] * w_weights[cols][:, None, :]
    return {"pos_index": index.reshape(-1, 4), "pos_weight": weight.reshape(-1, 4)}


def vision_inputs(grid_thw: tuple[int, int, int], config: ModelConfig) -> dict[str, np.ndarray]:
    """Everything the vision encoder takes besides the pixels for one grid, by graph input name."""
    cos, sin = vision_rotary(grid_thw, config.vision)
    feeds = {"rotary_cos": cos, "rotary_sin": sin}
    if config.family.windowed:
        feeds.update(vision_windows(grid_thw, config.vision))
    if config.family.pos_table:
        feeds.update(vision_pos_taps(grid_thw, config.vision))
    return feeds
