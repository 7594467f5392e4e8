"""`BlockMask`: the forms of a block mask the kernels walk, their round trips and the checks that reject a malformed
mask before any kernel reads it."""
import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st

from paro_compile.kernels.block_mask import (
    BlockMask, block_mask_to_csr, csr_dtype, csr_to_block_mask, dense_csr, grouped_block_csr, trim_csr,
    ungrouped_block_mask,
)


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


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 7), st.integers(1, 40), st.floats(0.0, 1.0), st.sampled_from([1, 4, 16]))
def test_trim_csr_round_trip(heads, mq, nk, p, multiple):
    """Compact CSR (plan constants): rows cut to the largest count, rounded up to ``multiple``, int16 indices."""
    mask = torch.rand(2, heads, mq, nk) < p  # [S, H, Mq, Nk]: one width for all step buckets
    counts, indices = block_mask_to_csr(mask)
    tc, ti = trim_csr(counts, indices, multiple=multiple)
    largest = int(counts.max())
    assert ti.dtype == torch.int16 and tc.dtype == torch.int16
    assert ti.shape[-1] == min(nk, max(1, -(-largest // multiple) * multiple)) >= min(largest, nk)
    assert torch.equal(csr_to_block_mask(tc, ti, nk), mask)
    group = 2
    gc, gi, gb = grouped_block_csr(mask, group)
    tgc, tgi, tgb = trim_csr(gc, gi, gb, multiple=multiple)
    assert tgb.dtype == torch.int8 and tgb.shape == tgi.shape
    assert torch.equal(ungrouped_block_mask(tgc, tgi, tgb, group, mq, nk), mask)


def test_csr_falls_back_to_int32_past_32767_kv_blocks():
    """int16 holds every block index and count up to Nk = 32,767; one more block and the compact CSR stays int32 (a
    one-row mask, not a giant one), and int16 indices for such a mask are refused."""
    assert csr_dtype(32767) == torch.int16 and csr_dtype(32768) == torch.int32
    for nk, dtype in [(32767, torch.int16), (32768, torch.int32)]:
        mask = torch.zeros(1, 1, nk, dtype=torch.bool)
        mask[0, 0, [0, nk - 1]] = True
        built = BlockMask.from_dense(mask)
        assert built.counts.dtype == built.indices.dtype == dtype, (nk, built.counts.dtype, built.indices.dtype)
        assert built.indices[0, 0, :2].tolist() == [0, nk - 1] and torch.equal(built.to_dense(), mask)
    wide = dataclasses.replace(built, indices=built.indices.to(torch.int16), num_q_blocks=1)
    with pytest.raises(ValueError, match="int16 mask indices cannot name 32768 KV blocks"):
        wide.validate(1, 64, kv_len=64 * 32768)


def test_grouped_csr_union_and_bits():
    mask = torch.zeros(1, 5, 4, dtype=torch.bool)
    mask[0, 0, [0, 2]] = True
    mask[0, 1, [2, 3]] = True
    mask[0, 4, 1] = True  # query blocks 2, 3 keep nothing; block 4 is alone in the last group
    ucounts, uindices, bits = grouped_block_csr(mask, 2)
    assert ucounts.tolist() == [[3, 0, 1]]
    assert uindices[0, 0, :3].tolist() == [0, 2, 3] and uindices[0, 2, :1].tolist() == [1]
    assert bits[0, 0, :3].tolist() == [0b01, 0b11, 0b10] and bits[0, 2, 0].item() == 0b01
    assert bits.dtype == torch.int8
    both = grouped_block_csr(torch.stack([mask[0], mask[0]]), 2)  # batched masks (step buckets): the same per bucket
    assert torch.equal(both[0][1], ucounts[0]) and torch.equal(both[2][0], bits[0])


@pytest.mark.parametrize("group,mq", [(2, 7), (4, 9), (4, 4)])
def test_grouped_csr_round_trip(gen, group, mq):
    mask = torch.rand(3, 2, mq, 11, generator=gen) < 0.35  # [S, H, Mq, Nk], some rows empty
    mask[0, 0, 1] = False
    counts, indices, bits = grouped_block_csr(mask, group)
    assert torch.equal(ungrouped_block_mask(counts, indices, bits, group, mq), mask)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("block", [16, 32, 64, 128])
@pytest.mark.parametrize("compact", [True, False])
def test_from_dense_views_round_trip(gen, block, compact):
    mask = torch.rand(3, 2, 9, 9, generator=gen) < 0.4  # [S, H, Mq, Nk]
    built = BlockMask.from_dense(mask, block, block, kept_bits=True, compact=compact)
    assert built.group == max(1, 64 // block)
    assert built.density == pytest.approx(float(mask.float().mean()))
    assert torch.equal(built.to_dense(), mask)
    for s in range(3):
        one = built.bucket(s).validate(2, 9 * block - 3)
        assert torch.equal(one.to_dense(), mask[s])
        assert torch.equal(csr_to_block_mask(*one.block_csr(), 9), mask[s])
        assert torch.equal(one.ungrouped().to_dense(), mask[s]) and torch.equal(one.ungrouped().grouped().to_dense(), mask[s])
        assert one.kept_bits.shape == (2, 9, 1)
    tensors, sizes = built.bucket(1).as_op_args()
    again = BlockMask.from_op_args(tensors, sizes, built.density)
    assert torch.equal(again.to_dense(), mask[1]) and again.group == built.group


def test_all_ones_is_dense():
    built = BlockMask.from_dense(torch.ones(2, 3, 3, dtype=torch.bool), kept_bits=True)
    assert built.is_dense and built.kept_bits is None and built.density == 1.0
    assert BlockMask.dense(130).num_q_blocks == 3


def _csr(counts, indices, n=256, block=64):
    return BlockMask.from_csr(torch.tensor(counts, dtype=torch.int32), torch.tensor(indices, dtype=torch.int32), n,
                              block, block)


@pytest.mark.parametrize("make,match", [
    (lambda: _csr([[1, 1, 1, 1]], [[[0], [1], [2], [4]]]), r"indices of kept slots must lie in \[0, 4\)"),
    (lambda: _csr([[1, 1, 1, 1]], [[[0], [1], [-1], [3]]]), r"indices of kept slots must lie in \[0, 4\)"),
    (lambda: _csr([[2, 1, 1, 1]], [[[0], [1], [2], [3]]]), r"counts must lie in \[0, 1\]"),
    (lambda: _csr([[-1, 1, 1, 1]], [[[0], [1], [2], [3]]]), r"counts must lie in \[0, 1\]"),
    (lambda: _csr([[2, 1, 1, 1]], [[[0, 0], [1, 0], [2, 0], [3, 0]]]), "lists a KV block twice"),
    (lambda: _csr([[1, 1, 1]], [[[0], [1], [2]]]), r"do not fit 1 heads x 4 rows"),
    (lambda: _csr([[1, 1, 1, 1]], [[[0], [1], [2], [3]]], n=300), r"mask has 5x5 blocks, N=256 needs 4x4"),
    (lambda: dataclasses.replace(_csr([[1, 1, 1, 1]], [[[0], [1], [2], [3]]]), block_m=48), "block sizes must be in"),
    (lambda: dataclasses.replace(_csr([[1, 1, 1, 1]], [[[0], [1], [2], [3]]]),
                                 indices=torch.zeros(1, 4, 1, dtype=torch.float32)), "indices int16/int32"),
])
def test_validate_rejects_malformed_masks(make, match):
    with pytest.raises(ValueError, match=match):
        make().validate(1, 256)


def test_validate_rejects_slot_bits_past_the_last_query_block():
    mask = torch.zeros(1, 3, 3, dtype=torch.bool)
    mask[0, torch.arange(3), torch.arange(3)] = True
    grouped = BlockMask.from_dense(mask, 32, 32).validate(1, 96)  # groups of 2: the second has one query block
    bits = grouped.slot_bits.clone()
    bits[0, 1, 0] = 0b10
    with pytest.raises(ValueError, match="slot_bits name query blocks past the last one"):
        dataclasses.replace(grouped, slot_bits=bits).validate(1, 96)
