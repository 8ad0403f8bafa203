"""By hand, not collected by pytest: the test suite's GPTQ/AWQ packers and our reader against the publishers'
own pack code, AutoAWQ 0.2.9 (`WQLinear_GEMM.from_linear`, `dequantize_gemm`) and AutoGPTQ 0.7.1
(`QuantLinear.pack` of qlinear_cuda_old / qlinear_cuda), fetched with `pip download --no-deps` and loaded
from their files (not installed: their CUDA / accelerate dependencies are not needed for packing).

    python tests/crosscheck_publishers.py [DIR]     # DIR caches the downloads (default: a temp dir)
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tarfile
import tempfile
import types
import zipfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from quantized_checkpoints import group_index, pack_awq, pack_gptq, rtn  # noqa: E402
from qwen2vl_edge.export.prequantized import read_scheme, unpack  # noqa: E402

N, K = 64, 128  # AutoAWQ sizes qweight as N // 32 * bits columns: N a multiple of 32


def fetch(dest: Path) -> tuple[Path, Path]:
    """-> (AutoAWQ's awq/ dir, AutoGPTQ's auto_gptq/ dir)."""
    for spec in ("autoawq==0.2.9", "auto-gptq==0.7.1"):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), spec], check=True)
    with tarfile.open(next(dest.glob("autoawq-*.tar.gz"))) as tar:
        tar.extractall(dest, filter="data")
    zipfile.ZipFile(next(dest.glob("auto_gptq-*.whl"))).extractall(dest / "auto_gptq_whl")
    return next(dest.glob("autoawq-*/awq")), dest / "auto_gptq_whl" / "auto_gptq"


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def awq_modules(awq: Path):
    """AutoAWQ's gemm and packing_utils, without its package __init__ (which loads every model family)."""
    for pkg in ("awq", "awq.utils", "awq.modules", "awq.modules.linear"):
        module = types.ModuleType(pkg)
        module.__path__ = [str(awq.parent / pkg.replace(".", "/"))]
        sys.modules[pkg] = module
    load("awq.utils.module", awq / "utils/module.py")
    sys.modules["awq.utils.utils"] = types.SimpleNamespace(get_best_device=lambda: "cpu")
    return load("awq.modules.linear.gemm", awq / "modules/linear/gemm.py"), load(
        "awq.utils.packing_utils", awq / "utils/packing_utils.py")


def layer(rng, bits: int, g_idx, sym: bool, min_zero: int):
    q, scales, zeros = rtn(rng.standard_normal((N, K)).astype(np.float32), bits, g_idx, sym, min_zero)
    dequant = ((q - zeros[:, g_idx]) * scales.astype(np.float32)[:, g_idx]).astype(np.float32)
    linear = torch.nn.Linear(K, N, bias=False)
    linear.weight.data = torch.from_numpy(dequant)
    return q, scales, zeros, dequant, linear


def main() -> int:
    dest = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp())
    dest.mkdir(parents=True, exist_ok=True)
    awq_dir, gptq_dir = fetch(dest)
    gemm, packing = awq_modules(awq_dir)
    rng, failures = np.random.default_rng(0), []

    def check(label: str, ok: bool) -> None:
        print(("ok   " if ok else "FAIL ") + label)
        if not ok:
            failures.append(label)

    for gs in (32, 128):
        g_idx = np.arange(K) // gs
        q, scales, zeros, dequant, linear = layer(rng, 4, g_idx, sym=False, min_zero=0)
        theirs = gemm.WQLinear_GEMM.from_linear(linear, 4, gs, scales=torch.from_numpy(scales.T.astype(np.float32)),
                                                zeros=torch.from_numpy(zeros.T.astype(np.float32)))
        ours = pack_awq(q, scales, zeros)
        check(f"AWQ g{gs}: packer == WQLinear_GEMM.from_linear", all(
            np.array_equal(ours[k], getattr(theirs, k).numpy()) for k in ("qweight", "qzeros", "scales")))
        tensors = {k: getattr(theirs, k).numpy() for k in ("qweight", "qzeros", "scales")}
        w = unpack(read_scheme({"quant_method": "awq", "bits": 4, "group_size": gs}), tensors, "awq").dequantize()
        check(f"AWQ g{gs}: reader on AutoAWQ's tensors == the packed weight", np.array_equal(w, dequant))
        fp16 = packing.dequantize_gemm(theirs.qweight, theirs.qzeros, theirs.scales, 4, gs).float().numpy()  # [K, N]
        check(f"AWQ g{gs}: reader == dequantize_gemm within fp16 rounding", np.allclose(w.T, fp16, rtol=1e-3))
    for bits, sym, act, kind in ((4, True, False, "qlinear_cuda_old"), (4, False, True, "qlinear_cuda"),
                                 (8, False, False, "qlinear_cuda"), (8, True, True, "qlinear_cuda")):
        g_idx = group_index(K, 32, rng.permutation(K) if act else None)
        q, scales, zeros, dequant, linear = layer(rng, bits, g_idx, sym, min_zero=1)
        theirs = load(kind, gptq_dir / f"nn_modules/qlinear/{kind}.py").QuantLinear(bits, 32, K, N, False)
        theirs.pack(linear, torch.from_numpy(scales.astype(np.float32)), torch.from_numpy(zeros.astype(np.float32)),
                    torch.from_numpy(g_idx.astype(np.int32)) if act else None)
        label = f"GPTQ {bits}-bit {'sym' if sym else 'asym'}{' act order' if act else ''} ({kind})"
        names = ("qweight", "qzeros", "scales", "g_idx")
        ours = pack_gptq(q, scales, zeros, g_idx, bits, "gptq")
        check(f"{label}: packer == QuantLinear.pack", all(np.array_equal(ours[k], getattr(theirs, k).numpy())
                                                          for k in names))
        tensors = {k: getattr(theirs, k).numpy() for k in names}
        w = unpack(read_scheme({"quant_method": "gptq", "bits": bits, "group_size": 32}), tensors, "gptq").dequantize()
        check(f"{label}: reader on AutoGPTQ's tensors == the packed weight", np.array_equal(w, dequant))
    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
