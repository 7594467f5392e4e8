"""Skipped-block compensation: kernel time with and without it per block size (H100).

Pooled keys per compensation step were tried wider than the block for blocks under 64 and measured slower each time,
so the kernel keeps block_n per step: 64 per step (228 registers) took block 16 + compensation to 31.68 / 26.34 ms at
0.3 / 0.2 (results/pool_step/pool_step_probe.json); 32 per step (156 registers, 37 instead of 50 instructions per
pooled score) 27.87 / 24.01 ms against 25.82 / 22.01 ms with 16 per step in the same run (results/pool_step/ab/).
Rerunning this probe measures the current kernel.

CogVideoX shape B2·H48·N17776·D64, INT8 QKᵀ / FP8 PV, coherent masks (a random 64-block mask refined to the block),
densities 0.3 / 0.2, blocks 64 / 32 / 16, with and without compensation; fixed configs (PARO_AUTOTUNE=0: compensated
kernels capped at 168 registers). Round 4b measured with 16 / 32 pooled keys per step: block 16 + compensation 26.88 ms
and block 32 + compensation 14.36 ms at 0.3 (without: 11.11 / 6.85 ms). Writes $OUT/pool_step_probe.json.
"""
import json
import os

import torch

from probe_setup import COG_SHAPE, bench, cog_qkv  # first: PARO_AUTOTUNE=0, the repository on sys.path
from paro_compile.kernels import reference as R, tuning  # noqa: E402
from paro_compile.kernels.attention import paro_attention_triton  # noqa: E402

b, h, n, d = COG_SHAPE
gen = torch.Generator().manual_seed(0)
q, k, v = cog_qkv(gen)
rows = []
for dens in (0.3, 0.2):
    m64 = tuning.random_block_mask(h, R.num_blocks(n, 64), R.num_blocks(n, 64), dens, generator=gen)
    for blk in (64, 32, 16):
        f, nb = 64 // blk, R.num_blocks(n, blk)
        mask = tuning.refine_block_mask(m64, f, nb)
        csr = R.grouped_block_csr(mask, f) if blk < 64 else R.block_mask_to_csr(mask)
        tensors = tuple(t.cuda() for t in R.trim_csr(*csr))
        kw = dict(grouped=tensors, block_m=blk, block_n=blk) if blk < 64 else dict(kv_counts=tensors[0],
                                                                                     kv_indices=tensors[1])
        bits = R.kept_block_bits(mask).cuda()
        for comp in (False, True):
            ms = bench(lambda: paro_attention_triton(q, k, v, compensate=comp, kv_kept_bits=bits if comp else None, **kw))
            rows.append({"density": dens, "block": blk, "compensate": comp, "ms": ms})
            print(f"dens {dens} block {blk:2d} comp={comp!s:5s} {ms:8.3f} ms", flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "pool_step_probe.json"), "w"), indent=1)
