"""Folding, phase 2 (mutates the graph): layout ops at the region's sources and boundaries, and the residuals.

At each token source the common order c goes into the patch embed's conv input (`fold_patch_embed`) or,
where no rule applies, into ``unflatten(axis, grid) → permute(axes of c) → flatten``; each boundary of the
region gets the same layout op with the inverse (``"inv"``) or forward (``"fwd"``) axis order, segment by
segment when text shares the axis. What the kernel still applies is the residual ``r[h] = c⁻¹[perm[h]]``:
a constant (`residual_permutation`) with static shapes, computed in the graph (`Rewriter.residual`) from
the grid sizes with symbolic ones.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import sympy
import torch
import torch.fx as fx
from torch.utils._sympy.interp import sympy_interp
from torch.utils._sympy.reference import PythonReferenceAnalysis

from paro_compile.grid import TokenGrid, inverse_permutation, order_permutation
from paro_compile.passes.discover import sdpa_arguments
from paro_compile.passes.fold_analysis import FoldError, GridFactor, Seg, ShardedOperand, TokenRegion
from paro_compile.passes.fold_patch_embed import fold_into_patch_embed
from paro_compile.passes.fx_utils import SizeLike, fake_value, meta_value, op_name, shape_of, static_int

if TYPE_CHECKING:
    from paro_compile.passes.discover import AttentionSite

SizeValue = Any
"""A size as the graph computes it: an int, or an fx.Node that reads a symbolic size at run time."""


class Rewriter:
    """Inserts the layout ops of one common ``order`` over the grid ``axes`` (sizes from ``factors``).

    Symbolic sizes are computed from the graph's inputs (`input_size`), at the top of the graph: a size node must
    dominate every layout op that uses it, and a layout op can sit before the node whose shape first shows the
    size (LTX's packed-latent input is reordered before the RoPE grid that forms (F, H, W) is built)."""

    def __init__(self, gm: fx.GraphModule, order: str, axes: str, factors: list[GridFactor],
                 inputs: Optional[InputSizes] = None) -> None:
        self.gm, self.graph = gm, gm.graph
        self.order, self.axes = order, axes
        self.factors = factors
        self.size_cache: dict[str, fx.Node] = {}
        self.new_nodes: set[fx.Node] = set()
        self.inputs = inputs if inputs is not None else InputSizes(self.graph)

    def input_size(self, size: SizeLike) -> SizeValue:
        """``size`` as the graph computes it: an int, or a node computing the SymInt from the graph's inputs
        (placed right after the placeholders, so it dominates every use). Raises FoldError when a symbol of the
        size is carried by no input (check first with `InputSizes.covers`)."""
        static = static_int(size)
        if static is not None:
            return static
        key = str(size)
        if key not in self.size_cache:
            node = self.inputs.build(size)
            if node is None:
                raise FoldError(f"the symbolic size {size} is carried by no graph input")
            self.size_cache[key] = node
        return self.size_cache[key]

    def size_value(self, ref: GridFactor) -> SizeValue:
        if isinstance(ref, int):
            return ref
        node, dim = ref
        return self.input_size(shape_of(node)[dim])

    def grid_sizes(self) -> list[SizeValue]:
        return [self.size_value(f) for f in self.factors]

    def _segment_length(self, seg: Seg) -> SizeValue:
        return self.input_size(seg.length)

    def _call(self, fn: Any, args: tuple) -> fx.Node:
        node = self.graph.call_function(fn, args)
        self.new_nodes.add(node)
        return node

    def _mul_all(self, values: list[SizeValue]) -> SizeValue:
        total = values[0]
        for v in values[1:]:
            total = self._call(operator.mul, (total, v)) if isinstance(total, fx.Node) or isinstance(v, fx.Node) else total * v
        return total

    def _add(self, a: SizeValue, b: SizeValue) -> SizeValue:
        if isinstance(a, fx.Node) or isinstance(b, fx.Node):
            return self._call(operator.add, (a, b))
        return a + b

    def reorder(self, x: fx.Node, dim: int, segs: tuple[Seg, ...], forward: bool, before: fx.Node, rank: int) -> fx.Node:
        """Natural → common order (forward) or back, on axis ``dim`` of ``x``; inserted before ``before``."""
        sizes = self.grid_sizes()
        k = len(self.axes)
        nat, tgt = self.axes, self.order
        if not forward:
            nat, tgt = tgt, nat
        view_sizes = [sizes[self.axes.index(a)] for a in nat]
        perm = list(range(dim)) + [dim + nat.index(a) for a in tgt]
        with self.graph.inserting_before(before):
            if len(segs) == 1:
                return self._apply(x, dim, view_sizes, perm, k, rank)
            lengths = [self._mul_all(sizes) if seg.kind == "vis" else self._segment_length(seg) for seg in segs]
            pieces_node = self._call(torch.split, (x, lengths, dim))
            pieces = []
            for i, seg in enumerate(segs):
                piece = self._call(operator.getitem, (pieces_node, i))
                if seg.kind == "vis":
                    piece = self._apply(piece, dim, view_sizes, perm, k, rank)
                pieces.append(piece)
            return self._call(torch.cat, (pieces, dim))

    def _apply(self, x: fx.Node, dim: int, view_sizes: list[SizeValue], perm: list[int], k: int, rank: int) -> fx.Node:
        y = self._call(torch.unflatten, (x, dim, tuple(view_sizes)))
        full = perm + list(range(dim + k, rank + k - 1))
        y = self._call(torch.permute, (y, full))
        return self._call(torch.flatten, (y, dim, dim + k - 1))

    def residual(self, segs: tuple[Seg, ...], head_orders: list[str], device: Optional[torch.device],
                 before: fx.Node) -> fx.Node:
        """In-graph ``r[h] = c⁻¹[perm[h]]`` ([H, N] int64) for tokens already in the common order, built from
        the (possibly symbolic) grid sizes: ``c⁻¹`` as a grid over the natural axes, permuted to each head's
        order. Used when the sequence length is symbolic (no [H, N] constant can be built at compile time)."""
        axes, order = self.axes, self.order
        with self.graph.inserting_before(before):
            sizes = self.grid_sizes()
            nvis = self._mul_all(list(sizes))
            rows: dict[str, fx.Node] = {}
            for o in dict.fromkeys(head_orders):
                parts, offset = [], 0
                for seg in segs:
                    if seg.kind == "vis":
                        pos = self._call(torch.arange, (nvis,))
                        pos.kwargs = {"dtype": torch.int64, "device": device}
                        pos = self._call(torch.reshape, (pos, tuple(sizes[axes.index(a)] for a in order)))
                        pos = self._call(torch.permute, (pos, [order.index(a) for a in axes]))  # c⁻¹ over natural axes
                        pos = self._call(torch.permute, (pos, [axes.index(a) for a in o]))
                        pos = self._call(torch.flatten, (pos,))
                        length = nvis
                    else:
                        length = self._segment_length(seg)
                        pos = self._call(torch.arange, (length,))
                        pos.kwargs = {"dtype": torch.int64, "device": device}
                    parts.append(self._call(operator.add, (pos, offset)) if not (isinstance(offset, int) and offset == 0) else pos)
                    offset = self._add(offset, length)
                rows[o] = parts[0] if len(parts) == 1 else self._call(torch.cat, (parts,))
            return self._call(torch.stack, ([rows[o] for o in head_orders],))


class InputSizes:
    """Symbolic sizes rebuilt from the graph's inputs: Dynamo lifts every input symbol as a ``SymInt`` placeholder
    (or it is one dimension of an input tensor), so any size expression over them can be computed right after the
    placeholders, where it dominates every node (`torch.utils._sympy.interp.sympy_interp` turns the expression into
    graph arithmetic)."""

    def __init__(self, graph: fx.Graph) -> None:
        self.graph = graph
        placeholders = graph.find_nodes(op="placeholder")
        self.tail: Optional[fx.Node] = placeholders[-1] if placeholders else None
        """The last node of the size computations (they follow the placeholders, in creation order)."""
        self.carriers: dict[sympy.Symbol, tuple[fx.Node, Optional[int]]] = {}
        for node in placeholders:
            value = meta_value(node)
            if isinstance(value, torch.SymInt) and isinstance(value.node.expr, sympy.Symbol):
                self.carriers[value.node.expr] = (node, None)
        for node in placeholders:
            value = fake_value(node)
            for dim, size in enumerate(value.shape if value is not None else ()):
                if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                    self.carriers.setdefault(size.node.expr, (node, dim))
        self.symbol_nodes: dict[sympy.Symbol, fx.Node] = {}

    def _expression(self, size: torch.SymInt) -> Optional[sympy.Expr]:
        """The size over carried symbols: as written, else after the ShapeEnv's replacements (a RoPE table's
        length that Dynamo equated with F·H·W)."""
        expr = size.node.expr
        if expr.free_symbols <= self.carriers.keys():
            return expr
        replaced = size.node.shape_env.replace(expr)
        return replaced if replaced.free_symbols <= self.carriers.keys() else None

    def covers(self, size: SizeLike) -> bool:
        """Whether `build` can compute ``size``: static, or an expression over carried symbols that `sympy_interp`
        turns into graph arithmetic (tried on a scratch graph, so a failure leaves this graph untouched)."""
        if static_int(size) is not None:
            return True
        expr = self._expression(size) if isinstance(size, torch.SymInt) else None
        if expr is None:
            return False
        scratch = fx.Graph()
        tracer = fx.proxy.GraphAppendingTracer(scratch)
        try:
            sympy_interp(PythonReferenceAnalysis,
                         {s: fx.Proxy(scratch.placeholder(str(s)), tracer) for s in expr.free_symbols}, expr)
        except Exception:  # an expression the interpreter has no graph rule for
            return False
        return True

    def build(self, size: torch.SymInt) -> Optional[fx.Node]:
        expr = self._expression(size)
        if expr is None or self.tail is None:
            return None
        tracer = fx.proxy.GraphAppendingTracer(self.graph)
        follower = self.tail.next
        with self.graph.inserting_before(follower):
            env = {}
            for symbol in expr.free_symbols:
                if symbol not in self.symbol_nodes:
                    carrier, dim = self.carriers[symbol]
                    self.symbol_nodes[symbol] = carrier if dim is None else self.graph.call_method("size", (carrier, dim))
                env[symbol] = fx.Proxy(self.symbol_nodes[symbol], tracer)
            value = sympy_interp(PythonReferenceAnalysis, env, expr)
        self.tail = follower.prev
        if isinstance(value, fx.Proxy):
            return value.node
        if isinstance(value, fx.Node):
            return value
        return None


@dataclass
class AppliedOrder:
    """What `apply_order` inserted: labels of the token sources, the exits and the forward (table) permutes."""

    rewriter: Rewriter
    sources: list[str] = field(default_factory=list)
    exits: list[str] = field(default_factory=list)
    table_permutes: list[str] = field(default_factory=list)


def apply_order(gm: fx.GraphModule, sites: list[AttentionSite], region: TokenRegion, order: str,
                inputs: Optional[InputSizes] = None) -> AppliedOrder:
    """Insert the layout ops that run ``region`` in ``order`` (mutates gm); the sites' q/k/v are refreshed.
    ``inputs``: the graph's `InputSizes`, shared with other rewrites of the same graph."""
    rw = Rewriter(gm, order, region.axes, region.grid_factors, inputs)
    applied = AppliedOrder(rw)
    analysis = region.analysis
    current: dict[fx.Node, fx.Node] = {}
    for node, dim in region.sources:
        folded = fold_into_patch_embed(gm, node, dim, region.axes, order)
        if folded is not None:
            kind, tokens = folded
            current[node] = tokens
            applied.sources.append(f"{kind} input({tokens.name})")
            continue
        users = list(node.users)
        rw.grid_sizes()  # size nodes first: an input's layout op goes right after them
        after = rw.inputs.tail.next if node.op == "placeholder" else node.next
        permuted = rw.reorder(node, dim, analysis.state[node].segs, True, after, len(shape_of(node)))
        for u in users:
            u.replace_input_with(node, permuted)
        current[node] = permuted
        applied.sources.append(f"{op_name(node) if node.op != 'placeholder' else 'input'}({node.name})")
    inserted: dict[tuple[fx.Node, str], fx.Node] = {}
    table_copies: dict[fx.Node, fx.Node] = {}
    for user, operand, direction, state in analysis.boundaries:
        if state.shard is not None:  # a table joining this rank's chunk: permute the whole table, then cut it
            key = (operand, "shard")
            if key not in inserted:
                inserted[key] = _replay_on_permuted_table(rw, analysis.sharded_operands[(user, operand)], state, user,
                                                          table_copies)
                applied.table_permutes.append(f"{operand.name}->{user.name}")
            user.replace_input_with(operand, inserted[key])
            continue
        src = current.get(operand, operand)
        key = (operand, direction)
        if key not in inserted:
            inserted[key] = rw.reorder(src, state.dim, state.segs, direction == "fwd", user, len(shape_of(operand)))
            (applied.exits if direction == "inv" else applied.table_permutes).append(f"{operand.name}->{user.name}")
        user.replace_input_with(src, inserted[key])
    gm.graph.lint()
    gm.recompile()
    for site in sites:
        args = sdpa_arguments(site.node)
        site.q, site.k, site.v = args.get("query"), args.get("key"), args.get("value")
    return applied


def _replay_on_permuted_table(rw: Rewriter, sharded: ShardedOperand, state: Any, before: fx.Node,
                              copies: dict[fx.Node, fx.Node]) -> fx.Node:
    """The operand of ``sharded`` computed from its whole table in the common order: the forward layout op on the
    table, then the table's ``chunk(U)[rank]`` and the ops after it, copied (``copies``: original → copy, shared by
    every operand of the graph). Inserted before ``before``, the operand's first user in the region."""
    if sharded.table not in copies:
        copies[sharded.table] = rw.reorder(sharded.table, sharded.dim, state.segs, True, before,
                                           len(shape_of(sharded.table)))
    with rw.graph.inserting_before(before):
        for node in [sharded.split, sharded.piece] + sharded.chain:
            if node not in copies:  # shared by the table's operands: the first copy dominates the later users
                copies[node] = rw.graph.node_copy(node, lambda a: copies.get(a, a))
                rw.new_nodes.add(copies[node])
    return copies[sharded.chain[-1] if sharded.chain else sharded.piece]


def common_permutation(segs: tuple[Seg, ...], grid: TokenGrid, order: str) -> torch.Tensor:
    """c: model token index at each position of a site's sequence with visual segments in ``order``."""
    visual = order_permutation(TokenGrid(grid.frames, grid.height, grid.width, 0), order)
    parts, pos = [], 0
    for seg in segs:
        n = static_int(seg.length)
        parts.append(visual + pos if seg.kind == "vis" else torch.arange(pos, pos + n))
        pos += n
    return torch.cat(parts)


def residual_permutation(perm: torch.Tensor, common: torch.Tensor) -> torch.Tensor:
    """r[h, i] = c⁻¹[perm[h, i]]: what the kernel still applies to tokens already in order c."""
    inv = inverse_permutation(common.to(perm.device))
    return inv[perm.long()]
