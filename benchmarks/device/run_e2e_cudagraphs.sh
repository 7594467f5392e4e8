#!/usr/bin/env bash
# Device call (H100, ~9 min): the CUDA-graph test of the backend, then the Flux-1024-shaped model (5 double + 10
# single blocks) with and without CUDA graphs (mode="reduce-overhead"): at 4,608 tokens the paro call is
# host-bound, so graphs show what the kernels give. Carry `.whl`.
set -u
source benchmarks/device/setup.sh
( timeout 150 python3 -m pytest -q -rf -p no:logging --timeout 120 tests/test_backend.py -k "cuda_graphs or bf16_default" \
    2>&1 || true ) | grep -E "passed|failed|FAILED|Error|assert" | cut -c1-300 | tail -6
timeout 420 python3 benchmarks/bench_e2e.py --out $OUT/flux_cg --model flux --flux-layers 5,10 --iters 10 \
    --variants "compile-cudnn,compile-cudnn+cg,paro-0.2+cg,paro-0.2,paro-0.5+cg" --max-minutes 6.3 2>&1 \
    | grep -E "median|FAILED|skip|cudagraph" | cut -c1-250 | tail -8
python3 - <<PY
import json
rows = json.load(open("$OUT/flux_cg/results.json"))["rows"]
for r in rows:
    print(r["variant"], r.get("median_ms"), "skips", r.get("cudagraph_skips"), "x best", r.get("speedup_vs_best_compile"))
PY
