"""Token layout of an attention site's sequence, and the PARO candidate orders over it.

A site's sequence of N tokens is ``text_tokens`` text tokens followed (``text_position="prefix"``) or
preceded (``"suffix"``) by ``frames·height·width`` visual tokens flattened in (F, H, W) row-major order
(images: ``frames=None``, (H, W) row-major). A PARO *order* is a string naming the visual axes from the
slowest to the fastest varying: "FHW" is the model's own order, "HWF" makes F vary fastest (tokens at the
same (h, w) of consecutive frames become neighbours). Text tokens never move.

``order_permutation(grid, order)[i]`` is the model token index placed at position i, the convention of
`SitePlan.perm` and of `kernels.reference.permute_tokens`.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

TEXT_POSITIONS = ("prefix", "suffix")


@dataclass(frozen=True)
class TokenGrid:
    """Layout of one site's token sequence: ``text_tokens`` text + F·H·W visual tokens (F=None: an image)."""

    frames: Optional[int]
    height: int
    width: int
    text_tokens: int = 0
    text_position: str = "prefix"

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TokenGrid.{name} must be a positive int, got {value!r}")
        if self.frames is not None and (not isinstance(self.frames, int) or self.frames < 1):
            raise ValueError(f"TokenGrid.frames must be a positive int or None (image), got {self.frames!r}")
        if not isinstance(self.text_tokens, int) or self.text_tokens < 0:
            raise ValueError(f"TokenGrid.text_tokens must be an int >= 0, got {self.text_tokens!r}")
        if self.text_position not in TEXT_POSITIONS:
            raise ValueError(f"TokenGrid.text_position must be one of {TEXT_POSITIONS}, got {self.text_position!r}")

    # ---- sizes -------------------------------------------------------------------------------------
    @property
    def is_video(self) -> bool:
        return self.frames is not None

    @property
    def axes(self) -> str:
        """The visual axes in model (natural) order: "FHW" or "HW"."""
        return "FHW" if self.is_video else "HW"

    @property
    def natural_order(self) -> str:
        return self.axes

    @property
    def sizes(self) -> dict[str, int]:
        sizes = {"H": self.height, "W": self.width}
        if self.is_video:
            sizes = {"F": int(self.frames), **sizes}
        return sizes

    @property
    def visual_tokens(self) -> int:
        return (self.frames or 1) * self.height * self.width

    @property
    def num_tokens(self) -> int:
        return self.visual_tokens + self.text_tokens

    @property
    def visual_offset(self) -> int:
        """Index of the first visual token in the sequence."""
        return self.text_tokens if self.text_position == "prefix" else 0

    @property
    def text_slice(self) -> slice:
        if self.text_position == "prefix":
            return slice(0, self.text_tokens)
        return slice(self.visual_tokens, self.num_tokens)

    @property
    def visual_slice(self) -> slice:
        return slice(self.visual_offset, self.visual_offset + self.visual_tokens)

    def text_mask(self, device=None) -> torch.Tensor:
        """bool [N]: True at text tokens (the same in every order, since text never moves)."""
        mask = torch.zeros(self.num_tokens, dtype=torch.bool, device=device)
        mask[self.text_slice] = True
        return mask

    # ---- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TokenGrid":
        return cls(
            frames=None if data.get("frames") is None else int(data["frames"]),
            height=int(data["height"]),
            width=int(data["width"]),
            text_tokens=int(data.get("text_tokens", 0)),
            text_position=str(data.get("text_position", "prefix")),
        )

    def __str__(self) -> str:
        shape = "x".join(str(self.sizes[a]) for a in self.axes)
        text = f" + {self.text_tokens} text ({self.text_position})" if self.text_tokens else ""
        return f"{self.axes} {shape}{text} = {self.num_tokens} tokens"


def candidate_orders(grid: TokenGrid) -> list[str]:
    """The PARO candidates: the 6 permutations of "FHW" (video) or the 2 of "HW" (image), natural first."""
    return ["".join(p) for p in itertools.permutations(grid.axes)]


def check_order(grid: TokenGrid, order: str) -> None:
    if sorted(order) != sorted(grid.axes):
        raise ValueError(f"order {order!r} is not a permutation of the grid's axes {grid.axes!r}")


def order_permutation(grid: TokenGrid, order: str, device=None) -> torch.Tensor:
    """LongTensor [N]: model token index at each position when the visual tokens are flattened in ``order``.

    ``order`` names the axes slowest first, so "HWF" puts F fastest. Text tokens keep their positions.
    """
    check_order(grid, order)
    natural = grid.axes
    shape = [grid.sizes[a] for a in natural]
    visual = torch.arange(grid.visual_tokens, dtype=torch.long, device=device).view(shape)
    visual = visual.permute([natural.index(a) for a in order]).reshape(-1) + grid.visual_offset
    perm = torch.arange(grid.num_tokens, dtype=torch.long, device=device)
    perm[grid.visual_slice] = visual
    return perm


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """inv[..., perm[..., i]] = i: position of each model token in the permuted order."""
    inv = torch.empty_like(perm)
    positions = torch.arange(perm.shape[-1], dtype=perm.dtype, device=perm.device).expand_as(perm)
    return inv.scatter_(-1, perm, positions)


def orders_permutation(grid: TokenGrid, orders: list[str], device=None) -> torch.Tensor:
    """LongTensor [len(orders), N]: one `order_permutation` per head (the `SitePlan.perm` layout)."""
    cache: dict[str, torch.Tensor] = {}
    rows = []
    for order in orders:
        if order not in cache:
            cache[order] = order_permutation(grid, order, device=device)
        rows.append(cache[order])
    return torch.stack(rows) if rows else torch.empty(0, grid.num_tokens, dtype=torch.long, device=device)

