"""Host memory of one request, estimated before any graph runs, and the memory there is to run it in.

Plain data: the request's shapes (batch, prompt length, new tokens, vision grids), the model config and
the export settings (graph target, KV-cache kind, logits) -> bytes at the peak of each stage. A request
whose peak exceeds what is available (MemAvailable, the cgroup's limit, an explicit `memory_limit`)
is refused with the option that would make it fit, instead of an allocation error from inside ONNX
Runtime or the kernel's OOM killer.

What dominates is attention: the graphs of some targets hold fp32 scores [rows, heads, queries, keys].
How each target's graphs hold them is a table (ATTENTION), so a target with fused attention (no S x S
tensor) is one more row. The estimate covers host memory with ONNX Runtime on the CPU; TensorRT engines
have their own limits (backends/trt_profiles.py) and GPU memory is not estimated here.
"""

from __future__ import annotations

import ctypes
import gc
import os
from dataclasses import dataclass
from pathlib import Path

from .backends.onnxruntime import BOUNDED_FROM
from .backends.trt_memory import kv_cache_bytes
from .backends.trt_profiles import CONCAT, PREALLOCATED
from . import checks
from .config import ModelConfig
from .errors import ConfigError, MemoryShortage

F32 = 4
GB = 1e9

# fp32 [rows, heads, queries, keys] tensors alive at the peak of one attention. Measured with onnxruntime 1.32
# (benchmarks/memory_estimate.py, docs/cpu.md): the vision encoder's MatMul -> Mul -> Softmax peaked at 1.3 of them,
# the portable decoder's MatMul -> Mul -> Add(mask) -> Softmax at 2.7, GroupQueryAttention at none (its mask
# bias is counted apart). Each kind is rounded up.
SOFTMAX = 2  # scores and probabilities
MASKED_SOFTMAX = 3  # scores, masked scores and probabilities
FUSED = 0  # no S x S tensor (ONNX Runtime's CPU GroupQueryAttention, MultiHeadAttention's flash attention)
ATTENTION = {  # target -> graph -> how its attention holds the scores (export/vision.py, export/decoder.py)
    "portable": {"vision": SOFTMAX, "decoder": MASKED_SOFTMAX},
    "ort-cpu": {"vision": FUSED, "decoder": FUSED},
    # run by ONNX Runtime: 10.3's explicit attention as portable's; 10.15's ONNX Attention still allocates every
    # head's scores inside ONNX Runtime's CPU kernel (2B-shape vision, 9,216 patches, fp16: 7.6 GB above the
    # weights, 1.4 fp32 score tensors; benchmarks/vision_memory.py, docs/benchmarks.md)
    "tensorrt": {"vision": SOFTMAX, "decoder": MASKED_SOFTMAX},
}
# target -> how its decoder keeps the cache (tensorrt: concat for 10.3, the default; preallocated from 10.15)
KV_CACHE = {"portable": CONCAT, "ort-cpu": PREALLOCATED, "tensorrt": CONCAT}
# fp32 activations alive besides attention, in units of one [tokens, width] row set: the residual stream,
# the norm output, q/k/v and their rotations; the MLP's hidden width counted separately (fc1 / gate, up,
# the activation's intermediates). The vision encoder's, measured at Qwen2-VL-2B's widths (MLP 4 widths of
# embed_dim; 2026-11-26, onnxruntime 1.32; docs/cpu.md, benchmarks/results/vision-memory-photo.json): 26-30 a patch
# in the shared arena with buffer reuse (images under BOUNDED_FROM patches), 11 + 6 x 4 = 35; 8.9-11.3 in the
# session large images get, without either (backends/onnxruntime.py), 4 + 2 x 4 = 12.
VISION_WIDTHS = {False: (11, 6), True: (4, 2)}  # bounded session? -> (widths, MLP widths)
DECODER_WIDTHS, DECODER_MLP_WIDTHS = 6, 4


@dataclass(frozen=True)
class RequestShape:
    batch: int
    prompt_len: int  # L, padded
    max_new_tokens: int
    grids: tuple[tuple[int, int, int], ...]  # (t, h, w) in patches of each image / video: one encoder run each

    @classmethod
    def of(cls, inputs: dict, max_new_tokens: int) -> "RequestShape":
        grids = [tuple(int(x) for x in g) for key in ("image_grid_thw", "video_grid_thw") for g in inputs.get(key, [])]
        batch, length = inputs["input_ids"].shape
        return cls(int(batch), int(length), int(max_new_tokens), tuple(grids))


@dataclass(frozen=True)
class Estimate:
    stages: dict[str, int]  # bytes at the peak of each stage: inputs + what the stage adds
    largest_grid: tuple[int, int, int] | None  # the vision run that peaks

    @property
    def peak(self) -> int:
        return max(self.stages.values())

    @property
    def stage(self) -> str:
        return max(self.stages, key=self.stages.get)


def _listed(target: str | None, graph: str) -> int:
    return ATTENTION.get(target, ATTENTION["portable"])[graph]  # an unknown target: the costliest kind


def _attention(target: str, graph: str) -> int:
    kind = _listed(target, graph)
    if graph == "vision" and kind == FUSED and flash_attention_disabled():
        return SOFTMAX  # MultiHeadAttention through its full score matrix (1.1 of them measured, rounded up)
    return kind


def flash_attention_disabled() -> bool:
    """ONNX Runtime's switch for its CPU MultiHeadAttention's flash path, read when a session is made: set, the
    vision encoder holds every head's scores again (onnxruntime 1.32, S = 8,192, 2 heads: +557 MB, not 10 MB).
    ONNX Runtime parses it as a bool: "1" or "true"."""
    return os.environ.get("ORT_DISABLE_FLASH_ATTENTION", "").strip().lower() in ("1", "true")


def vision_bytes(cfg: ModelConfig, target: str, grid: tuple[int, int, int]) -> int:
    """The encoder's peak for one image / video grid: frames are a batch, attention runs within a frame."""
    v = cfg.vision
    frames, patches = grid[0], grid[1] * grid[2]  # F temporal slices of S patches
    scores = _attention(target, "vision") * frames * v.num_heads * patches * patches
    rows, mlp_rows = VISION_WIDTHS[frames * patches >= BOUNDED_FROM]
    widths = rows * v.embed_dim + mlp_rows * v.mlp_dim
    return F32 * (scores + frames * patches * widths)


def prefill_bytes(cfg: ModelConfig, export: dict, req: RequestShape, chunk: int | None = None) -> int:
    """The decoder's run over the prompt, besides the cache: scores, mask bias, activations, logits. The prompt
    runs `chunk` positions at a time (generation.prefill_chunks; None: all at once): what a run holds scales
    with its C positions against the T it attends to. Each run hands its arena's free regions back when it ends
    (backends/onnxruntime.py), so a chunk does not find the previous one's smaller buffers still held."""
    t, B, L = cfg.text, req.batch, req.prompt_len
    C = min(L, chunk or L)
    T = export.get("max_context") or L  # keys attended to: the whole buffer where the graphs fix its length
    kind = _attention(export.get("target", "portable"), "decoder")
    scores = kind * B * t.num_attention_heads * C * T
    # tensorrt 10.3 tiles its fp32 bias over the query heads sharing a kv head (export/decoder.py: _mask_bias)
    groups = t.num_attention_heads // t.num_key_value_heads if export.get("min_tensorrt") == "10.3" else 1
    mask = B * groups * C * T * 1.25 + groups * C * T / 4  # fp32 bias [B, 1, (groups*) C, T], its bool masks
    if kind == FUSED:  # GroupQueryAttention's probabilities, [C, T] at a time (tiny ort-cpu, 4,359 tokens in
        mask += B * C * T  # chunks of 2,048: 70 MB measured, 65 estimated without them)
    widths = DECODER_WIDTHS * t.hidden_size + DECODER_MLP_WIDTHS * t.intermediate_size
    logits = B * (C if export.get("logits") == "all" else 1) * t.vocab_size
    return int(F32 * (scores + mask + B * C * widths + logits))


def estimate(cfg: ModelConfig, export: dict, req: RequestShape, chunk: int | None = None) -> Estimate:
    """Peak bytes of each stage of one request on ONNX Runtime (CPU); `chunk`: the backend's prefill_chunk."""
    t, B, L = cfg.text, req.batch, req.prompt_len
    m2 = cfg.vision.spatial_merge_size ** 2
    patches = sum(g[0] * g[1] * g[2] for g in req.grids)
    inputs = F32 * patches * cfg.vision.patch_dim + 8 * 5 * B * L  # pixel patches, ids, mask, positions
    deepstack = len(cfg.vision.deepstack_visual_indexes)  # K more features a vision token, a visual_index per token
    features = F32 * (patches // m2) * t.hidden_size * (1 + deepstack)
    target, total = export.get("target", "portable"), L + req.max_new_tokens
    largest = max(req.grids, key=lambda g: vision_bytes(cfg, target, g)) if req.grids else None
    stages = {"vision": inputs + features + (vision_bytes(cfg, target, largest) if largest else 0)}
    embeds = F32 * B * L * t.hidden_size + (8 * B * L if deepstack else 0)
    dtype, kind = export.get("compute_dtype", "fp32"), export.get("kv_cache", CONCAT)  # fp16 weights: fp32 cache
    # concat: past and present both alive in a step; preallocated: one buffer of L + max_new_tokens from the start,
    # or of the length the graphs fix (tensorrt from 10.15)
    cache_decode = kv_cache_bytes(cfg, B, export.get("max_context") or total, dtype, kind)
    cache_prefill = cache_decode if kind == PREALLOCATED else kv_cache_bytes(cfg, B, L, dtype, PREALLOCATED)
    stages["prefill"] = inputs + features + embeds + cache_prefill + prefill_bytes(cfg, export, req, chunk)
    stages["decode"] = inputs + cache_decode + F32 * B * t.vocab_size * 2
    return Estimate({k: int(v) for k, v in stages.items()}, largest)


# -- what there is ------------------------------------------------------------------------------------

def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        text = Path(path).read_text()
    except OSError:
        return None  # not Linux: the other sources (or none) decide
    for line in text.splitlines():
        fields = line.split()
        if fields[:1] == ["MemAvailable:"] and len(fields) > 1 and fields[1].isdigit():
            return int(fields[1]) * 1024
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _cgroup_available(root: str = "/sys/fs/cgroup", self_cgroup: str = "/proc/self/cgroup") -> int | None:
    """limit - usage of this process's cgroup (v2, or v1's memory controller), page cache it may reclaim
    (inactive_file) counted as free."""
    try:
        lines = Path(self_cgroup).read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, rel = line.split(":", 2)
        if controllers == "":  # v2
            d = Path(root) / rel.lstrip("/")
            limit, usage, stat = d / "memory.max", d / "memory.current", d / "memory.stat"
        elif "memory" in controllers.split(","):
            d = Path(root) / "memory" / rel.lstrip("/")
            limit, usage, stat = d / "memory.limit_in_bytes", d / "memory.usage_in_bytes", d / "memory.stat"
        else:
            continue
        lim, used = _read_int(limit), _read_int(usage)
        if lim is None or used is None or lim >= 1 << 60:  # v1 writes "no limit" as a huge number
            continue
        return lim - used + _inactive_file(stat)
    return None


def _inactive_file(stat: Path) -> int:
    try:
        text = stat.read_text()
    except OSError:
        return 0  # no stat file: no page cache counted as free (the safe side)
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key in ("inactive_file", "total_inactive_file") and value.strip().isdigit():
            return int(value)
    return 0


def available(limit: int | None = None) -> tuple[int | None, str]:
    """(bytes a request may still allocate, where that figure comes from); None: unknown."""
    sources = [(limit, "memory_limit"), (_cgroup_available(), "the cgroup's memory limit"),
               (_meminfo_available(), "MemAvailable")]
    known = [(b, name) for b, name in sources if b is not None]
    return min(known) if known else (None, "")


# -- the check ------------------------------------------------------------------------------------------

def _largest(fits, lo: int, hi: int) -> int | None:
    """The largest n in [lo, hi] with fits(n) (fits is monotone), or None."""
    if not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _with_grid(req: RequestShape, old, new, merge2: int) -> RequestShape:
    """The request with one vision grid replaced: its placeholder tokens in the prompt change with it."""
    grids = list(req.grids)
    grids[grids.index(old)] = new
    tokens = lambda g: g[0] * g[1] * g[2] // merge2  # noqa: E731
    return RequestShape(req.batch, req.prompt_len - tokens(old) + tokens(new), req.max_new_tokens, tuple(grids))


def _fixes(cfg: ModelConfig, export: dict, req: RequestShape, est: Estimate, budget: int,
           chunk: int | None) -> list[str]:
    fits = lambda r, e=export: estimate(cfg, e, r, chunk).peak <= budget  # noqa: E731
    fixes = []
    if est.stage in ("vision", "prefill") and est.largest_grid:  # smaller images: fewer patches and tokens
        t, h, w = est.largest_grid
        unit = cfg.vision.spatial_merge_size ** 2  # patches come in merge x merge blocks
        side = lambda n: (t, 1, n * unit)  # noqa: E731  (the pixel count is what matters, not the aspect)
        n = _largest(lambda k: fits(_with_grid(req, est.largest_grid, side(k), unit)), 1, h * w // unit)
        if n:
            patch = cfg.vision.patch_size ** 2
            fixes.append(f"max_pixels={n * unit * patch} (this {'video' if t > 1 else 'image'} has "
                         f"{h * w * patch} pixels per frame after resizing)")
    if est.stage == "decode" or est.stages["decode"] > budget:
        n = _largest(lambda k: fits(RequestShape(req.batch, req.prompt_len, k, req.grids)), 1, req.max_new_tokens)
        if n:
            fixes.append(f"max_new_tokens={n}")
    if est.stage == "prefill":
        fixes.append("a shorter prompt")
    if est.stage == "vision" and _listed(export.get("target"), "vision") == FUSED and flash_attention_disabled():
        fixes.append("ORT_DISABLE_FLASH_ATTENTION unset (it makes ONNX Runtime's MultiHeadAttention hold every "
                     "head's scores)")
    for target in ATTENTION:
        if target != export.get("target") and fits(req, _export_for(export, target)):
            fixes.append(f"an export with --target {target} (needs about "
                         f"{estimate(cfg, _export_for(export, target), req, chunk).peak / GB:.1f} GB)")
    return fixes


def _export_for(export: dict, target: str) -> dict:
    return {**export, "target": target, "kv_cache": KV_CACHE[target], "max_context": None,
            "min_tensorrt": "10.3" if target == "tensorrt" else None}


def check(cfg: ModelConfig, export: dict, inputs: dict, max_new_tokens: int, limit: int | None = None,
          chunk: int | None = None) -> Estimate:
    """Raise MemoryShortage (an InputError) when the request's estimated peak exceeds the memory available to
    it; `chunk`: the backend's prefill_chunk."""
    check_limit(limit)
    req = RequestShape.of(inputs, max_new_tokens)
    est = estimate(cfg, export, req, chunk)
    budget, source = available(limit)
    if budget is not None and est.peak > budget:
        fixes = _fixes(cfg, export, req, est, budget, chunk)
        raise MemoryShortage(
            f"this request needs about {est.peak / GB:.1f} GB of memory at its peak, in the {est.stage} stage ("
            + ", ".join(f"{k} {v / GB:.1f} GB" for k, v in est.stages.items())
            + f"), more than the {max(budget, 0) / GB:.1f} GB available ({source}); it would fit with "
            + (" or ".join(fixes) if fixes else "nothing smaller that this model allows: run it on a larger machine"),
            source)
    return est


def check_limit(limit: int | None) -> None:
    if limit is not None:
        checks.integer("memory_limit", limit, minimum=1, error=ConfigError, hint=" (bytes; None: what the system has)")


def check_weights(weight_bytes: int, limit: int | None, what: str) -> None:
    """At load, before ONNX Runtime maps anything: weights alone above `memory_limit` (or above what the system
    has) could never serve a request; say so instead of failing every call, or the kernel's OOM killer."""
    check_limit(limit)
    budget, source = available(limit)
    if budget is not None and weight_bytes > budget:
        raise ConfigError(f"the weights of {what} take {weight_bytes / GB:.1f} GB, more than the "
                          f"{max(budget, 0) / GB:.1f} GB available ({source}): raise memory_limit, free memory, or "
                          "export smaller weights (--weights int4 --vision-weights int8)")


def give_back() -> None:
    """Return memory freed by dropped objects to the system, so that the next check's MemAvailable counts it.
    A KV cache's per-layer buffers (a few MB each) come from malloc's heap, which keeps freed pages: dropping
    a 2B session with a 3,037-position cache gave back nothing, then 290 MB of RSS after malloc_trim."""
    gc.collect()  # a session and its cache may sit in a reference cycle
    trim()


def trim() -> None:
    """Hand the free pages of malloc's heap back to the system (glibc; other C libraries keep theirs). Measured
    on the 2B int4 export (2 threads): 5-10 ms after a request of 200-6,400 tokens, under 1 ms after another."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


def host_backend(backend) -> bool:
    """Whether the backend runs the graphs in host memory (ONNX Runtime on the CPU), the memory estimated here."""
    return getattr(backend, "name", None) == "onnxruntime" and getattr(backend, "device", None) == "cpu"
