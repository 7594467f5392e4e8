#!/usr/bin/env bash
# Device call (H100, ~5 min): the exp2 argument in one FFMA (fma_exp_arg, now the default) against the two-step
# form, CogVideoX shape, dense / 0.2 / 0.3, cuDNN and Flex in the same run; then the kernel-variant tests on the GPU.
# (The recorded run, benchmarks/results/kernel_variants_h100_v4_fma.json, also had a tensor-core row-sum variant,
# since removed: 20.4 ms dense and wrong on the GPU.)
set -u
source benchmarks/device/setup.sh
timeout 300 python3 benchmarks/kernel_variants.py --out $OUT/fma_exp.json --rep 100 \
    --variants "fp8 two-step exp-arg,fp8,bf16,int8" --densities 1.0,0.2,0.3 \
    --dense-configs "64,4,3;128,8,2" --sparse-configs "64,4,3;64,4,2" 2>&1 \
    | grep -v -i warn | tee $OUT/fma_exp.log | grep -E "^  |==" | head -70
( timeout 240 python3 -m pytest -q -rf -p no:logging --timeout 200 tests/kernels/test_attention.py \
    -k "variants_match or tma_and_register_cap" 2>&1 || true ) > $OUT/tests.log
grep -E "passed|failed|FAILED|Error" $OUT/tests.log | cut -c1-300 | tail -8
