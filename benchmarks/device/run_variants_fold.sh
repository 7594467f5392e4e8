#!/usr/bin/env bash
# One device call (H100, ~8 min): kernel code variants on the CogVideoX shape, the GPU kernel tests,
# and the folding overhead. Run from the repo root (carry `.whl` for diffusers, see the device README):
#   bash benchmarks/device/run_variants_fold.sh
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1 || echo "editable install failed"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv
timeout 230 python3 benchmarks/kernel_variants.py --rep 200 --out $OUT/variants.json 2>&1 | grep -v "^\[" | tail -40
( timeout 170 python3 -m pytest -q -p no:logging --timeout 60 tests/kernels/test_kernel_helpers.py tests/kernels/test_attention.py -k "cuda or variants or exp2 or integer" 2>&1 || true ) > $OUT/gpu_kernel_tests.log
tail -6 $OUT/gpu_kernel_tests.log
timeout 100 python3 benchmarks/bench_fold.py --depth 2 --iters 5 --json $OUT/fold.json 2>&1 | tail -8
