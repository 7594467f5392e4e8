#!/usr/bin/env bash
# Device call (H100, ~9 min): GPU kernel tests with the round-4 kernel (one-FFMA exp2 argument default), the CUDA-graph
# backend test, then end to end: CogVideoX-5B-shaped 4 layers (cuDNN compile, paro 0.2, +comp, +CUDA graphs) and
# the Flux-shaped paro 0.2 with CUDA graphs (failed before the empty dummy tensors). Carry `.whl`.
set -u
source benchmarks/device/setup.sh
( timeout 200 python3 -m pytest -q -rf -p no:logging --timeout 150 tests/kernels/test_attention.py tests/kernels/test_compensation.py \
    -k "sparse_matches_reference or dense_matches or cuda or compens" 2>&1 || true ) > $OUT/gpu_tests.log
grep -E "passed|failed|FAILED" $OUT/gpu_tests.log | cut -c1-300 | tail -8
( timeout 100 python3 -m pytest -q -rf -p no:logging --timeout 90 tests/test_backend.py -k "cuda_graphs" 2>&1 || true ) \
    | grep -E "passed|failed|FAILED|assert" | cut -c1-300 | tail -4
timeout 200 python3 benchmarks/bench_e2e.py --out $OUT/cog4 --model cog --layers 4 --iters 10 \
    --variants "compile-cudnn,paro-0.2,paro-0.2+comp,paro-0.2+cg,paro-0.3" --max-minutes 3.0 2>&1 \
    | grep -E "median|FAILED|skip" | cut -c1-200
timeout 150 python3 benchmarks/bench_e2e.py --out $OUT/flux_cg --model flux --flux-layers 5,10 --iters 10 \
    --variants "compile-cudnn,paro-0.2+cg,paro-0.2" --max-minutes 2.3 2>&1 | grep -E "median|FAILED|skip" | cut -c1-200
