#!/usr/bin/env bash
# Device call (H100, ~6 min): register cap (maxnreg → CTAs per SM) × TMA K/V loads on the CogVideoX shape,
# dense / 0.3 / 0.2, cuDNN and Flex in the same run; then the GPU tests of both switches and the speed test.
set -u
source benchmarks/device/setup.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
timeout 330 python3 benchmarks/kernel_variants.py --out $OUT/occupancy.json --rep 100 \
    --variants "fp8,fp8 tma,fp8 tma prefetch" --densities 1.0,0.2,0.3 \
    --dense-configs "128,8,2;128,8,2,128;64,4,3;64,4,3,168;64,4,2,128" \
    --sparse-configs "64,4,3;64,4,3,168;64,4,2,168;64,4,4,168;64,4,3,128;64,4,2,128" 2>&1 \
    | grep -v -i warn | tee $OUT/occupancy.log | grep -E "^  |==" | head -90
( timeout 200 python3 -m pytest -q -rf -p no:logging --timeout 150 tests/kernels/test_attention.py \
    -k "tma_and_register_cap or cuda_sparse_is_faster" 2>&1 || true ) > $OUT/tests.log
grep -E "passed|failed|FAILED|Error|ours" $OUT/tests.log | cut -c1-300 | tail -8
