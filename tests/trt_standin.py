"""Contract-shaped stand-ins for `--target tensorrt` artifacts, made from another target's export: the GPU
plumbing check uses it for artifacts that are not `--target tensorrt` (the tests use the real export)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def tensorrt_standin(src: Path, out: Path) -> Path:
    """A tiny portable fp32 export with its manifest relabeled as `--target tensorrt --precision fp32
    --min-tensorrt 10.3`: past [B, kv, P, hd] -> present [B, kv, P+L, hd], as 10.3 graphs are. Nothing stands in
    for 10.15 graphs: their cache has a static length, which no other target's graphs have (export one)."""
    manifest = json.loads((src / "manifest.json").read_text())
    if manifest["export"].get("kv_cache", "concat") != "concat":
        raise ValueError(f"{src}: only portable graphs stand in for tensorrt ones (10.3); for a preallocated cache, "
                         "export --target tensorrt --min-tensorrt 10.15 --precision fp32")
    shutil.copytree(src, out)
    manifest["export"].update(target="tensorrt", precision="fp32", min_tensorrt="10.3")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out
