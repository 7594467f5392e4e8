#!/usr/bin/env bash
# Device call (H100, ~5 min): every GPU-marked test (`pytest -m gpu`: the kernels against their references on the
# GPU, the diffusers models, the backend with CUDA graphs) in one run, fixed tile configs (PARO_AUTOTUNE=0) so
# the run fits one call. Log: $OUT/gpu_tests.log. Carry `.whl`.
set -u
source benchmarks/device/setup.sh
export PARO_AUTOTUNE=0
( timeout 540 python3 -m pytest -q -rf -p no:logging --timeout 240 -m gpu tests 2>&1 || true ) > $OUT/gpu_tests.log
grep -E "passed|failed|FAILED|Error" $OUT/gpu_tests.log | cut -c1-300 | tail -15
