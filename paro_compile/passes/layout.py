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

Sizes are sympy expressions (from the fake tensors' SymInts), so symbolic shapes (``dynamic=True``)
are inferred too; `SiteLayout.token_grid()` returns a `paro_compile.grid.TokenGrid` only when every
size is a concrete int (TokenGrid holds ints).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Optional

import sympy
import torch
import torch.fx as fx

from paro_compile.grid import TokenGrid

# ---------------------------------------------------------------------------------------------------
# shapes as sympy


def fake_value(node: Any) -> Optional[torch.Tensor]:
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return value if isinstance(value, torch.Tensor) else None


def to_sym(x: Any) -> sympy.Expr:
    if isinstance(x, torch.SymInt):
        return sympy.sympify(x.node.expr)
    return sympy.Integer(int(x))


def shape_of(node: Any) -> Optional[tuple]:
    value = fake_value(node)
    return None if value is None else tuple(to_sym(s) for s in value.shape)


def sym_eq(a: Any, b: Any) -> bool:
    a, b = sympy.sympify(a), sympy.sympify(b)
    if a == b:
        return True
    try:
        return sympy.simplify(a - b) == 0
    except Exception:  # pragma: no cover - defensive
        return False


def sym_prod(xs) -> sympy.Expr:
    out = sympy.Integer(1)
    for x in xs:
        out = out * sympy.sympify(x)
    return out


def is_one(x: Any) -> bool:
    return sym_eq(x, 1)


def map_view_forward(in_shape: tuple, out_shape: tuple, d: int) -> Optional[int]:
    """Output axis of a view-like op that holds exactly input axis ``d`` (None: merged or split)."""
    before = sym_prod(in_shape[:d])
    for j in range(len(out_shape)):
        if sym_eq(out_shape[j], in_shape[d]) and sym_eq(sym_prod(out_shape[:j]), before):
            if is_one(in_shape[d]) and j != d:
                continue
            return j
    return None


def map_view_backward(in_shape: tuple, out_shape: tuple, j: int):
    """("same", i) when output axis j is input axis i; ("merge", [i0..i1]) when it is their product."""
    i = map_view_forward(out_shape, in_shape, j)
    if i is not None:
        return ("same", i)
    before = sym_prod(out_shape[:j])
    for i0 in range(len(in_shape)):
        if not sym_eq(sym_prod(in_shape[:i0]), before):
            continue
        for i1 in range(i0 + 1, len(in_shape)):
            if sym_eq(sym_prod(in_shape[i0:i1 + 1]), out_shape[j]):
                dims = [i for i in range(i0, i1 + 1) if not is_one(in_shape[i])]
                if len(dims) == 1:
                    return ("same", dims[0])
                return ("merge", dims)
    return None


def op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        target = node.target
        if target is operator.getitem:
            return "getitem"
        if target is operator.setitem:
            return "setitem"
        return str(getattr(target, "__name__", target)).lstrip("_")
    return node.op


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if name in node.kwargs:
        return node.kwargs[name]
    if len(node.args) > index:
        return node.args[index]
    return default


def norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


VIEW_OPS = {"view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze", "contiguous", "expand", "view_as", "reshape_as"}
PERMUTE_OPS = {"transpose", "permute", "swapaxes", "movedim"}
ELEMENTWISE_OPS = {
    "add", "sub", "mul", "truediv", "div", "neg", "pow", "to", "float", "half", "bfloat16", "type_as", "clone", "gelu",
    "silu", "relu", "sigmoid", "tanh", "exp", "sin", "cos", "dropout", "rsqrt", "sqrt", "abs", "where", "erf", "square",
    "clamp", "add_", "mul_", "sub_", "div_", "iadd", "imul", "isub", "itruediv", "radd", "rmul", "rsub", "empty_like",
    "zeros_like", "ones_like", "detach", "masked_fill", "lerp", "addcmul", "mish", "softplus", "hardswish", "leaky_relu",
    "floordiv", "contiguous",
}
LAST_DIM_OPS = {"linear"}  # act on the last axis only
NORM_OPS = {"layer_norm", "rms_norm"}
REDUCTIONS = {"mean", "sum", "amax", "amin", "var", "std", "norm", "softmax", "log_softmax", "max", "min"}


def permute_dims(node: fx.Node, rank: int) -> Optional[list[int]]:
    """For permute-like ops: dims such that output axis j = input axis dims[j]."""
    name = op_name(node)
    if name == "permute":
        dims = node.args[1:] if len(node.args) > 2 or not isinstance(arg(node, 1, "dims"), (list, tuple)) else arg(node, 1, "dims")
        return [norm_dim(int(x), rank) for x in dims]
    if name in ("transpose", "swapaxes"):
        a, b = norm_dim(int(arg(node, 1, "dim0")), rank), norm_dim(int(arg(node, 2, "dim1")), rank)
        dims = list(range(rank))
        dims[a], dims[b] = dims[b], dims[a]
        return dims
    if name == "movedim":
        src, dst = arg(node, 1, "source"), arg(node, 2, "destination")
        if not isinstance(src, int) or not isinstance(dst, int):
            return None
        src, dst = norm_dim(src, rank), norm_dim(dst, rank)
        order = [i for i in range(rank) if i != src]
        order.insert(dst, src)
        return order
    return None


# ---------------------------------------------------------------------------------------------------
# result types


@dataclass
class Factor:
    """One axis of the visual grid: its size and the (node, axis) it can be read from at run time."""

    size: sympy.Expr
    node: fx.Node
    dim: int


@dataclass
class VisualSource:
    """The node whose axis ``dim`` first holds the visual tokens as one flat axis (natural order)."""

    node: fx.Node
    dim: int
    length: sympy.Expr
    factors: Optional[list[Factor]] = None
    """The grid axes, slowest first (None: a flat leaf; the grid must come from elsewhere)."""
    kind: str = "merge"  # "merge" | "flat"

    @property
    def label(self) -> str:
        return f"{op_name(self.node) if self.node.op != 'placeholder' else 'input'}({self.node.name})"


@dataclass
class SiteLayout:
    """What layout inference found for one site."""

    site_id: str
    seq_len: sympy.Expr
    merge_sources: list[tuple[VisualSource, sympy.Expr]] = field(default_factory=list)
    """(source, offset of its first token in the site's sequence)."""
    flat_leaves: list[tuple[VisualSource, sympy.Expr]] = field(default_factory=list)

    @property
    def factors(self) -> Optional[list[Factor]]:
        for source, _ in self.merge_sources:
            if source.factors and len(source.factors) in (2, 3):
                return source.factors
        return None

    @property
    def visual_offset(self) -> Optional[sympy.Expr]:
        for source, offset in self.merge_sources:
            if source.factors and len(source.factors) in (2, 3):
                return offset
        return None

    def symbolic_grid(self) -> Optional[dict[str, Any]]:
        """{"axes": "FHW"|"HW", "sizes": [sympy], "text_tokens": sympy, "text_position": str} or None."""
        factors, offset = self.factors, self.visual_offset
        if factors is None:
            return None
        visual = sym_prod(f.size for f in factors)
        text = sympy.simplify(self.seq_len - visual)
        position = "prefix" if sym_eq(offset, text) else "suffix"
        if not (sym_eq(offset, text) or sym_eq(offset, 0)):
            return None  # text on both sides: not a TokenGrid
        return {"axes": "FHW" if len(factors) == 3 else "HW", "sizes": [f.size for f in factors], "text_tokens": text,
                "text_position": position}

    def token_grid(self) -> Optional[TokenGrid]:
        grid = self.symbolic_grid()
        if grid is None:
            return None
        try:
            sizes = [int(s) for s in grid["sizes"]]
            text = int(grid["text_tokens"])
        except TypeError:
            return None  # symbolic
        if grid["axes"] == "FHW":
            return TokenGrid(frames=sizes[0], height=sizes[1], width=sizes[2], text_tokens=text, text_position=grid["text_position"])
        return TokenGrid(frames=None, height=sizes[0], width=sizes[1], text_tokens=text, text_position=grid["text_position"])


# ---------------------------------------------------------------------------------------------------
# backward trace


def _index_tuple(index: Any) -> tuple:
    return index if isinstance(index, tuple) else (index,)


def getitem_axis_map(index: Any, in_rank: int) -> Optional[list[tuple[str, Any]]]:
    """For a basic-indexing tuple: per output axis ("in", input axis, slice) or ("new", None, None).

    None for advanced indexing (tensors, lists) that we do not see through.
    """
    items = list(_index_tuple(index))
    consumed = sum(1 for it in items if it is not None and it is not Ellipsis)
    out: list[tuple[str, Any, Any]] = []
    axis = 0
    for it in items:
        if it is Ellipsis:
            for _ in range(in_rank - consumed):
                out.append(("in", axis, slice(None)))
                axis += 1
        elif it is None:
            out.append(("new", None, None))
        elif isinstance(it, slice):
            if any(isinstance(x, fx.Node) for x in (it.start, it.stop, it.step)):
                out.append(("in", axis, "dynamic"))
            else:
                out.append(("in", axis, it))
            axis += 1
        elif isinstance(it, int):
            axis += 1  # dropped axis
        else:
            return None
    while axis < in_rank:
        out.append(("in", axis, slice(None)))
        axis += 1
    return out


def trace_factors(node: fx.Node, dim: int, depth: int = 0) -> list[Factor]:
    """Split axis ``dim`` of ``node`` into the axes it was merged from (recursively)."""
    shape = shape_of(node)
    if depth > 32 or shape is None:
        return [Factor(shape[dim] if shape else sympy.Symbol("?"), node, dim)]
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
    return [Factor(shape[dim], node, dim)]


class _Tracer:
    def __init__(self, layout: SiteLayout) -> None:
        self.layout = layout
        self.seen: set[tuple[str, int, str]] = set()

    def visit(self, node: Any, dim: int, offset: sympy.Expr, depth: int = 0) -> None:
        if not isinstance(node, fx.Node) or depth > 4000:
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
                if aligned >= 0 and sym_eq(a_shape[aligned], length) and not is_one(length):
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
            if sl.step not in (None, 1):
                self._leaf(node, dim, length, offset)
                return
            start = sl.start or 0
            if isinstance(start, int) and start < 0:
                start = src_shape[in_axis] + start
            self.visit(args0, in_axis, offset - start, depth + 1)
            return
        if name == "cat":
            tensors = arg(node, 0, "tensors")
            cat_dim = norm_dim(int(arg(node, 1, "dim", 0)), rank)
            running = sympy.Integer(0)
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
            for a in (arg(node, 0, "query"), arg(node, 1, "key"), arg(node, 2, "value")):
                self.visit(a, dim, offset, depth + 1)
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
            pieces = tup.meta.get("example_value")
            if isinstance(pieces, (list, tuple)):
                start = sympy.Integer(0)
                for p in pieces[:index]:
                    start = start + to_sym(p.shape[dim])
                self.visit(src, dim, offset - start, depth + 1)

    def _leaf(self, node: fx.Node, dim: int, length, offset) -> None:
        self.layout.flat_leaves.append((VisualSource(node, dim, length, None, "flat"), offset))


def infer_site_layout(site) -> SiteLayout:
    shape = shape_of(site.q)
    seq_len = shape[2] if shape is not None and len(shape) == 4 else sympy.Symbol("N")
    layout = SiteLayout(site_id=site.site_id, seq_len=seq_len)
    if shape is None or len(shape) != 4:
        return layout
    tracer = _Tracer(layout)
    for tensor in (site.q, site.k, site.v):
        tracer.visit(tensor, 2, sympy.Integer(0))
    # one entry per source node
    uniq: dict[tuple[str, int], tuple[VisualSource, Any]] = {}
    for source, offset in layout.merge_sources:
        uniq.setdefault((source.node.name, source.dim), (source, offset))
    layout.merge_sources = list(uniq.values())
    return layout


def infer_layouts(gm: fx.GraphModule, sites) -> dict[str, SiteLayout]:
    return {site.site_id: infer_site_layout(site) for site in sites}


def infer_token_grids(gm: fx.GraphModule, sites) -> dict[str, Optional[TokenGrid]]:
    """site_id → the `TokenGrid` of its sequence, or None when the tokens are not formed from a grid in
    this graph (flat graph input: take the grid from the plan / the user) or the sizes are symbolic."""
    out: dict[str, Optional[TokenGrid]] = {}
    for site in sites:
        try:
            out[site.site_id] = infer_site_layout(site).token_grid()
        except Exception:  # layout inference must never break compilation
            out[site.site_id] = None
    return out
