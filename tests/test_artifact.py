"""The artifact contract: one manifest schema, paths confined to the directory, every file read verified."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import requires_torch
from qwen2vl_edge.runtime import ArtifactError, Qwen2VLPipeline
from qwen2vl_edge.runtime.artifact import MANIFEST_SCHEMA, files_read, load_artifact, schema_errors
from qwen2vl_edge.runtime.processor import Processor

pytestmark = requires_torch  # the artifact fixture is built with the [export] extra


def _clone(src: Path, dst: Path) -> Path:
    """A copy made of hard links (fast, not symlinks): rewrite files with _replace, never in place."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def _replace(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


def _edit_manifest(art: Path, edit) -> None:
    manifest = json.loads((art / "manifest.json").read_text())
    edit(manifest)  # in place
    _replace(art / "manifest.json", json.dumps(manifest).encode())


@pytest.fixture
def art(tiny_artifact, tmp_path):
    return _clone(tiny_artifact, tmp_path / "art")


def test_the_export_follows_the_schema(tiny_artifact):
    manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    assert schema_errors(manifest, MANIFEST_SCHEMA) == []
    assert load_artifact(tiny_artifact).config.text.hidden_size == 64


@pytest.mark.parametrize("content,message", [
    (b"[1, 2]", "must hold a JSON object, got list"),
    (b"null", "must hold a JSON object, got NoneType"),
    (b"\xff\xfe{}", "is not UTF-8"),
    (b"{\"format\": ", "is not valid JSON"),
])
def test_malformed_manifest_files(art, content, message):
    _replace(art / "manifest.json", content)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(art)


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.pop("config"), r"manifest\.config is missing"),
    (lambda m: m["generation"].pop("eos_token_id"), r"manifest\.generation\.eos_token_id is missing"),
    (lambda m: m["config"]["text"].pop("hidden_size"), r"config\.text\.hidden_size is missing"),
    (lambda m: m["config"].pop("image_token_id"), r"config\.image_token_id is missing"),
    (lambda m: m["config"]["vision"].update(num_heads="16"), r"config\.vision\.num_heads = '16' is not a valid int"),
    (lambda m: m["config"]["text"].update(num_key_value_heads=3), "must divide by num_key_value_heads"),
    (lambda m: m["graphs"].pop("decoder"), r"manifest\.graphs\.decoder is missing"),
    (lambda m: m.update(files=[]), r"manifest\.files must be a JSON object, got list"),
    (lambda m: m["files"].update({"tokenizer.json": "abc"}), r"files\.tokenizer\.json = 'abc' is not a sha256"),
    (lambda m: m["export"].update(kv_cache="paged"), r"export\.kv_cache = 'paged' is not one of"),
    (lambda m: m.update(engines={"decoder": {"file": "/abs/decoder.engine", "sidecar": "d.json"}}),
     r"engines\.decoder\.file = '/abs/decoder\.engine' is not a relative path"),
])
def test_manifest_schema_names_the_field(art, edit, message):
    _edit_manifest(art, edit)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(art)


@pytest.mark.parametrize("path", ["../../x", "/etc/hostname", "sub/../../x", "C:/x", ""])
def test_paths_outside_the_directory_are_refused(art, path):
    _edit_manifest(art, lambda m: m["graphs"]["decoder"].update(file=path))
    with pytest.raises(ArtifactError, match=r"graphs\.decoder\.file = .* is not a relative path"):
        load_artifact(art)
    _edit_manifest(art, lambda m: m["graphs"]["decoder"].update(file="decoder.onnx"))
    _edit_manifest(art, lambda m: m["files"].update({path: "0" * 64}))
    with pytest.raises(ArtifactError, match=r"manifest\.files key = .* is not a relative path"):
        load_artifact(art, verify=False)


def test_a_symlink_out_of_the_directory_is_refused(art, tmp_path):
    """Same bytes, same sha256: only the confinement can tell."""
    outside = tmp_path / "elsewhere.json"
    shutil.copyfile(art / "tokenizer.json", outside)
    (art / "tokenizer.json").unlink()
    (art / "tokenizer.json").symlink_to(outside)
    with pytest.raises(ArtifactError, match="tokenizer.json resolves outside the artifact directory"):
        load_artifact(art)


@pytest.mark.parametrize("edit", [lambda m: m["files"].pop("weights.data"), lambda m: m.update(files={})])
def test_every_file_read_must_be_listed(art, edit):
    """Dropping weights.data from `files` and corrupting it used to load with changed output."""
    _edit_manifest(art, edit)
    with open(art / "weights.data", "rb") as f:
        data = bytearray(f.read())
    data[1000:1004] = b"\x7f\x7f\x7f\x7f"
    _replace(art / "weights.data", bytes(data))
    for verify in (True, False):
        with pytest.raises(ArtifactError, match=r"weights\.data.* not listed in the manifest's files"):
            load_artifact(art, verify=verify)


def test_files_read_depend_on_the_backend(tiny_artifact):
    manifest = json.loads((tiny_artifact / "manifest.json").read_text())
    present = {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.jinja",
               "chat_template.json"}
    ort = files_read(manifest, "onnxruntime", present)
    assert {"decoder.onnx", "vision_encoder.onnx", "embedding_merger.onnx", "weights.data", "tokenizer.json",
            "chat_template.jinja"} <= ort and "chat_template.json" not in ort  # the .jinja wins, as in chat.py
    manifest["engines"] = {"decoder": {"file": "engines/decoder.engine", "sidecar": "engines/decoder.engine.json"}}
    trt = files_read(manifest, "tensorrt", present)
    assert {"engines/decoder.engine", "engines/decoder.engine.json", "tokenizer.json"} <= trt
    assert "weights.data" not in trt and "decoder.onnx" not in trt


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                                  "chat_template.jinja", "generation_config.json", "decoder.onnx"])
def test_damaged_side_files_are_named_by_the_hash_check(art, name):
    _replace(art / name, (art / name).read_bytes()[:-3] + b"!!!")
    with pytest.raises(ArtifactError, match=f"{name} does not match its sha256"):
        load_artifact(art)


@pytest.mark.parametrize("name,content,message", [
    ("tokenizer.json", b"{\"not\": \"a tokenizer\"}", r"tokenizer\.json is damaged"),
    ("tokenizer_config.json", b"[", r"tokenizer_config\.json is damaged"),
    ("preprocessor_config.json", b"[]", r"preprocessor_config\.json is damaged"),
    ("chat_template.jinja", b"{% if %}", r"the chat template of .* is damaged"),
])
def test_damaged_side_files_without_verification_name_the_file(art, name, content, message):
    _replace(art / name, content)
    with pytest.raises(ArtifactError, match=message):
        Processor.from_pretrained(load_artifact(art, verify=False).dir)


def test_a_graph_file_swapped_for_another_is_refused(art):
    """Both files are listed and verified: the manifest itself points the decoder at the vision graph."""
    _edit_manifest(art, lambda m: m["graphs"]["decoder"].update(file="vision_encoder.onnx"))
    with pytest.raises(ArtifactError, match="vision_encoder.onnx is not the decoder graph the manifest describes"):
        Qwen2VLPipeline.load(art)


# -- token ids come from the checkpoint (no Qwen2 vocabulary assumed) ------------------------------

def test_placeholder_token_ids_are_required_from_config_json(tiny_ckpt):
    from qwen2vl_edge.runtime.config import ConfigError, parse_hf_config

    raw = json.loads((tiny_ckpt / "config.json").read_text())
    assert parse_hf_config(raw).image_token_id == raw["image_token_id"]
    del raw["video_token_id"]
    with pytest.raises(ConfigError, match="no integer video_token_id"):
        parse_hf_config(raw)


def test_generation_ids_are_read_from_the_checkpoint(tmp_path):
    from qwen2vl_edge.export.onnx_export import _generation_settings

    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"eos_token_id": 7}}))
    assert _generation_settings(tmp_path) == {"eos_token_id": [7], "pad_token_id": 7}  # generate()'s pad fallback
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 6], "pad_token_id": 9}))
    assert _generation_settings(tmp_path) == {"eos_token_id": [5, 6], "pad_token_id": 9}
    (tmp_path / "generation_config.json").write_text("{}")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no eos_token_id in generation_config.json or config.json"):
        _generation_settings(tmp_path)
