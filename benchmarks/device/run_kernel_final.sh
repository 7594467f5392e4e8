#!/usr/bin/env bash
# One device call (H100, ~9 min): prefetch/PV variants on the CogVideoX shape, then the full attention
# benchmark (all shapes, densities, peers; with the faster of the fp8 variants as the default), the
# large GPU kernel tests, and the interleaved folding overhead at depth 6.
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > /dev/null 2>&1 || echo "editable install failed"
timeout 120 python3 benchmarks/kernel_variants.py --rep 200 --out $OUT/variants.json \
    --variants "fp8,fp8 prefetch,bf16 ftz,bf16 prefetch" 2>&1 | grep -v "^\[" | tail -22
export PARO_KERNEL_VARIANT=$(python3 - <<'PY'
import json, os
rows = json.load(open(os.environ["OUT"] + "/variants.json"))["rows"]
best = lambda v: min((r["ms"] for r in rows if r.get("variant") == v and r["density"] < 1), default=1e9)
print("prefetch_qk=1" if best("fp8 prefetch") < 0.98 * best("fp8") else "")
PY
)
echo "PARO_KERNEL_VARIANT=$PARO_KERNEL_VARIANT"
timeout 280 python3 benchmarks/bench_attention.py --rep 60 --out /tmp/attn 2>&1 | tail -45
(cd /tmp/attn && tar cf $OUT/attention.tar .)
( timeout 60 python3 -m pytest -q -p no:logging --timeout 50 tests/kernels/test_attention.py -k "cuda_bf16_large" 2>&1 || true ) | tail -4
timeout 120 python3 benchmarks/bench_fold.py --depth 6 --iters 10 --json $OUT/fold6.json 2>&1 | grep -E "_ms\"|pct"
