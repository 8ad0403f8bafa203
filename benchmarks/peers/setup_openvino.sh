#!/usr/bin/env bash
# OpenVINO GenAI peer for `qwen2vl-edge bench --systems ...,openvino-int4`.
#
# A venv with openvino-genai (the VLMPipeline the bench runs) and optimum-intel + NNCF (the int4 export),
# under $QWEN2VL_EDGE_PEERS/openvino (default ~/.cache/qwen2vl-edge/peers/openvino). optimum-intel exports
# Qwen2-VL with transformers 4.x only, so the venv holds its own transformers < 5. The bench exports each
# checkpoint on first use.
#
#   benchmarks/peers/setup_openvino.sh [--torch-site DIR]
#
# --torch-site: a site-packages holding a CPU torch (+ torchvision), linked into the venv after its own
# packages (so the venv's transformers 4.x wins) instead of downloading torch again (PyPI's is the CUDA
# build, gigabytes). Default: the one of `python` on PATH.
set -euo pipefail
PINS=("openvino==2026.4.1" "openvino-genai==2026.4.1.0" "openvino-tokenizers==2026.4.1.0" "optimum-intel==2.2.0"
      "nncf==3.4.0" "transformers>=4.51,<5" "numpy<2.5")
ROOT="${QWEN2VL_EDGE_PEERS:-$HOME/.cache/qwen2vl-edge/peers}/openvino"
TORCH_SITE=""
[[ "${1:-}" == "--torch-site" ]] && TORCH_SITE="$2"
if [[ -z "$TORCH_SITE" ]]; then
  TORCH_SITE="$(python -c 'import pathlib, torch; print(pathlib.Path(torch.__file__).parents[1])')"
fi

mkdir -p "$ROOT"
[[ -x "$ROOT/venv/bin/python" ]] || python -m venv "$ROOT/venv"
PY="$ROOT/venv/bin/python"
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# The .pth goes in first so that pip counts torch as installed; the venv's own site-packages stays ahead of
# it on sys.path, and pip never uninstalls outside the venv, so TORCH_SITE is left as it is.
echo "$TORCH_SITE" > "$SITE/zz-torch-site.pth"
"$PY" -m pip install -q "${PINS[@]}"
"$PY" - <<'PY'
import openvino, openvino_genai, optimum.intel, torch, transformers
assert transformers.__version__ < "5", f"transformers {transformers.__version__} shadows the venv's 4.x"
print("OpenVINO peer ready: openvino", openvino.__version__, "genai", openvino_genai.__version__,
      "transformers", transformers.__version__, "torch", torch.__version__)
PY
