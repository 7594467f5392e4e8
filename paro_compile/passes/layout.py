"""Layout inference: where does the sequence axis of each attention site come from?

Starting at a site's query (axis 2 of [B, H, N, D]) we walk the FX graph backwards through the ops
that keep the token axis intact (view/reshape/flatten/unflatten/permute/transpose, linear, norms,
elementwise ops with broadcasting, ``cat``/``split``/``chunk``/``unbind``/``getitem`` slices) until we
reach the op that *forms* the tokens:

- a **merge** (``flatten``/``view``/``reshape`` whose output token axis is the product of several
  input axes, e.g. the patchify ``conv(x).flatten(2)``): the visual grid is the list of merged axes,
  expanded recursively (CogVideoX merges (H, W) first, then (F, HW));
- a **flat leaf** (a graph input such as Flux's packed latents, a buffer, or any op we do not see
  through): its tokens are visual when they occupy the visual range of the site's sequence; the grid
  then comes from the plan (``SitePlan.grid``) or from the user.

Under Ulysses context parallelism (``passes/context_parallel.py``) the trace crosses the all-to-all: the
exchanged token axis before attention is (sending rank, local tokens), this rank's local tokens sit at
``rank·L`` of the site's sequence, and ``chunk(U)[rank]`` of the token sharding takes them back to offset 0 of the
whole sequence (the exchange after attention, which hands this rank its chunk, shifts the other way). An
exchange whose token axis cannot be read ends the trace as an opaque leaf (``kind="exchange"``), never as a merge:
its ``(U, N/U)`` reshape is not a patch grid.

Sizes are the fake tensors' own (ints, or SymInts with ``dynamic=True``), compared without guards
(`fx_utils.known_equal`), so symbolic shapes are inferred too without specializing them;
`SiteLayout.symbolic_grid()` gives them as sympy expressions, and `SiteLayout.token_grid()` returns a
`paro_compile.grid.TokenGrid` only when every size is a concrete int (TokenGrid holds ints).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch.fx as fx

from paro_compile.grid import TokenGrid
from paro_compile.passes.context_parallel import LayoutError, comes_from_all_to_all, trace_exchanged_tokens
from paro_compile.passes.fx_utils import (
    ELEMENTWISE_OPS, LAST_DIM_OPS, NORM_OPS, PERMUTE_OPS, REDUCTIONS, VIEW_OPS, SizeLike, arg, getitem_axis_map, is_one,
    known_equal, map_view_backward, meta_value, norm_dim, op_name, permute_dims, shape_of, static_int, to_sym,
    unit_step,
)

if TYPE_CHECKING:
    from paro_compile.passes.discover import AttentionSite

# ---------------------------------------------------------------------------------------------------
# result types (eq=False: sizes may be SymInts, and == on them would guard)


@dataclass(eq=False)
class Factor:
    """One axis of the visual grid: its size and the (node, axis) it can be read from at run time."""

    size: SizeLike
    node: fx.Node
    dim: int


@dataclass(eq=False)
class VisualSource:
    """The node whose axis ``dim`` first holds the visual tokens as one flat axis (natural order)."""

    node: fx.Node
    dim: int
    length: SizeLike
    factors: Optional[list[Factor]] = None
    """The grid axes, slowest first (None: a flat leaf; the grid must come from elsewhere)."""
    kind: str = "merge"  # "merge" | "flat" | "exchange" (an all-to-all whose token order is not known)

    @property
    def label(self) -> str:
        return f"{op_name(self.node) if self.node.op != 'placeholder' else 'input'}({self.node.name})"


@dataclass(eq=False)
class SiteLayout:
    """What layout inference found for one site."""

    site_id: str
    seq_len: Optional[SizeLike]
    """None when the site's query has no 4-D fake value (nothing is inferred then)."""
    merge_sources: list[tuple[VisualSource, SizeLike]] = field(default_factory=list)
    """(source, offset of its first token in the site's sequence)."""
    flat_leaves: list[tuple[VisualSource, SizeLike]] = field(default_factory=list)

    @property
    def factors(self) -> Optional[list[Factor]]:
        for source, _ in self.merge_sources:
            if source.factors and len(source.factors) in (2, 3):
                return source.factors
        return None

    @property
    def visual_offset(self) -> Optional[SizeLike]:
        for source, offset in self.merge_sources:
            if source.factors and len(source.factors) in (2, 3):
                return offset
        return None

    def symbolic_grid(self) -> Optional[dict[str, Any]]:
        """{"axes": "FHW"|"HW", "sizes": [sympy], "text_tokens": sympy, "text_position": str} or None."""
        factors, offset = self.factors, self.visual_offset
        if factors is None:
            return None
        visual = math.prod(f.size for f in factors)
        text = self.seq_len - visual
        position = "prefix" if known_equal(offset, text) else "suffix"
        if not (known_equal(offset, text) or known_equal(offset, 0)):
            return None  # text on both sides: not a TokenGrid
        return {"axes": "FHW" if len(factors) == 3 else "HW", "sizes": [to_sym(f.size) for f in factors],
                "text_tokens": to_sym(text), "text_position": position}

    def token_grid(self) -> Optional[TokenGrid]:
        grid = self.symbolic_grid()
        if grid is None:
            return None
        sizes = [static_int(s) for s in grid["sizes"]]
        text = static_int(grid["text_tokens"])
        if text is None or None in sizes:
            return None  # symbolic
        if grid["axes"] == "FHW":
            return TokenGrid(frames=sizes[0], height=sizes[1], width=sizes[2], text_tokens=text, text_position=grid["text_position"])
        return TokenGrid(frames=None, height=sizes[0], width=sizes[1], text_tokens=text, text_position=grid["text_position"])


# ---------------------------------------------------------------------------------------------------
# backward trace


def trace_factors(node: fx.Node, dim: int, depth: int = 0) -> list[Factor]:
    """Split axis ``dim`` of ``node`` into the axes it was merged from (recursively)."""
    shape = shape_of(node)  # callers pass nodes with a fake value
    if depth > 32:
        return [Factor(shape[dim], node, dim)]
    name = op_name(node)
    src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    src_shape = shape_of(src) if src is not None else None
    if node.op in ("call_method", "call_function") and src_shape is not None:
        if name in VIEW_OPS:
            mapped = map_view_backward(src_shape, shape, dim)
            if mapped is not None:
                kind, where = mapped
                if kind == "same":
                    return trace_factors(src, where, depth + 1)
                factors: list[Factor] = []
                for i in where:
                    if not is_one(src_shape[i]):
                        factors.extend(trace_factors(src, i, depth + 1))
                return factors
        elif name in PERMUTE_OPS:
            dims = permute_dims(node, len(shape))
            if dims is not None:
                return trace_factors(src, dims[dim], depth + 1)
        elif name in ELEMENTWISE_OPS and name != "where" and len(src_shape) == len(shape) \
                and known_equal(src_shape[dim], shape[dim]):
            # an op that keeps its first operand's axes (a dtype cast such as Allegro's `latent.to(dtype)` between its
            # per-frame (H, W) merge and the (F, HW) merge, a positional-embedding add); `where`'s first operand is the
            # condition, not the tokens
            return trace_factors(src, dim, depth + 1)
    return [Factor(shape[dim], node, dim)]


class _Tracer:
    attention_inputs: tuple[str, ...] = ("query", "key", "value")
    """The inputs of an attention node the trace follows back from its output."""

    def __init__(self, layout: SiteLayout) -> None:
        self.layout = layout
        self.seen: set[tuple[str, int, str]] = set()

    def finished(self) -> bool:
        """True when the trace has learned what it needs: it visits nothing more."""
        return False

    def visit(self, node: Any, dim: int, offset: SizeLike, depth: int = 0) -> None:
        if not isinstance(node, fx.Node) or depth > 4000 or self.finished():
            return
        shape = shape_of(node)
        if shape is None or dim >= len(shape):
            return
        key = (node.name, dim, str(offset))
        if key in self.seen:
            return
        self.seen.add(key)
        name = op_name(node)
        length = shape[dim]
        if node.op in ("placeholder", "get_attr"):
            self.layout.flat_leaves.append((VisualSource(node, dim, length, None, "flat"), offset))
            return
        if node.op not in ("call_method", "call_function"):
            return
        if comes_from_all_to_all(node):
            try:
                source, source_dim, shift = trace_exchanged_tokens(node, dim)
            except LayoutError:
                self.layout.flat_leaves.append((VisualSource(node, dim, length, None, "exchange"), offset))
                return
            self.visit(source, source_dim, offset + shift, depth + 1)
            return
        args0 = node.args[0] if node.args else None
        src_shape = shape_of(args0) if isinstance(args0, fx.Node) else None
        rank = len(shape)
        if name in VIEW_OPS and src_shape is not None:
            mapped = map_view_backward(src_shape, shape, dim)
            if mapped is None:
                self._leaf(node, dim, length, offset)
                return
            kind, where = mapped
            if kind == "same":
                self.visit(args0, where, offset, depth + 1)
            else:
                factors = trace_factors(node, dim)
                self.layout.merge_sources.append((VisualSource(node, dim, length, factors, "merge"), offset))
            return
        if name in PERMUTE_OPS and src_shape is not None:
            dims = permute_dims(node, rank)
            if dims is None:
                self._leaf(node, dim, length, offset)
            else:
                self.visit(args0, dims[dim], offset, depth + 1)
            return
        if name in LAST_DIM_OPS and dim < rank - 1:
            self.visit(args0, dim, offset, depth + 1)
            return
        if name in NORM_OPS:
            normalized = arg(node, 1, "normalized_shape")
            k = len(normalized) if isinstance(normalized, (list, tuple)) else 1
            if dim < rank - k:
                self.visit(args0, dim, offset, depth + 1)
                return
        if name in ELEMENTWISE_OPS or name in REDUCTIONS or name in ("repeat_interleave",):
            if name in REDUCTIONS or name == "repeat_interleave":
                rdim = arg(node, 1, "dim")
                dims = rdim if isinstance(rdim, (list, tuple)) else [rdim]
                if rdim is None or any(norm_dim(int(x), len(src_shape or ())) == dim for x in dims if isinstance(x, int)):
                    self._leaf(node, dim, length, offset)
                    return
                keep = bool(arg(node, 2, "keepdim", False)) or name in ("softmax", "log_softmax", "repeat_interleave")
                src_dim = dim if keep else dim + sum(1 for x in dims if norm_dim(int(x), len(src_shape)) <= dim)
                self.visit(args0, src_dim, offset, depth + 1)
                return
            for a in list(node.args) + list(node.kwargs.values()):
                a_shape = shape_of(a)
                if a_shape is None:
                    continue
                aligned = dim - (rank - len(a_shape))
                if aligned >= 0 and known_equal(a_shape[aligned], length) and not is_one(length):
                    self.visit(a, aligned, offset, depth + 1)
            return
        if name == "getitem" and isinstance(args0, fx.Node):
            if shape_of(args0) is None:  # tuple from split/chunk/unbind
                self._through_split(args0, node.args[1], dim, offset, depth)
                return
            axes = getitem_axis_map(node.args[1], len(src_shape))
            if axes is None or dim >= len(axes) or axes[dim][0] != "in" or axes[dim][2] == "dynamic":
                self._leaf(node, dim, length, offset)
                return
            _, in_axis, sl = axes[dim]
            if not unit_step(sl):
                self._leaf(node, dim, length, offset)
                return
            start = 0 if sl.start is None else sl.start
            if isinstance(start, int) and start < 0:
                start = src_shape[in_axis] + start
            self.visit(args0, in_axis, offset - start, depth + 1)
            return
        if name == "cat":
            tensors = arg(node, 0, "tensors")
            cat_dim = norm_dim(int(arg(node, 1, "dim", 0)), rank)
            running: SizeLike = 0
            for t in tensors:
                t_shape = shape_of(t)
                if t_shape is None:
                    continue
                if cat_dim == dim:
                    self.visit(t, dim, offset + running, depth + 1)
                    running = running + t_shape[dim]
                else:
                    self.visit(t, dim, offset, depth + 1)
            return
        if name == "stack":
            tensors = arg(node, 0, "tensors")
            sdim = norm_dim(int(arg(node, 1, "dim", 0)), rank)
            if sdim != dim:
                for t in tensors:
                    self.visit(t, dim - (1 if sdim < dim else 0), offset, depth + 1)
                return
        if name in ("scaled_dot_product_attention",) and dim == rank - 2:
            for index, input_name in enumerate(("query", "key", "value")):
                if input_name in self.attention_inputs:
                    self.visit(arg(node, index, input_name), dim, offset, depth + 1)
            return
        self._leaf(node, dim, length, offset)

    def _through_split(self, tup: fx.Node, index: Any, dim: int, offset, depth: int) -> None:
        name = op_name(tup)
        src = tup.args[0] if tup.args else None
        src_shape = shape_of(src)
        if src_shape is None or not isinstance(index, int):
            return
        rank = len(src_shape)
        if name == "unbind":
            udim = norm_dim(int(arg(tup, 1, "dim", 0)), rank)
            self.visit(src, dim + (1 if udim <= dim else 0), offset, depth + 1)
            return
        if name in ("split", "chunk", "split_with_sizes", "tensor_split"):
            sdim = norm_dim(int(arg(tup, 2, "dim", 0)), rank)
            if sdim != dim:
                self.visit(src, dim, offset, depth + 1)
                return
            pieces = meta_value(tup)
            if isinstance(pieces, (list, tuple)):
                start = sum((p.shape[dim] for p in pieces[:index]), 0)
                self.visit(src, dim, offset - start, depth + 1)

    def _leaf(self, node: fx.Node, dim: int, length, offset) -> None:
        self.layout.flat_leaves.append((VisualSource(node, dim, length, None, "flat"), offset))


class _TokenStreamTracer(_Tracer):
    """Where a tensor's tokens come from, following an attention output back to its query only (its tokens are the
    query's, whatever the keys are). With ``inputs_only`` it stops at the first source that is not a graph input."""

    attention_inputs = ("query",)

    def __init__(self, inputs_only: bool = False) -> None:
        super().__init__(SiteLayout(site_id="", seq_len=None))
        self.inputs_only = inputs_only

    def finished(self) -> bool:
        return self.inputs_only and not self.only_graph_inputs()

    def only_graph_inputs(self) -> bool:
        return not self.layout.merge_sources and all(source.node.op == "placeholder"
                                                     for source, _ in self.layout.flat_leaves)

    def nodes(self) -> set[str]:
        return {name for name, _, _ in self.seen}


def keys_from_other_tokens(query: fx.Node, key: fx.Node) -> bool:
    """True when an attention's keys provably are not its queries' tokens: the query's tokens are formed in the graph
    (a patchify merge), every way back from the key's token axis ends at graph inputs (the text embeddings of a
    cross-attention), and the query's token stream meets neither those inputs nor any node on the key's way.
    Self-attention always meets (at the normed hidden states its Q and K are projected from). Anything less is no
    proof and keeps the site self-attention: a key whose way passes a merge or an op the trace cannot see through, or a
    query whose tokens are a graph input as the keys are (two inputs may hold the same tokens: a graph of one attention
    takes q, k and v as inputs). For sites whose query and key lengths are equal; the lengths tell the others apart."""
    key_trace = _TokenStreamTracer(inputs_only=True)
    key_trace.visit(key, 2, 0)
    if not key_trace.layout.flat_leaves or not key_trace.only_graph_inputs():
        return False
    query_trace = _TokenStreamTracer()
    query_trace.visit(query, 2, 0)
    return bool(query_trace.layout.merge_sources) and not key_trace.nodes() & query_trace.nodes()


def infer_site_layout(site: AttentionSite) -> SiteLayout:
    """Where the tokens of ``site``'s query, key and value come from: the merges and flat leaves that form them."""
    shape = shape_of(site.q)
    seq_len = shape[2] if shape is not None and len(shape) == 4 else None
    layout = SiteLayout(site_id=site.site_id, seq_len=seq_len)
    if shape is None or len(shape) != 4:
        return layout
    tracer = _Tracer(layout)
    for tensor in (site.q, site.k, site.v):
        tracer.visit(tensor, 2, 0)
    # one entry per source node
    uniq: dict[tuple[str, int], tuple[VisualSource, SizeLike]] = {}
    for source, offset in layout.merge_sources:
        uniq.setdefault((source.node.name, source.dim), (source, offset))
    layout.merge_sources = list(uniq.values())
    return layout


def infer_layouts(gm: fx.GraphModule, sites: list[AttentionSite]) -> dict[str, SiteLayout]:
    return {site.site_id: infer_site_layout(site) for site in sites}


def infer_token_grids(gm: fx.GraphModule, sites: list[AttentionSite]) -> dict[str, Optional[TokenGrid]]:
    """site_id → the `TokenGrid` of its sequence, or None when the tokens are not formed from a grid in
    this graph (flat graph input: take the grid from the plan / the user) or the sizes are symbolic."""
    out: dict[str, Optional[TokenGrid]] = {}
    for site in sites:
        try:
            out[site.site_id] = infer_site_layout(site).token_grid()
        except Exception:  # layout inference must never break compilation
            out[site.site_id] = None
    return out
