"""Contract-shaped stand-ins for `--target tensorrt` artifacts, made from another target's export: the GPU
plumbing check uses it for artifacts that are not `--target tensorrt` (the tests use the real export)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def tensorrt_standin(src: Path, out: Path, kv_cache: str | None = None) -> Path:
    """A tiny fp32-compute export with its manifest relabeled as `--target tensorrt --precision fp32`.
    concat: portable graphs (past [B, kv, P, hd] -> present [B, kv, P+L, hd], as 10.3 graphs are);
    preallocated: ort-cpu `--weights fp32` graphs (one buffer [B, kv, capacity, hd] written in place, as
    10.15 graphs are). `kv_cache` None: the one `src` has."""
    shutil.copytree(src, out)
    manifest = json.loads((out / "manifest.json").read_text())
    kv_cache = kv_cache or manifest["export"].get("kv_cache", "concat")
    manifest["export"].update(target="tensorrt", precision="fp32", kv_cache=kv_cache,
                              min_tensorrt="10.3" if kv_cache == "concat" else "10.15")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out
