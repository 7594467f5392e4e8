#!/usr/bin/env bash
# Device call (H100, ~6 min): PARO order vs natural order at block 64, densities 0.5 / 0.3 / 0.2, with and without
# compensation, pooled over three seeds (quality.py --seeds: each seed its own evaluation noise and calibration
# trajectories; 6 calibration prompts). Carry `.whl`.
set -u
source benchmarks/device/setup.sh
timeout 560 python3 benchmarks/quality.py --exec eager --max-minutes 2.8 --out $OUT/q64 --block 64 --calib-prompts 6 \
    --densities 0.5,0.3,0.2 --variants paro,natural --compensate both --seeds ${SEEDS:-1234,4321,999} 2>&1 \
    | grep -E "^\| |Targets|FAILED|Error" | cut -c1-260
(cd $OUT && find q64 -name plans -type d -prune -exec rm -rf {} + ; tar cf quality_seeds.tar q64 && rm -rf q64)
