#!/usr/bin/env bash
# Device call (H100, ~5 min): grouped 64-row tiles for 32/16-token query blocks — speed (grouped_probe.py, with and
# without compensation) and the GPU tests of the grouped walk. The numerics do not change (quality as measured).
# Carry `.whl`.
set -u
source benchmarks/device/setup.sh
timeout 200 python3 benchmarks/device/grouped_probe.py 2>&1 | grep -v -i warn | grep -E "block (32|16) coherent|block 64"
( timeout 300 python3 -m pytest -q -rf -p no:logging --timeout 280 tests/kernels/test_attention.py \
    tests/kernels/test_compensation.py -k "grouped or other_block_sizes or kernel_matches_reference" 2>&1 || true ) | grep -E "passed|failed|FAILED|rel-L2" | cut -c1-300 | tail -5
