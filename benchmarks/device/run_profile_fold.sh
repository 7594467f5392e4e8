#!/usr/bin/env bash
# One device call (H100, ~5 min): where the time goes in the CogVideoX-5B-shaped model (2 layers,
# torch.profiler per variant), and the folding overhead at depth 2 and 6 (fixed vs per-layer cost).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1 || echo "editable install failed"
timeout 200 python3 benchmarks/bench_e2e.py --out $OUT/e2e --model cog --layers 2 --iters 5 --profile \
    --variants compile-cudnn,paro-0.2 --max-minutes 3 2>&1 | tail -6
for f in $OUT/e2e/profile_*.txt; do echo "== $f"; head -28 $f | cut -c1-100,190-260; done
timeout 100 python3 benchmarks/bench_fold.py --depth 2 --iters 10 --json $OUT/fold2.json 2>&1 | tail -3
timeout 150 python3 benchmarks/bench_fold.py --depth 6 --iters 10 --json $OUT/fold6.json 2>&1 | tail -3
