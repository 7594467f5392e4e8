#!/usr/bin/env bash
# Device call (H100, ~6 min): block-16 dense-first recipes with compensation at an average density of 0.3, with the
# dense share moved: 3 of 20 steps dense + 0.1765 on the rest, and 5 of 20 + 0.0667 (round 4 measured 4 of 20 +
# 0.125: 29.71 dB). quality.py, 6 prompts × 20 steps, eager paro op. Carry `.whl`.
set -u
source benchmarks/device/setup.sh
# SPECS: "dense_steps,density,step_buckets;..." (default: the two of the recorded run)
IFS=';' read -ra ITEMS <<< "${SPECS:-3,0.1765,2;5,0.0667,2}"
for spec in "${ITEMS[@]}"; do
  IFS=',' read -r ds dens sb <<< "$spec"
  timeout 170 python3 benchmarks/quality.py --exec eager --max-minutes 2.5 --out $OUT/q16ds${ds}b${sb} --block 16 --calib-every 1 \
      --dense-steps $ds --densities $dens --step-buckets $sb --variants paro --compensate on 2>&1 | grep -E "FAILED|Error" | cut -c1-150
  python3 -c "
import json; r = json.load(open('$OUT/q16ds${ds}b${sb}/results.json'))
for v in r['variants']:
    print('dense steps $ds buckets $sb', v['name'], 'avg', round(v.get('avg_density', -1), 4), 'psnr', round(v.get('psnr', -1), 2), 'ssim', round(v.get('ssim', -1), 4), 'cos', round(v.get('cosine', -1), 5))"
done
(cd $OUT && tar cf quality_dense_share.tar q16ds* && rm -rf q16ds*)
