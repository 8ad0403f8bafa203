"""The artifact directory and its manifest.json: the one versioned contract between export and runtime.

A manifest is checked against one schema (MANIFEST_SCHEMA, below) before anything in it is used. Every
path it names stays inside the artifact directory, and every file the runtime will read for the chosen
backend (`files_read`) must be listed in `files` with its sha256: a file the manifest does not vouch
for is never read.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any

from .config import FAMILIES, ConfigError, ModelConfig
from .errors import ArtifactError

FORMAT = "qwen2vl-edge"
FORMAT_VERSION = 2  # 2: export.max_context, the KV cache's static length of tensorrt graphs from 10.15; the family
#                     (config.model_type) picks the vision encoder's inputs (Qwen2.5-VL's windows), and the vision
#                     config's deepstack_visual_indexes the DeepStack I/O (DEEPSTACK_IO; Qwen3-VL): graphs of the
#                     families before keep theirs, so their artifacts stay readable
MANIFEST = "manifest.json"
GRAPHS = ("vision_encoder", "embedding_merger", "decoder")
# side files read when they are present (runtime/processor.py, preprocess.py, generation.py); of the chat
# templates only the first present is read (runtime/chat.py: find_template)
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                   "video_preprocessor_config.json", "generation_config.json")  # the video one: Qwen3-VL's
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
REQUIRED_PROCESSOR_FILES = ("tokenizer.json",)
# (graph, "inputs" | "outputs", name) that carry DeepStack's features from the merger to the decoder, for a model
# with deepstack_visual_indexes (export/merger.py, export/decoder.py)
DEEPSTACK_IO = (("embedding_merger", "outputs", "visual_index"), ("decoder", "inputs", "visual_index"),
                ("decoder", "inputs", "deepstack_embeds"))


# -- schema --------------------------------------------------------------------------------------
# A schema is a Python type, a tuple of allowed values, a dict {key: schema} (keys wrapped in OptionalKey may
# be absent; other keys are allowed, so newer writers stay readable), or MapOf / ListOf / a named check.

@dataclass(frozen=True)
class OptionalKey:
    key: str


@dataclass(frozen=True)
class MapOf:
    value: Any
    keys: Any = None  # a check on every key, or None


@dataclass(frozen=True)
class ListOf:
    item: Any
    min_len: int = 0


@dataclass(frozen=True)
class Check:
    what: str  # the expectation, as the error message says it
    test: Any  # value -> bool


def _relative_path(value: Any) -> bool:
    if not isinstance(value, str) or not value or "\\" in value or "\x00" in value:
        return False
    p = PurePosixPath(value)
    return not p.is_absolute() and ".." not in p.parts and not re.match(r"^[A-Za-z]:", value)


PATH = Check("a relative path inside the artifact directory (no '..', not absolute)", _relative_path)
SHA256 = Check("a sha256 hex digest", lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None)
STATIC_LENGTH = Check("null or a positions count (integer >= 2)",
                      lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 2))
TOKEN_ID = Check("a token id (integer >= 0)", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0)
GRAPH_ENTRY = {"file": PATH, "inputs": ListOf({"name": str}, 1), "outputs": ListOf({"name": str}, 1)}
ENGINE_ENTRY = {"file": PATH, "sidecar": PATH}
MANIFEST_SCHEMA = {
    "format": (FORMAT,),
    "format_version": (FORMAT_VERSION,),
    # the model family, which the runtime's front-end, position and vision-input rules follow; the other fields
    # are checked field by field in ModelConfig.from_dict
    "config": {"model_type": tuple(FAMILIES)},
    "export": {OptionalKey("kv_cache"): ("concat", "preallocated"), OptionalKey("target"): str,
               OptionalKey("max_context"): STATIC_LENGTH,
               "weights_file": PATH, OptionalKey("logits"): ("last", "all")},
    "generation": {"eos_token_id": ListOf(TOKEN_ID, min_len=1), "pad_token_id": TOKEN_ID},
    "graphs": {name: GRAPH_ENTRY for name in GRAPHS},
    "files": MapOf(SHA256, keys=PATH),
    OptionalKey("engines"): MapOf(ENGINE_ENTRY, keys=(*GRAPHS,)),  # TensorRT engines, added by build-trt
}


def _key_name(key) -> str:
    return key.key if isinstance(key, OptionalKey) else key


def schema_errors(value: Any, schema: Any, where: str = "manifest") -> list[str]:
    """Every place where `value` departs from `schema`, as 'where: what was expected'."""
    if isinstance(schema, Check):
        return [] if schema.test(value) else [f"{where} = {value!r:.80} is not {schema.what}"]
    if isinstance(schema, tuple):
        return [] if value in schema and type(value) in {type(s) for s in schema} else [
            f"{where} = {value!r:.80} is not one of {', '.join(map(repr, schema))}"]
    if isinstance(schema, type):
        ok = isinstance(value, schema) and not (schema is int and isinstance(value, bool))
        return [] if ok else [f"{where} must be a {schema.__name__}, got {type(value).__name__}"]
    if isinstance(schema, ListOf):
        if not isinstance(value, list) or len(value) < schema.min_len:
            return [f"{where} must be a list of at least {schema.min_len} item(s)"]
        return [e for i, item in enumerate(value) for e in schema_errors(item, schema.item, f"{where}[{i}]")]
    if not isinstance(value, dict):
        return [f"{where} must be a JSON object, got {type(value).__name__}"]
    if isinstance(schema, MapOf):
        errors = [] if schema.keys is None else [e for k in value for e in schema_errors(k, schema.keys,
                                                                                             f"{where} key")]
        return errors + [e for k, v in value.items() for e in schema_errors(v, schema.value, f"{where}.{k}")]
    errors = []
    for key, sub in schema.items():
        name = _key_name(key)
        if name in value:
            errors += schema_errors(value[name], sub, f"{where}.{name}")
        elif not isinstance(key, OptionalKey):
            errors.append(f"{where}.{name} is missing")
    return errors


# -- files ------------------------------------------------------------------------------------------

def files_read(manifest: dict, backend: str, present: set[str]) -> set[str]:
    """The artifact files the runtime reads with `backend`: each must be listed in `files` and verified.
    `present`: the files that exist in the directory (optional side files are read when present)."""
    needed = {name for name in PROCESSOR_FILES if name in present} | set(REQUIRED_PROCESSOR_FILES)
    needed |= set([name for name in TEMPLATE_FILES if name in present][:1])
    needed |= set(manifest["files"])  # what the exporter listed stays verified
    onnx = {manifest["graphs"][name]["file"] for name in GRAPHS} | {manifest["export"]["weights_file"]}
    if backend == "tensorrt":  # engines replace the graphs and their weights: an artifact may ship without them
        engines = {path for entry in manifest.get("engines", {}).values() for path in (entry["file"], entry["sidecar"])}
        return (needed - onnx) | engines
    return needed | onnx


def _confined(d: Path, name: str) -> Path:
    """d / name, refused when it (or a symlink on the way) resolves outside d."""
    path = d / name
    if not path.resolve().is_relative_to(d.resolve()):
        raise ArtifactError(f"{d}: {name} resolves outside the artifact directory (a symlink?); the runtime reads "
                            "only files inside it: copy the file in and re-export")
    return path


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _check_files(d: Path, manifest: dict, backend: str, verify: bool) -> None:
    listed = manifest["files"]
    present = {name for name in PROCESSOR_FILES + TEMPLATE_FILES if (d / name).exists()}
    needed = files_read(manifest, backend, present)
    unlisted = sorted(needed - set(listed))
    if unlisted:
        raise ArtifactError(f"{d}: {', '.join(unlisted)} not listed in the manifest's files (with a sha256); the "
                            "runtime reads only files the manifest vouches for: re-export the artifact")
    for name in sorted(needed):
        path = _confined(d, name)
        if not path.is_file():
            raise ArtifactError(f"{d}: file {name} listed in the manifest is missing")
        if verify and sha256_file(path) != listed[name]:
            raise ArtifactError(
                f"{d}: {name} does not match its sha256 in the manifest (corrupted or modified); re-export, "
                "or pass verify=False / --no-verify to skip the check"
            )


# -- the artifact -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Artifact:
    dir: Path
    manifest: dict[str, Any]
    config: ModelConfig

    def graph_path(self, name: str) -> Path:
        return _confined(self.dir, self.manifest["graphs"][name]["file"])

    def graph(self, name: str) -> dict[str, Any]:
        return self.manifest["graphs"][name]

    @cached_property
    def weight_bytes(self) -> int:
        """Bytes of the ONNX files ONNX Runtime loads: the three graphs and their shared weights file (read once:
        every request's memory check subtracts them)."""
        files = {self.graph_path(name) for name in GRAPHS} | {_confined(self.dir, self.export["weights_file"])}
        return sum(f.stat().st_size for f in files)

    @property
    def generation(self) -> dict[str, Any]:
        return self.manifest["generation"]

    @property
    def export(self) -> dict[str, Any]:
        return self.manifest["export"]

    @property
    def static_kv_length(self) -> int | None:
        """The KV cache's fixed length where the graphs fix it (tensorrt from 10.15, export --max-context): every
        request's cache is that long. None: the cache is sized per request."""
        return self.export.get("max_context")

    @property
    def context(self) -> int:
        """Positions a request or chat session may hold: the model's context, or the static cache's length."""
        model = self.config.text.max_position_embeddings
        return min(model, self.static_kv_length or model)


def _read_manifest(d: Path) -> dict:
    path = _confined(d, MANIFEST)
    if not path.is_file():
        raise ArtifactError(f"{d} has no {MANIFEST}: not an exported artifact dir (run `qwen2vl-edge export`)")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ArtifactError(f"{path} is not UTF-8 text ({e}): restore it or re-export") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} must hold a JSON object, got {type(manifest).__name__}: restore it or re-export")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} has format {manifest.get('format')!r} version {manifest.get('format_version')!r}; this runtime "
            f"reads {FORMAT!r} version {FORMAT_VERSION}: re-export with this version of qwen2vl-edge"
        )
    errors = schema_errors(manifest, MANIFEST_SCHEMA)
    if errors:
        shown = "; ".join(errors[:5]) + (f" (and {len(errors) - 5} more)" if len(errors) > 5 else "")
        raise ArtifactError(f"{path} does not follow the manifest schema: {shown}. Re-export the artifact")
    return manifest


def load_artifact(directory: str | Path, verify: bool = True, backend: str = "onnxruntime") -> Artifact:
    """Read and check an artifact dir for `backend`; `verify` compares every file the runtime will read with
    its sha256 in the manifest (the listing and the confinement are checked either way)."""
    d = Path(directory)
    if not d.is_dir():
        raise ArtifactError(f"artifact directory not found: {d} (create one with `qwen2vl-edge export CKPT {d}`)")
    manifest = _read_manifest(d)
    try:
        config = ModelConfig.from_dict(manifest["config"])
    except ConfigError as e:
        raise ArtifactError(f"{d / MANIFEST}: {e}. Re-export the artifact") from None
    _check_deepstack(d, manifest, config)
    _check_files(d, manifest, backend, verify)
    return Artifact(d, manifest, config)


def _check_deepstack(d: Path, manifest: dict, config: ModelConfig) -> None:
    """A DeepStack model's graphs must carry its features: without them the decoder would silently drop them."""
    if not config.vision.deepstack_visual_indexes:
        return
    missing = [f"{graph} {kind[:-1]} {name}" for graph, kind, name in DEEPSTACK_IO
               if name not in {v["name"] for v in manifest["graphs"][graph][kind]}]
    if missing:
        raise ArtifactError(f"{d / MANIFEST}: the model adds DeepStack features after "
                            f"{len(config.vision.deepstack_visual_indexes)} decoder layers, but the graphs lack "
                            f"{', '.join(missing)}: re-export the artifact with this version of qwen2vl-edge")
