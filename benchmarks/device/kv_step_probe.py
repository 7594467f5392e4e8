"""How much does a 128-key softmax step save over a 64-key step? (H100 probe, ~1 min)

CogVideoX shape, the current kernel with block_n 64 vs 128 (block_m 64) at equal density: dense and random
block masks at 0.2 / 0.3. A 128-key step is what walking kept blocks in pairs would give, minus the second
load and dot; if it is not clearly faster, the pair walk is not worth its numerics change.
"""
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.getcwd())
from paro_compile.kernels import reference as R, tuning  # noqa: E402
from paro_compile.kernels.attention import paro_attention_triton  # noqa: E402

b, h, n, d = 2, 48, 17776, 64
gen = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(b, h, n, d, generator=gen).to(torch.bfloat16).cuda() for _ in range(3))
rows = []
for dens in (1.0, 0.3, 0.2):
    for bn in (64, 128):
        mq, nk = R.num_blocks(n, 64), R.num_blocks(n, bn)
        if dens >= 1.0:
            counts = indices = None
        else:
            mask = tuning.random_block_mask(h, mq, nk, dens, generator=gen, block_m=64, block_n=bn)
            counts, indices = (x.cuda() for x in R.block_mask_to_csr(mask))
        for cfg in ({"TILE_M": 64, "num_warps": 4, "num_stages": 3}, {"TILE_M": 64, "num_warps": 4, "num_stages": 2},
                    {"TILE_M": 64, "num_warps": 8, "num_stages": 2}):
            try:
                fn = lambda: paro_attention_triton(q, k, v, kv_counts=counts, kv_indices=indices, block_m=64,  # noqa
                                                   block_n=bn, config=cfg)
                fn()
                torch.cuda.synchronize()
                ms = triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")
            except Exception as e:  # noqa: BLE001
                ms = float("nan")
                print("failed", dens, bn, cfg, type(e).__name__, str(e)[:200])
            rows.append({"density": dens, "block_n": bn, **cfg, "ms": round(ms, 4)})
            print(f"dens {dens:4.2f} block_n {bn:4d} {cfg}  {ms:8.3f} ms", flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "kv_step_probe.json"), "w"), indent=1)
