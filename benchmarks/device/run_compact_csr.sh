#!/usr/bin/env bash
# Device call (H100, ~7 min): compact plan CSRs — kernel tests on the GPU (compact CSR, grouped tiles, sparse masks vs the
# reference), the kernel probe (compact vs padded, same output, times), and end to end 4 CogVideoX layers
# at density 0.2 (the lowering now stores compact CSRs). Carry `.whl`.
set -u
source benchmarks/device/setup.sh
export PARO_AUTOTUNE=0
( timeout 240 python3 -m pytest -q -rf -p no:logging --timeout 200 tests/kernels/test_attention.py \
    -k "compact or grouped or sparse_matches" 2>&1 || true ) > $OUT/gpu_tests.log
grep -E "passed|failed|FAILED|Error" $OUT/gpu_tests.log | cut -c1-300 | tail -10
timeout 150 python3 benchmarks/device/compact_csr_probe.py 2>&1 | tail -30
unset PARO_AUTOTUNE
timeout 200 python3 benchmarks/bench_e2e.py --out $OUT/cog4 --model cog --layers 4 --iters 10 \
    --variants "compile-cudnn,paro-0.2" --max-minutes 3.0 2>&1 | grep -E "median|FAILED|skip" | cut -c1-200
