#!/usr/bin/env bash
# llama.cpp peer for `qwen2vl-edge bench --systems ...,llamacpp-q4km`.
#
# Builds llama-mtmd-cli and llama-quantize from the llama.cpp vendored in the `llama-cpp-python` source
# distribution (PyPI), and makes a venv for its convert_hf_to_gguf.py (transformers 4.x, as its
# requirements pin). Everything lands under $QWEN2VL_EDGE_PEERS/llamacpp (default
# ~/.cache/qwen2vl-edge/peers/llamacpp); the bench converts each checkpoint on first use.
#
#   benchmarks/peers/setup_llamacpp.sh [--torch-site DIR]
#
# --torch-site: a site-packages holding a CPU torch, linked into the venv after its own packages (so the
# venv's transformers 4.x wins) instead of downloading torch again. Default: the one of `python` on PATH.
set -euo pipefail
VERSION=0.3.36          # llama-cpp-python; its vendor/llama.cpp is the llama.cpp measured
TRANSFORMERS="transformers>=4.51,<5"
ROOT="${QWEN2VL_EDGE_PEERS:-$HOME/.cache/qwen2vl-edge/peers}/llamacpp"
TORCH_SITE=""
[[ "${1:-}" == "--torch-site" ]] && TORCH_SITE="$2"
JOBS="${JOBS:-$(nproc)}"

mkdir -p "$ROOT/src"
SRC="$ROOT/src/llama_cpp_python-$VERSION/vendor/llama.cpp"
if [[ ! -f "$SRC/CMakeLists.txt" ]]; then
  python -m pip download --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$ROOT/src"
  tar -xzf "$ROOT/src/llama_cpp_python-$VERSION.tar.gz" -C "$ROOT/src"
fi

# Static binaries for this CPU (GGML_NATIVE), no network features, only the two tools the bench runs.
cmake -S "$SRC" -B "$ROOT/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_BUILD_APP=OFF -DLLAMA_USE_PREBUILT_UI=OFF
nice cmake --build "$ROOT/build" -j "$JOBS" --target llama-mtmd-cli llama-quantize

if [[ ! -x "$ROOT/venv/bin/python" ]]; then
  python -m venv "$ROOT/venv"
fi
if [[ -z "$TORCH_SITE" ]]; then
  TORCH_SITE="$(python -c 'import pathlib, torch; print(pathlib.Path(torch.__file__).parents[1])')"
fi
SITE="$("$ROOT/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# torch from TORCH_SITE; pip never uninstalls outside the venv, so the newer transformers there stays put
echo "$TORCH_SITE" > "$SITE/zz-torch-site.pth"
"$ROOT/venv/bin/python" -m pip install -q "$TRANSFORMERS" "numpy<2.5" sentencepiece "protobuf<5" pyyaml tqdm
"$ROOT/venv/bin/python" -c 'import transformers, torch; assert transformers.__version__ < "5", transformers.__version__; print("llama.cpp peer ready: transformers", transformers.__version__, "torch", torch.__version__)'
ls "$ROOT/build/bin/llama-mtmd-cli" "$ROOT/build/bin/llama-quantize"
