"""Mask selection: density, mass threshold, mandatory diagonal and text blocks, row-normalised mass."""
import math

import torch

from paro_compile.calibration.masks import kept_share, mandatory_blocks, row_normalized_mass, select_blocks
from paro_compile.grid import TokenGrid


def test_select_blocks_density_threshold_and_mandatory():
    gen = torch.Generator().manual_seed(0)
    mass = torch.rand(3, 10, 10, generator=gen)
    mandatory = torch.eye(10, dtype=torch.bool)
    mask = select_blocks(mass, 0.3, mandatory)
    assert mask.sum((-1, -2)).tolist() == [30, 30, 30] and bool(mask[:, mandatory].all())
    assert select_blocks(mass, 0.01, mandatory).sum((-1, -2)).tolist() == [10, 10, 10]  # mandatory wins
    thr = select_blocks(mass, 0.3, mandatory, mass_threshold=0.5)
    for h in range(3):
        share = (mass[h] * thr[h]).sum() / mass[h].sum()
        assert share >= 0.5
        # Minimal: dropping the lightest kept non-mandatory block falls below the threshold.
        kept = mass[h].masked_fill(~thr[h] | mandatory, math.inf)
        assert (share - kept.min() / mass[h].sum()) < 0.5
    text_grid = TokenGrid(frames=None, height=4, width=8, text_tokens=20)  # text in blocks 0, 1 (block 16)
    mand = mandatory_blocks(text_grid, 16)
    assert bool(mand[:2].all() and mand[:, :2].all()) and not bool(mand[2, 3])


def test_row_normalized_mass_is_the_share_per_query_slot():
    mass = torch.tensor([[[6.0, 2.0], [1.0, 3.0]]])  # 2 blocks of 8 rows, the second holding 2 valid rows
    expected = torch.tensor([[[6.0 / 8, 2.0 / 8], [1.0 / 4 * 2 / 8, 3.0 / 4 * 2 / 8]]])
    torch.testing.assert_close(row_normalized_mass(mass, seq_len=10, block_size=8), expected)
    empty = row_normalized_mass(torch.zeros(1, 2, 2), seq_len=16, block_size=8)
    assert torch.equal(empty, torch.zeros(1, 2, 2))  # rows without mass stay 0, not NaN


def test_kept_share():
    mass = torch.tensor([[[1.0, 3.0], [0.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, False], [False, True]])
    torch.testing.assert_close(kept_share(mass, mask), torch.tensor([5.0 / 8.0, 0.0]))
