"""Mask selection: which blocks of one head's (or several heads') block map a static mask keeps.

Per head, in its chosen order, blocks are ranked by calibration mass and kept until the target density (or, with
``mass_threshold``, until that share of the mass is kept); diagonal blocks and the blocks holding text rows or text
columns are always kept (`mandatory_blocks`) and count toward the density. Ranking heads or sites together
(``allocation`` "site" / "global", `budget.allocate_blocks`) compares row-normalised mass (`row_normalized_mass`).

Ties (`block_priority`): blocks whose scores agree within a relative `TIE_RESOLUTION` are taken round-robin
over query block rows (and heads): each row's best remaining block before any row's next one. A plain stable sort
would give equal blocks to the first rows (and the first head) in order: a uniform head would keep whole rows at the
top and only its mandatory blocks below, and of two identical heads ranked together one would get every block.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from paro_compile.grid import TokenGrid
from paro_compile.kernels.reference import num_blocks


def mandatory_blocks(grid: TokenGrid, block_size: int, device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """bool [nb, nb]: diagonal blocks, and every block in a row or column that holds a text token."""
    nb = num_blocks(grid.num_tokens, block_size)
    mask = torch.eye(nb, dtype=torch.bool, device=device)
    if grid.text_tokens:
        text_blocks = torch.zeros(nb, dtype=torch.bool, device=device)
        sl = grid.text_slice
        text_blocks[sl.start // block_size: (sl.stop - 1) // block_size + 1] = True
        mask |= text_blocks[:, None] | text_blocks[None, :]
    return mask


TIE_RESOLUTION = 1e-5
"""Scores within this relative difference of each other are ties (float summation leaves equal blocks ~1e-7 apart)."""
_LOG_LEVELS = 1.0 / math.log2(1.0 + TIE_RESOLUTION)
_LOWEST_LEVEL = -round(160 * _LOG_LEVELS)  # below 2**-160 of the top score: zero


def block_priority(score: torch.Tensor, mandatory: torch.Tensor, top: torch.Tensor, columns: int) -> torch.Tensor:
    """int64 [..., nb, nk] priority of every block of ``score`` (higher is kept first): mandatory blocks, then the
    score on a log scale of relative step `TIE_RESOLUTION` (relative to ``top``, broadcastable to ``score``'s lead
    dims + [1, 1]), ties broken by the block's rank within its query block row so that tied blocks go round-robin
    over rows. ``columns`` ≥ nk: the same for every map whose priorities are compared."""
    ratio = score.float() / top.float().clamp_min(1e-30)
    level = torch.where(ratio > 0, (ratio.clamp_min(1e-45).log2() * _LOG_LEVELS).floor(), torch.full_like(ratio, -math.inf))
    level = level.clamp(min=_LOWEST_LEVEL - 1, max=0).long()
    level = torch.where(mandatory.to(score.device), torch.ones_like(level), level)
    rank_in_row = level.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)
    return level * columns + (columns - 1 - rank_in_row)


def select_blocks(
    mass: torch.Tensor,
    density: float,
    mandatory: Optional[torch.Tensor] = None,
    mass_threshold: Optional[float] = None,
) -> torch.Tensor:
    """Per map of ``mass`` [..., nb, nb], keep the heaviest blocks → bool [..., nb, nb].

    Mandatory blocks are kept first (they count toward the density); then blocks by descending mass until
    ``ceil(density · nb²)`` blocks are kept, or, with ``mass_threshold``, until that share of the map's mass
    is kept.
    """
    *lead, mq, nk = mass.shape
    total = mq * nk
    flat = mass.reshape(*lead, total).float()
    if mandatory is None:
        mandatory = torch.zeros(mq, nk, dtype=torch.bool, device=mass.device)
    mand = mandatory.reshape(total).to(mass.device)
    n_mand = int(mand.sum().item())
    top = flat.amax(-1)[..., None, None] if total else flat.new_ones(())
    key = block_priority(mass, mandatory.to(mass.device), top, nk).reshape(*lead, total)
    order = key.argsort(dim=-1, descending=True, stable=True)
    if mass_threshold is not None:
        sorted_mass = flat.gather(-1, order)
        cum = sorted_mass.cumsum(-1) / flat.sum(-1, keepdim=True).clamp_min(1e-30)
        keep_count = ((cum < mass_threshold - 1e-7).sum(-1) + 1).clamp(max=total).clamp(min=n_mand)
    else:
        k = max(math.ceil(float(density) * total - 1e-9), n_mand, 1)
        keep_count = torch.full(flat.shape[:-1], min(k, total), device=mass.device)
    keep_sorted = torch.arange(total, device=mass.device) < keep_count[..., None]
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted).view(*lead, mq, nk)


def row_normalized_mass(mass: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """[..., nb, nb] block mass → share of each query block row's attention, weighted by its valid rows.

    Every query row's attention sums to 1 (per head and call), so ``mass[..., i, :]`` sums to
    calls · batch · rows(i). Dividing by that row sum and multiplying by rows(i) / block_size gives every
    block its mean attention share per query slot of the block: the last, partial query block counts for its
    rows only, and maps accumulated over different call counts or batch sizes (other sites, buckets) compare.
    The sum of the kept values over all blocks of all heads is the kept attention share summed over query
    rows (/ block_size), the quantity `budget.allocate_blocks` maximises.
    """
    nb = mass.shape[-2]
    rows = torch.full((nb,), float(block_size), dtype=torch.float32, device=mass.device)
    rows[-1] = seq_len - (nb - 1) * block_size
    mass = mass.float()
    row_sum = mass.sum(-1, keepdim=True)
    share = torch.where(row_sum > 0, mass / row_sum.clamp_min(1e-30), torch.zeros_like(mass))
    return share * (rows / block_size)[:, None]


def kept_share(mass: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[..., nb, nb] mass and mask → [...] share of each map's mass that the mask keeps."""
    total = mass.sum((-1, -2)).clamp_min(1e-30)
    return (mass * mask).sum((-1, -2)) / total
