"""How long `serve --ray` takes to stop on SIGTERM, with a stream in flight: `python -m
qwen2vl_edge.benchmarks.ray_stop ARTIFACT [--runs 10]`. Each run starts the server (a local Ray cluster, 2
replicas), starts a long stream, sends SIGTERM and measures the seconds until the server exits and until
every process it started (Ray's GCS, raylet, workers, replicas) is gone. Run it where Ray may listen: on a
shared machine, in a network namespace with only loopback (`unshare --net`, then `ip link set lo up`).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from .serve_bench import ServerProcess


def descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                children = [int(c) for c in (task / "children").read_text().split()]
                found.update(children)
                todo += children
        except OSError:  # ended meanwhile
            continue
    return found


def alive(pid: int) -> bool:
    try:
        return " Z " not in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:3]
    except OSError:
        return False


def start_stream(url: str, model: str):
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30000,
                       "stream": True}).encode()
    response = urllib.request.urlopen(urllib.request.Request(f"{url}/v1/chat/completions", body,
                                                             {"Content-Type": "application/json"}), timeout=120)
    response.readline()  # the role chunk: the generation runs
    return response


def one_run(artifact: str, log: Path) -> dict:
    srv = ServerProcess([artifact, "--ray", "--replicas", "2", "--threads", "1"], log, ready_timeout=300)
    with urllib.request.urlopen(f"{srv.url}/v1/models", timeout=30) as r:
        model = json.loads(r.read())["data"][0]["id"]
    stream = start_stream(srv.url, model)
    started = descendants(srv.proc.pid)
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    rc = srv.proc.wait(120)
    exited = time.monotonic() - t0
    while any(alive(p) for p in started) and time.monotonic() - t0 < 120:
        time.sleep(0.05)
    gone = time.monotonic() - t0
    tail = stream.read().decode()
    return {"exit_status": rc, "exit_s": round(exited, 2), "all_processes_gone_s": round(gone, 2),
            "processes": len(started), "stream_answered_503": "shutting_down" in tail}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as d:
        runs = []
        for i in range(args.runs):
            runs.append(one_run(args.artifact, Path(d) / f"server-{i}.log"))
            print(json.dumps(runs[-1]), flush=True)
    worst = max(r["all_processes_gone_s"] for r in runs)
    print(json.dumps({"runs": len(runs), "max_all_processes_gone_s": worst,
                      "all_exit_0": all(r["exit_status"] == 0 for r in runs),
                      "all_streams_answered_503": all(r["stream_answered_503"] for r in runs)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
