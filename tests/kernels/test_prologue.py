"""Fused prologue (permute + smooth K + quantize) vs the pure-PyTorch reference helpers."""
import math

import pytest
import torch

from paro_compile.kernels import reference as R
from paro_compile.kernels.prologue import dequantized_views, paro_prologue, unpack_int4

from paro_kernel_helpers import kernel_device, requires_cuda


def _inputs(gen, b, h, n, d, dtype, device, perm=True):
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
    k = k + 4.0 * torch.randn(1, 1, 1, d, generator=gen)  # channel outliers: smoothing matters
    v = v * torch.rand(1, 1, 1, d, generator=gen) * 3
    pm = torch.stack([torch.randperm(n, generator=gen) for _ in range(h)]) if perm else None
    to = lambda x: x.to(dtype).to(device)
    return to(q), to(k), to(v), (pm.to(device) if pm is not None else None)


def _check(seed, q, k, v, pm, bits, pv, bm, bn, scale=None):
    b, h, n, d = q.shape
    p = paro_prologue(q, k, v, perm=pm, qk_bits=bits, pv_dtype=pv, block_m=bm, block_n=bn, scale=scale)
    got = {key: val.cpu() for key, val in dequantized_views(p).items()}
    qf, kf, vf = (R.permute_tokens(x.cpu(), pm.cpu() if pm is not None else None).float() for x in (q, k, v))
    sm = (scale if scale is not None else 1 / math.sqrt(d)) * R.LOG2E
    nq, nk = R.num_blocks(n, bm), R.num_blocks(n, bn)
    if bits == 16:
        qv, qs, kv, ks = qf, torch.full((b, h, nq), sm), kf, torch.ones(b, h, nk)
    else:
        kf = kf - kf.mean(2, keepdim=True)
        qv, qs = R.quantize_blockwise(qf, bm, bits)
        kv, ks = R.quantize_blockwise(kf, bn, bits)
        qs = qs * sm
    msg = f"seed={seed} bits={bits} pv={pv} dtype={q.dtype} shape={tuple(q.shape)} bm={bm} bn={bn}"
    gq, gk = got["q"].view(b, h, n, -1), got["k"].view(b, h, n, -1)
    assert torch.equal(gq, qv), f"Q values differ: {msg}"
    torch.testing.assert_close(got["q_scale"].view(b, h, -1), qs, rtol=1e-6, atol=0, msg=lambda m: f"{msg}\n{m}")
    # K's smoothing mean is a reduction in another order: a value exactly at a rounding tie may move by one step.
    dk = (gk - kv).abs()
    assert dk.max() <= (1 if bits != 16 else 0), f"K values differ by {dk.max()}: {msg}"
    assert (dk > 0).float().mean() < 1e-3, f"K: {(dk > 0).float().mean():.2e} of values differ: {msg}"
    torch.testing.assert_close(got["k_scale"].view(b, h, -1), ks, rtol=1e-5, atol=0, msg=lambda m: f"{msg}\n{m}")
    if pv == "fp16":
        assert torch.equal(got["v"].view(b, h, n, d), vf), msg
    else:
        vv, vs = R.quantize_v_per_channel(vf, pv)
        torch.testing.assert_close(got["v_scale"].view(b, h, d), vs, rtol=0, atol=0, msg=lambda m: f"{msg}\n{m}")
        assert torch.equal(got["v"].view(b, h, n, d), vv), f"V values differ: {msg}"
    # Rows past N are zero (padding of the last block).
    if bits != 16:
        assert not p.q[:, n:].any() and not p.k[:, n:].any(), msg


@pytest.mark.parametrize("bits", [8, 4, 16])
@pytest.mark.parametrize("pv", ["fp8", "int8", "fp16"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_prologue_matches_reference(seed, gen, bits, pv, dtype):
    n = int(torch.randint(65, 260, (1,), generator=gen))
    d = 64 if (bits + len(pv)) % 2 else 128
    q, k, v, pm = _inputs(gen, 2, 2, n, d, dtype, kernel_device(), perm=bool(n % 2) or bits == 4)
    _check(seed, q, k, v, pm, bits, pv, 64, 64)


@pytest.mark.parametrize("bm,bn", [(32, 64), (128, 64), (64, 16)])
def test_prologue_block_sizes(seed, gen, bm, bn):
    q, k, v, pm = _inputs(gen, 1, 3, 203, 64, torch.float16, kernel_device())
    _check(seed, q, k, v, pm, 8, "fp8", bm, bn, scale=0.3)


def test_int4_packing_roundtrip(gen):
    vals = torch.randint(-7, 8, (5, 64), generator=gen, dtype=torch.int32)
    packed = ((vals[:, :32] & 15) | (vals[:, 32:] << 4)).to(torch.int8)
    assert torch.equal(unpack_int4(packed).int(), vals)


def test_prologue_zero_block(gen):
    """An all-zero block gets scale 1 and values 0 (like the reference)."""
    q, k, v, pm = _inputs(gen, 1, 1, 130, 64, torch.float32, kernel_device(), perm=False)
    q[:, :, 64:128] = 0
    _check(0, q, k, v, pm, 8, "int8", 64, 64)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("pv", ["fp8", "int8"])
def test_prologue_cuda_large(seed, gen, bits, pv):
    q, k, v, pm = _inputs(gen, 2, 4, 4133, 128, torch.bfloat16, "cuda")
    _check(seed, q, k, v, pm, bits, pv, 64, 64)
