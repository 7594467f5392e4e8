#!/usr/bin/env bash
# CogVideoX-5B-shaped transformer, all 42 layers (H100, < 10 min per call). Usage:
#   bash benchmarks/device/run_e2e_cog42.sh "compile,compile-cudnn,paro-0.2" OUTNAME
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1 || echo "editable install failed"
timeout 560 python3 benchmarks/bench_e2e.py --out $OUT/$2 --model cog --layers 42 --iters 5 \
    --variants "$1" --max-minutes 8.8 2>&1 | grep -v "^\[bench\] *$" | tail -14
