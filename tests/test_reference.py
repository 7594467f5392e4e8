"""The PyTorch oracle: exact against SDPA without quantization, close to float64 with it."""
import math
import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

from paro_compile.kernels.reference import (
    block_mask_to_csr, csr_to_block_mask, dense_csr, grouped_block_csr, paro_attention_reference, quantize_blockwise,
    trim_csr, ungrouped_block_mask,
)
from tests.conftest import rel_l2


def float64_attention(q, k, v, mask=None):
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
    return torch.softmax(s, -1).nan_to_num(0.0) @ v.double()


def random_perm(heads, n):
    return torch.stack([torch.randperm(n) for _ in range(heads)])


@pytest.mark.parametrize("n", [64, 100, 150])
@pytest.mark.parametrize("d", [64, 128])
def test_no_quant_dense_equals_sdpa(n, d):
    q, k, v = (torch.randn(2, 3, n, d) for _ in range(3))
    perm = random_perm(3, n)
    out = paro_attention_reference(q, k, v, perm=perm, qk_bits=16, pv_dtype="fp16")
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qk_bits,pv_dtype,bound", [(8, "fp8", 6e-2), (8, "int8", 3e-2), (8, "fp16", 2e-2), (4, "fp16", 0.6)])
def test_quantized_close_to_float64(qk_bits, pv_dtype, bound):
    # Peaked attention (as in trained models) rather than the flat maps of pure noise.
    q, k, v = (torch.randn(1, 2, 130, 64) for _ in range(3))
    q = q * 2.0
    out = paro_attention_reference(q, k, v, perm=random_perm(2, 130), qk_bits=qk_bits, pv_dtype=pv_dtype)
    err = rel_l2(out, float64_attention(q, k, v))
    assert err < bound, f"rel-L2 {err:.3e} vs float64 for qk_bits={qk_bits} pv={pv_dtype}"


def test_block_sparse_matches_masked_float64():
    n, block = 200, 64
    q, k, v = (torch.randn(1, 2, n, 64) for _ in range(3))
    nb = math.ceil(n / block)
    mask = torch.rand(2, nb, nb) < 0.5
    mask |= torch.eye(nb, dtype=torch.bool)
    counts, indices = block_mask_to_csr(mask)
    out = paro_attention_reference(q, k, v, kv_counts=counts, kv_indices=indices, qk_bits=16, pv_dtype="fp16")
    token_mask = mask.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :n, :n]
    torch.testing.assert_close(out.double(), float64_attention(q, k, v, token_mask[None]), rtol=1e-5, atol=1e-5)


def test_query_block_without_kept_blocks_is_zero():
    q, k, v = (torch.randn(1, 1, 128, 64) for _ in range(3))
    mask = torch.tensor([[[True, True], [False, False]]])
    counts, indices = block_mask_to_csr(mask)
    out = paro_attention_reference(q, k, v, kv_counts=counts, kv_indices=indices)
    assert torch.all(out[:, :, 64:] == 0)
    assert torch.all(torch.isfinite(out))


def test_quantize_blockwise_roundtrip_error_bounded():
    x = torch.randn(1, 2, 100, 64)
    values, scale = quantize_blockwise(x, 64, 8)
    assert values.abs().max() <= 127
    recon = values * scale.repeat_interleave(64, -1)[..., :100, None]
    assert (recon - x).abs().max() <= scale.max() / 2 + 1e-6


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.floats(0.0, 1.0))
def test_csr_roundtrip(heads, mq, nk, p):
    mask = torch.rand(heads, mq, nk) < p
    counts, indices = block_mask_to_csr(mask)
    assert torch.equal(csr_to_block_mask(counts, indices), mask)
    assert torch.equal(counts, mask.sum(-1).int())
    assert int(indices.max()) < nk


def test_dense_csr_is_full_mask():
    counts, indices = dense_csr(2, 3, 4)
    assert csr_to_block_mask(counts, indices).all()


def test_bad_arguments_say_what_is_wrong():
    q = torch.randn(1, 1, 64, 64)
    with pytest.raises(ValueError, match="qk_bits"):
        paro_attention_reference(q, q, q, qk_bits=6)
    with pytest.raises(ValueError, match="pv_dtype"):
        paro_attention_reference(q, q, q, pv_dtype="fp4")
    with pytest.raises(ValueError, match="block mask has shape"):
        paro_attention_reference(q, q, q, kv_counts=torch.ones(2, 1, dtype=torch.int32), kv_indices=torch.zeros(2, 1, 1, dtype=torch.int32))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 7), st.integers(1, 40), st.floats(0.0, 1.0), st.sampled_from([1, 4, 16]))
def test_trim_csr_round_trip(heads, mq, nk, p, multiple):
    """Compact CSR (plan constants): rows cut to the largest count, rounded up to ``multiple``, int16 indices."""
    mask = torch.rand(2, heads, mq, nk) < p  # [S, H, Mq, Nk]: one width for all step buckets
    counts, indices = block_mask_to_csr(mask)
    tc, ti = trim_csr(counts, indices, multiple=multiple)
    largest = int(counts.max())
    assert ti.dtype == torch.int16 and tc.dtype == torch.int32
    assert ti.shape[-1] == min(nk, max(1, -(-largest // multiple) * multiple)) >= min(largest, nk)
    assert torch.equal(csr_to_block_mask(tc, ti, nk), mask)
    group = 2
    gc, gi, gb = grouped_block_csr(mask, group)
    tgc, tgi, tgb = trim_csr(gc, gi, gb, multiple=multiple)
    assert tgb.dtype == torch.int8 and tgb.shape == tgi.shape
    assert torch.equal(ungrouped_block_mask(tgc, tgi, tgb, group, mq, nk), mask)


def test_reference_accepts_a_trimmed_csr_and_rejects_a_short_one():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 300, 64) for _ in range(3))
    mask = torch.rand(2, 5, 5) < 0.4
    mask[:, torch.arange(5), torch.arange(5)] = True
    counts, indices = block_mask_to_csr(mask)
    full = paro_attention_reference(q, k, v, kv_counts=counts, kv_indices=indices, compensate=True)
    tc, ti = trim_csr(counts, indices, multiple=1)
    assert ti.shape[-1] < 5
    torch.testing.assert_close(paro_attention_reference(q, k, v, kv_counts=tc, kv_indices=ti, compensate=True), full,
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="largest count"):
        paro_attention_reference(q, k, v, kv_counts=tc, kv_indices=ti[..., : ti.shape[-1] - 1])
