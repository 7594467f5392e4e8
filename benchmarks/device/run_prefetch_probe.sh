#!/usr/bin/env bash
# One device call (H100, ~4 min): sparse QK^T prefetch with indices carried ahead, and the fold probe.
set -u
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD
timeout 150 python3 benchmarks/kernel_variants.py --rep 200 --out $OUT/variants.json \
    --variants "fp8,fp8 prefetch,fp8 no-prefetch,bf16" 2>&1 | grep -v "^\[" | tail -18
timeout 90 python3 benchmarks/device/fold_prologue_probe.py 2>&1 | tail -5
