#!/usr/bin/env bash
# One device call for issue 15: install the carried tree, run the GPU tests of the fused training path, then the
# benchmarks, logging everything under $OUT (a failing test does not stop the benchmarks).
#   bash kernels/bench/run_train_gpu.sh WHEEL_DIR TEST_SECONDS BENCH_SECONDS [bench_train.py args...]
set -u
WHL=$1; TEST_S=$2; BENCH_S=$3; shift 3
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl \
  > "$OUT/install.log" 2>&1 || { echo "wheel install failed"; tail "$OUT/install.log"; }
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e kernels -e . -e plugins/based -e plugins/swa \
  -e plugins/mamba -e plugins/attention >> "$OUT/install.log" 2>&1 || { echo "editable install failed"; tail "$OUT/install.log"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton, deepspeed, transformers; print(torch.__version__, triton.__version__, deepspeed.__version__, transformers.__version__)"
echo "start $(date +%s)"
if [ "$TEST_S" -gt 0 ]; then
  timeout "$TEST_S" python3 -m pytest -q -p no:cacheprovider ${TESTS:-kernels/tests/test_fused_ops.py tests/test_train_fused.py} \
    > "$OUT/gpu_tests.log" 2>&1; echo "gpu tests rc=$?"; tail -5 "$OUT/gpu_tests.log"
fi
echo "bench start $(date +%s)"
timeout "$BENCH_S" python3 kernels/bench/bench_train.py --out "$OUT" "$@" > "$OUT/bench.log" 2> "$OUT/bench.err"
echo "bench rc=$?"; cat "$OUT/train.md" 2>/dev/null; tail -30 "$OUT/bench.err" | cut -c1-600
if [ -n "${CE:-}" ]; then
  timeout "${CE}" python3 kernels/bench/bench_norm_ce.py --sections ce --budget 20 --out "$OUT" > "$OUT/norm_ce.log" 2>&1
  echo "ce bench rc=$? $(date +%s)"; tail -12 "$OUT/norm_ce.log"
fi
