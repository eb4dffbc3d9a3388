#!/usr/bin/env bash
# Create .venv (once) and install moekd with its pinned CPU PyTorch. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
# The CPU build of torch 2.13.0; a plain `torch` requirement would pull a multi-GB CUDA build.
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install --disable-pip-version-check -q torch==2.13.0
fi
python -m pip install --disable-pip-version-check -q -c scripts/constraints.txt -e '.[dev,study]'
