"""Folding, phase 1 (no mutation): which nodes carry the visual tokens, and where the order must change.

From the token sources that layout inference finds (the patchify merge, or a flat input whose grid is
known), `Analysis` propagates forward, in graph order, "axis d holds the tokens, as these text / visual
segments" through every token-wise op. The nodes it reaches form the region that runs in the common order
c; a `Boundary` is an operand edge where the rewrite inserts a layout op: ``"inv"`` where the tokens leave
the region (an op that is not token-wise, a graph output), ``"fwd"`` where a token-varying operand from
outside joins it (RoPE tables, positional embeddings). Anything the rewrite could not express (a store into
part of a segment, a tuple of permuted tensors as an output) raises `FoldError` before the graph is touched.

Under Ulysses context parallelism the rules of `fold_sharding.ShardedTokenRules` apply too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Union

import torch.fx as fx

from paro_compile.grid import TokenGrid
from paro_compile.passes.context_parallel import ALL_GATHER, OperandLayout, TokenSharding
from paro_compile.passes.discover import sdpa_arguments
from paro_compile.passes.fold_sharding import ShardedTokenRules
from paro_compile.passes.fold_values import Boundary, FoldError, Seg, ShardedOperand, State, whole_segments
from paro_compile.passes.fx_utils import (
    ELEMENTWISE_OPS, LAST_DIM_OPS, NORM_OPS, PERMUTE_OPS, REDUCTIONS, SIZE_OPS, SPLIT_OPS, VIEW_OPS, SizeLike, arg,
    getitem_axis_map, index_size_nodes, is_inplace, is_one, known_equal, map_view_forward, meta_value, norm_dim,
    op_name, permute_dims, shape_of, static_int, unit_step,
)
from paro_compile.passes.layout import infer_layouts

if TYPE_CHECKING:
    from paro_compile.passes.discover import AttentionSite
    from paro_compile.plan import Plan

GridFactor = Union[int, tuple[fx.Node, int]]
"""One grid axis size: an int, or the (node, dim) whose fake size it is (symbolic sizes are computed from the graph's
inputs when the rewrite needs them: `fold_rewrite.InputSizes`)."""


def graph_ends_before_the_gather_hint() -> str:
    """Why a context-parallel graph can end with a rank's chunk: Dynamo broke it before diffusers' final all-gather.
    Names the known causes present in this process (`parallel_tracing`)."""
    from paro_compile.parallel_tracing import context_parallel_tracing_gaps

    gaps = context_parallel_tracing_gaps()
    if not gaps:
        return " (the graph ends before the final all-gather: a graph break; see TORCH_LOGS=graph_breaks)"
    return (" (the graph ends before the final all-gather: " + "; ".join(gaps)
            + "; call paro_compile.parallel.make_context_parallel_traceable() before the first call)")


def _is_tensor_node(x: Any) -> bool:
    return isinstance(x, fx.Node) and shape_of(x) is not None


class Analysis(ShardedTokenRules):
    """Forward propagation of the token axis from the sources; fills `state`, `tuple_state` and `boundaries`."""

    def __init__(self, gm: fx.GraphModule, sources: list[tuple[fx.Node, int]],
                 sharding: Optional[TokenSharding] = None) -> None:
        self.gm = gm
        self.state: dict[fx.Node, State] = {}
        self.tuple_state: dict[fx.Node, list[Optional[State]]] = {}
        self.boundaries: list[Boundary] = []
        self.sources = sources
        self.sharding = sharding
        self.sharded_operands: dict[tuple[fx.Node, fx.Node], ShardedOperand] = {}
        """(user, operand) of a "fwd" boundary on sharded tokens → how the operand is computed from its whole table."""
        self.skip: set[fx.Node] = set()
        """Nodes inside an exchange or gather chain: the chain's result gets the state, the chain itself carries none."""
        self.exchanges: dict[fx.Node, Union[OperandLayout, str]] = {}
        """Exchange results (`context_parallel.exchange_result`) → their traced layout, or why it cannot be traced."""
        for node, dim in sources:
            self.state[node] = State(dim, (Seg("vis", shape_of(node)[dim]),))
        if sharding is not None:
            self._find_exchanges()

    def run(self) -> None:
        for node in list(self.gm.graph.nodes):
            if node.op == "placeholder" or node.op == "get_attr" or node in self.skip:
                continue
            if node in self.exchanges:
                self.visit_exchange(node)
                continue
            inputs = [a for a in node.all_input_nodes if a in self.state or a in self.tuple_state]
            if not inputs:
                continue
            if node in self.state:  # a source fed by permuted tokens (e.g. a conv inside the region)
                self.exit(node)
                continue
            if node.op == "output":
                for a in node.all_input_nodes:
                    if a in self.state:
                        if self.state[a].shard is not None:
                            raise FoldError(f"graph output {a.name} is this rank's chunk of the permuted tokens"
                                            + graph_ends_before_the_gather_hint())
                        self.boundaries.append(Boundary(node, a, "inv", self.state[a]))
                    elif a in self.tuple_state:
                        raise FoldError(f"graph output {a.name} is a tuple in permuted order")
                continue
            self.visit(node)

    def exit(self, node: fx.Node) -> None:
        name = op_name(node)
        if is_inplace(name):
            raise FoldError(f"in-place op {node.name} ({name}) on permuted tokens cannot take a copy")
        for a in node.all_input_nodes:
            if a in self.state:
                if self.state[a].shard is not None:
                    raise FoldError(f"{node.name} ({name}) takes this rank's chunk of the permuted tokens ({a.name}): "
                                    "putting them back in model order needs every rank's chunk")
                self.boundaries.append(Boundary(node, a, "inv", self.state[a]))
            elif a in self.tuple_state:
                raise FoldError(f"{node.name} consumes a tuple of permuted tensors")

    def fwd(self, node: fx.Node, operand: fx.Node, state: State) -> None:
        if not any(s.kind == "vis" for s in state.segs):
            return
        if state.shard is not None:
            found = self._sharded_operand(operand, state)
            if isinstance(found, str):
                raise FoldError(f"{node.name}: operand {operand.name} varies along this rank's chunk of the tokens, "
                                f"but {found}")
            self.sharded_operands[(node, operand)] = found
        self.boundaries.append(Boundary(node, operand, "fwd", state))

    def _other_inputs_outside(self, node: fx.Node) -> bool:
        return not any(a in self.state for a in node.all_input_nodes[1:])

    def visit(self, node: fx.Node) -> None:
        name = op_name(node)
        shape = shape_of(node)
        a0 = node.args[0] if node.args else None
        st0 = self.state.get(a0) if isinstance(a0, fx.Node) else None
        if name in SIZE_OPS:
            return
        if name == "type_as":  # the second operand gives only a dtype
            if st0 is not None:
                self.state[node] = st0
            return
        if node.target in ALL_GATHER and st0 is not None and st0.shard is not None:
            self.visit_gather(node)
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
        if shape is None and name not in SPLIT_OPS:
            self.exit(node)
            return
        rank = len(shape) if shape is not None else 0
        if name in ELEMENTWISE_OPS:
            self.visit_elementwise(node, shape)
            return
        if name in LAST_DIM_OPS and st0 is not None and st0.dim < len(shape_of(a0)) - 1 and self._other_inputs_outside(node):
            self.state[node] = st0
            return
        if name in NORM_OPS and st0 is not None and self._other_inputs_outside(node):
            normalized = arg(node, 1, "normalized_shape")
            k = len(normalized) if isinstance(normalized, (list, tuple)) else 1
            if st0.dim < rank - k:
                self.state[node] = st0
                return
        if name in VIEW_OPS and st0 is not None and self._other_inputs_outside(node):
            j = map_view_forward(shape_of(a0), shape, st0.dim)
            if j is not None:
                self.state[node] = st0.at(j)
                return
        if name in PERMUTE_OPS and st0 is not None:
            dims = permute_dims(node, rank)
            if dims is not None:
                self.state[node] = st0.at(dims.index(st0.dim))
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
                    self.state[node] = st0.at(out_dim)
                    return
        if name == "getitem" and st0 is not None and self.visit_getitem(node, st0):
            return
        if name == "cat" and self.visit_cat(node, shape):
            return
        if name == "stack" and self.visit_stack(node, shape):
            return
        if name in SPLIT_OPS and st0 is not None and self.visit_split(node, st0):
            return
        if name == "scaled_dot_product_attention" and self.visit_sdpa(node):
            return
        self.exit(node)

    def visit_elementwise(self, node: fx.Node, shape: tuple) -> None:
        rank = len(shape)
        out_state: Optional[State] = None
        for a in node.all_input_nodes:
            if a in self.state:
                st = self.state[a]
                cand = st.at(st.dim + rank - len(shape_of(a)))
                if out_state is not None and not (out_state.dim == cand.dim and out_state.same(cand)):
                    self.exit(node)
                    return
                out_state = cand
            elif a in self.tuple_state:
                self.exit(node)
                return
        if out_state is None:
            return
        for a in node.all_input_nodes:
            if a in self.state or not _is_tensor_node(a):
                continue
            a_shape = shape_of(a)
            aligned = out_state.dim - (rank - len(a_shape))
            if aligned >= 0 and not is_one(a_shape[aligned]):
                self.fwd(node, a, out_state.at(aligned))
        self.state[node] = out_state

    def _indexed(self, index: Any, in_shape: tuple, st: State) -> Optional[tuple[int, tuple[Seg, ...]]]:
        """(output axis of the token axis, segs kept) for tensor[index]; None when not expressible."""
        axes = getitem_axis_map(index, len(in_shape))
        if axes is None:
            return None
        for j, (kind, axis, sl) in enumerate(axes):
            if kind == "in" and axis == st.dim:
                if sl == "dynamic" or not unit_step(sl):
                    return None
                length = in_shape[axis]
                start = sl.start if sl.start is not None else 0
                stop = sl.stop if sl.stop is not None else length
                if isinstance(start, int) and start < 0:
                    start = length + start
                if isinstance(stop, int) and stop < 0:
                    stop = length + stop
                static_length = static_int(length)
                if isinstance(stop, int) and static_length is not None and stop > static_length:
                    stop = length
                if st.shard is not None:  # this rank's chunk: only the whole of it
                    return (j, st.segs) if known_equal(start, 0) and known_equal(stop, length) else None
                segs = whole_segments(st.segs, start, stop)
                if segs is None:
                    return None
                return j, segs
        return None  # token axis indexed by an int

    def visit_getitem(self, node: fx.Node, st: State) -> bool:
        if any(x is not node.args[0] and x not in index_size_nodes(node.args[1]) for x in node.all_input_nodes):
            return False
        indexed = self._indexed(node.args[1], shape_of(node.args[0]), st)
        if indexed is None:
            return False
        j, segs = indexed
        if any(s.kind == "vis" for s in segs):
            self.state[node] = State(j, segs, st.shard)
        return True

    def visit_setitem(self, node: fx.Node) -> None:
        target, index, value = node.args[0], node.args[1], node.args[2]
        t_state = self.state.get(target)
        v_state = self.state.get(value) if isinstance(value, fx.Node) else None
        if t_state is None:
            if v_state is not None:
                self.boundaries.append(Boundary(node, value, "inv", v_state))
            return
        if isinstance(index, fx.Node) or any(x not in (target, value) and x not in index_size_nodes(index)
                                             for x in node.all_input_nodes):
            raise FoldError(f"{node.name}: tensor-indexed store into permuted tokens")
        indexed = self._indexed(index, shape_of(target), t_state)
        if indexed is None:
            raise FoldError(f"{node.name}: store into a part of the token axis that is not whole segments")
        j, segs = indexed
        sub_rank = len(getitem_axis_map(index, len(shape_of(target))))
        if not _is_tensor_node(value):
            return
        v_shape = shape_of(value)
        aligned = j - (sub_rank - len(v_shape))
        want = State(aligned, segs, t_state.shard)
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
            if any(s is not None and s.shard is not None for s in states):
                return False  # a chunk of the tokens joined to others: not the sequence the sharding split
            segs: list[Seg] = []
            for t, s in zip(tensors, states):
                if s is not None:
                    segs.extend(s.segs)
                else:
                    segs.append(Seg("txt", shape_of(t)[cdim]))
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
        self.state[node] = ref.at(out_dim)
        return True

    def visit_split(self, node: fx.Node, st: State) -> bool:
        name = op_name(node)
        pieces = meta_value(node)
        if not isinstance(pieces, (list, tuple)):
            return False
        src_rank = len(shape_of(node.args[0]))
        if name == "unbind":
            udim = norm_dim(int(arg(node, 1, "dim", 0)), src_rank)
            if udim == st.dim:
                return False
            out = st.at(st.dim - (1 if udim < st.dim else 0))
            self.tuple_state[node] = [out] * len(pieces)
            return True
        sdim = norm_dim(int(arg(node, 2, "dim", 0)), src_rank)
        if sdim != st.dim:
            self.tuple_state[node] = [st] * len(pieces)
            return True
        if st.shard is not None:
            return False
        if self.sharding is not None and name == "chunk" and self._rank_chunk(node, pieces, sdim):
            shard = State(sdim, st.segs, self.sharding)
            self.tuple_state[node] = [shard if i == self.sharding.rank else None for i in range(len(pieces))]
            return True
        states: list[Optional[State]] = []
        start: SizeLike = 0
        for p in pieces:
            stop = start + p.shape[sdim]
            segs = whole_segments(st.segs, start, stop)
            if segs is None:
                return False
            states.append(State(sdim, segs) if any(s.kind == "vis" for s in segs) else None)
            start = stop
        self.tuple_state[node] = states
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
        if any(s is not None and s.shard is not None for s in (sk, sv)):
            return False  # keys of this rank's chunk only: attention over a part of the sequence
        if sq is not None and sq.shard is not None and known_equal(shape_of(k)[2], shape_of(q)[2]):
            return False  # self-attention over this rank's chunk
        if sq is not None:
            q_len = shape_of(q)[2]
            for x, s in ((k, sk), (v, sv)):
                # keys of another length (cross-attention) may be permuted their own way
                if s is not None and not s.same(sq) and known_equal(shape_of(x)[2], q_len):
                    return False
            if (sk is None) != (sv is None):
                return False
            if sk is None and known_equal(shape_of(k)[2], q_len):
                # self-attention whose keys/values come from a path we did not see: give them the same order
                self.fwd(node, k, sq)
                self.fwd(node, v, sq)
            self.state[node] = sq
            return True
        if sk is not None and sv is not None and sk.same(sv):
            return True  # keys and values permuted alike: softmax over keys is order-invariant
        return False


@dataclass
class TokenRegion:
    """What phase 1 found: the token sources, the grid they form, and the analysis of the region they feed."""

    axes: str  # "FHW" | "HW": the natural axis order of the grid
    grid_factors: list[GridFactor]  # per natural axis
    sources: list[tuple[fx.Node, int]]
    analysis: Analysis

    @property
    def symbolic(self) -> bool:
        return any(isinstance(f, tuple) and static_int(shape_of(f[0])[f[1]]) is None for f in self.grid_factors)

    def static_grid(self, text_tokens: int, text_position: str) -> Optional[TokenGrid]:
        sizes = [f if isinstance(f, int) else static_int(shape_of(f[0])[f[1]]) for f in self.grid_factors]
        if None in sizes:
            return None
        if self.axes == "FHW":
            return TokenGrid(sizes[0], sizes[1], sizes[2], text_tokens, text_position)
        return TokenGrid(None, sizes[0], sizes[1], text_tokens, text_position)


def analyse_region(gm: fx.GraphModule, sites: list[AttentionSite], plan: Optional[Plan] = None,
                   grid_hint: Optional[TokenGrid] = None, sharding: Optional[TokenSharding] = None) -> TokenRegion:
    """Find the token sources of the supported sites and run the forward analysis; raises FoldError. ``sharding``:
    the graph's Ulysses token sharding (context parallelism), whose chunk, exchanges and gather the analysis then
    follows (module docstring)."""
    supported = [s for s in sites if s.supported]
    layouts = infer_layouts(gm, supported)
    factors = None
    for lay in layouts.values():
        if lay.factors is not None:
            if factors is None:
                factors = lay.factors
            elif not known_equal([f.size for f in lay.factors], [f.size for f in factors]):
                raise FoldError("sites see different token grids")
    sources: dict[tuple[str, int], tuple[fx.Node, int]] = {}
    if factors is not None:
        axes = "FHW" if len(factors) == 3 else "HW"
        grid_factors: list[GridFactor] = [(f.node, f.dim) for f in factors]
        for lay in layouts.values():
            for src, _ in lay.merge_sources:
                if src.factors and known_equal([f.size for f in src.factors], [f.size for f in factors]):
                    sources[(src.node.name, src.dim)] = (src.node, src.dim)
        grid_sizes = [f.size for f in factors]
    else:
        grid = grid_hint
        if grid is None and plan is not None:
            grid = next((sp.grid for sp in plan.sites.values() if sp.grid is not None), None)
        if grid is None:
            raise FoldError("no layout op forms the tokens in this graph and no grid is known (plan SitePlan.grid)")
        axes = grid.axes
        grid_factors = [grid.sizes[a] for a in axes]
        grid_sizes = list(grid_factors)
    visual = math.prod(grid_sizes)
    for lay in layouts.values():
        for src, offset in lay.flat_leaves:
            if src.node.op == "get_attr" or src.kind == "exchange" or not known_equal(src.length, visual):
                continue
            # a visual leaf: it occupies the visual range of the site's sequence
            text = lay.seq_len - visual
            suffix_hint = grid_hint is not None and grid_hint.text_position == "suffix"
            if known_equal(offset, text) or known_equal(text, 0) or (
                    known_equal(offset, 0) and factors is None and suffix_hint):
                sources[(src.node.name, src.dim)] = (src.node, src.dim)
    if not sources:
        raise FoldError("no visual token source found")
    analysis = Analysis(gm, list(sources.values()), sharding)
    analysis.run()
    return TokenRegion(axes, grid_factors, list(sources.values()), analysis)
