#!/usr/bin/env bash
# Device call (H100, ~5 min): the exp2 argument in one FFMA (fma_exp_arg) and the row sum on the tensor cores
# (rowsum_mma) against the current kernel, CogVideoX shape, dense / 0.2 / 0.3, cuDNN and Flex in the same run;
# then the kernel-variant tests on the GPU.
set -u
source benchmarks/device/setup.sh
timeout 300 python3 benchmarks/kernel_variants.py --out $OUT/fma_exp.json --rep 100 \
    --variants "fp8,fp8 fmaexp,fp8 fmaexp rowsum,bf16,bf16 fmaexp,int8 fmaexp" --densities 1.0,0.2,0.3 \
    --dense-configs "64,4,3;128,8,2" --sparse-configs "64,4,3;64,4,2" 2>&1 \
    | grep -v -i warn | tee $OUT/fma_exp.log | grep -E "^  |==" | head -70
( timeout 240 python3 -m pytest -q -rf -p no:logging --timeout 200 tests/kernels/test_attention.py \
    -k "variants_match or tma_and_register_cap" 2>&1 || true ) > $OUT/tests.log
grep -E "passed|failed|FAILED|Error" $OUT/tests.log | cut -c1-300 | tail -8
