"""The peers inside the benchmark (benchmarks/peers/): registry, the 'not installed' message, their workers'
input and output handling, and cells for scenarios a system cannot run. None of this needs a peer installed;
the last test runs the installed peers on the tiny checkpoint and is skipped, saying why, where they are not."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import requires_torch

from qwen2vl_edge.benchmarks import bench, peers, report, roofline, scenarios, worker
from qwen2vl_edge.benchmarks.peers.llamacpp_worker import LlamaCpp, chat_script, parse_log
from qwen2vl_edge.benchmarks.peers.openvino_worker import split_conversation
from qwen2vl_edge.cli import main
from qwen2vl_edge.export.vocab import cache_dir
from qwen2vl_edge.runtime.errors import ConfigError

# The end of one llama-mtmd-cli run's log (llama-cpp-python 0.3.36's llama.cpp, the tiny checkpoint, one
# 448x448 image, 8 new tokens, -lv 4 --perf), as printed.
MTMD_LOG = """\
> Describe this image.
/tmp/t13smoke/inputs/s448.png image loaded

> I encoding mtmd batch, n_chunks = 1 (done = 1, total = 3)
I mtmd batch encoding done in 29 ms
I decoding image batch 1/1, n_tokens_batch = 256
I image decoded (batch 1/1) in 3 ms

威尼斯人(format捉首届日本人实在太 notch<Scalars
> ///quit

I llama_perf_context_print:        load time =     681.46 ms
I llama_perf_context_print: prompt eval time =      37.58 ms /   281 tokens (    0.13 ms per token,  7477.98 tokens per second)
I llama_perf_context_print:        eval time =       5.80 ms /     7 runs   (    0.83 ms per token,  1205.86 tokens per second)
I llama_perf_context_print:       total time =      87.63 ms /   288 tokens
I llama_perf_context_print:    graphs reused =          7
"""


def test_llamacpp_log_timings():
    t = parse_log(MTMD_LOG)
    assert t == {"encode_ms": 29.0, "prompt_ms": 37.58, "prompt_tokens": 281.0, "eval_ms": 5.80, "eval_runs": 7.0}


def test_llamacpp_log_sums_image_slices_and_text_only_has_none():
    two = MTMD_LOG.replace("done in 29 ms", "done in 29 ms\nI mtmd batch encoding done in 5 ms")
    assert parse_log(two)["encode_ms"] == 34.0
    text_only = "\n".join(line for line in MTMD_LOG.splitlines() if "image" not in line and "mtmd" not in line)
    assert parse_log(text_only)["encode_ms"] == 0.0


def test_llamacpp_log_without_timings_is_an_error_not_zero():
    with pytest.raises(RuntimeError, match="eval time"):
        parse_log(MTMD_LOG.replace("eval time", "evaluation"))


def test_llamacpp_run_reads_a_log_whose_reply_ends_mid_character(tmp_path):
    """One run through a stand-in llama-mtmd-cli that prints a real run's log, its reply cut inside a UTF-8
    character as random weights do: the timings come through, the bytes do not stop the run."""
    model = tmp_path / "llamacpp" / "models" / "llamacpp-q4km" / "key"
    model.mkdir(parents=True)
    (tmp_path / "llamacpp" / "src" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp").mkdir(parents=True)
    cli = tmp_path / "llamacpp" / "build" / "bin" / "llama-mtmd-cli"
    cli.parent.mkdir(parents=True)
    (tmp_path / "log").write_bytes(MTMD_LOG.encode().replace(b"notch", b"notch\xe5\x8f"))
    cli.write_text(f"#!/bin/sh\ncat > /dev/null\ncat {tmp_path / 'log'}\n")
    cli.chmod(0o755)
    r = LlamaCpp(str(model), threads=2).run(_conv({"type": "image", "image": "/a.png"},
                                                  {"type": "text", "text": "Describe this image."}), 8)
    assert r["vision"] == 0.029 and r["ttft"] == pytest.approx(0.03758) and r["prompt_tokens"] == 281
    assert r["decode_tok_s"] == pytest.approx(7 / 0.0058) and r["peak_rss_bytes"] > 0


def _conv(*content):
    return [{"role": "user", "content": list(content)}]


def test_conversations_reach_the_peers_as_their_inputs():
    conv = _conv({"type": "image", "image": "/a.png"}, {"type": "image", "image": "/b.png"},
                 {"type": "text", "text": "Compare these images."})
    assert split_conversation(conv) == ("Compare these images.", ["/a.png", "/b.png"], [])
    assert chat_script(conv) == "/image /a.png\n/image /b.png\nCompare these images.\n/quit\n"
    assert chat_script([{"role": "user", "content": "Continue."}]) == "Continue.\n/quit\n"
    video = _conv({"type": "video", "video": ["/f0.png", "/f1.png"]}, {"type": "text", "text": "What happens?"})
    assert split_conversation(video) == ("What happens?", [], [["/f0.png", "/f1.png"]])
    with pytest.raises(worker.CannotRun, match="video"):
        chat_script(video)
    with pytest.raises(worker.CannotRun, match="one line"):
        chat_script(_conv({"type": "text", "text": "two\nlines"}))


def test_peer_systems_are_registered_on_request_with_their_set_up_scripts():
    for name, peer in peers.PEERS.items():
        assert bench.SYSTEMS[name][0] == "peer" and name not in bench.DEFAULT_SYSTEMS
        assert os.access(peers.HERE / peer.setup, os.X_OK) and (peers.HERE / peer.worker).is_file()
    assert {w for _, _, w, _ in bench.SYSTEMS.values()} <= set(roofline.BYTES)


def test_missing_peer_names_its_set_up_script(tmp_path):
    with pytest.raises(ConfigError, match=r"openvino-int4 is not installed.*setup_openvino\.sh.*"
                                          r"llamacpp-q4km is not installed.*setup_llamacpp\.sh"):
        peers.check_installed(["openvino-int4", "llamacpp-q4km"], tmp_path)
    for rel in peers.PEERS["llamacpp-q4km"].needs:  # installed: no error
        (tmp_path / "llamacpp" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "llamacpp" / rel).touch()
    peers.check_installed(["llamacpp-q4km"], tmp_path)


def test_bench_without_the_peer_says_which_script_to_run(tmp_path, capsys):
    code = main(["bench", "--systems", "ours-ort-int4,openvino-int4", "--peers-dir", str(tmp_path),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "benchmarks/peers/setup_openvino.sh" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before measuring anything


def test_llamacpp_refuses_a_vision_tower_its_converter_cannot_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": {"depth": 2}}))
    peers.check_checkpoint(["openvino-int4"], tmp_path)
    with pytest.raises(ConfigError, match="llamacpp-q4km cannot convert.*depth of at least 3.*has 2"):
        peers.check_checkpoint(["openvino-int4", "llamacpp-q4km"], tmp_path)


def test_checkpoint_key_changes_with_the_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"1")
    first = peers.checkpoint_key(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"12")
    assert peers.checkpoint_key(tmp_path) != first


class _NoVideo:
    def run(self, conversation, new_tokens):
        if conversation == "video":
            raise worker.CannotRun("no video input")
        return {"preprocess": None, "vision": 0.5, "ttft": 1.0, "decode_tok_s": 10.0, "e2e": 2.0,
                "prompt_tokens": 5, "peak_rss_bytes": 7e8}


def test_a_scenario_the_system_cannot_run_gets_a_cell_saying_why():
    assert worker.measure(_NoVideo(), "video", 4, 2) == {"cannot_run": "no video input"}
    m = worker.measure(_NoVideo(), "text", 4, 2)
    assert m["preprocess"] is None and m["ttft"]["median"] == 1.0 and m["peak_rss_bytes"] == 7e8
    stage = {"min": 1.0, "median": 1.0, "max": 1.0}
    cell = {k: stage for k in ("preprocess", "vision", "ttft", "decode_tok_s", "e2e")}
    cell.update(prompt_tokens=274, peak_rss_bytes=1e9)
    scen = {n: cell for n in ("image_448", "three_images", "text_only", "text_274", "long_text_2k")}
    result = {"model": "tiny", "new_tokens": 4, "repeats": 2, "systems": {"llamacpp-q4km": {
        "scenarios": {**scen, "video_16_frames": {"cannot_run": "no video input"}}, "weights_on_disk_bytes": 1e8,
        "decode_roofline_fraction": 0.5, "peak_rss_bytes": 1e9, "cold_start_ready_s": 1.0,
        "cold_start_first_token_s": 2.0}},
        "machine": {"date": "2026-11-26", "cpu": "x", "cores": 2, "threads": 2, "ram_gb": 24,
                    "copy_bandwidth_gb_s": 10, "matmul_gflop_s": 100}}
    assert "| llamacpp-q4km | video_16_frames | cannot run: no video input |" in report.markdown(result)


def _installed(name: str) -> bool:
    try:
        peers.check_installed([name], peers.peers_dir())
        return True
    except ConfigError:
        return False


@pytest.fixture(scope="module")
def peer_ckpt() -> Path:
    """The tiny checkpoint with 3 vision blocks (llama.cpp's converter needs 3), kept with the peers'
    conversions of it so that they are made once."""
    ckpt = cache_dir() / "peers-test" / "tiny-vision3"
    if not (ckpt / "config.json").is_file():
        from qwen2vl_edge.export.tiny import make_tiny

        make_tiny(ckpt, overrides=["vision.depth=3"])
    return ckpt


@requires_torch
@pytest.mark.parametrize("name", list(peers.PEERS))
def test_peer_runs_the_tiny_checkpoint(name, request, tmp_path):
    """The peer's conversion counts the same 274-token S2 prompt as we do (one tokenizer, one chat template),
    and gets the bench's thread count. Converts once into the peers folder (a minute), as the bench does."""
    if not _installed(name):
        pytest.skip(f"{name} not installed: run benchmarks/peers/{peers.PEERS[name].setup}")
    root = peers.peers_dir()
    model = peers.model_dir(name, request.getfixturevalue("peer_ckpt"), root)  # built only where it runs
    convs = scenarios.scenarios(tmp_path / "inputs", quick=True)
    spec = {"system": name, "model_dir": str(model), "threads": 1, "new_tokens": 4, "repeats": 1,
            "scenarios": {k: convs[k] for k in ("image_448", "text_274")}, "spawned_at": time.time()}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([*peers.worker_command(name, root), tmp_path / "spec.json", tmp_path / "out.json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["scenarios"]["text_274"]["prompt_tokens"] == 274
    s1 = out["scenarios"]["image_448"]
    assert s1["prompt_tokens"] > 256 and s1["vision"]["median"] > 0 and s1["decode_tok_s"]["median"] > 0
    assert 0 < out["cold_start_ready_s"] <= out["cold_start_first_token_s"] and out["peak_rss_bytes"] > 0
    assert out["settings"]["threads"] == 1  # the bench's thread count reached the peer
