#!/usr/bin/env bash
# Set up the environment (scripts/setup.sh), run the test suite, then the main job's whole path on a
# tiny budget (scripts/demo.sh --smoke: every stage of the demo, its configs, sizes cut). With arguments,
# only pytest runs, with them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_vllm.sh  # the vLLM backend's tests run in its own environment
. .venv/bin/activate
python -m pytest -q "$@"
if [ $# -eq 0 ]; then
  bash scripts/demo.sh --smoke
fi
