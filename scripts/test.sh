#!/usr/bin/env bash
# Set up the environment (scripts/setup.sh) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_vllm.sh  # the vLLM backend's tests run in its own environment
. .venv/bin/activate
python -m pytest -q "$@"
