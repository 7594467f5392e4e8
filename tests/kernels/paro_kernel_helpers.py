"""Helpers shared by the kernel tests (a uniquely named module, importable from the test files)."""
import math

import pytest
import torch

from paro_compile.kernels import reference as R


def kernel_device() -> str:
    """CUDA when present, else the CPU under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels on hardware)")


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def attention_f64(q, k, v, perm, block_mask, block_m=64, block_n=64, scale=None):
    """Float64 block-masked attention in model order (rows without a kept block -> 0)."""
    b, h, n, d = q.shape
    pm = perm.cpu() if perm is not None else None
    qp, kp, vp = (R.permute_tokens(x.cpu(), pm).double() for x in (q, k, v))
    sm = scale if scale is not None else 1 / math.sqrt(d)
    s = qp @ kp.transpose(-1, -2) * sm
    if block_mask is not None:
        tok = torch.arange(n)
        tm = block_mask.cpu()[:, tok // block_m][:, :, tok // block_n]
        s = s.masked_fill(~tm[None], -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return R.unpermute_tokens(p @ vp, pm)
