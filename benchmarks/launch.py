"""Spawning a benchmark worker: below `bench` and `decode_spread`, which both start workers this way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_worker(spec: dict, threads: int, command: list[str] | None = None) -> dict:
    """Run one benchmark worker in a fresh process (ours, or a peer's `command`) on `spec`; its JSON result."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec["spawned_at"] = time.time()
        spec_path.write_text(json.dumps(spec))
        command = command or [sys.executable, "-m", "qwen2vl_edge.benchmarks.worker"]
        proc = subprocess.run([*command, str(spec_path), str(out_path)], env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark worker for {spec['system']} failed (exit {proc.returncode})")
        return json.loads(out_path.read_text())
