#!/usr/bin/env bash
# One device call (H100, ~9 min): kernel variants + INT4 check, the folding overhead, a reduced-depth
# CogVideoX-5B end-to-end run, and the CUDA-parametrised tests. Carry `.whl` (diffusers +
# importlib_metadata + sageattention wheels, see the device README) and run from the repo root:
#   bash benchmarks/device/run_kernel_e2e_tests.sh
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1 || echo "editable install failed"
timeout 150 python3 benchmarks/kernel_variants.py --out $OUT/variants.json 2>&1 | tail -45
timeout 100 python3 benchmarks/bench_fold.py --depth 2 --iters 5 --json $OUT/fold.json 2>&1 | tail -8
timeout 200 python3 benchmarks/bench_e2e.py --out /tmp/e2e --model cog --layers 4 --iters 5 \
    --variants compile,compile-cudnn,paro-0.5,paro-0.3,paro-0.2 --max-minutes 3.1 2>&1 | tail -20
(cd /tmp/e2e && tar cf $OUT/e2e.tar .)
( timeout 140 python3 -m pytest -q -m gpu -p no:logging --timeout 60 tests/test_backend.py tests/test_lower.py \
    tests/test_diffusers_models.py tests/kernels/test_kernel_helpers.py 2>&1 || true ) > $OUT/gpu_tests.log
tail -15 $OUT/gpu_tests.log
