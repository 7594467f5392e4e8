"""A dense step bucket inside a fine-block plan (H100): the grouped walk over every 16- / 32-token block at density 1,
against the dense kernel (no mask, 64-token blocks) and cuDNN SDPA. CogVideoX shape, fixed configs; writes
$OUT/dense_bucket_probe.json."""
import json
import os

import torch

from probe_setup import COG_SHAPE, bench, cog_qkv  # first: PARO_AUTOTUNE=0, the repository on sys.path
from paro_compile.kernels import reference as R  # noqa: E402
from paro_compile.kernels.attention import paro_attention_triton  # noqa: E402

b, h, n, d = COG_SHAPE
gen = torch.Generator().manual_seed(0)
q, k, v = cog_qkv(gen)

rows = {"dense kernel, block 64": bench(lambda: paro_attention_triton(q, k, v))}
with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.CUDNN_ATTENTION]):
    rows["cuDNN SDPA"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
for blk in (32, 16):
    nb = R.num_blocks(n, blk)
    full = torch.ones(h, nb, nb, dtype=torch.bool)
    grouped = tuple(t.cuda() for t in R.trim_csr(*R.grouped_block_csr(full, 64 // blk)))
    rows[f"grouped walk, block {blk}, density 1"] = bench(
        lambda: paro_attention_triton(q, k, v, grouped=grouped, block_m=blk, block_n=blk))
for name, ms in rows.items():
    print(f"{name:40s} {ms:8.3f} ms", flush=True)
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "dense_bucket_probe.json"), "w"), indent=1)
