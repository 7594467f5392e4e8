"""Content checks shared by plans built in code (`SitePlan.validate`, `Plan.validate`) and plans read from files
(`paro_compile.plan_file`): each says why a value is not what a plan needs, or returns None. They raise nothing; the
callers turn a problem into a `PlanError` naming the site and the field.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from paro_compile.grid import TokenGrid

VISUAL_AXES = ("FHW", "HW")


def is_finite_number(value: Any) -> bool:
    """An int or float (not a bool) that is a finite float: NaN, ±inf and ints beyond the float range are not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def permutation_problem(perm: torch.Tensor, n: int) -> Optional[str]:
    """Why ``perm`` [H, n] is not one permutation of range(n) per row, or None. Vectorised: a range check, then
    one sort per row compared with arange(n); only the first offending row is examined further."""
    if perm.dtype == torch.bool or perm.dtype.is_floating_point or perm.dtype.is_complex:
        return f"has dtype {perm.dtype}; token indices need an integer dtype"
    rows = perm.long()
    outside = (rows < 0) | (rows >= n)
    if bool(outside.any()):
        head, position = (int(i) for i in outside.nonzero()[0])
        return (f"row {head} holds {int(rows[head, position])} at position {position}, outside range(0, {n}) "
                "(a token index must name one of the site's tokens)")
    wrong = rows.sort(dim=-1).values != torch.arange(n, device=rows.device)
    if bool(wrong.any()):
        head = int(wrong.any(-1).nonzero()[0])
        counts = torch.bincount(rows[head], minlength=n)
        repeated = int((counts > 1).nonzero()[0])
        missing = int((counts == 0).nonzero()[0])
        return (f"row {head} is not a permutation of range({n}): token {repeated} appears {int(counts[repeated])} "
                f"times and token {missing} is missing")
    return None


def text_block_range(grid: TokenGrid, block_size: int) -> range:
    """Indices of the blocks that hold at least one text token (empty without text)."""
    if not grid.text_tokens:
        return range(0)
    text = grid.text_slice
    return range(text.start // block_size, (text.stop - 1) // block_size + 1)


def mandatory_blocks_problem(masks: torch.Tensor, block_size: int, grid: Optional[TokenGrid]) -> Optional[str]:
    """Why bool masks [S, H, nb, nb] drop a block the method always keeps (diagonal; rows and columns of text
    blocks), or None. Without them a query row may keep no block at all, and such a row returns zeros."""
    diagonal = masks.diagonal(dim1=-2, dim2=-1)
    if not bool(diagonal.all()):
        bucket, head, block = (int(i) for i in (~diagonal).nonzero()[0])
        return f"bucket {bucket}, head {head}: diagonal block ({block}, {block}) is not kept"
    text = text_block_range(grid, block_size) if grid is not None else range(0)
    if len(text):
        for name, part, offset in (("row", masks[..., text.start:text.stop, :], (text.start, 0)),
                                   ("column", masks[..., :, text.start:text.stop], (0, text.start))):
            if not bool(part.all()):
                bucket, head, i, j = (int(x) for x in (~part).nonzero()[0])
                return (f"bucket {bucket}, head {head}: block ({i + offset[0]}, {j + offset[1]}) in a text {name} "
                        f"(text tokens {grid.text_slice.start}..{grid.text_slice.stop - 1}) is not kept")
    return None


def order_problem(order: Any, axes: Optional[str]) -> Optional[str]:
    """Why ``order`` is not an axis order of a grid with ``axes`` (None: of a video or an image grid), or None."""
    if not isinstance(order, str):
        return f"{order!r} is a {type(order).__name__}, not an order string such as 'FHW'"
    allowed = (axes,) if axes is not None else VISUAL_AXES
    if not any(sorted(order) == sorted(a) for a in allowed):
        return f"{order!r} is not a permutation of the grid axes {' or '.join(map(repr, allowed))}"
    return None
