#!/usr/bin/env bash
# Device call (H100, ~8 min): skipped-block compensation — kernel cost vs the uncompensated kernel and
# FlexAttention (bench_compensation.py), then quality on the trained fixture (quality.py, eager paro op,
# 6 prompts x 20 steps) with and without compensation: the default recipe (block 64) and the dense-first
# recipe (block 32 / 64, dense_steps=2, sparse density 0.125 => ~0.3 step-weighted). Carry `.whl`.
set -u
source benchmarks/device/setup.sh
timeout 230 python3 benchmarks/bench_compensation.py --out $OUT/kernel 2>&1 | tail -12
Q="python3 benchmarks/quality.py --exec eager --max-minutes 4"
timeout 120 $Q --out $OUT/q64 --variants paro,natural --compensate both 2>&1 | grep -E "PSNR|FAILED|Error" | cut -c1-150
timeout 90 $Q --out $OUT/q32ds2 --block 32 --dense-steps 2 --densities 0.125 --variants paro --compensate both 2>&1 | grep -E "PSNR|FAILED|Error" | cut -c1-150
timeout 90 $Q --out $OUT/q64ds2 --dense-steps 2 --densities 0.125 --variants paro --compensate both 2>&1 | grep -E "PSNR|FAILED|Error" | cut -c1-150
for d in q64 q32ds2 q64ds2; do python3 -c "
import json; r = json.load(open('$OUT/$d/results.json'))
for v in r['variants']:
    print('$d', v['name'], 'avg', round(v.get('avg_density', -1), 4), 'psnr', round(v.get('psnr', -1), 2), 'cos', round(v.get('cosine', -1), 5))
print('$d targets', r['targets'])"; done
(cd $OUT && tar cf quality.tar q64 q32ds2 q64ds2 && rm -rf q64 q32ds2 q64ds2)
