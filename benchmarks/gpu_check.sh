#!/usr/bin/env bash
# The GPU half of the fast path's checks, in one command on a machine with a CUDA GPU.
#
#   bash benchmarks/gpu_check.sh [RESULTS_DIR]        (default: benchmarks/results)
#
# 1. the fast-path tests on the GPU (tests/test_gpu.py: channels_last, fused CUDA Adam, bf16,
#    CUDA graphs and the trainer's fastest path against eager fp32) plus the CPU fast-path and
#    DDP tests in the same environment;
# 2. benchmarks/train_speed.py at the study's setting (900 slices per domain, 304x256, batch
#    1, paper networks): the plain loop against mrsynth, every feature alone, inference.
#
# Uses the python on PATH (or $PYTHON) with mrsynth importable: an installed venv, or a
# checkout with src/ put on PYTHONPATH here. Writes RESULTS_DIR/gpu_check-tests.log and
# RESULTS_DIR/train_speed-cuda.json; exits non-zero if a test failed or the benchmark did.
set -uo pipefail
cd "$(dirname "$0")/.."
results=${1:-benchmarks/results}
mkdir -p "$results"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

"$py" - <<'EOF' || exit 2
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: this torch sees no CUDA GPU; nothing to check here")
import mrsynth
print(f"mrsynth {mrsynth.__version__}, torch {torch.__version__}, "
      f"{torch.cuda.get_device_name()}, python {sys.version.split()[0]}")
EOF

"$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_speed_fast.py \
    tests/test_speed_state.py tests/test_distributed.py 2>&1 | tee "$results/gpu_check-tests.log"
tests=${PIPESTATUS[0]}

"$py" benchmarks/train_speed.py --device cuda --out "$results/train_speed-cuda.json"
bench=$?

echo "gpu_check: tests exit $tests, benchmark exit $bench (results in $results)"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
