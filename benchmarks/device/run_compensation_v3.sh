#!/usr/bin/env bash
# Device call (H100, ~8 min): compensation with in-order pooled tiles + kept-bit words (bench_compensation.py),
# the small-shape probe, a 4-layer CogVideoX-5B e2e with and without compensation, CUDA kernel tests.
set -u
source benchmarks/device/setup.sh
timeout 200 python3 benchmarks/bench_compensation.py --out $OUT/kernel 2>&1 | tail -14
timeout 60 python3 benchmarks/device/small_shape_probe.py 2>&1 | tail -8
timeout 170 python3 benchmarks/bench_e2e.py --out /tmp/e2e --model cog --layers 4 --iters 5 \
    --variants compile-cudnn,paro-0.2,paro-0.2+comp,paro-0.3,paro-0.3+comp --max-minutes 2.6 2>&1 | grep -E "median|ms|speed" | tail -8
(cd /tmp/e2e && tar cf $OUT/e2e.tar .)
( timeout 120 python3 -m pytest -q -p no:logging --timeout 100 tests/kernels/test_compensation.py 2>&1 || true ) > $OUT/gpu_kernel_tests.log
tail -4 $OUT/gpu_kernel_tests.log
