"""llama.cpp (llama-mtmd-cli, Q4_K_M text model + f16 mmproj) measured as one benchmark system.

    PEERS/llamacpp/venv/bin/python benchmarks/peers/llamacpp_worker.py SPEC.json OUT.json

Every run is one llama-mtmd-cli process in chat mode (images as `/image` lines, then the text), greedy, with
`--ignore-eos` and `-n` = the new tokens, `-t`/`-tb` = the bench's threads. Its timings are llama.cpp's own,
parsed from its log: vision = the images' encode time; time to first token = its prompt-eval timer, which
spans the image encode (see run); image decoding and resizing, and the process start and model load, are
outside them: llama.cpp times neither; decode = the eval runs. The timing lines are printed at log verbosity
4 with --perf. Peak RSS is each process's own (wait4's ru_maxrss). The process start and model load of the
first run give the cold start. Imports nothing of qwen2vl-edge but benchmarks/worker.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__:
    from .. import worker
    from .openvino_worker import split_conversation
else:  # run by the peer's python, where qwen2vl-edge is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import worker
    from openvino_worker import split_conversation

CONTEXT = 8192  # KV cache for the longest scenario: a 1,792 px image (4,096 tokens) or a 2,048-token prompt
_PATTERNS = {  # key -> (regex, how matches combine); times in ms
    "encode_ms": (r"(?:batch encoding done|slice encoded) in (\d+) ms", sum),  # per image (batch)
    "prompt_ms": (r"prompt eval time =\s*([\d.]+) ms", sum),
    "prompt_tokens": (r"prompt eval time =\s*[\d.]+ ms /\s*(\d+) tokens", sum),
    "eval_ms": (r"eval time =\s*([\d.]+) ms /\s*\d+ runs", sum),  # "runs": not the prompt eval line
    "eval_runs": (r"eval time =\s*[\d.]+ ms /\s*(\d+) runs", sum),
}


def parse_log(text: str) -> dict[str, float]:
    """llama-mtmd-cli's timing lines -> numbers; a missing line is an error naming it (a changed log format
    must not read as zero)."""
    out = {}
    for key, (pattern, combine) in _PATTERNS.items():
        found = [float(x) for x in re.findall(pattern, text)]
        if not found and key != "encode_ms":  # a text-only prompt encodes nothing
            raise RuntimeError(f"llama-mtmd-cli's log has no line matching {pattern!r}:\n{text[-2000:]}")
        out[key] = combine(found)
    return out


def chat_script(conversation) -> str:
    """stdin for llama-mtmd-cli's chat mode: one `/image` line per image, the text, then /quit."""
    text, images, videos = split_conversation(conversation)
    if videos:
        raise worker.CannotRun("llama-mtmd-cli takes a video only as a file it decodes with ffmpeg, not as frames")
    if "\n" in text:
        raise worker.CannotRun("llama-mtmd-cli's chat mode reads the prompt as one line")
    return "".join(f"/image {p}\n" for p in images) + text + "\n/quit\n"


class LlamaCpp:
    def __init__(self, model_dir: str, threads: int):
        root = Path(model_dir)
        self.cli = root.parents[2] / "build" / "bin" / "llama-mtmd-cli"  # PEERS/llamacpp/models/NAME/KEY
        self.args = ["-m", root / "text-q4_k_m.gguf", "--mmproj", root / "mmproj-f16.gguf", "-t", threads,
                     "-tb", threads, "-c", CONTEXT, "--temp", 0, "--ignore-eos", "--jinja",
                     "--perf", "-lv", 4, "--no-log-timestamps", "--log-colors", "off"]  # perf lines are level 4
        self.peak = 0
        source = next(root.parents[2].glob("src/llama_cpp_python-*/vendor/llama.cpp"))
        self.settings = {"llama.cpp": f"{source.parents[1].name}'s vendor/llama.cpp", "threads": threads,
                         "context": CONTEXT, "text": "Q4_K_M", "mmproj": "f16"}

    def run(self, conversation, new_tokens: int) -> dict:
        script = chat_script(conversation)
        with tempfile.TemporaryFile("w+", errors="replace") as log:  # replies may end mid-character
            t0 = time.time()
            proc = subprocess.Popen([str(a) for a in (self.cli, *self.args, "-n", new_tokens)], text=True,
                                    stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT)
            proc.stdin.write(script)
            proc.stdin.close()
            _, status, usage = os.wait4(proc.pid, 0)
            t1 = time.time()
            proc.returncode = os.waitstatus_to_exitcode(status)
            log.seek(0)
            text = log.read()
        if proc.returncode != 0:
            raise RuntimeError(f"llama-mtmd-cli failed (exit {proc.returncode}):\n{text[-3000:]}")
        t = parse_log(text)
        peak = usage.ru_maxrss * 1024
        self.peak = max(self.peak, peak)
        # llama.cpp's prompt-eval timer runs from the first queued prompt batch to the next synchronisation:
        # the text before an image is queued, the image encoded and decoded, then synchronised, so the
        # timer spans the image encode too
        ttft = t["prompt_ms"] / 1e3
        decode_s = t["eval_ms"] / 1e3
        return {"preprocess": None, "vision": t["encode_ms"] / 1e3, "ttft": ttft,
                "decode_tok_s": t["eval_runs"] / decode_s if decode_s else 0.0, "e2e": ttft + decode_s,
                "prompt_tokens": int(t["prompt_tokens"]), "peak_rss_bytes": peak,
                "first_token_at": t1 - decode_s, "ready_at": t1 - decode_s - ttft}

    def whole_run_peak_rss_bytes(self) -> int:
        return self.peak


if __name__ == "__main__":
    worker.main(sys.argv[1], sys.argv[2], make=lambda spec: LlamaCpp(spec["model_dir"], spec["threads"]))
