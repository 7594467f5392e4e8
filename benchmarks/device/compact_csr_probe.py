"""Compact plan CSRs (reference.trim_csr: rows cut to the largest count, int16 indices) vs padded int32 CSRs (H100).

CogVideoX shape B2·H48·N17776·D64, INT8 QKᵀ / FP8 PV, density 0.2 and 0.3: block 64 (per-block CSR) and block 32 / 16
with coherent masks (grouped CSR, shared 64-row tiles), with and without compensation at block 64. Both forms must give
bitwise the same output; the probe reports both times (the kernel reads int16 indices and a narrower row, so it
should be no slower). Fixed launch configs (PARO_AUTOTUNE=0). Medians of triton.testing.do_bench; writes
$OUT/compact_csr_probe.json.
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


for dens in (0.2, 0.3):
    m64 = tuning.random_block_mask(h, R.num_blocks(n, 64), R.num_blocks(n, 64), dens, generator=gen)
    for blk, comp in ((64, False), (64, True), (32, False), (16, False)):
        f = 64 // blk
        nb = R.num_blocks(n, blk)
        mask = tuning.refine_block_mask(m64, f, nb)
        csr = R.grouped_block_csr(mask, f) if blk < 64 else R.block_mask_to_csr(mask)
        forms = {"padded int32": tuple(t.cuda() for t in csr), "compact int16": tuple(t.cuda() for t in R.trim_csr(*csr))}
        outs = {}
        for form, tensors in forms.items():
            if blk < 64:
                kw = dict(grouped=tensors, block_m=blk, block_n=blk)
            else:
                kw = dict(kv_counts=tensors[0], kv_indices=tensors[1])
            fn = lambda: paro_attention_triton(q, k, v, compensate=comp, **kw)  # noqa: E731
            outs[form] = fn()
            ms = bench(fn)
            width = tensors[1].shape[-1]
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            rows.append({"density": dens, "block": blk, "compensate": comp, "form": form, "ms": ms, "slots": width,
                         "kv_blocks": nb, "csr_mb": nbytes / 2**20})
            print(f"dens {dens} block {blk} comp={comp!s:5s} {form:13s} {ms:8.3f} ms  slots {width}/{nb}  "
                  f"{nbytes / 2**20:7.2f} MB", flush=True)
        same = torch.equal(outs["padded int32"], outs["compact int16"])
        rows[-1]["bitwise_equal"] = rows[-2]["bitwise_equal"] = same
        print(f"   bitwise equal: {same}", flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "compact_csr_probe.json"), "w"), indent=1)
