#!/usr/bin/env bash
# Device call (H100, ~8 min): grouped 64-row tiles for 32/16-token query blocks — speed (grouped_probe.py), the GPU
# tests of the grouped walk, then quality of the block-32 and block-16 dense-first recipes with compensation
# (quality.py, 6 prompts × 20 steps) now that those blocks run in 64-row tiles. Carry `.whl`.
set -u
source benchmarks/device/setup.sh
timeout 200 python3 benchmarks/device/grouped_probe.py 2>&1 | grep -v -i warn
( timeout 120 python3 -m pytest -q -rf -p no:logging --timeout 100 tests/kernels/test_attention.py \
    -k "grouped or other_block_sizes" 2>&1 || true ) | grep -E "passed|failed|FAILED|rel-L2" | cut -c1-300 | tail -5
for blk in 32 16; do
  timeout 140 python3 benchmarks/quality.py --exec eager --max-minutes 2.0 --out $OUT/q${blk} --block $blk --dense-steps 2 \
      --densities 0.125 --variants paro --compensate on 2>&1 | grep -E "FAILED|Error" | cut -c1-150
  python3 -c "
import json; r = json.load(open('$OUT/q${blk}/results.json'))
for v in r['variants']:
    print('block $blk', v['name'], 'avg', round(v.get('avg_density', -1), 4), 'psnr', round(v.get('psnr', -1), 2), 'cos', round(v.get('cosine', -1), 5))"
done
(cd $OUT && tar cf quality_grouped.tar q32 q16 && rm -rf q32 q16)
