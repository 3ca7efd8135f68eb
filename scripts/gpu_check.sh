#!/usr/bin/env bash
# The GPU checks in one go, for a CUDA machine whose python3 already has torch, triton,
# transformers and peft (no install: the package is staged as it would be installed, with
# tests/ and benchmarks/ beside it). Writes its logs and bench_gpu.py's JSON under ${OUT:-.}.
#   bash scripts/gpu_check.sh [seconds for the tests] [seconds for the benchmark]
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$PWD}
STAGE=$(mktemp -d)
python3 - "$ROOT" "$STAGE" <<'PY'
import shutil, sys
from pathlib import Path
sys.path.insert(0, str(Path(sys.argv[1]) / "scripts"))
from lint_imports import stage
root, into = Path(sys.argv[1]), Path(sys.argv[2])
stage(root, into)
for name in ("native.c", "native.h"):  # the CPU kernels' source (stage copies .py files only)
    shutil.copy2(root / "kernels" / name, into / "gpupool" / "kernels" / name)
for extra in ("tests", "benchmarks"):
    shutil.copytree(root / extra, into / extra)
shutil.copy2(root / "pyproject.toml", into / "pyproject.toml")
PY
cd "$STAGE"
export PYTHONUNBUFFERED=1
nvidia-smi -L 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout "${1:-240}" python3 -m pytest -q -p no:cacheprovider -rs -k "gpu or cuda" \
  tests/test_kernels_sgmv.py tests/test_kernels_attention.py tests/test_quant.py \
  tests/test_prefetch.py tests/test_int4.py tests/test_kernels_moe.py 2>&1 | tee "$OUT/pytest.log"
timeout "${1:-240}" python3 -m pytest -q -p no:cacheprovider -rs tests/test_graphs.py \
  tests/test_kernels_fused.py 2>&1 | tee -a "$OUT/pytest.log"
timeout "${2:-300}" python3 benchmarks/bench_gpu.py --out "$OUT/gpu.json" ${BENCH_GPU_ARGS:-} 2>&1 | tee "$OUT/bench.log"
