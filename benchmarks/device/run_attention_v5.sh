#!/usr/bin/env bash
# Device call (H100, ~8 min): the compact-CSR kernel tests on the GPU (fixed configs), then the full attention table
# (bench_attention.py: SDPA flash / cuDNN, SageAttention 1.0.6, Flex with the same mask, ours with compact CSRs as
# plans store them; three shapes, four densities). Carry `.whl`.
set -u
source benchmarks/device/setup.sh
( PARO_AUTOTUNE=0 timeout 120 python3 -m pytest -q -rf -p no:logging --timeout 100 tests/kernels/test_attention.py \
    -k "compact" 2>&1 || true ) > $OUT/gpu_tests.log
grep -E "passed|failed|FAILED|Error" $OUT/gpu_tests.log | cut -c1-300 | tail -6
timeout 420 python3 benchmarks/bench_attention.py --rep 60 --out $OUT/attn 2>&1 | grep -v -i warn | tail -42
