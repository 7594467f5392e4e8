#!/usr/bin/env bash
# Device call (H100, ~9 min): the full attention table with the one-FFMA exp2 argument (bench_attention.py: SDPA
# flash / cuDNN, SageAttention 1.0.6, Flex with the same mask, ours; three shapes, four densities), then the
# compensated kernel under register caps (it needs 208 registers per thread uncapped: 2 CTAs per SM).
set -u
source benchmarks/device/setup.sh
timeout 360 python3 benchmarks/bench_attention.py --rep 60 --out $OUT/attn 2>&1 | grep -v -i warn | tail -40
timeout 170 python3 benchmarks/kernel_variants.py --out $OUT/comp_regs.json --rep 100 --variants "fp8" \
    --densities 0.2,0.3 --compensate --sparse-configs "64,4,3;64,4,3,168;64,4,3,128;64,4,2,168" 2>&1 \
    | grep -v -i warn | grep -E "^  |==" | head -20
