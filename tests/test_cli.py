"""The `qwen2vl-edge` command line, run as users run it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import random_image, requires_torch
from qwen2vl_edge.benchmarks.bench import SYSTEMS

pytestmark = requires_torch


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen2vl_edge", *args], capture_output=True, text=True)


def test_run_json_matches_python_api(tiny_artifact, pipe, tmp_path):
    img = tmp_path / "a.png"
    random_image(np.random.default_rng(3), 160, 120).save(img)
    result = cli("run", str(tiny_artifact), "--image", str(img), "--prompt", "Describe this image.",
                 "--max-new-tokens", "6", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out) == {"text", "token_ids", "finish_reason", "timings", "usage", "boxes", "video_timestamps",
                        "tool_calls"}
    conv = [{"role": "user", "content": [{"type": "image", "image": str(img)},
                                         {"type": "text", "text": "Describe this image."}]}]
    assert out["token_ids"] == pipe.generate(conv, max_new_tokens=6).token_ids


def test_chat_keeps_the_session(tiny_artifact, pipe, tmp_path):
    img = tmp_path / "b.png"
    random_image(np.random.default_rng(4), 120, 160).save(img)
    lines = f"/image {img}\nWhat is this?\nAnd the colours?\n/reset\nHello.\n"
    result = subprocess.run([sys.executable, "-m", "qwen2vl_edge", "chat", str(tiny_artifact), "--system", "Be brief.",
                             "--max-new-tokens", "6", "--max-pixels", "20000"], input=lines, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    session = pipe.chat(system="Be brief.", max_new_tokens=6)
    expected = [session.send([{"type": "image", "image": str(img), "max_pixels": 20000},
                              {"type": "text", "text": "What is this?"}]).text,
                session.send([{"type": "text", "text": "And the colours?"}]).text]
    session.reset()
    expected.append(session.send([{"type": "text", "text": "Hello."}]).text)
    assert result.stdout.split("\n")[:3] == expected
    assert "cached" in result.stderr


def test_chat_prompt_and_help(tiny_artifact, pipe):
    """/help lists the commands and is not sent to the model: the reply that follows is a fresh session's."""
    result = subprocess.run([sys.executable, "-m", "qwen2vl_edge", "chat", str(tiny_artifact), "--max-new-tokens",
                             "6"], input="/help\nHello.\n", capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == pipe.chat(max_new_tokens=6).send("Hello.").text
    for command in ("/image PATH", "/video PATH", "/reset", "/help", "/quit"):
        assert command in result.stderr
    assert result.stderr.count("> ") == 3  # one prompt per line read, and one at the end of input


def test_run_streams_and_reads_message_files(tiny_artifact, tmp_path):
    batch = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "A longer question here?"}]]
    (tmp_path / "batch.json").write_text(json.dumps(batch))
    result = cli("run", str(tiny_artifact), "--messages", str(tmp_path / "batch.json"), "--max-new-tokens", "3")
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)) == 2
    streamed = cli("run", str(tiny_artifact), "--prompt", "Hi", "--max-new-tokens", "5")
    assert streamed.returncode == 0 and streamed.stdout.strip()


def test_run_reports_errors_without_traceback(tmp_path):
    result = cli("run", str(tmp_path / "missing"), "--prompt", "Hi")
    assert result.returncode == 2
    assert "artifact directory not found" in result.stderr and "Traceback" not in result.stderr


def test_make_tiny_cli(tmp_path):
    result = cli("make-tiny", str(tmp_path / "t"), "--layout", "v5", "--set", "text.num_hidden_layers=1")
    assert result.returncode == 0, result.stderr
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    assert cfg["text_config"]["num_hidden_layers"] == 1
    bad = cli("make-tiny", str(tmp_path / "u"), "--set", "text.no_such_field=1")
    assert bad.returncode != 0 and "unknown --set key" in bad.stderr


def test_quickstart(tmp_path):
    result = cli("quickstart", "--dir", str(tmp_path / "qs"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "identical" in result.stdout and "reply:" in result.stdout


def _json_run(artifact, *flags, stdin=None):
    result = subprocess.run([sys.executable, "-m", "qwen2vl_edge", "run", str(artifact), "--json",
                             "--max-new-tokens", "6", *flags], capture_output=True, text=True, input=stdin)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["token_ids"]


def test_decoding_flags_mean_what_they_say(tiny_artifact, pipe):
    conv = [{"role": "user", "content": [{"type": "text", "text": "Tell me a story."}]}]
    greedy = pipe.generate(conv, max_new_tokens=6).token_ids
    assert _json_run(tiny_artifact, "--prompt", "-", "--temperature", "0", stdin="Tell me a story.\n") == greedy
    sampled = pipe.generate(conv, max_new_tokens=6, do_sample=True, top_k=40, seed=3).token_ids
    assert sampled != greedy  # the tiny model's sampled reply differs, so the next check can fail
    assert _json_run(tiny_artifact, "--prompt", "Tell me a story.", "--top-k", "40", "--seed", "3") == sampled


def test_contradicting_flags_are_usage_errors():
    for flags, message in [
        (["--prompt", "x", "--greedy", "--top-p", "0.9"], "contradict --greedy"),
        (["--prompt", "x", "--temperature", "0", "--top-k", "5"], "contradict --temperature 0"),
        (["--prompt", "x", "--seed", "3"], "--seed only matters when sampling"),
        (["--messages", "m.json", "--prompt", "x"], "do not combine it with --prompt"),
        (["--messages", "m.json", "--image", "a.png"], "do not combine it with --prompt, --image"),
        (["--image", "a.png"], "give --messages FILE.json, or --prompt TEXT"),
    ]:
        result = cli("run", "/nowhere", *flags)  # refused before any artifact is read
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, flags
    for flag in ("--max-sessions", "--max-session-mb"):
        result = cli("serve", "/nowhere", flag, "-1")
        assert result.returncode == 2 and f"{flag} must be 0" in result.stderr, result.stderr


def test_bad_threads_and_unexpected_errors(tiny_artifact):
    result = cli("run", str(tiny_artifact), "--prompt", "Hi", "--threads", "0")
    assert result.returncode == 2 and "num_threads must be >= 1" in result.stderr
    bad = cli("bench", "--systems", "no-such-system")  # a plain ValueError, not one of the runtime's errors
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.splitlines() == ["error: ValueError: unknown system(s) no-such-system; known: "
                                       + ", ".join(SYSTEMS), "rerun with --debug for the traceback"]
    debug = cli("bench", "--systems", "no-such-system", "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def _unbounded(pipe) -> list[str]:
    """Generation flags for a reply as long as the model's context allows (32k tokens for the tiny model): it
    cannot end while a test signals the process or closes its pipe."""
    n = str(pipe.artifact.config.text.max_position_embeddings - 64)
    return ["--max-new-tokens", n, "--min-new-tokens", n]


def _ignore_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _start(command: str, artifact, pipe, sigint_ignored: bool = False) -> subprocess.Popen:
    """`run` or `chat` streaming an unbounded reply, once its first byte is out. `sigint_ignored`: the process
    starts with SIGINT ignored, as a background job of a script does (CI once ran the tests so)."""
    args = ["--prompt", "Go on."] if command == "run" else []
    proc = subprocess.Popen([sys.executable, "-m", "qwen2vl_edge", command, str(artifact), *args, *_unbounded(pipe)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=_ignore_sigint if sigint_ignored else None)
    if command == "chat":
        proc.stdin.write(b"Go on.\n")
        proc.stdin.flush()
    assert proc.stdout.read(1), proc.communicate()[1][-2000:]  # it is generating now
    return proc


@pytest.mark.parametrize("command, sigint_ignored", [("run", False), ("run", True), ("chat", True)])
def test_ctrl_c_stops_a_reply(tiny_artifact, pipe, command, sigint_ignored):
    """SIGINT stops `run` and `chat` mid-reply with status 130 and no traceback, also when the process started
    with SIGINT ignored (Python then installs no handler of its own: before the CLI installed one, such a
    run went on to its last token and exited 0)."""
    import signal

    proc = _start(command, tiny_artifact, pipe, sigint_ignored)
    try:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)  # a hang guard: the reply alone would take far longer
    finally:
        proc.kill()
    assert proc.returncode == 130 and b"Traceback" not in err, err[-2000:]


def test_a_closed_pipe_exits_quietly(tiny_artifact, pipe):
    proc = _start("run", tiny_artifact, pipe)  # `| head -c 1`: the reader leaves
    try:
        proc.stdout.close()
        err = proc.stderr.read()
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 141 and b"Traceback" not in err and b"Exception ignored" not in err, err[-2000:]


def test_ctrl_c_stops_serve(tiny_artifact):
    """`serve` started with SIGINT ignored stops on SIGINT too: uvicorn shuts down, then the CLI exits 130."""
    import signal
    import time
    import urllib.request

    pytest.importorskip("uvicorn", reason="serve needs the [serve] extra")
    from qwen2vl_edge.benchmarks.serve_bench import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qwen2vl_edge", "serve", str(tiny_artifact), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_ignore_sigint)
    try:
        while proc.poll() is None:  # until it answers (or has failed)
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).close()
                break
            except OSError:
                time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and b"Traceback" not in out, out[-2000:]
    assert b"Application shutdown complete" in out
