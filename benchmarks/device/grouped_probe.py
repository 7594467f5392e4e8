"""Query blocks under 64 rows in shared 64-row tiles (grouped union walk) vs one program per query block (H100).

CogVideoX shape B2·H48·N17776·D64, INT8 QKᵀ / FP8 PV, block 32 and 16 at densities 0.3 / 0.2, with
- "coherent" masks: a random 64×64 block mask refined to the finer blocks (neighbouring query blocks keep the same
  KV blocks: the union costs nothing; PARO masks are spatially coherent like this), and
- "independent" masks: random at the finer block (neighbours share little: the union is the worst case),
plus block 64 at the same density as the yardstick; and with skipped-block compensation on the coherent masks. The grouped CSR is passed precomputed, as the lowered op
passes it (plan constants); building it per call cost 1.4–3.6 ms at this shape (first run of this probe).
Fixed launch configs (PARO_AUTOTUNE=0: 64-row tiles, 4 warps, 3 stages; compensated: 168 registers), so every row
is the same config. Medians of triton.testing.do_bench; writes $OUT/grouped_probe.json.
"""
import json
import os

import torch

from probe_setup import COG_SHAPE, bench, cog_qkv  # first: PARO_AUTOTUNE=0, the repository on sys.path
from paro_compile.kernels import reference as R, tuning  # noqa: E402
from paro_compile.kernels.attention import grouped_csr, paro_attention_triton  # noqa: E402

b, h, n, d = COG_SHAPE
gen = torch.Generator().manual_seed(0)
q, k, v = cog_qkv(gen)
rows = []


for dens in (0.3, 0.2):
    m64 = tuning.random_block_mask(h, R.num_blocks(n, 64), R.num_blocks(n, 64), dens, generator=gen)
    c64, i64 = (x.cuda() for x in R.block_mask_to_csr(m64))
    for comp in (False, True):
        ms = bench(lambda: paro_attention_triton(q, k, v, kv_counts=c64, kv_indices=i64, compensate=comp))
        rows.append({"density": dens, "block": 64, "mask": "random", "grouped": False, "compensate": comp, "ms": ms})
        print(f"dens {dens} block 64 random     comp={comp!s:5s}      {ms:8.3f} ms", flush=True)
    for blk in (32, 16):
        f = 64 // blk
        nb = R.num_blocks(n, blk)
        coherent = tuning.refine_block_mask(m64, f, nb)
        independent = tuning.random_block_mask(h, nb, nb, dens, generator=gen, block_m=blk, block_n=blk)
        masks = (("coherent", coherent), ("independent", independent))
        if os.environ.get("PROBE_COHERENT_ONLY"):
            masks = masks[:1]
        for name, mask in masks:
            counts, indices = (x.cuda() for x in R.block_mask_to_csr(mask))
            # kept blocks walked per 64-row tile over the kept blocks of one of its query blocks (1 = no extra work)
            grouped_plan = grouped_csr(counts, indices, f, nb)  # as the lowered op gets it: plan constants
            union = grouped_plan[0].float().mean().item() / max(counts.float().mean().item(), 1)
            for grouped, comp in ((True, False), (False, False)) + (((True, True), (False, True)) if name == "coherent" else ()):
                try:
                    t = bench(lambda: paro_attention_triton(q, k, v, kv_counts=counts, kv_indices=indices, block_m=blk,
                                                            block_n=blk, variant={"group_query_blocks": grouped},
                                                            compensate=comp, grouped=grouped_plan))
                except Exception as e:  # noqa: BLE001
                    t = float("nan")
                    print("failed", blk, name, grouped, type(e).__name__, str(e)[:300], flush=True)
                rows.append({"density": dens, "block": blk, "mask": name, "grouped": grouped, "compensate": comp, "ms": t,
                             "kept": float(mask.float().mean()), "union_over_own": union})
                print(f"dens {dens} block {blk} {name:11s} grouped={grouped!s:5s} comp={comp!s:5s} {t:8.3f} ms  kept {mask.float().mean():.3f}"
                      f"  union/own {union:.2f}", flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "grouped_probe.json"), "w"), indent=1)
