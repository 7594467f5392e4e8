#!/usr/bin/env bash
# Device call (H100, ~40 s per spec): quality recipes at an average density of 0.3 with the calibration inputs and
# the budget allocation varied — how many calibration prompts (--calib-prompts) and allocation uniform / site /
# global — on top of round 4b's best recipe (block 16, 3 of 20 steps dense + 0.1765, 3 buckets, compensation:
# 29.78 dB). quality.py, 6 prompts × 20 steps, eager paro op. Carry `.whl`.
set -u
source benchmarks/device/setup.sh
# SPECS: "block,dense_steps,density,step_buckets,calib_prompts,allocation;..."; SEED (default 1234); VARIANTS (paro, or
# paro,natural for the order comparison at the same recipe)
IFS=';' read -ra ITEMS <<< "${SPECS:-16,3,0.1765,3,2,uniform;16,3,0.1765,3,4,uniform}"
for spec in "${ITEMS[@]}"; do
  IFS=',' read -r blk ds dens sb cp alloc <<< "$spec"
  tag="b${blk}ds${ds}d${dens}sb${sb}cp${cp}${alloc}s${SEED:-1234}"
  timeout 240 python3 benchmarks/quality.py --exec eager --max-minutes 3.5 --out $OUT/q_$tag --block $blk --calib-every 1 \
      --dense-steps $ds --densities $dens --step-buckets $sb --calib-prompts $cp --allocation $alloc \
      --seed ${SEED:-1234} \
      --variants ${VARIANTS:-paro} --compensate on 2>&1 | grep -E "FAILED|Error|calibrat" | cut -c1-150
  python3 -c "
import json; r = json.load(open('$OUT/q_$tag/results.json'))
for v in r['variants']:
    print('$tag', v['name'], 'avg', round(v.get('avg_density', -1), 4), 'psnr', round(v.get('psnr', -1), 2), 'ssim', round(v.get('ssim', -1), 4), 'cos', round(v.get('cosine', -1), 5), 'attn', round(v.get('attn_rel_l2_mean', -1), 4))"
done
(cd $OUT && rm -rf q_*/plans && tar cf quality_calib_s${SEED:-1234}.tar q_* && rm -rf q_*)
