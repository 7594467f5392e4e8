"""INT4 QKᵀ on the GPU: kernel vs reference for both INT4 dot layouts (and INT8 as the control)."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from paro_compile.kernels import attention  # noqa: E402
from paro_compile.kernels.reference import paro_attention_reference  # noqa: E402

torch.manual_seed(192678357)
q, k, v = (torch.randn(2, 3, 2010, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
perm = torch.stack([torch.randperm(2010, device="cuda") for _ in range(3)])
results = {}
for bits in (4, 8):
    ref = paro_attention_reference(q, k, v, perm=perm, qk_bits=bits, pv_dtype="fp8").float()
    for single in (False, True):
        if bits == 8 and single:
            continue
        attention.INT4_SINGLE_DOT = single
        out = attention.paro_attention_triton(q, k, v, perm=perm, kv_counts=None, kv_indices=None, scale=None,
                                              qk_bits=bits, pv_dtype="fp8", block_m=64, block_n=64).float()
        results[f"qk{bits}_single_dot={single}"] = float((out - ref).norm() / ref.norm())
print(json.dumps(results))
