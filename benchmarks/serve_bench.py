"""`qwen2vl-edge bench-serve`: the HTTP server under concurrent clients, one process against Ray Serve replicas.

Each setup runs `qwen2vl-edge serve` as its own process; clients stream image chats (SSE) from threads.
Per concurrency level: requests/s and generated tokens/s over the level's wall time, and p50/p95 time to
first token as the client sees it (request sent -> first text piece).
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
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


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants; pages shared between processes count once
    per process."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration):  # the process ended meanwhile, or is a zombie without VmRSS
            continue
    return total


def image_uri(seed: int, side: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def stream_chat(url: str, body: dict, api_key: str | None = None) -> dict:
    """One streamed request -> seconds to the first text piece, total seconds, generated tokens, replica."""
    data = json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    request = urllib.request.Request(f"{url}/v1/chat/completions", data, headers)
    t0 = time.perf_counter()
    first, tokens = None, 0
    with urllib.request.urlopen(request, timeout=600) as response:
        replica = response.headers.get("x-qwen2vl-replica", "")
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
    return {"ttft_s": first, "total_s": time.perf_counter() - t0, "completion_tokens": tokens, "replica": replica}


def run_level(url: str, model: str, concurrency: int, requests: int, new_tokens: int, side: int,
              api_key: str | None = None) -> dict:
    bodies = [{"model": model, "max_tokens": new_tokens, "temperature": 0,
               "messages": [{"role": "user", "content": [
                   {"type": "image_url", "image_url": {"url": image_uri(i, side)}},
                   {"type": "text", "text": f"Describe picture number {i}."}]}]} for i in range(requests)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        runs = list(pool.map(lambda b: stream_chat(url, b, api_key), bodies))
    wall = time.perf_counter() - t0
    ttft = [r["ttft_s"] for r in runs if r["ttft_s"] is not None]
    return {"concurrency": concurrency, "requests": requests, "wall_s": round(wall, 3),
            "replicas": sorted({r["replica"] for r in runs}),
            "requests_per_s": round(requests / wall, 3),
            "generated_tokens_per_s": round(sum(r["completion_tokens"] for r in runs) / wall, 1),
            "ttft_p50_s": round(float(np.percentile(ttft, 50)), 3), "ttft_p95_s": round(float(np.percentile(ttft, 95)), 3)}


SETUPS = {  # name -> extra `serve` arguments, given the thread count of the machine
    "one-process": lambda threads: ["--threads", str(threads)],
    "one-process-half-threads": lambda threads: ["--threads", str(max(1, threads // 2))],
    # each replica gets half the threads and reserves half the CPUs
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
    logs = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    for name in setups:
        print(f"starting {name} (log: {logs / name}.log) ...", flush=True)
        srv = ServerProcess([str(artifact), "--max-batch", str(max_batch), *SETUPS[name](threads)],
                            logs / f"{name}.log", ready_timeout=600)
        if srv.proc.poll() is not None:
            raise RuntimeError(f"{name}: the server exited:\n{srv.output()[-3000:]}")
        result["setups"][name] = {"args": SETUPS[name](threads), "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
        try:
            served = json.loads(urllib.request.urlopen(f"{srv.url}/v1/models").read())["data"][0]["id"]
            stream_chat(srv.url, {"model": served, "max_tokens": 4, "messages": [
                {"role": "user", "content": "warm up"}]})
            result["setups"][name]["levels"] = levels_out = []
            for c in levels:
                level = run_level(srv.url, served, c, max(c * requests_per_client, 4), new_tokens, side)
                print(f"  {name} concurrency {c}: {level}", flush=True)
                levels_out.append(level)
            pids = {int(r.rsplit(":", 1)[1]) for lv in levels_out for r in lv["replicas"]}
            result["setups"][name]["rss_after_gb"] = {  # the serve process tree, and each replica in it
                "server": round(tree_rss_bytes(srv.proc.pid) / 1e9, 2),
                "replicas": [round(tree_rss_bytes(p) / 1e9, 2) for p in sorted(pids - {srv.proc.pid})]}
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
    loads = ", ".join(f"{n} {s['load_average_at_start'][0]}" for n, s in result["setups"].items())
    for name, setup in result["setups"].items():
        for lv in setup["levels"]:
            lines.append(f"| {name} | {lv['concurrency']} | {lv['requests']} | {lv['requests_per_s']:.2f} | "
                         f"{lv['generated_tokens_per_s']:.1f} | {lv['ttft_p50_s']:.3f} s | {lv['ttft_p95_s']:.3f} s |")
    lines += ["", "Resident memory after the run, summed over the `serve` process and all its descendants (with "
              "--ray: the driver, Ray's GCS, raylet, agents, proxy, controller and the replicas), of which "
              "replicas: " + "; ".join(f"{n} {s['rss_after_gb']['server']} GB" + (
                  " (replicas " + " + ".join(f"{x} GB" for x in s['rss_after_gb']['replicas']) + ")"
                  if s['rss_after_gb']['replicas'] else "") for n, s in result["setups"].items()) + "."]
    lines += ["", f"1-minute load average of the machine when each setup started: {loads} "
              f"(on {m['cores']} cores: other work shared the machine)."]
    return "\n".join(lines) + "\n"
