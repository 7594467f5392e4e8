#!/usr/bin/env bash
# Device call (H100, ~8 min): the patch-conv-input fold at depth 6 (with a kernel profile) and depth 2,
# then the CUDA kernel tests after the stop-9 kernel loop refactor. Carry `.whl`.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1 || echo "editable install failed"
nvidia-smi --query-gpu=name --format=csv,noheader; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
timeout 220 python3 benchmarks/bench_fold.py --depth 6 --iters 10 --json $OUT/fold6.json --profile $OUT/prof > $OUT/f6.log 2>&1
grep -E '_ms"|pct|sites' $OUT/f6.log || tail -5 $OUT/f6.log
for f in $OUT/prof/*.txt; do echo "== $f"; head -14 $f | cut -c1-82,150-230; done
(cd $OUT && tar cf prof.tar prof && rm -rf prof)
timeout 110 python3 benchmarks/bench_fold.py --depth 2 --iters 10 --json $OUT/fold2.json 2>&1 | grep -E 'pct'
( timeout 200 python3 -m pytest -q -p no:logging --timeout 60 tests/kernels/test_kernel_helpers.py tests/kernels/test_attention.py tests/kernels/test_prologue.py -k "cuda" 2>&1 || true ) > $OUT/gpu_kernel_tests.log
tail -6 $OUT/gpu_kernel_tests.log
