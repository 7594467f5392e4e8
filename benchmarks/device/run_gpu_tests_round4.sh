#!/usr/bin/env bash
# Device call (H100, ~7 min): the GPU tests touched in round 4 (block 16 PV, the host-bound speed test,
# compensation) and the model-level gpu-marked tests. Carry `.whl`.
set -u
source benchmarks/device/setup.sh
( timeout 200 python3 -m pytest -q -rf -p no:logging --timeout 120 tests/kernels/test_attention.py \
    -k "other_block_sizes or cuda_sparse_is_faster or cuda_bf16_large" 2>&1 || true ) > $OUT/kernel_tests.log
grep -E "passed|failed|FAILED|Error" $OUT/kernel_tests.log | cut -c1-300 | tail -6
( timeout 200 python3 -m pytest -q -rf -p no:logging --timeout 120 -m gpu tests/test_backend.py tests/test_lower.py \
    tests/test_diffusers_models.py 2>&1 || true ) > $OUT/model_tests.log
grep -E "passed|failed|FAILED|Error" $OUT/model_tests.log | cut -c1-300 | tail -6
