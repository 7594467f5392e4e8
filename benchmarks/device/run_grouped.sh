#!/usr/bin/env bash
# Device call (H100, ~5 min): grouped 64-row tiles for 32/16-token query blocks — speed (grouped_probe.py, with and
# without compensation) and the GPU tests of the grouped walk. The numerics do not change (quality as measured).
# Carry `.whl`.
set -u
source benchmarks/device/setup.sh
PROBE_COHERENT_ONLY=${PROBE_COHERENT_ONLY:-} timeout 200 python3 benchmarks/device/grouped_probe.py 2>&1 | grep -v -i warn | grep -E "block (32|16) coherent|block 64"
( timeout 240 python3 -m pytest -q -rf -p no:logging --timeout 230 tests/kernels/test_attention.py \
    tests/kernels/test_compensation.py -k "grouped or other_block_sizes or kernel_matches_reference" 2>&1 || true ) | grep -E "passed|failed|FAILED|rel-L2" | cut -c1-300 | tail -5
# End to end, CogVideoX-5B-shaped 4 layers with block-32 synthetic plans (random masks per block: the grouped walk's
# worst case; calibrated PARO masks are coherent).
timeout 150 python3 benchmarks/bench_e2e.py --out $OUT/cog4_b32 --model cog --layers 4 --iters 10 --block 32 \
    --variants "compile-cudnn,paro-0.2" --max-minutes 1.5 2>&1 | grep -E "median|FAILED|skip" | cut -c1-200
