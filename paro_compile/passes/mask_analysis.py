"""What an SDPA ``attn_mask`` provably is, read from the FX graph that builds it: key padding, or padding of both
queries and keys.

Models with padded text build their mask in a few shapes:

- key padding, ``[B, 1, 1, Nk]`` or that repeated / expanded over the query rows;
- padding of queries and keys together (HunyuanVideo 1.5 and others): ``m_i ∧ m_j`` for a token validity vector m,
  built as ``view(B, 1, 1, N).repeat(1, 1, N, 1)`` and its transpose, or as ``m[:, None, :, None] & m[:, None, None, :]``.
  SDPA gives a row whose keys are all masked an output of zeros.

`constant_axes` proves along which axes of the (right-aligned, 4-D) mask a tensor holds a single value per line, from
the ops that built it: size-1 axes, ``repeat`` / ``expand`` of such axes, ``transpose`` / ``permute``, and elementwise
ops (the axes every operand is constant along). `padding_form` then reads the mask as one of the two forms, or None.
Nothing is assumed from values: a mask the rules cannot prove stays on SDPA, and so does one that an in-place op may
change after the ops the proof read (HunyuanVideo's token refiner sets ``mask[:, :, :, 0] = True``: `mutated`).

Lowering (`passes/lower.py`): the key part becomes the op's key bias; a query part zeroes the output rows of padded
queries (`zero_padded_query_rows`), which is what SDPA returns for them.
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx

from paro_compile.passes.fx_utils import (PERMUTE_OPS, arg, fake_value, is_inplace, known_equal, norm_dim, op_name,
                                          permute_dims)

QUERY_AXIS, KEY_AXIS = 2, 3
MAX_DEPTH = 24

_REPEATS = {"repeat", "expand", "expand_as", "broadcast_to"}
_REGROUPS = {"view", "reshape", "flatten", "unflatten"}
_UNARY = {"to", "bool", "float", "half", "bfloat16", "type", "type_as", "contiguous", "clone", "logical_not",
          "bitwise_not", "invert", "neg", "detach"}
_BINARY = {"and_", "logical_and", "bitwise_and", "or_", "logical_or", "bitwise_or", "mul", "add", "sub", "eq", "ne",
           "gt", "ge", "lt", "le", "where", "masked_fill"}
_ANDS = {"and_", "logical_and", "bitwise_and"}
_NEGATIONS = {"logical_not", "bitwise_not", "invert", "neg"}
"""Unary ops that keep constancy but not an AND: ¬(q ∧ k) is ¬q ∨ ¬k."""
_IN_PLACE_OPERATORS = {"iand", "ior", "ixor", "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow",
                       "ilshift", "irshift"}
"""``mask &= other`` and the like, as Dynamo records them (operator.iand, ...), also spelled as dunders."""


_DUNDERS = {"and": "and_", "rand": "and_", "or": "or_", "ror": "or_", "rmul": "mul", "radd": "add"}
"""Dunder spellings whose operator name differs from the dunder's core (``__and__`` is ``operator.and_``)."""


def _name(node: fx.Node) -> str:
    """`fx_utils.op_name`, with a dunder (``__and__`` as a method, ``and__`` as a function whose leading underscores
    op_name dropped) read as the operator it spells."""
    name = op_name(node)
    if name.endswith("__"):
        core = name.strip("_")
        return _DUNDERS.get(core, core)
    return name


def _rank(node: Any) -> Optional[int]:
    value = fake_value(node)
    return value.dim() if value is not None else None


def _axis(dim: int, rank: int) -> int:
    """A dim of a rank-``rank`` tensor as its position in the right-aligned 4-D shape."""
    return norm_dim(dim, rank) + 4 - rank


def _same_last_two(source: fx.Node, node: fx.Node) -> bool:
    a, b = fake_value(source), fake_value(node)
    return (a is not None and b is not None and a.dim() >= 2 and b.dim() >= 2
            and known_equal(tuple(a.shape[-2:]), tuple(b.shape[-2:])))


def _interleaves_leading_axis(node: fx.Node, rank: int) -> bool:
    """``repeat_interleave`` along an axis before the last two (the query and key axes keep their planes)."""
    dim = arg(node, 2, "dim")
    return isinstance(dim, int) and rank >= 2 and _axis(dim, rank) < QUERY_AXIS


def constant_axes(node: Any, depth: int = 0, read: Optional[set] = None) -> frozenset[int]:
    """The axes (0-3 of the right-aligned 4-D shape) along which ``node`` provably holds one value per line; axes the
    tensor does not have count as constant (broadcasting repeats them). ``read`` collects the nodes the proof read."""
    if not isinstance(node, fx.Node):
        return frozenset()
    if read is not None:
        read.add(node)
    value = fake_value(node)
    if value is None or value.dim() > 4:
        return frozenset()
    rank = value.dim()
    axes = set(range(4 - rank)) | {_axis(d, rank) for d in range(rank) if known_equal(value.shape[d], 1)}
    if depth >= MAX_DEPTH:
        return frozenset(axes)
    name = _name(node)
    args = node.args
    source = args[0] if args else None
    if name in _REPEATS and isinstance(source, fx.Node) and (_rank(source) or 0) <= rank:
        axes |= constant_axes(source, depth + 1, read)  # right-aligned: new leading axes only add size-1 or copies
    elif name in _REGROUPS and isinstance(source, fx.Node) and _same_last_two(source, node):
        # leading axes regrouped (e.g. [B·H, N, N] viewed as [B, H, N, N]): every (query, key) plane is kept whole
        axes |= constant_axes(source, depth + 1, read) & {QUERY_AXIS, KEY_AXIS}
    elif name == "repeat_interleave" and isinstance(source, fx.Node) and _interleaves_leading_axis(node, rank):
        axes |= constant_axes(source, depth + 1, read) & {QUERY_AXIS, KEY_AXIS}
    elif name in PERMUTE_OPS and isinstance(source, fx.Node) and rank and (dims := permute_dims(node, rank)):
        inner = constant_axes(source, depth + 1, read)
        axes |= {_axis(new, rank) for new, old in enumerate(dims) if _axis(old, rank) in inner}
    elif name in _UNARY and isinstance(source, fx.Node) and _rank(source) == rank:
        axes |= constant_axes(source, depth + 1, read)
    elif name in _BINARY:
        operands = [a for a in (*args, *node.kwargs.values()) if isinstance(a, fx.Node) and fake_value(a) is not None]
        if operands:
            axes |= functools.reduce(operator.and_, (constant_axes(a, depth + 1, read) for a in operands))
    return frozenset(axes)


_VIEWS = {"getitem", "view", "view_as", "reshape", "transpose", "swapaxes", "permute", "expand", "expand_as",
          "broadcast_to", "unsqueeze", "squeeze", "select", "narrow", "t", "flatten", "unflatten", "unbind", "split",
          "chunk", "as_strided", "diagonal", "movedim", "detach", "alias", "contiguous", "to", "type_as", "real",
          "bool", "float", "half", "bfloat16", "type"}
"""Ops whose result may alias their input (a conversion to the tensor's own dtype returns it): an in-place op on the
result may change the input too."""


def _in_place(node: fx.Node) -> bool:
    """`fx_utils.is_inplace`, without the operator functions spelled with a trailing underscore (``operator.and_``),
    and with the in-place operators (``mask &= other``)."""
    name = _name(node)
    if name in _IN_PLACE_OPERATORS:
        return True
    return is_inplace(name) and name not in _ANDS | {"or_", "not_"}


def mutated(node: fx.Node) -> bool:
    """Whether an in-place op (``setitem``, ``fill_``, ``masked_fill_``, ...) may write ``node``'s tensor, directly
    or through a view of it."""
    seen, todo = {node}, [node]
    while todo:
        current = todo.pop()
        for user in current.users:
            if _in_place(user) and user.args and user.args[0] is current:
                return True
            if user.kwargs.get("out") is current:  # torch.<op>(..., out=mask)
                return True
            if _name(user) in _VIEWS and user not in seen:
                seen.add(user)
                todo.append(user)
    return False


def and_operands(node: Any, depth: int = 0, read: Optional[set] = None) -> list[Any]:
    """The operands of a (nested) boolean AND, flattened; ``[node]`` for anything else. ``read`` collects the nodes
    passed through."""
    if not isinstance(node, fx.Node) or depth >= MAX_DEPTH:
        return [node]
    if read is not None:
        read.add(node)
    name = _name(node)
    if name in _UNARY - _NEGATIONS and node.args:
        value, source = fake_value(node), fake_value(node.args[0])
        if value is not None and source is not None and value.dtype == source.dtype == torch.bool:
            return and_operands(node.args[0], depth + 1, read)  # .bool() / .contiguous() of a boolean AND
    if _is_and(node):
        return [x for a in node.args for x in and_operands(a, depth + 1, read)]
    return [node]


def _is_and(node: fx.Node) -> bool:
    """A boolean AND of two tensors: ``&`` / ``logical_and`` / ``bitwise_and``, or ``*`` of two boolean tensors."""
    if len(node.args) != 2 or not all(isinstance(a, fx.Node) for a in node.args):
        return False
    name = _name(node)
    if name in _ANDS:
        return True
    if name == "mul":
        values = [fake_value(a) for a in (node, *node.args)]
        return all(v is not None and v.dtype == torch.bool for v in values)
    return False


@dataclass(frozen=True)
class PaddingForm:
    """An ``attn_mask`` read as padding: ``keys`` AND together to the key mask (each constant over query rows),
    ``queries`` AND together to the query-row mask (each constant over keys; empty for key padding alone).

    With queries, the mask is ``chain(core)``: ``core`` the AND of all parts, ``chain`` the ops after it (leading axes
    regrouped or repeated, conversions), in order. `lower` gets each part in the mask's own shape and batch/head layout
    by expanding it to ``core``'s shape and replaying ``chain`` on it (`replay`)."""

    keys: tuple[fx.Node, ...]
    queries: tuple[fx.Node, ...] = ()
    core: Optional[fx.Node] = None
    chain: tuple[fx.Node, ...] = ()


def _plane_preserving(node: fx.Node) -> Optional[fx.Node]:
    """The tensor input of ``node`` where ``node`` keeps every (query, key) plane whole and in place along the last
    two axes (conversions, leading axes regrouped, repeated or interleaved); else None."""
    source = node.args[0] if node.args else None
    if not isinstance(source, fx.Node):
        return None
    name, rank = _name(node), _rank(node)
    if rank is None or _rank(source) is None:
        return None
    if name in _UNARY - _NEGATIONS and _rank(source) == rank and name != "type_as":
        return source
    if name in _REGROUPS and _same_last_two(source, node):
        return source
    if name == "repeat_interleave" and _interleaves_leading_axis(node, rank):
        return source
    if name in _REPEATS and _same_last_two(source, node):
        return source
    return None


def _core_and_chain(mask: fx.Node) -> tuple[fx.Node, tuple[fx.Node, ...]]:
    """The first AND below ``mask`` through plane-preserving ops, and those ops in graph order (``mask`` itself
    when no AND is reached)."""
    chain: list[fx.Node] = []
    node = mask
    for _ in range(MAX_DEPTH):
        if _is_and(node):
            return node, tuple(reversed(chain))
        source = _plane_preserving(node)
        if source is None:
            break
        chain.append(node)
        node = source
    return mask, ()


def padding_form(mask: Any) -> Optional[PaddingForm]:
    """``mask`` as key padding, or as boolean padding of queries and keys together; None where not provable."""
    return padding_analysis(mask)[0]


def padding_analysis(mask: Any) -> tuple[Optional[PaddingForm], bool]:
    """(`padding_form` of ``mask``, whether the ops read had the form of padding but an in-place op may write one of
    their tensors afterwards). The flag lets a refusal say why: such a mask looks like padding in the graph (e.g.
    HunyuanVideo's and HunyuanImage's token refiners build ``m_i ∧ m_j``, then set ``mask[:, :, :, 0] = True``), so
    "not padding" alone would leave the user reading the model's code for the reason."""
    if not isinstance(mask, fx.Node):
        return None, False
    value = fake_value(mask)
    if value is None:
        return None, False
    if value.dim() < 2 or known_equal(value.shape[-2], 1):
        return PaddingForm(keys=(mask,)), False  # one row for every query: its values do not matter to the form
    read: set = set()
    if QUERY_AXIS in constant_axes(mask, read=read):
        return _unless_written(PaddingForm(keys=(mask,)), read)
    if value.dtype != torch.bool:
        return None, False  # additive masks: only a key-padding bias is a bias the op can take
    core, chain = _core_and_chain(mask)
    read |= {mask, core, *chain}
    keys, queries = [], []
    for operand in and_operands(core, read=read):
        axes = constant_axes(operand, read=read)
        operand_value = fake_value(operand)
        if operand_value is None or operand_value.dtype != torch.bool:
            return None, False
        if QUERY_AXIS in axes:
            keys.append(operand)
        elif KEY_AXIS in axes:
            queries.append(operand)
        else:
            return None, False
    if not keys or not queries:
        return None, False
    return _unless_written(PaddingForm(keys=tuple(keys), queries=tuple(queries), core=core, chain=chain), read)


def _unless_written(form: PaddingForm, read: set) -> tuple[Optional[PaddingForm], bool]:
    """(``form``, False), or (None, True) when an in-place op may write a tensor the proof read."""
    return (None, True) if any(mutated(node) for node in read) else (form, False)


def replay(graph: fx.Graph, form: PaddingForm, parts: tuple[fx.Node, ...]) -> fx.Node:
    """Insert (at the graph's insertion point) the AND of ``parts`` expanded to ``form.core``'s shape with
    ``form.chain`` applied after it: that part of the mask in the mask's own shape and layout."""
    node = graph.call_function(expand_like, (graph.call_function(all_true_of, tuple(parts)), form.core))
    env = {form.core: node}
    for op in form.chain:
        node = graph.node_copy(op, lambda arg: env.get(arg, arg))
        if node.op == "call_method" and node.target == "view":
            node.target = "reshape"  # the expanded part has zero strides that a view cannot always regroup
        env[op] = node
    return node


def expand_like(part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``part`` broadcast to ``like``'s shape (a view; ``like``'s values are not read)."""
    return part.expand(like.shape)


def all_true_of(*parts: torch.Tensor) -> torch.Tensor:
    """The AND of boolean masks (broadcasting)."""
    return functools.reduce(torch.logical_and, parts)


def zero_padded_query_rows(out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out`` [B, H, Nq, D] with the rows of padded queries set to zero, as SDPA returns rows whose keys are all
    masked. ``rows``: a boolean mask constant over keys, [.., Nq, Nk|1], true for valid query rows."""
    while rows.dim() < 4:
        rows = rows.unsqueeze(0)
    return out.masked_fill(~rows[..., :1], 0)
