"""The artifact directory and its manifest.json: the one versioned contract between export and runtime."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ModelConfig
from .errors import ArtifactError

FORMAT = "qwen2vl-edge"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GRAPHS = ("vision_encoder", "embedding_merger", "decoder")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Artifact:
    dir: Path
    manifest: dict[str, Any]
    config: ModelConfig

    def graph_path(self, name: str) -> Path:
        return self.dir / self.manifest["graphs"][name]["file"]

    def graph(self, name: str) -> dict[str, Any]:
        return self.manifest["graphs"][name]

    @property
    def generation(self) -> dict[str, Any]:
        return self.manifest.get("generation", {})

    @property
    def export(self) -> dict[str, Any]:
        return self.manifest.get("export", {})


def engine_only_skips(manifest: dict[str, Any]) -> set[str]:
    """Files that built TensorRT engines replace: the ONNX graphs and their weights."""
    graphs = {g.get("file") for g in manifest.get("graphs", {}).values()}
    return graphs | {manifest.get("export", {}).get("weights_file", "weights.data")}


def load_artifact(directory: str | Path, verify: bool = True, engines_only: bool = False) -> Artifact:
    """Read and check an artifact dir; `verify` compares every file with its sha256 in the manifest.
    `engines_only` (the TensorRT backend): the ONNX graphs and weights are neither required, read nor hashed,
    so an artifact can ship with its engines alone."""
    d = Path(directory)
    if not d.is_dir():
        raise ArtifactError(f"artifact directory not found: {d} (create one with `qwen2vl-edge export CKPT {d}`)")
    path = d / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{d} has no {MANIFEST}: not an exported artifact dir (run `qwen2vl-edge export`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format {manifest.get('format')!r} version {manifest.get('format_version')!r}; this runtime "
            f"reads {FORMAT!r} version {FORMAT_VERSION}: re-export with this version of qwen2vl-edge"
        )
    missing = [g for g in GRAPHS if g not in manifest.get("graphs", {})]
    if missing:
        raise ArtifactError(f"{path} lists no graph for {', '.join(missing)}")
    skip = engine_only_skips(manifest) if engines_only else set()
    for name, digest in manifest.get("files", {}).items():
        if name in skip:
            continue
        f = d / name
        if not f.is_file():
            raise ArtifactError(f"{d}: file {name} listed in the manifest is missing")
        if verify and sha256_file(f) != digest:
            raise ArtifactError(
                f"{d}: {name} does not match its sha256 in the manifest (corrupted or modified); re-export, "
                "or pass verify=False / --no-verify to skip the check"
            )
    return Artifact(d, manifest, ModelConfig.from_dict(manifest["config"]))
