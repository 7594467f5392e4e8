#!/usr/bin/env bash
# Next device call (H100, ~5 min): measure the patch-conv-input fold (docs/folding.md) against the round-3
# numbers (depth 6: 2.0-2.1 % of attention, all of it in the patch embed), with a kernel profile of both
# orders, and once more at depth 2.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1 || echo "editable install failed"
export PYTHONPATH=$PWD
timeout 200 python3 benchmarks/bench_fold.py --depth 6 --iters 10 --json $OUT/fold6.json --profile $OUT/prof > /tmp/f6.log 2>&1
grep -E '_ms"|pct|sites' /tmp/f6.log || tail -5 /tmp/f6.log
for f in $OUT/prof/*.txt; do echo "== $f"; head -16 $f | cut -c1-82,150-230; done
timeout 100 python3 benchmarks/bench_fold.py --depth 2 --iters 10 --json $OUT/fold2.json 2>&1 | grep -E 'pct'
