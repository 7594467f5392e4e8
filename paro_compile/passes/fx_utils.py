"""FX helpers shared by the passes: fake values, sizes compared without guards, op names and their classes,
and how view-like ops and basic indexing map tensor axes.

Sizes are the fake tensors' own: ints in static graphs, SymInts with ``dynamic=True``. They are compared
with `statically_known_true` (through the graph's ShapeEnv, never adding a guard) and read as ints with
`static_int`, which never calls ``int()`` on a symbolic SymInt: that would guard on the size and turn a
dynamic graph static. `to_sym` gives the sympy form for reports.
"""
from __future__ import annotations

import operator
from contextlib import nullcontext
from typing import Any, Iterable, Optional, Union

import sympy
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.symbolic_shapes import is_concrete_int, statically_known_true, sym_eq

SizeLike = Union[int, torch.SymInt]

# ---------------------------------------------------------------------------------------------------
# fake values and sizes


def meta_value(node: Any) -> Any:
    """The fake value Dynamo (``example_value``) or AOT (``val``) recorded for ``node``: a tensor, a SymInt, a tuple."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def fake_value(node: Any) -> Optional[torch.Tensor]:
    value = meta_value(node)
    return value if isinstance(value, torch.Tensor) else None


def shape_of(node: Any) -> Optional[tuple[SizeLike, ...]]:
    value = fake_value(node)
    return None if value is None else tuple(value.shape)


def static_int(value: Any) -> Optional[int]:
    """The value as an int, or None when it is symbolic (a SymInt or sympy expression with free symbols)."""
    if isinstance(value, torch.SymInt):
        return int(value.node.expr) if is_concrete_int(value) else None
    try:
        return int(value)
    except (TypeError, ValueError):  # sympy raises TypeError for expressions with symbols
        return None


def _as_size(value: Any) -> Any:
    if isinstance(value, (int, torch.SymInt)):
        return value
    if isinstance(value, (tuple, list)):
        return tuple(_as_size(v) for v in value)
    as_int = static_int(value)
    if as_int is None:
        raise TypeError(f"{value!r} is not a size: compare ints or SymInts (the fake tensors' sizes)")
    return as_int


def known_equal(a: Any, b: Any) -> bool:
    """Sizes (or tuples of sizes) that are equal for every value of their symbols; never adds a guard."""
    return statically_known_true(sym_eq(_as_size(a), _as_size(b)))


def is_one(size: Any) -> bool:
    return known_equal(size, 1)


def to_sym(size: Any) -> sympy.Expr:
    if isinstance(size, torch.SymInt):
        return sympy.sympify(size.node.expr)
    return sympy.Integer(int(size))


def propagate_fake_values(gm: fx.GraphModule, nodes: Iterable[fx.Node]) -> None:
    """Give nodes a pass inserted the fake ``example_value`` later passes read shapes from.

    Runs only those nodes, with `fx.Interpreter`'s op semantics, under the fake mode of their inputs
    (`FakeTensorProp` would re-run the whole graph for a handful of new nodes). A node whose inputs have no
    fake value is skipped."""
    interpreter = fx.Interpreter(gm, garbage_collect_values=False)
    for node in nodes:
        inputs = node.all_input_nodes
        for input_node in inputs:
            if input_node not in interpreter.env:
                interpreter.env[input_node] = meta_value(input_node)
        if any(interpreter.env[input_node] is None for input_node in inputs):
            continue
        # the values' own mode, not detect_fake_mode(): inside a backend the tracing context holds a fresh fake
        # mode (sharing the ShapeEnv), and Dynamo's example values belong to the one it traced with
        fake_mode = next((v.fake_mode for v in map(interpreter.env.get, inputs) if isinstance(v, FakeTensor)), None)
        with fake_mode if fake_mode is not None else nullcontext():
            node.meta["example_value"] = interpreter.env[node] = interpreter.run_node(node)


# ---------------------------------------------------------------------------------------------------
# op names and arguments


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
    """Argument ``name`` of a call, given by keyword or at position ``index``."""
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
SPLIT_OPS = {"split", "chunk", "unbind", "split_with_sizes"}
INPLACE_OPS = {"setitem", "copy_", "fill_", "zero_", "index_put_", "masked_fill_", "scatter_"}
"""Stores that are not spelled ``<op>_`` (any other name ending in one underscore is in place as well)."""
SIZE_OPS = {"size", "dim", "numel", "stride", "is_contiguous", "get_device"}


def is_inplace(name: str) -> bool:
    return name in INPLACE_OPS or (name.endswith("_") and not name.startswith("_"))


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
# axis maps


def _product(sizes: Iterable[Any]) -> Any:
    out: Any = 1
    for size in sizes:
        out = out * _as_size(size)
    return out


def map_view_forward(in_shape: tuple, out_shape: tuple, d: int) -> Optional[int]:
    """Output axis of a view-like op that holds exactly input axis ``d`` (None: merged or split)."""
    before = _product(in_shape[:d])
    for j in range(len(out_shape)):
        if known_equal(out_shape[j], in_shape[d]) and known_equal(_product(out_shape[:j]), before):
            if is_one(in_shape[d]) and j != d:
                continue
            return j
    return None


def map_view_backward(in_shape: tuple, out_shape: tuple, j: int) -> Optional[tuple[str, Any]]:
    """("same", i) when output axis j is input axis i; ("merge", [i0..i1]) when it is their product."""
    i = map_view_forward(out_shape, in_shape, j)
    if i is not None:
        return ("same", i)
    before = _product(out_shape[:j])
    for i0 in range(len(in_shape)):
        if not known_equal(_product(in_shape[:i0]), before):
            continue
        for i1 in range(i0 + 1, len(in_shape)):
            if known_equal(_product(in_shape[i0:i1 + 1]), out_shape[j]):
                dims = [i for i in range(i0, i1 + 1) if not is_one(in_shape[i])]
                if len(dims) == 1:
                    return ("same", dims[0])
                return ("merge", dims)
    return None


_NOT_A_SIZE = object()


def size_operand(value: Any) -> Any:
    """An index operand as a size: literals as they are, a graph node by the int or SymInt it holds
    (``_NOT_A_SIZE`` for a node holding anything else, e.g. a tensor)."""
    if not isinstance(value, fx.Node):
        return value
    held = meta_value(value)
    return held if isinstance(held, (int, torch.SymInt)) else _NOT_A_SIZE


def unit_step(sl: slice) -> bool:
    """A slice that steps by one (a symbolic step is read without a guard: it is not known to be one)."""
    return sl.step is None or static_int(sl.step) == 1


def index_size_nodes(index: Any) -> set[fx.Node]:
    """The graph nodes among a basic-indexing tuple's slice bounds that hold sizes (SymInt nodes)."""
    items = index if isinstance(index, tuple) else (index,)
    return {x for it in items if isinstance(it, slice) for x in (it.start, it.stop, it.step)
            if isinstance(x, fx.Node) and size_operand(x) is not _NOT_A_SIZE}


def getitem_axis_map(index: Any, in_rank: int) -> Optional[list[tuple[str, Any, Any]]]:
    """For a basic-indexing tuple: per output axis ("in", input axis, slice) or ("new", None, None).

    A bound that is a graph node holding a size (a SymInt, e.g. ``x[:, text_len:]`` with a symbolic text length)
    is replaced by that size, so it compares with `known_equal` like a literal; the slice is "dynamic" when a bound
    is any other graph value. None for advanced indexing (tensors, lists), which we do not see through.
    """
    items = list(index if isinstance(index, tuple) else (index,))
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
            bounds = [size_operand(x) for x in (it.start, it.stop, it.step)]
            if any(b is _NOT_A_SIZE for b in bounds):
                out.append(("in", axis, "dynamic"))
            else:
                out.append(("in", axis, slice(*bounds)))
            axis += 1
        elif isinstance(it, int):
            axis += 1  # dropped axis
        else:
            return None
    while axis < in_rank:
        out.append(("in", axis, slice(None)))
        axis += 1
    return out
