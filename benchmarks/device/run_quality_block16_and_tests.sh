#!/usr/bin/env bash
# Device call (H100, ~8 min): quality of the finest-block dense-first recipe with and without compensation
# (block 16, dense_steps=2, sparse density 0.125 => ~0.3 step-weighted), then every kernel test on the GPU. Carry `.whl`.
set -u
source benchmarks/device/setup.sh
timeout 150 python3 benchmarks/quality.py --exec eager --max-minutes 2.3 --out $OUT/q16ds2 --block 16 --dense-steps 2 \
    --densities 0.125 --variants paro --compensate both 2>&1 | grep -E "PSNR|FAILED|Error" | cut -c1-150
python3 -c "
import json; r = json.load(open('$OUT/q16ds2/results.json'))
for v in r['variants']:
    print(v['name'], 'avg', round(v.get('avg_density', -1), 4), 'psnr', round(v.get('psnr', -1), 2), 'cos', round(v.get('cosine', -1), 5))
print(r['targets'])"
(cd $OUT && tar cf quality16.tar q16ds2 && rm -rf q16ds2)
# kernel tests run on the GPU here (kernel_device() = cuda); failures reported with their message (-rf)
( timeout 330 python3 -m pytest -q -rf -p no:logging --timeout 120 tests/kernels/test_attention.py \
    -k "sparse_matches_reference or other_block_sizes or cuda" 2>&1 || true ) > $OUT/gpu_tests.log
grep -E "passed|failed|FAILED|rel-L2" $OUT/gpu_tests.log | cut -c1-400 | tail -12
