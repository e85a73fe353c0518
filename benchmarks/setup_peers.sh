#!/usr/bin/env bash
# Install the peer toolchains used by benchmarks/run_all.py into their own virtual environments:
#   benchmarks/.venvs/optimum : optimum-onnx (needs transformers < 4.58) + onnxruntime
#   benchmarks/.venvs/genai   : onnxruntime-genai (its builder needs transformers 5.x) + onnx
# Idempotent: a venv whose marker file exists is left alone (pass --force to rebuild).
# Optional extras for benchmarks only; no test depends on them.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENVS="${SKYWORK_BENCH_VENVS:-$HERE/.venvs}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
FORCE=0
[[ "${1:-}" == "--force" ]] && FORCE=1

# Always a CPU torch: an unpinned torch pulls a multi-GB CUDA build.
torch_spec() {
    local wheel
    wheel=$(ls /opt/wheels/torch-${TORCH_VERSION}+cpu-*.whl 2>/dev/null | head -n1 || true)
    if [[ -n "$wheel" ]]; then echo "$wheel"; else echo "torch==${TORCH_VERSION}"; fi
}

make_venv() {  # name, then pip requirement arguments
    local name="$1"; shift
    local dir="$VENVS/$name"
    if [[ $FORCE == 0 && -f "$dir/.installed" ]]; then
        echo "[setup_peers] $name: already installed ($dir)"
        return
    fi
    echo "[setup_peers] $name: creating $dir"
    rm -rf "$dir"
    "$PYTHON" -m venv "$dir"
    "$dir/bin/python" -m pip install -q "$(torch_spec)"
    "$dir/bin/python" -m pip install -q "$@" psutil
    "$dir/bin/python" -m pip freeze > "$dir/.installed"
    echo "[setup_peers] $name: done"
}

# accelerate: optimum uses it to deduplicate tied weights at export.
make_venv optimum "optimum-onnx==0.1.0" "transformers<4.58" "onnxruntime" "onnx" "accelerate"
# The builder also imports onnx_ir, which onnxruntime-genai does not declare.
make_venv genai "onnxruntime-genai==0.18.0" "transformers>=5,<6" "onnx" "onnxruntime" "onnx-ir"

KEY_PACKAGES='^(torch|transformers|optimum-onnx|optimum|onnxruntime|onnxruntime-genai|onnx|onnx-ir)=='
for name in optimum genai; do
    echo "[setup_peers] $name: $(grep -iE "$KEY_PACKAGES" "$VENVS/$name/.installed" | tr '\n' ' ')"
done
