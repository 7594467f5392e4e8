"""Skipped-block compensation (`compensate=True`): reference vs its float64 definition, kernel vs reference.

Every KV block a row's mask skips joins the softmax as one pooled key (mean K, weight log(token count),
mean V): `paro_compile.kernels.reference`, step 6.
"""
import dataclasses
import math

import pytest
import torch

from paro_compile.kernels import block_mask as M
from paro_compile.kernels import reference as R
from paro_compile.kernels import tuning
from paro_compile.kernels.attention import paro_attention_triton
from paro_compile.kernels.block_mask import BlockMask
from paro_compile.kernels.prologue import paro_prologue

from paro_kernel_helpers import kernel_device, rel_l2

KERNEL_TOL = {torch.float32: 2e-3, torch.float16: 3e-3, torch.bfloat16: 1e-2}


def compensated_f64(q, k, v, perm, block_mask, block, scale=None):
    """Float64 definition: kept tokens plus one pooled key per skipped block, in one softmax (model order)."""
    b, h, n, d = q.shape
    pm = perm.cpu() if perm is not None else None
    qp, kp, vp = (R.permute_tokens(x.cpu(), pm).double() for x in (q, k, v))
    sm = scale if scale is not None else 1 / math.sqrt(d)
    nk = M.num_blocks(n, block)
    tok_block = torch.arange(n) // block
    counts = torch.bincount(tok_block, minlength=nk).double()
    k_bar = torch.zeros(b, h, nk, d, dtype=torch.float64).index_add_(2, tok_block, kp) / counts[:, None]
    v_bar = torch.zeros(b, h, nk, d, dtype=torch.float64).index_add_(2, tok_block, vp) / counts[:, None]
    kept_tok = block_mask.cpu()[:, tok_block][:, :, tok_block]  # [H, N, N]
    skipped_blk = ~block_mask.cpu()[:, tok_block]  # [H, N, nk]
    s_tok = (qp @ kp.transpose(-1, -2) * sm).masked_fill(~kept_tok[None], -math.inf)
    s_blk = (qp @ k_bar.transpose(-1, -2) * sm + counts.log()).masked_fill(~skipped_blk[None], -math.inf)
    p = torch.softmax(torch.cat([s_tok, s_blk], -1), -1)
    return R.unpermute_tokens(p @ torch.cat([vp, v_bar], 2), pm)


def _inputs(gen, b, h, n, d, dtype, device, perm=True):
    # Keys vary smoothly along the token axis (plus noise), so block means are informative, as in video DiTs.
    pos = torch.linspace(0, 6, n)
    base = torch.stack([torch.sin(pos * (i + 1) / 5) for i in range(d)], -1)
    q = base + 0.5 * torch.randn(b, h, n, d, generator=gen)
    k = base + 0.5 * torch.randn(b, h, n, d, generator=gen) + 0.5 * torch.randn(1, 1, 1, d, generator=gen)
    v = torch.randn(b, h, n, d, generator=gen)
    pm = torch.stack([torch.randperm(n, generator=gen) for _ in range(h)]) if perm else None
    to = lambda x: x.to(dtype).to(device)
    return to(q), to(k), to(v), (pm.to(device) if pm is not None else None)


def _mask(gen, h, n, block, density, empty_row=True):
    nq = M.num_blocks(n, block)
    mask = tuning.random_block_mask(h, nq, nq, density, generator=gen, block_m=block, block_n=block)
    if empty_row:
        mask[0, nq // 2] = False
    return mask


def test_reference_matches_float64_definition(seed, gen):
    n, d, block = 200, 32, 32
    q, k, v, pm = _inputs(gen, 2, 3, n, d, torch.float64, "cpu")
    mask = _mask(gen, 3, n, block, 0.3)
    out = R.paro_attention_reference(q, k, v, perm=pm, mask=BlockMask.from_dense(mask, block, block), qk_bits=16,
                                     pv_dtype="fp16", compensate=True)
    want = compensated_f64(q, k, v, pm, mask, block)
    # the pooled operands are rounded to fp16 (as the kernel's fp16 dots see them)
    assert rel_l2(out, want) < 2e-3, f"seed={seed}"


def test_compensation_recovers_skipped_mass(seed, gen):
    """On smooth keys the pooled estimate brings a sparse row much closer to dense attention."""
    n, d, block = 256, 32, 32
    q, k, v, pm = _inputs(gen, 1, 2, n, d, torch.float32, "cpu", perm=False)
    mask = _mask(gen, 2, n, block, 0.3, empty_row=False)
    bm = BlockMask.from_dense(mask, block, block)
    dense = torch.softmax(q.double() @ k.double().transpose(-1, -2) / math.sqrt(d), -1) @ v.double()
    errs = {}
    for comp in (False, True):
        out = R.paro_attention_reference(q, k, v, mask=bm, compensate=comp)
        errs[comp] = rel_l2(out, dense)
    assert errs[True] < 0.6 * errs[False], f"seed={seed} {errs}"


def test_csr_rows_list_skipped_blocks_after_kept(gen):
    mask = torch.rand(3, 7, 9, generator=gen) < 0.4
    counts, indices = M.block_mask_to_csr(mask)
    assert torch.equal(indices.sort(-1).values, torch.arange(9, dtype=torch.int32).expand(3, 7, 9))
    assert torch.equal(M.csr_to_block_mask(counts, indices), mask)
    bits = M.kept_block_bits(mask)
    assert bits.shape == (3, 7, 1) and bits.dtype == torch.int32
    wide = torch.rand(2, 3, 70, generator=gen) < 0.5
    wide[..., 31] = True  # the sign bit of word 0
    words = M.kept_block_bits(wide)
    unpacked = (words[..., torch.arange(70) // 32] >> (torch.arange(70) % 32)) & 1
    assert torch.equal(unpacked.bool(), wide)


def test_full_mask_and_dense_are_unchanged(seed, gen):
    n, d = 150, 32
    q, k, v, pm = _inputs(gen, 1, 2, n, d, torch.float32, "cpu")
    nq = M.num_blocks(n, 64)
    full = BlockMask.from_csr(*M.block_mask_to_csr(torch.ones(2, nq, nq, dtype=torch.bool)), n)
    for kw in ({}, {"mask": full}):
        a = R.paro_attention_reference(q, k, v, perm=pm, compensate=False, **kw)
        b = R.paro_attention_reference(q, k, v, perm=pm, compensate=True, **kw)
        assert torch.equal(a, b)


def test_prologue_pooled_blocks_match_reference(seed, gen):
    device = kernel_device()
    n, d, block = 130, 64, 32
    q, k, v, pm = _inputs(gen, 2, 2, n, d, torch.float16, device)
    for bits, pv in ((8, "fp8"), (16, "fp16"), (4, "int8")):
        pro = paro_prologue(q, k, v, perm=pm, qk_bits=bits, pv_dtype=pv, block_m=block, block_n=block, pooled=True)
        kf, vf = (R.permute_tokens(x, pm).float() for x in (k, v))
        if bits != 16:
            kf = kf - kf.mean(dim=2, keepdim=True)
        k_bar, v_bar = R.pooled_blocks(kf, vf, block, pro.v_scale.view(2, 2, d))
        assert pro.k_bar.dtype == pro.v_bar.dtype == torch.float16
        # stored in fp16: equal up to one fp16 rounding step of the fp32 mean
        torch.testing.assert_close(pro.k_bar.view_as(k_bar).float(), k_bar, rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(pro.v_bar.view_as(v_bar).float(), v_bar, rtol=1e-3, atol=1e-2)
    plain = paro_prologue(q, k, v, perm=pm, block_m=block, block_n=block)
    assert plain.k_bar is None and plain.v_bar is None


@pytest.mark.parametrize("bits,pv,dtype,d,block", [
    (8, "fp8", torch.float16, 64, 64),
    (8, "int8", torch.bfloat16, 32, 32),
    (4, "fp8", torch.float16, 64, 32),
    (16, "fp16", torch.float32, 32, 32),
    (16, "fp16", torch.bfloat16, 64, 64),
    (8, "fp16", torch.float16, 128, 64),
    (8, "fp8", torch.float16, 64, 16),  # 4 query blocks per 64-row tile, each reading its own kept bits
])
def test_kernel_matches_reference(seed, gen, bits, pv, dtype, d, block):
    device = kernel_device()
    n = 300 if block < 64 else 333  # not a multiple of the block: a partial tail block is pooled too
    q, k, v, pm = _inputs(gen, 1, 2, n, d, dtype, device)
    mask = _mask(gen, 2, n, block, 0.3)
    kw = dict(perm=pm, mask=BlockMask.from_dense(mask, block, block).to(device), qk_bits=bits, pv_dtype=pv)
    out = torch.full_like(q, float("nan"))
    paro_attention_triton(q, k, v, out=out, compensate=True, **kw)
    ref = R.paro_attention_reference(q, k, v, compensate=True, **kw)
    msg = f"seed={seed} bits={bits} pv={pv} dtype={dtype} d={d} block={block} device={device}"
    assert not out.isnan().any(), f"unwritten rows; {msg}"
    tol = KERNEL_TOL[dtype] + (3e-2 if bits == 4 and q.is_cuda else 0.0)
    assert rel_l2(out, ref) <= tol, f"kernel vs reference {rel_l2(out, ref):.3e}; {msg}"
    # the empty query block now carries the pooled estimate instead of zeros
    plain = paro_attention_triton(q, k, v, compensate=False, **kw)
    half = M.num_blocks(n, block) // 2  # `_mask` empties query block `half` of head 0 (permuted order)
    rows = torch.arange(half * block, min(n, (half + 1) * block), device=device)
    tokens = pm[0, rows]
    assert plain[:, 0, tokens].abs().max() == 0
    assert out[:, 0, tokens].abs().max() > 0, msg


def test_kernel_compensation_ignored_for_dense(seed, gen):
    device = kernel_device()
    q, k, v, pm = _inputs(gen, 1, 2, 100, 32, torch.float16, device)
    a = paro_attention_triton(q, k, v, perm=pm, compensate=True)
    b = paro_attention_triton(q, k, v, perm=pm, compensate=False)
    assert torch.equal(a, b)


def test_custom_op_passes_compensate(seed, gen):
    from paro_compile.ops import paro_attention

    device = kernel_device()
    n, block = 160, 32
    q, k, v, pm = _inputs(gen, 1, 2, n, 32, torch.float16, device)
    with_bits = BlockMask.from_dense(_mask(gen, 2, n, block, 0.3), block, block, kept_bits=True).to(device)
    without_bits = dataclasses.replace(with_bits, kept_bits=None)
    kw = dict(perm=pm, scale=1 / math.sqrt(32))
    ref_on = paro_attention(q, k, v, mask=with_bits, compensate=True, impl="reference", **kw)
    ref_off = paro_attention(q, k, v, mask=with_bits, compensate=False, impl="reference", **kw)
    tri_on = paro_attention(q, k, v, mask=with_bits, compensate=True, impl="triton", **kw)
    tri_derived = paro_attention(q, k, v, mask=without_bits, compensate=True, impl="triton", **kw)
    assert rel_l2(tri_on, ref_on) <= KERNEL_TOL[torch.float16]
    assert torch.equal(tri_derived, tri_on)  # kept bits derived from the CSR when the mask does not carry them
    with pytest.raises(ValueError, match="kept_bits has shape"):
        dataclasses.replace(with_bits, kept_bits=with_bits.kept_bits[:, :1]).to("cpu").validate(2, n)
    assert rel_l2(ref_on, ref_off) > 1e-2  # the flag reaches the implementation
