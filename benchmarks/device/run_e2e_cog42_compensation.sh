#!/usr/bin/env bash
# Device call (H100, ~5 min): all 42 CogVideoX-5B layers, B=2, paro d=0.2 with and without skipped-block
# compensation in the same run (the cost of compensation at full depth). Carry `.whl`.
set -u
source benchmarks/device/setup.sh
timeout 290 python3 benchmarks/bench_e2e.py --out /tmp/e2e --model cog --layers 42 --iters 5 \
    --variants paro-0.2,paro-0.2+comp --max-minutes 4.6 2>&1 | grep -E "median|SKIP|skip|Error" | tail -6
(cd /tmp/e2e && tar cf $OUT/e2e42.tar .)
