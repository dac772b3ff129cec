#!/usr/bin/env bash
# The whole GPU check in one command: environment, every test on CUDA for every backend (torch,
# triton, cuda), every benchmark suite, then the report. Everything lands in $OUT (default
# benchmarks/results/gpu-check/): at most a handful of files, so they can be collected at once.
#
#   bash benchmarks/gpu_check.sh            # from the repository root, on a machine with a GPU
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  python -c "import triton; print('triton', triton.__version__)" || echo "triton missing"
  python -c "import cupy; print('cupy', cupy.__version__)" || echo "cupy missing"
} > "$OUT/environment.txt" 2>&1

python -m pytest -q -rs tests --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1 || status=1
tail -n 3 "$OUT/tests.log"
python -m pytest -q benchmarks --benchmark-only --benchmark-json="$OUT/benchmarks.json" \
  > "$OUT/benchmarks.log" 2>&1 || status=1
tail -n 3 "$OUT/benchmarks.log"
python benchmarks/report.py --out "$OUT" > "$OUT/report.log" 2>&1 || status=1
cat "$OUT/report.log"
exit $status
