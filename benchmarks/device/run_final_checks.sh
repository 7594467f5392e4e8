#!/usr/bin/env bash
# Device call (H100, ~4 min): GPU kernel tests after the last kernel edits of round 4 (grouped tiles, compensation,
# block sizes, the one-FFMA exp2 argument), and the CUDA-graph backend test. Carry `.whl`.
set -u
source benchmarks/device/setup.sh
( timeout 250 python3 -m pytest -q -rf -p no:logging --timeout 240 tests/kernels/test_attention.py tests/kernels/test_compensation.py \
    -k "grouped or other_block_sizes or kernel_matches_reference or cuda_bf16_large or tma_and_register" 2>&1 || true ) \
    | grep -E "passed|failed|FAILED|rel-L2" | cut -c1-300 | tail -6
