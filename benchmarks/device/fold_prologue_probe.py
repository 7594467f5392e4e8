"""Where does the per-layer cost of kernel-side residual permutations come from? (issue 4 probe)

CogVideoX-5B attention inputs (B2 H48 N17776 D64 bf16) as the model hands them over — strided views of
one [B, N, 3, H, D] QKV projection output — vs contiguous copies; with no permutation vs the fold
benchmark's residual permutations (heads in orders HWF/WHF/FWH relative to a HWF-folded layout). Times
the prologue alone and the whole call (dense mask), `triton.testing.do_bench` medians.
Usage (GPU): python benchmarks/device/fold_prologue_probe.py
"""
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from paro_compile.grid import TokenGrid, orders_permutation  # noqa: E402
from paro_compile.kernels.attention import paro_attention_triton  # noqa: E402
from paro_compile.kernels.prologue import paro_prologue  # noqa: E402

b, h, d = 2, 48, 64
grid = TokenGrid(13, 30, 45, 226)
n = grid.num_tokens
mixed = ["HWF", "HWF", "WHF", "HWF", "FWH", "HWF"]
base = orders_permutation(grid, ["HWF"] * h)
target = orders_permutation(grid, [mixed[i % len(mixed)] for i in range(h)])
# residual: position i of the head's order, expressed in the folded (HWF) token layout
inv_base = torch.empty_like(base[0])
inv_base[base[0]] = torch.arange(n)
residual = inv_base[target].cuda()
qkv = torch.randn(b, n, 3, h, d, device="cuda", dtype=torch.bfloat16)
q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
qc, kc, vc = (x.contiguous() for x in (q, k, v))
rows = {}
for layout, (qq, kk, vv) in (("strided", (q, k, v)), ("contiguous", (qc, kc, vc))):
    for name, perm in (("no perm", None), ("residual perm", residual)):
        pro = triton.testing.do_bench(lambda: paro_prologue(qq, kk, vv, perm=perm), warmup=10, rep=100, return_mode="median")
        call = triton.testing.do_bench(lambda: paro_attention_triton(qq, kk, vv, perm=perm), warmup=10, rep=300, return_mode="median")
        rows[f"{layout}, {name}"] = {"prologue_ms": round(pro, 4), "call_ms": round(call, 4)}
        print(f"{layout:10s} {name:14s} prologue {pro:7.3f} ms   whole call {call:8.3f} ms", flush=True)
print(json.dumps(rows))
