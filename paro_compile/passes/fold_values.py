"""The values folding's analysis computes (`fold_analysis`) and its rewrite reads (`fold_rewrite`): token states,
segments, boundaries, and the error that leaves a graph untouched."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch.fx as fx

from paro_compile.passes.context_parallel import TokenSharding
from paro_compile.passes.fx_utils import SizeLike, known_equal


class FoldError(RuntimeError):
    """The graph cannot run in the common order (the pass then leaves it untouched)."""


# eq=False: the lengths may be SymInts, and == on them would guard; compare with `State.same`.
@dataclass(frozen=True, eq=False)
class Seg:
    kind: str  # "vis" | "txt"
    length: SizeLike


@dataclass(frozen=True, eq=False)
class State:
    """The token axis of a node and the segments along it. ``shard``: the axis holds only this rank's chunk of the
    sequence whose segments are ``segs`` (context parallelism; None: the whole sequence)."""

    dim: int
    segs: tuple[Seg, ...]
    shard: Optional[TokenSharding] = None

    def same(self, other: State) -> bool:
        return self.shard == other.shard and len(self.segs) == len(other.segs) and all(
            a.kind == b.kind and known_equal(a.length, b.length) for a, b in zip(self.segs, other.segs))

    def at(self, dim: int) -> State:
        """The same tokens on axis ``dim``."""
        return State(dim, self.segs, self.shard)


@dataclass
class ShardedOperand:
    """A position-dependent operand that joins sharded tokens: ``operand`` is computed from ``chunk(U, dim)[rank]``
    of ``table`` (axis ``dim`` the whole sequence) by ``chain`` (single-input ops that keep the token axis, in graph
    order, ending at ``operand``; ``split`` and ``piece`` are the chunk and its ``[rank]``). The rewrite applies the
    forward layout op to ``table`` and replays ``split``, ``piece`` and ``chain`` on it."""

    table: fx.Node
    dim: int
    split: fx.Node
    piece: fx.Node
    chain: list[fx.Node]


class Boundary(NamedTuple):
    """``operand`` of ``user`` needs the layout op of ``direction``: "inv" (common → natural order) or "fwd"."""

    user: fx.Node
    operand: fx.Node
    direction: str
    state: State  # the operand's token axis and segments


def whole_segments(segs: tuple[Seg, ...], start: SizeLike, stop: SizeLike) -> Optional[tuple[Seg, ...]]:
    """The whole segments covering [start, stop) of the axis, or None when a boundary cuts a segment."""
    pos: SizeLike = 0
    out = []
    inside = known_equal(start, 0)
    if inside and known_equal(stop, 0):
        return ()
    for seg in segs:
        end = pos + seg.length
        if not inside and known_equal(pos, start):
            inside = True
        if inside:
            out.append(seg)
            if known_equal(end, stop):
                return tuple(out)
        pos = end
    return None
