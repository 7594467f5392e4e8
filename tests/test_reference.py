"""The PyTorch oracle: exact against SDPA without quantization, close to float64 with it."""
import math
import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

from paro_compile.kernels.block_mask import BlockMask
from paro_compile.kernels.reference import paro_attention_reference, quantize_blockwise
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
    out = paro_attention_reference(q, k, v, mask=BlockMask.from_dense(mask), qk_bits=16, pv_dtype="fp16")
    token_mask = mask.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :n, :n]
    torch.testing.assert_close(out.double(), float64_attention(q, k, v, token_mask[None]), rtol=1e-5, atol=1e-5)


def test_query_block_without_kept_blocks_is_zero():
    q, k, v = (torch.randn(1, 1, 128, 64) for _ in range(3))
    mask = torch.tensor([[[True, True], [False, False]]])
    out = paro_attention_reference(q, k, v, mask=BlockMask.from_dense(mask))
    assert torch.all(out[:, :, 64:] == 0)
    assert torch.all(torch.isfinite(out))


def test_quantize_blockwise_roundtrip_error_bounded():
    x = torch.randn(1, 2, 100, 64)
    values, scale = quantize_blockwise(x, 64, 8)
    assert values.abs().max() <= 127
    recon = values * scale.repeat_interleave(64, -1)[..., :100, None]
    assert (recon - x).abs().max() <= scale.max() / 2 + 1e-6


def test_bad_arguments_say_what_is_wrong():
    q = torch.randn(1, 1, 64, 64)
    with pytest.raises(ValueError, match="qk_bits"):
        paro_attention_reference(q, q, q, qk_bits=6)
    with pytest.raises(ValueError, match="pv_dtype"):
        paro_attention_reference(q, q, q, pv_dtype="fp4")
    with pytest.raises(ValueError, match="block mask has shape"):
        paro_attention_reference(q, q, q, mask=BlockMask.from_csr(torch.ones(2, 1, dtype=torch.int32),
                                                                  torch.zeros(2, 1, 1, dtype=torch.int32), 64))
    with pytest.raises(ValueError, match="mask has 2x2 blocks, N=64, Nk=64 needs 1x1"):
        paro_attention_reference(q, q, q, mask=BlockMask.dense(128))


def test_reference_accepts_a_trimmed_csr_and_walks_only_its_slots():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 300, 64) for _ in range(3))
    mask = torch.rand(2, 5, 5) < 0.4
    mask[:, torch.arange(5), torch.arange(5)] = True
    full = paro_attention_reference(q, k, v, mask=BlockMask.from_dense(mask, compact=False), compensate=True)
    trimmed = BlockMask.from_dense(mask, slot_multiple=1)
    assert trimmed.row_width < 5
    torch.testing.assert_close(paro_attention_reference(q, k, v, mask=trimmed, compensate=True), full, rtol=0, atol=0)


def test_malformed_csr_slots_add_nothing():
    """Slots naming a block outside [0, Nk) and counts past the row width are skipped, exactly as the kernel skips
    them (validation rejects such masks; the two paths must still agree on them)."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 1, 200, 64) for _ in range(3))
    counts = torch.tensor([[2, 1, 1, 1]], dtype=torch.int32)
    indices = torch.tensor([[[0, 9], [1, 1], [2, 2], [3, 3]]], dtype=torch.int32)  # block 9 does not exist
    bad = paro_attention_reference(q, k, v, mask=BlockMask.from_csr(counts, indices, 200))
    good = paro_attention_reference(q, k, v, mask=BlockMask.from_csr(torch.tensor([[1, 1, 1, 1]], dtype=torch.int32),
                                                                     indices, 200))
    torch.testing.assert_close(bad, good, rtol=0, atol=0)
    wide = paro_attention_reference(q, k, v, mask=BlockMask.from_csr(torch.tensor([[7, 1, 1, 1]], dtype=torch.int32),
                                                                     torch.tensor([[[0, 9], [1, 1], [2, 2], [3, 3]]],
                                                                                  dtype=torch.int32), 200))
    torch.testing.assert_close(wide, good, rtol=0, atol=0)
    with pytest.raises(ValueError, match="indices of kept slots must lie in"):
        BlockMask.from_csr(counts, indices, 200).validate(1, 200)
