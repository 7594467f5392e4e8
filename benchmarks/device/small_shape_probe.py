"""Why is B1·H8·N8192·D64 at density 0.2 slower than dense SDPA (test_cuda_sparse_is_faster_than_dense_sdpa)?
Times the whole call, the prologue alone, and the call with the density given (no autotune-bucket sync),
with the chosen launch config; prints one line per variant."""
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from paro_compile.kernels import reference as R, tuning  # noqa: E402
from paro_compile.kernels.attention import last_launch_info, paro_attention_triton  # noqa: E402
from paro_compile.kernels.prologue import paro_prologue  # noqa: E402

gen = torch.Generator().manual_seed(0)
b, h, n, d = 1, 8, 8192, 64
q, k, v = (torch.randn(b, h, n, d, generator=gen).to("cuda", torch.bfloat16) for _ in range(3))
pm = torch.stack([torch.randperm(n, generator=gen) for _ in range(h)]).cuda()
mask = tuning.random_block_mask(h, n // 64, n // 64, 0.2, generator=gen)
counts, indices = (x.cuda() for x in R.block_mask_to_csr(mask))
bench = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
sdpa = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
print(f"sdpa dense {sdpa:.3f} ms")
for name, kw in [("perm", dict(perm=pm)), ("noperm", {}), ("perm+density", dict(perm=pm, density=0.2)),
                 ("perm+comp", dict(perm=pm, density=0.2, compensate=True))]:
    paro_attention_triton(q, k, v, kv_counts=counts, kv_indices=indices, **kw)
    t = bench(lambda: paro_attention_triton(q, k, v, kv_counts=counts, kv_indices=indices, **kw))
    print(f"{name}: {t:.3f} ms  config {last_launch_info()}")
print(f"prologue {bench(lambda: paro_prologue(q, k, v, perm=pm)):.3f} ms")
torch.cuda.synchronize()
import time
t0 = time.perf_counter()
for _ in range(50):
    paro_attention_triton(q, k, v, perm=pm, kv_counts=counts, kv_indices=indices, density=0.2)
t_host = (time.perf_counter() - t0) / 50 * 1e3
torch.cuda.synchronize()
print(f"host time per call (no sync) {t_host:.3f} ms")
