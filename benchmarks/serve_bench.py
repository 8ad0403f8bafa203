"""`qwen2vl-edge bench-serve`: the HTTP server under concurrent clients, one process against Ray Serve replicas.

Each setup runs `qwen2vl-edge serve` as its own process; clients stream image chats (SSE) from threads.
Per concurrency level: requests/s and generated tokens/s over the level's wall time, and p50/p95 time to
first token as the client sees it (request sent -> first text piece).
"""

from __future__ import annotations

import base64
import io
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from qwen2vl_edge.export.vocab import cache_dir

from . import machine
from .models import model_dirs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m qwen2vl_edge serve ARGS` on a free port of 127.0.0.1, its output in `log`. After the
    constructor the server is ready, or its process has exited (`proc.poll()` tells)."""

    def __init__(self, args: list[str], log: Path, ready_timeout: float = 120.0):
        self.port, self.log = free_port(), Path(log)
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "qwen2vl_edge", "serve", *args, "--port", str(self.port)],
                                     stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_timeout
        while self.proc.poll() is None and not self._healthy():
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"server not ready within {ready_timeout:.0f} s:\n{self.output()[-3000:]}")
            time.sleep(0.2)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                return r.status == 200
        except (OSError, urllib.error.HTTPError):
            return False

    def output(self) -> str:
        return self.log.read_text()

    def stop(self, timeout: float = 120.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def image_uri(seed: int, side: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def stream_chat(url: str, body: dict) -> dict:
    """One streamed request -> seconds to the first text piece, total seconds, generated tokens."""
    data = json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", data, {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first, tokens = None, 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                raise RuntimeError(f"server error: {event['error']}")
            if first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t0
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return {"ttft_s": first, "total_s": time.perf_counter() - t0, "completion_tokens": tokens}


def run_level(url: str, model: str, concurrency: int, requests: int, new_tokens: int, side: int) -> dict:
    bodies = [{"model": model, "max_tokens": new_tokens, "temperature": 0,
               "messages": [{"role": "user", "content": [
                   {"type": "image_url", "image_url": {"url": image_uri(i, side)}},
                   {"type": "text", "text": f"Describe picture number {i}."}]}]} for i in range(requests)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        runs = list(pool.map(lambda b: stream_chat(url, b), bodies))
    wall = time.perf_counter() - t0
    ttft = [r["ttft_s"] for r in runs if r["ttft_s"] is not None]
    return {"concurrency": concurrency, "requests": requests, "wall_s": round(wall, 3),
            "requests_per_s": round(requests / wall, 3),
            "generated_tokens_per_s": round(sum(r["completion_tokens"] for r in runs) / wall, 1),
            "ttft_p50_s": round(float(np.percentile(ttft, 50)), 3), "ttft_p95_s": round(float(np.percentile(ttft, 95)), 3)}


SETUPS = {  # name -> extra `serve` arguments, given the thread count of the machine
    "one-process": lambda threads: ["--threads", str(threads)],
    "ray-2-replicas": lambda threads: ["--ray", "--replicas", "2", "--threads", str(max(1, threads // 2)),
                                       "--cpus-per-replica", str(max(1, threads // 2))],
}


def run_bench_serve(model: str, variant: str, levels: list[int], requests_per_client: int, new_tokens: int,
                    side: int, threads: int, max_batch: int, setups: list[str], out: Path) -> dict:
    _, artifacts = model_dirs(model, None, cache_dir() / "bench", (variant,))
    artifact = artifacts[variant]
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": model, "variant": variant, "new_tokens": new_tokens, "image_side": side,
              "max_batch": max_batch, "machine": machine.describe(threads), "setups": {}}
    for name in setups:
        print(f"starting {name} ...", flush=True)
        srv = ServerProcess([str(artifact), "--max-batch", str(max_batch), *SETUPS[name](threads)],
                            out / f"server-{name}.log", ready_timeout=600)
        if srv.proc.poll() is not None:
            raise RuntimeError(f"{name}: the server exited:\n{srv.output()[-3000:]}")
        try:
            served = json.loads(urllib.request.urlopen(f"{srv.url}/v1/models").read())["data"][0]["id"]
            stream_chat(srv.url, {"model": served, "max_tokens": 4, "messages": [
                {"role": "user", "content": "warm up"}]})
            levels_out = []
            for c in levels:
                level = run_level(srv.url, served, c, max(c * requests_per_client, 4), new_tokens, side)
                print(f"  {name} concurrency {c}: {level}", flush=True)
                levels_out.append(level)
            result["setups"][name] = levels_out
        finally:
            srv.stop()
    (out / "result.json").write_text(json.dumps(result, indent=2))
    (out / "report.md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# bench-serve: {result['model']} ({result['variant']}), {m['date']}", "",
             f"{m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM; {result['image_side']}x{result['image_side']} "
             f"image + short text, {result['new_tokens']} new tokens, greedy, --max-batch {result['max_batch']}, "
             "streamed; TTFT as the client sees it.", "",
             "| setup | concurrency | requests | requests/s | generated tok/s | TTFT p50 | TTFT p95 |",
             "|---|---|---|---|---|---|---|"]
    for name, levels in result["setups"].items():
        for lv in levels:
            lines.append(f"| {name} | {lv['concurrency']} | {lv['requests']} | {lv['requests_per_s']:.2f} | "
                         f"{lv['generated_tokens_per_s']:.1f} | {lv['ttft_p50_s']:.3f} s | {lv['ttft_p95_s']:.3f} s |")
    return "\n".join(lines) + "\n"
