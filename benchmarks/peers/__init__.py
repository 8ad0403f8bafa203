"""The peers measured beside us: OpenVINO GenAI and llama.cpp, each installed in its own environment.

Each peer has a set-up script here (run once; it installs under the peers folder, not in the repo), a worker
that the bench runs with the peer's own python, and a conversion of the benchmark's checkpoint made on first
use with the peer's own tools. The workers import nothing of ours but benchmarks/worker.py (pure Python).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from qwen2vl_edge.runtime.errors import ConfigError

HERE = Path(__file__).resolve().parent
# OpenVINO's int4: optimum-intel's recommended group of 128, symmetric as ours, every layer in int4
# (embeddings and lm_head stay int8 as NNCF does by default); groups that do not divide a small
# checkpoint's rows are adjusted instead of refused.
OPENVINO_INT4 = ("--weight-format", "int4", "--sym", "--group-size", "128", "--ratio", "1.0",
                 "--group-size-fallback", "adjust")


@dataclass(frozen=True)
class Peer:
    folder: str  # under the peers dir
    setup: str  # set-up script in this folder
    worker: str  # run by the peer's python
    needs: tuple[str, ...]  # files the set-up leaves, relative to the peer's folder
    # llama.cpp's converter names the vision merger's MLP layers (mlp.0, mlp.2) through the vision block
    # table, so a vision tower of fewer than 3 blocks (the tiny checkpoint's 2) has no name for mlp.2
    min_vision_depth: int = 0

    def root(self, peers_dir: Path) -> Path:
        return peers_dir / self.folder

    def python(self, peers_dir: Path) -> Path:
        return self.root(peers_dir) / "venv" / "bin" / "python"


PEERS = {
    "openvino-int4": Peer("openvino", "setup_openvino.sh", "openvino_worker.py",
                          ("venv/bin/python", "venv/bin/optimum-cli")),
    "llamacpp-q4km": Peer("llamacpp", "setup_llamacpp.sh", "llamacpp_worker.py",
                          ("venv/bin/python", "build/bin/llama-mtmd-cli", "build/bin/llama-quantize"),
                          min_vision_depth=3),
}


def peers_dir(override: str | Path | None = None) -> Path:
    if override:
        return Path(override)
    return Path(os.environ.get("QWEN2VL_EDGE_PEERS", Path.home() / ".cache" / "qwen2vl-edge" / "peers"))


def check_installed(names: list[str], root: Path) -> None:
    """ConfigError naming the set-up script of every peer in `names` that is not installed under `root`."""
    missing = []
    for name in names:
        peer = PEERS[name]
        absent = [n for n in peer.needs if not (peer.root(root) / n).exists()]
        if absent:
            missing.append(f"{name} is not installed ({peer.root(root) / absent[0]} is missing): run "
                           f"benchmarks/peers/{peer.setup}")
    if missing:
        raise ConfigError("; ".join(missing) + (f" (with QWEN2VL_EDGE_PEERS={root})"
                                                if root != peers_dir() else ""))


def check_checkpoint(names: list[str], ckpt: Path) -> None:
    """ConfigError for a peer in `names` whose converter cannot take `ckpt`, before anything is measured."""
    depth = json.loads((ckpt / "config.json").read_text())["vision_config"]["depth"]
    for name in names:
        if depth < PEERS[name].min_vision_depth:
            raise ConfigError(f"{name} cannot convert {ckpt}: llama.cpp's convert_hf_to_gguf needs a vision "
                              f"depth of at least {PEERS[name].min_vision_depth} (it names the merger's mlp.2 "
                              f"through the vision blocks), this checkpoint has {depth}; use --model 2b-shape, "
                              f"or a checkpoint with a deeper vision tower")


def checkpoint_key(ckpt: Path) -> str:
    """A folder name per checkpoint and weights version: a rebuilt checkpoint at the same path converts anew."""
    h = hashlib.sha256(str(ckpt.resolve()).encode())
    for p in sorted(ckpt.glob("*.safetensors")) + [ckpt / "config.json"]:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return f"{ckpt.resolve().parent.name}-{h.hexdigest()[:10]}"


def _run(cmd: list, what: str) -> None:
    print("  " + " ".join(map(str, cmd)), flush=True)
    proc = subprocess.run([str(c) for c in cmd])
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}); the command is printed above")


def _convert_openvino(root: Path, ckpt: Path, out: Path) -> None:
    _run([root / "venv" / "bin" / "optimum-cli", "export", "openvino", "--model", ckpt, "--task",
          "image-text-to-text", *OPENVINO_INT4, out], "optimum-cli export openvino")


def _convert_llamacpp(root: Path, ckpt: Path, out: Path) -> None:
    """Text model to f16 GGUF, then Q4_K_M; the vision part (--mmproj) stays f16, as llama.cpp ships it."""
    py = root / "venv" / "bin" / "python"
    convert = next((root / "src").glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    f16 = out / "text-f16.gguf"
    _run([py, convert, ckpt, "--outtype", "f16", "--outfile", f16], "convert_hf_to_gguf (text)")
    _run([py, convert, ckpt, "--mmproj", "--outtype", "f16", "--outfile", out / "mmproj-f16.gguf"],
         "convert_hf_to_gguf (--mmproj)")
    _run([root / "build" / "bin" / "llama-quantize", f16, out / "text-q4_k_m.gguf", "Q4_K_M"], "llama-quantize")
    f16.unlink()


CONVERT = {"openvino-int4": _convert_openvino, "llamacpp-q4km": _convert_llamacpp}
CONVERSION = {  # for the report
    "openvino-int4": "optimum-cli export openvino " + " ".join(OPENVINO_INT4),
    "llamacpp-q4km": "convert_hf_to_gguf.py --outtype f16, then llama-quantize Q4_K_M; vision: --mmproj f16",
}


def model_dir(name: str, ckpt: Path, root: Path) -> Path:
    """The peer's conversion of `ckpt`, made on first use (into a temporary folder, renamed when complete)."""
    peer_root = PEERS[name].root(root)
    out = peer_root / "models" / name / checkpoint_key(ckpt)
    if not out.is_dir():
        print(f"converting {ckpt} for {name} into {out} (once) ...", flush=True)
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        CONVERT[name](peer_root, ckpt, tmp)
        tmp.rename(out)
    return out


def worker_command(name: str, root: Path) -> list[str]:
    peer = PEERS[name]
    return [str(peer.python(root)), str(HERE / peer.worker)]


def weights_on_disk_bytes(model: Path) -> int:
    return sum(p.stat().st_size for p in model.iterdir() if p.suffix in (".bin", ".gguf"))
