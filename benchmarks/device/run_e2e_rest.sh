#!/usr/bin/env bash
# CogVideoX-5B-shaped 42 layers at densities 0.5 / 0.3, then a Flux-1024-shaped run (FLUX.1 dims,
# reduced depth: 5 double + 10 single blocks, so that four compiles fit in one device call).
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1 || echo "editable install failed"
timeout 300 python3 benchmarks/bench_e2e.py --out $OUT/cog42b --model cog --layers 42 --iters 5 \
    --variants "paro-0.5,paro-0.3" --max-minutes 4.6 2>&1 | grep "median\|FAILED" | tail -4
timeout 260 python3 benchmarks/bench_e2e.py --out $OUT/flux --model flux --flux-layers 5,10 --iters 10 \
    --variants "compile-cudnn,compile,paro-0.5,paro-0.2" --max-minutes 4.1 2>&1 | tail -9
