#!/usr/bin/env bash
# Device call (H100, ~7 min): pooled keys 64 per step and dense fine-block sites at block 64 — compensation and grouped
# kernel tests on the GPU, the kernel probe, and 4 CogVideoX layers with synthetic coherent block-16 plans (dense; the
# quality recipe's sparse buckets with compensation). Carry `.whl`.
set -u
source benchmarks/device/setup.sh
( PARO_AUTOTUNE=0 timeout 200 python3 -m pytest -q -rf -p no:logging --timeout 150 tests/kernels/test_attention.py \
    tests/kernels/test_compensation.py -k "compens or grouped or compact" 2>&1 || true ) > $OUT/gpu_tests.log
grep -E "passed|failed|FAILED|Error" $OUT/gpu_tests.log | cut -c1-300 | tail -6
timeout 120 python3 benchmarks/device/pool_step_probe.py 2>&1 | tail -14
timeout 240 python3 benchmarks/bench_e2e.py --out $OUT/cog4_b16 --model cog --layers 4 --iters 10 --block 16 --coherent \
    --variants "compile-cudnn,paro-1.0,paro-0.1765+comp" --max-minutes 3.8 2>&1 | grep -E "median|FAILED|skip|Error" | cut -c1-220
