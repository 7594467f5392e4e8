"""Folding pass: apply the PARO token order with layout ops instead of runtime gathers.

See docs/folding.md for the algebra. In short, with c the common order of a token-wise region (one
permutation of the visual grid axes, e.g. "HWF") and perm[h] the order of head h of a site:

1. sources (the op that forms the flat visual token axis: the patchify flatten, or a flat graph input
   whose grid is known) get ``unflatten(grid) → permute(axes of c) → flatten``: a layout op;
2. the permuted order flows forward through every token-wise op (linear, norms, elementwise ops with
   broadcast modulation, residual adds, MLPs, cat/split with text, RoPE); position-dependent operands met
   on the way (RoPE cos/sin tables, positional embeddings) get the same layout permute; between two sites
   nothing is inserted (π⁻¹ of one site composed with π of the next is the identity);
3. where the order must be undone (unpatchify, graph outputs, any op that is not token-wise) the inverse
   layout permute is inserted;
4. each site's kernel gets only the residual ``r[h] = c⁻¹[perm[h]]`` (None when every head uses c).

Nothing here emits a gather: the residuals go to the attention kernel (its fused prologue/epilogue), so
`FoldResult.gathers` counts zero unless a future rule has to fall back to one.
"""
from __future__ import annotations

import operator
from contextlib import nullcontext
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import networkx as nx
import sympy
import torch
import torch.fx as fx

from paro_compile.grid import TokenGrid, inverse_permutation, order_permutation
from paro_compile.passes.discover import sdpa_arguments
from paro_compile.passes.layout import (
    fake_value, ELEMENTWISE_OPS, LAST_DIM_OPS, NORM_OPS, PERMUTE_OPS, REDUCTIONS, VIEW_OPS, SiteLayout, arg, getitem_axis_map,
    infer_layouts, is_one, map_view_forward, norm_dim, op_name, permute_dims, shape_of, sym_eq, sym_prod, to_sym,
)

INPLACE_EXTRA = {"setitem", "copy_", "fill_", "zero_", "index_put_", "masked_fill_", "scatter_"}
SIZE_OPS = {"size", "dim", "numel", "stride", "is_contiguous", "get_device"}


class FoldError(RuntimeError):
    pass


@dataclass(frozen=True)
class Seg:
    kind: str  # "vis" | "txt"
    length: Any  # sympy
    ref: Any = None  # (node, dim) to read the length from at run time when symbolic


@dataclass(frozen=True)
class State:
    dim: int
    segs: tuple

    def same(self, other: "State") -> bool:
        return len(self.segs) == len(other.segs) and all(
            a.kind == b.kind and sym_eq(a.length, b.length) for a, b in zip(self.segs, other.segs))


@dataclass
class FoldResult:
    kernel_perms: dict[str, Optional[torch.Tensor]] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)
    gathers: int = 0
    order: Optional[str] = None
    """The common order folded into the layout ops (None: nothing folded)."""
    grid: Optional[dict] = None
    sources: list[str] = field(default_factory=list)
    exits: list[str] = field(default_factory=list)
    table_permutes: list[str] = field(default_factory=list)
    region: Optional[nx.DiGraph] = None
    reason: str = ""
    """Why nothing was folded (empty when folded)."""


# ---------------------------------------------------------------------------------------------------
# phase 1: analysis (no mutation)


def _is_tensor_node(x: Any) -> bool:
    return isinstance(x, fx.Node) and shape_of(x) is not None


def _flat_args(node: fx.Node) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n))
    return out


def _sub_segs(segs: tuple, start, stop) -> Optional[tuple]:
    """The whole segments covering [start, stop) of the axis, or None when a boundary cuts a segment."""
    pos = sympy.Integer(0)
    out = []
    inside = sym_eq(start, 0)
    if inside and sym_eq(stop, 0):
        return ()
    for seg in segs:
        end = pos + seg.length
        if not inside and sym_eq(pos, start):
            inside = True
        if inside:
            out.append(seg)
            if sym_eq(end, stop):
                return tuple(out)
        pos = end
    return None


class Analysis:
    def __init__(self, gm: fx.GraphModule, sources: list[tuple[fx.Node, int]]) -> None:
        self.gm = gm
        self.state: dict[fx.Node, State] = {}
        self.tuple_state: dict[fx.Node, list[Optional[State]]] = {}
        self.actions: list[tuple[fx.Node, fx.Node, str, State]] = []  # (user, operand, "inv"|"fwd", state of operand)
        self.sources = sources
        for node, dim in sources:
            self.state[node] = State(dim, (Seg("vis", shape_of(node)[dim]),))

    def run(self) -> None:
        for node in list(self.gm.graph.nodes):
            if node.op == "placeholder" or node.op == "get_attr":
                continue
            inputs = [a for a in _flat_args(node) if a in self.state or a in self.tuple_state]
            if not inputs:
                continue
            if node in self.state:  # a source fed by permuted tokens (e.g. a conv inside the region)
                self.exit(node)
                continue
            if node.op == "output":
                for a in _flat_args(node):
                    if a in self.state:
                        self.actions.append((node, a, "inv", self.state[a]))
                    elif a in self.tuple_state:
                        raise FoldError(f"graph output {a.name} is a tuple in permuted order")
                continue
            self.visit(node)

    # helpers
    def exit(self, node: fx.Node, why: str = "") -> None:
        name = op_name(node)
        if name in INPLACE_EXTRA or (name.endswith("_") and not name.startswith("_")):
            raise FoldError(f"in-place op {node.name} ({name}) on permuted tokens cannot take a copy")
        for a in _flat_args(node):
            if a in self.state:
                self.actions.append((node, a, "inv", self.state[a]))
            elif a in self.tuple_state:
                raise FoldError(f"{node.name} consumes a tuple of permuted tensors")

    def fwd(self, node: fx.Node, operand: fx.Node, state: State) -> None:
        if not any(s.kind == "vis" for s in state.segs):
            return
        self.actions.append((node, operand, "fwd", state))

    def visit(self, node: fx.Node) -> None:
        name = op_name(node)
        shape = shape_of(node)
        a0 = node.args[0] if node.args else None
        st0 = self.state.get(a0) if isinstance(a0, fx.Node) else None
        if name in SIZE_OPS:
            return
        if name == "getitem" and isinstance(a0, fx.Node) and a0 in self.tuple_state:
            pieces = self.tuple_state[a0]
            idx = node.args[1]
            if isinstance(idx, int) and idx < len(pieces) and pieces[idx] is not None:
                self.state[node] = pieces[idx]
            elif not isinstance(idx, int):
                raise FoldError(f"{node.name}: non-constant index into a split of permuted tokens")
            return
        if name == "setitem":
            self.visit_setitem(node)
            return
        if shape is None and name not in ("split", "chunk", "unbind", "split_with_sizes"):
            self.exit(node)
            return
        rank = len(shape) if shape is not None else 0
        if name in ELEMENTWISE_OPS:
            self.visit_elementwise(node, shape)
            return
        if name in LAST_DIM_OPS and st0 is not None and st0.dim < len(shape_of(a0)) - 1 and len(node.args) >= 1 \
                and not any(a in self.state for a in _flat_args(node)[1:]):
            self.state[node] = st0
            return
        if name in NORM_OPS and st0 is not None and not any(a in self.state for a in _flat_args(node)[1:]):
            normalized = arg(node, 1, "normalized_shape")
            k = len(normalized) if isinstance(normalized, (list, tuple)) else 1
            if st0.dim < rank - k:
                self.state[node] = st0
                return
        if name in VIEW_OPS and st0 is not None and not any(a in self.state for a in _flat_args(node)[1:]):
            j = map_view_forward(shape_of(a0), shape, st0.dim)
            if j is not None:
                self.state[node] = State(j, st0.segs)
                return
        if name in PERMUTE_OPS and st0 is not None:
            dims = permute_dims(node, rank)
            if dims is not None:
                self.state[node] = State(dims.index(st0.dim), st0.segs)
                return
        if name in REDUCTIONS and st0 is not None:
            rdim = arg(node, 1, "dim")
            dims = rdim if isinstance(rdim, (list, tuple)) else [rdim]
            in_rank = len(shape_of(a0))
            if rdim is not None and all(isinstance(x, int) for x in dims):
                dims = [norm_dim(x, in_rank) for x in dims]
                if st0.dim not in dims:
                    keep = bool(arg(node, 2, "keepdim", False)) or name in ("softmax", "log_softmax")
                    out_dim = st0.dim if keep else st0.dim - sum(1 for x in dims if x < st0.dim)
                    self.state[node] = State(out_dim, st0.segs)
                    return
        if name == "getitem" and st0 is not None:
            if self.visit_getitem(node, st0):
                return
        if name == "cat":
            if self.visit_cat(node, shape):
                return
        if name == "stack":
            if self.visit_stack(node, shape):
                return
        if name in ("split", "chunk", "unbind", "split_with_sizes") and st0 is not None:
            if self.visit_split(node, st0):
                return
        if name == "scaled_dot_product_attention":
            if self.visit_sdpa(node):
                return
        self.exit(node)

    def visit_elementwise(self, node: fx.Node, shape: tuple) -> None:
        rank = len(shape)
        out_state: Optional[State] = None
        for a in _flat_args(node):
            if a in self.state:
                st = self.state[a]
                cand = State(st.dim + rank - len(shape_of(a)), st.segs)
                if out_state is not None and not (out_state.dim == cand.dim and out_state.same(cand)):
                    self.exit(node)
                    return
                out_state = cand
            elif a in self.tuple_state:
                self.exit(node)
                return
        if out_state is None:
            return
        for a in _flat_args(node):
            if a in self.state or not _is_tensor_node(a):
                continue
            a_shape = shape_of(a)
            aligned = out_state.dim - (rank - len(a_shape))
            if aligned >= 0 and not is_one(a_shape[aligned]):
                self.fwd(node, a, State(aligned, out_state.segs))
        self.state[node] = out_state

    def _region(self, index: Any, in_shape: tuple, st: State):
        """(output axis of the token axis, segs kept) for tensor[index]; None when not expressible."""
        axes = getitem_axis_map(index, len(in_shape))
        if axes is None:
            return None
        for j, (kind, axis, sl) in enumerate(axes):
            if kind == "in" and axis == st.dim:
                if sl == "dynamic" or sl.step not in (None, 1):
                    return None
                length = in_shape[axis]
                start = sl.start if sl.start is not None else 0
                stop = sl.stop if sl.stop is not None else length
                if isinstance(start, int) and start < 0:
                    start = length + start
                if isinstance(stop, int) and stop < 0:
                    stop = length + stop
                if isinstance(stop, int) and not isinstance(length, sympy.Symbol) and length.is_number and stop > int(length):
                    stop = length
                segs = _sub_segs(st.segs, sympy.sympify(start), sympy.sympify(stop))
                if segs is None:
                    return None
                return j, segs
        return None  # token axis indexed by an int

    def visit_getitem(self, node: fx.Node, st: State) -> bool:
        if len(_flat_args(node)) > 1:
            return False
        region = self._region(node.args[1], shape_of(node.args[0]), st)
        if region is None:
            return False
        j, segs = region
        if any(s.kind == "vis" for s in segs):
            self.state[node] = State(j, segs)
        return True

    def visit_setitem(self, node: fx.Node) -> None:
        target, index, value = node.args[0], node.args[1], node.args[2]
        t_state = self.state.get(target)
        v_state = self.state.get(value) if isinstance(value, fx.Node) else None
        if t_state is None:
            if v_state is not None:
                self.actions.append((node, value, "inv", v_state))
            return
        if isinstance(index, fx.Node) or any(isinstance(x, fx.Node) for x in _flat_args(node) if x not in (target, value)):
            raise FoldError(f"{node.name}: tensor-indexed store into permuted tokens")
        region = self._region(index, shape_of(target), t_state)
        if region is None:
            raise FoldError(f"{node.name}: store into a part of the token axis that is not whole segments")
        j, segs = region
        axes = getitem_axis_map(index, len(shape_of(target)))
        sub_rank = len(axes)
        if not _is_tensor_node(value):
            return
        v_shape = shape_of(value)
        aligned = j - (sub_rank - len(v_shape))
        want = State(aligned, segs)
        if v_state is not None:
            if not (v_state.dim == aligned and v_state.same(want)):
                raise FoldError(f"{node.name}: stored value is permuted differently from its destination")
            return
        if aligned >= 0 and not is_one(v_shape[aligned]):
            self.fwd(node, value, want)

    def visit_cat(self, node: fx.Node, shape: tuple) -> bool:
        tensors = arg(node, 0, "tensors")
        rank = len(shape)
        cdim = norm_dim(int(arg(node, 1, "dim", 0)), rank)
        states = [self.state.get(t) for t in tensors]
        dims = {s.dim for s in states if s is not None}
        if len(dims) != 1:
            return False
        d = dims.pop()
        if d == cdim:
            segs: list[Seg] = []
            for t, s in zip(tensors, states):
                if s is not None:
                    segs.extend(s.segs)
                else:
                    segs.append(Seg("txt", shape_of(t)[cdim], (t, cdim)))
            self.state[node] = State(cdim, tuple(segs))
            return True
        ref = next(s for s in states if s is not None)
        if not all(s is None or s.same(ref) for s in states):
            return False
        for t, s in zip(tensors, states):
            if s is None and not is_one(shape_of(t)[d]):
                self.fwd(node, t, ref)
        self.state[node] = ref
        return True

    def visit_stack(self, node: fx.Node, shape: tuple) -> bool:
        tensors = arg(node, 0, "tensors")
        rank = len(shape)
        sdim = norm_dim(int(arg(node, 1, "dim", 0)), rank)
        states = [self.state.get(t) for t in tensors]
        ref = next(s for s in states if s is not None)
        if not all(s is None or (s.dim == ref.dim and s.same(ref)) for s in states):
            return False
        out_dim = ref.dim + (1 if sdim <= ref.dim else 0)
        for t, s in zip(tensors, states):
            if s is None:
                self.fwd(node, t, ref)
        self.state[node] = State(out_dim, ref.segs)
        return True

    def visit_split(self, node: fx.Node, st: State) -> bool:
        name = op_name(node)
        pieces = node.meta.get("example_value")
        if not isinstance(pieces, (list, tuple)):
            return False
        src_rank = len(shape_of(node.args[0]))
        if name == "unbind":
            udim = norm_dim(int(arg(node, 1, "dim", 0)), src_rank)
            if udim == st.dim:
                return False
            out = State(st.dim - (1 if udim < st.dim else 0), st.segs)
            self.tuple_state[node] = [out] * len(pieces)
            return True
        sdim = norm_dim(int(arg(node, 2, "dim", 0)), src_rank)
        if sdim != st.dim:
            self.tuple_state[node] = [st] * len(pieces)
            return True
        out: list[Optional[State]] = []
        start = sympy.Integer(0)
        for p in pieces:
            stop = start + to_sym(p.shape[sdim])
            segs = _sub_segs(st.segs, start, stop)
            if segs is None:
                return False
            out.append(State(sdim, segs) if any(s.kind == "vis" for s in segs) else None)
            start = stop
        self.tuple_state[node] = out
        return True

    def visit_sdpa(self, node: fx.Node) -> bool:
        args = sdpa_arguments(node)
        if args.get("attn_mask") is not None:
            return False
        q, k, v = args.get("query"), args.get("key"), args.get("value")
        sq, sk, sv = (self.state.get(x) if isinstance(x, fx.Node) else None for x in (q, k, v))
        for s in (sq, sk, sv):
            if s is not None and s.dim != 2:
                return False
        if sq is not None:
            q_len = shape_of(q)[2]
            for x, s in ((k, sk), (v, sv)):
                if s is not None:
                    if not s.same(sq) and not sym_eq(shape_of(x)[2], q_len):
                        pass
                    elif not s.same(sq):
                        return False
            if (sk is None) != (sv is None):
                return False
            if sk is None and sym_eq(shape_of(k)[2], q_len):
                # self-attention whose keys/values come from a path we did not see: give them the same order
                self.fwd(node, k, sq)
                self.fwd(node, v, sq)
            self.state[node] = sq
            return True
        if sk is not None and sv is not None and sk.same(sv):
            return True  # keys and values permuted alike: softmax over keys is order-invariant
        return False


# ---------------------------------------------------------------------------------------------------
# phase 2: rewrite


class Rewriter:
    def __init__(self, gm: fx.GraphModule, order: str, axes: str, factors: list[Any]) -> None:
        self.gm, self.graph = gm, gm.graph
        self.order, self.axes = order, axes
        self.factors = factors  # per natural axis: int or (node, dim)
        self.size_cache: dict[tuple, Any] = {}
        self.new_nodes: set[fx.Node] = set()
        last_placeholder = None
        for n in self.graph.nodes:
            if n.op == "placeholder":
                last_placeholder = n
        self.last_placeholder = last_placeholder

    def _after(self, node: fx.Node):
        return self.graph.inserting_after(self.last_placeholder if node.op == "placeholder" else node)

    def size_value(self, ref: Any) -> Any:
        if isinstance(ref, int):
            return ref
        node, dim = ref
        size = shape_of(node)[dim]
        if size.is_number:
            return int(size)
        key = (node, dim)
        if key not in self.size_cache:
            with self._after(node):
                s = self.graph.call_method("size", (node, dim))
            self.new_nodes.add(s)
            self.size_cache[key] = s
        return self.size_cache[key]

    def grid_sizes(self) -> list[Any]:
        return [self.size_value(f) for f in self.factors]

    def _call(self, fn, args) -> fx.Node:
        node = self.graph.call_function(fn, args)
        self.new_nodes.add(node)
        return node

    def reorder(self, x: fx.Node, dim: int, segs: tuple, forward: bool, before: fx.Node, rank: int) -> fx.Node:
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
            lengths = []
            for seg in segs:
                if seg.kind == "vis":
                    total = sizes[0]
                    for s in sizes[1:]:
                        total = self._call(operator.mul, (total, s)) if isinstance(total, fx.Node) or isinstance(s, fx.Node) else total * s
                    lengths.append(total)
                else:
                    lengths.append(int(seg.length) if seg.length.is_number else self.size_value(seg.ref))
            pieces_node = self._call(torch.split, (x, lengths, dim))
            pieces = []
            for i, seg in enumerate(segs):
                piece = self._call(operator.getitem, (pieces_node, i))
                if seg.kind == "vis":
                    piece = self._apply(piece, dim, view_sizes, perm, k, rank)
                pieces.append(piece)
            return self._call(torch.cat, (pieces, dim))

    def _mul_all(self, values: list) -> Any:
        total = values[0]
        for v in values[1:]:
            total = self._call(operator.mul, (total, v)) if isinstance(total, fx.Node) or isinstance(v, fx.Node) else total * v
        return total

    def _add(self, a: Any, b: Any) -> Any:
        if isinstance(a, fx.Node) or isinstance(b, fx.Node):
            return self._call(operator.add, (a, b))
        return a + b

    def residual(self, segs: tuple, head_orders: list[str], device, before: fx.Node) -> fx.Node:
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
                        length = int(seg.length) if seg.length.is_number else self.size_value(seg.ref)
                        pos = self._call(torch.arange, (length,))
                        pos.kwargs = {"dtype": torch.int64, "device": device}
                    parts.append(self._call(operator.add, (pos, offset)) if not (isinstance(offset, int) and offset == 0) else pos)
                    offset = self._add(offset, length)
                rows[o] = parts[0] if len(parts) == 1 else self._call(torch.cat, (parts,))
            return self._call(torch.stack, ([rows[o] for o in head_orders],))

    def _apply(self, x, dim, view_sizes, perm, k, rank):
        y = self._call(torch.unflatten, (x, dim, tuple(view_sizes)))
        full = perm + list(range(dim + k, rank + k - 1))
        y = self._call(torch.permute, (y, full))
        return self._call(torch.flatten, (y, dim, dim + k - 1))


# ---------------------------------------------------------------------------------------------------
# driver


def _site_perm_in_segs(segs: tuple, grid: TokenGrid, order: str) -> torch.Tensor:
    """c: model token index at each position of a site's sequence with visual segments in ``order``."""
    visual = order_permutation(TokenGrid(grid.frames, grid.height, grid.width, 0), order)
    parts, pos = [], 0
    for seg in segs:
        n = int(seg.length)
        parts.append(visual + pos if seg.kind == "vis" else torch.arange(pos, pos + n))
        pos += n
    return torch.cat(parts)


def residual_permutation(perm: torch.Tensor, common: torch.Tensor) -> torch.Tensor:
    """r[h, i] = c⁻¹[perm[h, i]]: what the kernel still applies to tokens already in order c."""
    inv = inverse_permutation(common.to(perm.device))
    return inv[perm.long()]


def _head_orders(site_plan, grid: TokenGrid) -> list[Optional[str]]:
    if site_plan.perm is None:
        return [grid.natural_order] * site_plan.heads
    if site_plan.orders and len(site_plan.orders) == site_plan.heads:
        return list(site_plan.orders)
    from paro_compile.grid import candidate_orders

    cands = {o: order_permutation(grid, o) for o in candidate_orders(grid)}
    out = []
    for row in site_plan.perm:
        out.append(next((o for o, p in cands.items() if torch.equal(row.cpu().long(), p)), None))
    return out


def analyse(gm: fx.GraphModule, sites, plan=None, grid_hint: Optional[TokenGrid] = None):
    """Layouts + sources + forward analysis. Returns (layouts, sources, axes, factors, analysis) or raises FoldError."""
    supported = [s for s in sites if s.supported]
    layouts = infer_layouts(gm, supported)
    factors = None
    for lay in layouts.values():
        if lay.factors is not None:
            if factors is None:
                factors = lay.factors
            elif [str(f.size) for f in lay.factors] != [str(f.size) for f in factors]:
                raise FoldError("sites see different token grids")
    sources: dict[tuple[str, int], tuple[fx.Node, int]] = {}
    if factors is not None:
        axes = "FHW" if len(factors) == 3 else "HW"
        fvals = [(f.node, f.dim) for f in factors]
        for lay in layouts.values():
            for src, _ in lay.merge_sources:
                if src.factors and [str(f.size) for f in src.factors] == [str(f.size) for f in factors]:
                    sources[(src.node.name, src.dim)] = (src.node, src.dim)
        grid_sizes = [f.size for f in factors]
    else:
        grid = grid_hint
        if grid is None and plan is not None:
            grid = next((sp.grid for sp in plan.sites.values() if sp.grid is not None), None)
        if grid is None:
            raise FoldError("no layout op forms the tokens in this graph and no grid is known (plan SitePlan.grid)")
        axes = grid.axes
        fvals = [grid.sizes[a] for a in axes]
        grid_sizes = [sympy.Integer(v) for v in fvals]
    visual = sym_prod(grid_sizes)
    for lay in layouts.values():
        for src, offset in lay.flat_leaves:
            if src.node.op == "get_attr":
                continue
            if not sym_eq(src.length, visual):
                continue
            # a visual leaf: it occupies the visual range of the site's sequence
            text = sympy.simplify(lay.seq_len - visual)
            if sym_eq(offset, text) or (sym_eq(offset, 0) and not sym_eq(text, 0) and factors is None and grid_hint is not None
                                        and grid_hint.text_position == "suffix") or sym_eq(text, 0):
                sources[(src.node.name, src.dim)] = (src.node, src.dim)
    if not sources:
        raise FoldError("no visual token source found")
    analysis = Analysis(gm, list(sources.values()))
    analysis.run()
    return layouts, list(sources.values()), axes, fvals, analysis


def _grid_from(axes: str, fvals: list, text: int, position: str) -> Optional[TokenGrid]:
    try:
        sizes = [v if isinstance(v, int) else int(shape_of(v[0])[v[1]]) for v in fvals]
    except TypeError:
        return None
    if axes == "FHW":
        return TokenGrid(sizes[0], sizes[1], sizes[2], text, position)
    return TokenGrid(None, sizes[0], sizes[1], text, position)


CONV2D_TARGETS = {torch.conv2d, torch.nn.functional.conv2d}


def _static_shape(node: fx.Node) -> Optional[tuple[int, ...]]:
    shape = shape_of(node)
    if shape is None or not all(getattr(s, "is_number", False) for s in shape):
        return None
    return tuple(int(s) for s in shape)


def _sole_conv_args(conv: Any, targets: set, spatial: int) -> Optional[tuple]:
    """(x, weight, bias, stride, padding, dilation, groups) of a positional conv call whose only user is
    the patchify chain, with stride / padding / dilation as ``spatial``-tuples and groups an int, whichever
    way the call spelled them (``F.conv2d(x, w, b, 2)`` passes ints); None for anything else (another op,
    keyword arguments, several users, string padding "same" / "valid", which neither patch rule folds)."""
    if not (isinstance(conv, fx.Node) and conv.op == "call_function" and conv.target in targets
            and len(conv.users) == 1 and not conv.kwargs and len(conv.args) <= 7):
        return None
    x, weight, bias, stride, padding, dilation, groups = list(conv.args) + [None] * (7 - len(conv.args))

    def per_dim(value, default):
        value = default if value is None else value
        return tuple(value) if isinstance(value, (tuple, list)) else (value,) * spatial

    if isinstance(padding, str):
        return None
    return x, weight, bias, per_dim(stride, 1), per_dim(padding, 0), per_dim(dilation, 1), 1 if groups is None else groups


def _conv2d_patch_chain(source: fx.Node, dim: int) -> Optional[dict]:
    """Match the per-frame patch embedding of CogVideoX-style models, ending at ``source``:
    ``conv2d(x [B·F, C, H, W], kernel = stride, no padding)`` → ``view(B, F, C', H', W')`` →
    ``flatten(3)`` → ``transpose(2, 3)`` → ``flatten(1, 2)`` = tokens [B, F·H'·W', C'] (dim 1).
    Every intermediate must have one user, and all shapes must be static."""
    def method(node, name):
        return isinstance(node, fx.Node) and node.op == "call_method" and node.target == name and len(node.users) == 1

    if dim != 1 or not (source.op == "call_method" and source.target == "flatten"):
        return None
    if tuple(source.args[1:3]) != (1, 2) and (len(source.args) < 2 or source.args[1] != 1 or source.kwargs.get("end_dim", 2) != 2):
        return None
    transpose = source.args[0]
    if not method(transpose, "transpose") or tuple(transpose.args[1:]) != (2, 3):
        return None
    flat = transpose.args[0]
    if not method(flat, "flatten") or tuple(flat.args[1:]) not in ((3,), (3, -1), (3, 4)):
        return None
    view = flat.args[0]
    if not (isinstance(view, fx.Node) and view.op == "call_method" and view.target in ("view", "reshape")
            and len(view.users) == 1):
        return None
    conv = view.args[0]
    args = _sole_conv_args(conv, CONV2D_TARGETS, 2)
    if args is None:
        return None
    x, weight, bias, stride, padding, dilation, groups = args
    x_shape, w_shape, v_shape = _static_shape(x), _static_shape(weight), _static_shape(view)
    if x_shape is None or w_shape is None or v_shape is None or len(v_shape) != 5 or len(x_shape) != 4:
        return None
    if any(p != 0 for p in padding) or any(d != 1 for d in dilation):
        return None
    if tuple(w_shape[2:]) != stride:
        return None  # patches must not overlap: each output pixel reads its own kernel-sized patch
    b, f, c_out, h_out, w_out = v_shape
    if x_shape[0] != b * f or x_shape[2] != h_out * stride[0] or x_shape[3] != w_out * stride[1]:
        return None
    return {"x": x, "weight": weight, "bias": bias, "stride": stride, "groups": groups,
            "conv": conv, "chain": [source, transpose, flat, view, conv], "b": b, "f": f, "c_in": x_shape[1],
            "c_out": c_out, "sizes": {"F": f, "H": h_out, "W": w_out}}


def fold_into_patch_conv(gm: fx.GraphModule, source: fx.Node, dim: int, axes: str, order: str) -> Optional[fx.Node]:
    """Apply ``order`` to the *input* of a per-frame patch conv instead of to its output tokens.

    The conv's output pixels are (conv batch, row, column); rearranging the latent so that these are the
    three grid axes in ``order`` makes the conv emit the tokens already in that order:
    ``x.reshape(B, F, C, H', p, W', q).permute(B, A1, C, A2, p, A3, q).reshape(B·A1, C, A2·p, A3·q)``.
    That permutes the small latent (C input channels) instead of reading the C'-channel conv output
    in a scattered token order (uncoalesced on the GPU: see docs/folding.md). Returns the new token
    node, or None when the graph does not have that pattern (the caller then uses a layout permute)."""
    if axes != "FHW" or sorted(order) != sorted(axes):
        return None
    match = _conv2d_patch_chain(source, dim)
    if match is None:
        return None
    graph = gm.graph
    b, f, c_in, c_out = match["b"], match["f"], match["c_in"], match["c_out"]
    sizes = match["sizes"]
    p, q = match["stride"]
    x5_dim = {"F": 1, "H": 3, "W": 5}  # in x.view(B, F, C, H', p, W', q)
    a1, a2, a3 = order
    with graph.inserting_before(match["conv"]):
        # reshape, not view: the conv input or output may come in another memory format (channels-last)
        x5 = graph.call_method("reshape", (match["x"], b, f, c_in, sizes["H"], p, sizes["W"], q))
        xp = graph.call_method("permute", (x5, 0, x5_dim[a1], 2, x5_dim[a2], 4, x5_dim[a3], 6))
        x4 = graph.call_method("reshape", (xp, b * sizes[a1], c_in, sizes[a2] * p, sizes[a3] * q))
        conv = graph.call_function(match["conv"].target, (x4, match["weight"], match["bias"], (p, q), (0, 0), (1, 1),
                                                         match["groups"]))
        y = graph.call_method("reshape", (conv, b, sizes[a1], c_out, sizes[a2] * sizes[a3]))
        y = graph.call_method("transpose", (y, 2, 3))
        tokens = graph.call_method("flatten", (y, 1, 2))
    source.replace_all_uses_with(tokens)
    for node in match["chain"]:
        if not node.users:
            graph.erase_node(node)
    _propagate_fake_values([x5, xp, x4, conv, y.args[0], y, tokens])
    return tokens


CONV3D_TARGETS = {torch.conv3d, torch.nn.functional.conv3d}


def fold_into_conv3d_input(gm: fx.GraphModule, source: fx.Node, dim: int, axes: str, order: str) -> Optional[fx.Node]:
    """Wan / toy-DiT patch embed: ``conv3d(x [B, C, F, H, W]) → flatten(2)`` with tokens on dim 2.

    A 3-D convolution commutes with permuting the input's spatial dims together with the kernel's
    (and stride, padding, dilation), so permuting both into ``order`` makes the conv emit its tokens in
    that order, reading the small latent instead of the wide conv output in a scattered order."""
    if axes != "FHW" or sorted(order) != sorted(axes) or dim != 2:
        return None
    if not (source.op == "call_method" and source.target == "flatten" and not source.kwargs):
        return None
    if tuple(source.args[1:]) not in ((2,), (2, -1), (2, 4)):
        return None
    conv = source.args[0]
    args = _sole_conv_args(conv, CONV3D_TARGETS, 3)
    if args is None:
        return None
    x, weight, bias, stride, padding, dilation, groups = args
    x_shape = _static_shape(x)
    if x_shape is None or len(x_shape) != 5:
        return None
    spatial = [axes.index(a) for a in order]
    dims = (0, 1, *(2 + i for i in spatial))
    graph = gm.graph
    with graph.inserting_before(conv):
        xp = graph.call_method("permute", (x, *dims))
        wp = graph.call_method("permute", (weight, *dims))
        new_conv = graph.call_function(conv.target, (
            xp, wp, bias, tuple(stride[i] for i in spatial), tuple(padding[i] for i in spatial),
            tuple(dilation[i] for i in spatial), groups))
        tokens = graph.call_method("flatten", (new_conv, 2))
    source.replace_all_uses_with(tokens)
    graph.erase_node(source)
    graph.erase_node(conv)
    _propagate_fake_values([xp, wp, new_conv, tokens])
    return tokens


def _propagate_fake_values(nodes: list[fx.Node]) -> None:
    """Give new nodes the fake "example_value" later passes read shapes from (run on the fake inputs)."""
    def value_of(a):
        return fake_value(a) if isinstance(a, fx.Node) else a

    for node in nodes:
        args = fx.node.map_arg(node.args, value_of)
        kwargs = fx.node.map_arg(node.kwargs, value_of)
        first_val = args[0]
        if first_val is None:
            continue
        fake_mode = getattr(first_val, "fake_mode", None)
        with fake_mode if fake_mode is not None else nullcontext():
            if node.op == "call_method":
                out = getattr(first_val, node.target)(*args[1:], **kwargs)
            else:
                out = node.target(*args, **kwargs)
        node.meta["example_value"] = out


def apply_order(gm: fx.GraphModule, sites, analysis: Analysis, sources, axes: str, fvals, order: str, result: FoldResult) -> "Rewriter":
    """Phase 2: insert the layout permutes for ``order`` (mutates gm)."""
    rw = Rewriter(gm, order, axes, fvals)
    current: dict[fx.Node, fx.Node] = {}
    graph = gm.graph
    for node, dim in sources:
        folded = fold_into_patch_conv(gm, node, dim, axes, order)
        kind = "conv2d"
        if folded is None:
            folded, kind = fold_into_conv3d_input(gm, node, dim, axes, order), "conv3d"
        if folded is not None:
            current[node] = folded
            result.sources.append(f"{kind} input({folded.name})")
            continue
        users = list(node.users)
        anchor = rw.last_placeholder if node.op == "placeholder" else node
        # insert after the anchor (and after any size nodes read from it)
        nxt = anchor.next
        while nxt in rw.new_nodes:
            nxt = nxt.next
        st = analysis.state[node]
        rw.grid_sizes()  # make size nodes first so they dominate
        nxt = anchor.next
        while nxt in rw.new_nodes:
            nxt = nxt.next
        permuted = rw.reorder(node, dim, st.segs, True, nxt, len(shape_of(node)))
        for u in users:
            u.replace_input_with(node, permuted)
        current[node] = permuted
        result.sources.append(f"{op_name(node) if node.op != 'placeholder' else 'input'}({node.name})")
    cache: dict[tuple[fx.Node, str], fx.Node] = {}
    for user, operand, kind, st in analysis.actions:
        src = current.get(operand, operand)
        key = (operand, kind)
        if key not in cache:
            cache[key] = rw.reorder(src, st.dim, st.segs, kind == "fwd", user, len(shape_of(operand)))
            (result.exits if kind == "inv" else result.table_permutes).append(f"{operand.name}->{user.name}")
        user.replace_input_with(src, cache[key])
    graph.lint()
    gm.recompile()
    for site in sites:
        args = sdpa_arguments(site.node)
        site.q, site.k, site.v = args.get("query"), args.get("key"), args.get("value")
    return rw


def build_region(analysis: Analysis) -> nx.DiGraph:
    g = nx.DiGraph()
    for node, st in analysis.state.items():
        g.add_node(node.name, dim=st.dim, segs=[s.kind for s in st.segs], op=op_name(node))
        for a in _flat_args(node):
            if a in analysis.state or a in analysis.tuple_state:
                g.add_edge(a.name, node.name)
    for user, operand, kind, _ in analysis.actions:
        g.add_edge(operand.name, user.name, boundary=kind)
    return g


def site_device(site) -> Optional[torch.device]:
    """Device of the site's activations (from the graph's fake values), None when unknown."""
    value = fake_value(site.q) if isinstance(site.q, fx.Node) else None
    return value.device if value is not None else None


def _on_device(perm: Optional[torch.Tensor], device: Optional[torch.device]) -> Optional[torch.Tensor]:
    """Kernel permutations live on the activations' device: a CPU [H, N] buffer handed to a CUDA kernel is
    copied host→device (pageable, synchronising) on every call, twice per site (prologue and epilogue)."""
    if perm is None or device is None or perm.device == device:
        return perm
    return perm.to(device)


def _is_symbolic(fvals) -> bool:
    for v in fvals:
        if isinstance(v, tuple) and not shape_of(v[0])[v[1]].is_number:
            return True
    return False


class DynamicPlanError(FoldError):
    """A plan that cannot be applied to a graph with symbolic token counts."""


def fold_permutations(gm: fx.GraphModule, sites, plan, config=None, grid: Optional[TokenGrid] = None) -> FoldResult:
    """Fold the plan's per-site permutations into layout ops (see module docstring). Mutates ``gm``.

    With a symbolic token grid (``dynamic=True``) the plan's per-head order strings are applied to the
    inferred symbolic grid: the common order goes into the layout ops and the residuals are computed in the
    graph from the grid sizes (`Rewriter.residual`). A plan without order strings raises DynamicPlanError.
    """
    result = FoldResult()
    by_id = {s.site_id: s for s in sites}
    planned = {s.site_id: plan.sites.get(s.site_id) for s in sites if s.supported and plan is not None}
    planned = {k: v for k, v in planned.items() if v is not None and v.perm is not None}
    symbolic_sites = {sid for sid in planned if not _static_seq(by_id[sid])}
    for sid, sp in list(planned.items()):
        if sp.is_identity_perm():
            result.kernel_perms[sid] = None
            result.descriptions[sid] = "identity"
            del planned[sid]
            continue
        if sid in symbolic_sites and not (sp.orders and len(sp.orders) == sp.heads):
            raise DynamicPlanError(
                f"site {sid} has a symbolic sequence length and its plan holds a [H, N] permutation but no per-head "
                "order strings: with dynamic shapes only order plans (SitePlan.orders + grid) apply; compile with "
                "dynamic=False or use a plan with orders")
        result.kernel_perms[sid] = _on_device(sp.perm, site_device(by_id[sid])) if sid not in symbolic_sites else None
        result.descriptions[sid] = "kernel"
    if not planned:
        result.reason = "no site has a permutation"
        return result
    try:
        layouts, sources, axes, fvals, analysis = analyse(gm, sites, plan, grid)
    except FoldError as error:
        if symbolic_sites & set(planned):
            raise DynamicPlanError(f"symbolic shapes with a permuted plan need the token grid from the graph: {error}") from error
        result.reason = str(error)
        return result
    site_states = {s.site_id: analysis.state.get(s.node) for s in sites}
    if _is_symbolic(fvals):
        return _fold_symbolic(gm, sites, planned, analysis, sources, axes, fvals, site_states, result)
    # choose the common order: the one most heads of the reached sites use
    counts: Counter = Counter()
    site_grids: dict[str, TokenGrid] = {}
    for sid, sp in planned.items():
        st = site_states.get(sid)
        if st is None:
            continue
        text = sum(int(s.length) for s in st.segs if s.kind == "txt")
        position = "prefix" if st.segs[0].kind == "txt" else "suffix"
        g = _grid_from(axes, fvals, text, position)
        if g is None or sum(1 for s in st.segs if s.kind == "vis") != 1 or (sp.grid is not None and sp.grid.sizes != g.sizes):
            continue
        site_grids[sid] = g
        counts.update(o for o in _head_orders(sp, g) if o is not None)
    if not counts:
        result.reason = "no planned site is reached from the token sources"
        return result
    natural = axes
    best = max(counts.values())
    order = natural if counts.get(natural, 0) == best else next(o for o, c in counts.most_common() if c == best)
    if order == natural:
        result.reason = f"most heads use the natural order {natural}: nothing to fold"
        return result
    apply_order(gm, sites, analysis, sources, axes, fvals, order, result)
    result.order = order
    result.region = build_region(analysis)
    label = result.sources[0] if result.sources else "layout"
    for sid, sp in planned.items():
        st = site_states.get(sid)
        if sid not in site_grids or st is None:
            # reached or not, the kernel still applies the whole permutation in model order... unless the
            # site's tokens are now permuted: then it must apply the residual w.r.t. the common order.
            if st is not None:
                raise RuntimeError(f"site {sid} is in the permuted region but its grid is unknown")
            continue
        common = _site_perm_in_segs(st.segs, site_grids[sid], order)
        residual = residual_permutation(sp.perm, common)
        ident = torch.arange(residual.shape[-1], device=residual.device)
        if bool((residual == ident).all()):
            result.kernel_perms[sid] = None
            result.descriptions[sid] = f"folded:{label}"
        else:
            result.kernel_perms[sid] = _on_device(residual, site_device(by_id[sid]))
            result.descriptions[sid] = "kernel"
    # sites reached without a plan entry run in the permuted order: attention is equivariant, nothing to do.
    result.grid = {"axes": axes, "order": order}
    return result


def _static_seq(site) -> bool:
    """Static (not symbolic) size; never int() on a SymInt (it would specialize the graph)."""
    from paro_compile.plan import _as_int

    return _as_int(site.seq_len) is not None


def _fold_symbolic(gm, sites, planned, analysis, sources, axes, fvals, site_states, result: FoldResult) -> FoldResult:
    """Order plans on a symbolic grid: fold the common order, residuals computed in the graph."""
    by_id = {s.site_id: s for s in sites}
    counts: Counter = Counter()
    for sid, sp in planned.items():
        st = site_states.get(sid)
        if not sp.orders or len(sp.orders) != sp.heads:
            raise DynamicPlanError(f"site {sid}: a plan applied to a symbolic grid needs per-head order strings")
        if st is None or sum(1 for s in st.segs if s.kind == "vis") != 1:
            raise DynamicPlanError(f"site {sid}: its tokens are not reached from the visual token source of the "
                                   "graph, so its orders cannot be applied to the symbolic grid")
        bad = [o for o in sp.orders if sorted(o) != sorted(axes)]
        if bad:
            raise DynamicPlanError(f"site {sid}: orders {sorted(set(bad))} do not name the grid axes {axes!r}")
        counts.update(sp.orders)
    best = max(counts.values())
    order = axes if counts.get(axes, 0) == best else next(o for o, c in counts.most_common() if c == best)
    if order != axes:
        rw = apply_order(gm, sites, analysis, sources, axes, fvals, order, result)
        result.order = order
        result.region = build_region(analysis)
    else:
        rw = Rewriter(gm, order, axes, fvals)
        result.reason = f"most heads use the natural order {axes}: nothing to fold"
    label = result.sources[0] if result.sources else "layout"
    cache: dict[tuple, fx.Node] = {}
    first_site = next(s for s in gm.graph.nodes if any(s is by_id[sid].node for sid in planned))
    for sid, sp in planned.items():
        if all(o == order for o in sp.orders):
            result.kernel_perms[sid] = None
            result.descriptions[sid] = f"folded:{label}"
            continue
        st = site_states[sid]
        key = (tuple(sp.orders), tuple((seg.kind, str(seg.length)) for seg in st.segs))
        if key not in cache:  # one index computation per distinct (orders, layout), not per layer
            cache[key] = rw.residual(st.segs, list(sp.orders), site_device(by_id[sid]), first_site)
        result.kernel_perms[sid] = cache[key]
        result.descriptions[sid] = "kernel"
    gm.graph.lint()
    gm.recompile()
    result.grid = {"axes": axes, "order": order}
    return result


def fold_order(gm: fx.GraphModule, sites, order: str, grid: Optional[TokenGrid] = None) -> FoldResult:
    """Fold one axis-order string (e.g. "HWF") for every site, without a plan: works on symbolic grids
    (dynamic=True). Sites then need no kernel permutation for that order."""
    result = FoldResult()
    try:
        layouts, sources, axes, fvals, analysis = analyse(gm, sites, None, grid)
    except FoldError as error:
        result.reason = str(error)
        return result
    if sorted(order) != sorted(axes):
        raise ValueError(f"order {order!r} does not name the grid axes {axes!r}")
    if order == axes:
        result.reason = "natural order"
        return result
    apply_order(gm, sites, analysis, sources, axes, fvals, order, result)
    result.order = order
    result.region = build_region(analysis)
    for site in sites:
        if site.supported and site.node in analysis.state:
            result.kernel_perms[site.site_id] = None
            result.descriptions[site.site_id] = f"folded:{result.sources[0]}"
    return result
