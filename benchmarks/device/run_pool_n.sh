#!/usr/bin/env bash
# Device call (H100, ~2 min): compensation's pooled keys per step (pool_n 32 / 64 / 128), CogVideoX shape, block 64,
# densities 0.2 / 0.3, Flex in the same run. Carry `.whl`.
set -u
source benchmarks/device/setup.sh
timeout 200 python3 benchmarks/kernel_variants.py --out $OUT/pool_n.json --rep 100 --variants "fp8,fp8 pool32,fp8 pool128" \
    --densities 0.2,0.3 --compensate --sparse-configs "64,4,3,168;64,4,2,168" 2>&1 | grep -v -i warn | grep -E "^  |==" | head -20
