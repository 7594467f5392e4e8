"""Context parallelism: which global heads each attention site of this rank's graph holds, read from the graph's
collectives, and the plan cut down to them.

Under Ulysses (diffusers' ``ContextParallelConfig(ulysses_degree=U)``, or any engine that exchanges heads for tokens
with ``all_to_all_single``) every rank runs the attention of H/U heads over all N tokens. Dynamo records the
exchange as ``_c10d_functional.all_to_all_single`` + ``wait_tensor`` between the projections and the SDPA node, with
reshapes and permutes around it. This pass follows q, k and v back through those ops to the tensor the exchange
started from and tracks every index digit on the way (`Factor`: which axis of that tensor a digit belongs to, its
stride and its size), so it knows, without assuming diffusers' exact reshapes:

- the process group (``all_to_all_single``'s group name, resolved to the ``ProcessGroup`` at compile time: its size U
  and this process's rank r in it);
- which global head each local head is: the digit the exchange routes by (the destination rank) and the digits that
  end on SDPA's head axis, all taken from one axis of the source tensor; diffusers' layout gives heads
  ``[r·H/U, (r+1)·H/U)``, a strided layout gives ``r, r+U, ...``: both are found;
- that the token axis is (sending rank, local token), i.e. the model's order when every rank holds a contiguous
  chunk of the sequence (diffusers' ``EquipartitionSharder``: ``chunk(U)[rank]``).

`localize_plan` then gives every such site the plan rows of its heads (`paro_compile.parallel.select_heads`), so one
global plan file serves every rank. ``options={"heads": ...}`` states the head slice where the graph cannot tell
(`resolve_heads_option`).

Ring attention (``ring_degree > 1``: KV all-gathered, ATen flash/cuDNN with ``return_lse`` per step) and joint
text + visual sequences under Ulysses (each rank's chunk holds text and visual tokens, so the exchanged token axis is
not the model's order) stay on SDPA with the reason in the report: docs/context_parallel.md says why.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Optional, Sequence, Union

import torch
import torch.fx as fx

from paro_compile.passes.fx_utils import arg, fake_value, op_name, permute_dims, static_int

log = logging.getLogger("paro_compile")

_funcol = torch.ops._c10d_functional
# Dynamo records the packet (``torch.ops._c10d_functional.all_to_all_single``), AOT the overload (``.default``).
ALL_TO_ALL = {_funcol.all_to_all_single, _funcol.all_to_all_single.default}
ALL_GATHER = {_funcol.all_gather_into_tensor, _funcol.all_gather_into_tensor.default}
WAIT = {_funcol.wait_tensor, _funcol.wait_tensor.default}

IDENTITY_OPS = {"contiguous", "clone", "detach", "to", "float", "half", "bfloat16", "type_as"}
REGROUP_OPS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
PERMUTE_OPS = {"permute", "transpose", "swapaxes", "movedim"}
PEER = "peer"
"""`Factor.source` of the digit an all-to-all adds on the receiving side: the rank the data came from."""

HeadsOption = Union[None, tuple, list, Callable[[str, int], Sequence[int]]]


@dataclass(frozen=True)
class Factor:
    """One mixed-radix digit of a tensor axis: its value times ``stride`` is part of the index along ``source``
    (an axis ``("dim", k)`` of the tensor the exchange started from, or `PEER`)."""

    source: Hashable
    stride: int
    size: int

    def split(self, major: int) -> tuple["Factor", "Factor"]:
        """(the top ``major`` values of this digit, the rest)."""
        minor = self.size // major
        return Factor(self.source, self.stride * minor, major), Factor(self.source, self.stride, minor)


Layout = list[list[Factor]]
"""Per tensor axis, its digits from the slowest to the fastest."""


class LayoutError(ValueError):
    """A chain of ops this tracker cannot follow (the site is then treated as not sliceable)."""


def source_layout(shape: Sequence[int]) -> Layout:
    return [[Factor(("dim", k), 1, size)] if size != 1 else [] for k, size in enumerate(shape)]


def regroup(layout: Layout, out_shape: Sequence[int]) -> Layout:
    """The layout after a row-major reshape to ``out_shape`` (view, reshape, flatten, unflatten, (un)squeeze)."""
    pending = deque(f for axis in layout for f in axis if f.size != 1)
    out: Layout = []
    for size in out_shape:
        digits: list[Factor] = []
        need = int(size)
        while need > 1:
            if not pending:
                raise LayoutError(f"reshape to {tuple(out_shape)} asks for more elements than the input has")
            factor = pending.popleft()
            if factor.size <= need:
                if need % factor.size:
                    raise LayoutError(f"reshape to {tuple(out_shape)} splits a digit of size {factor.size} unevenly")
                digits.append(factor)
                need //= factor.size
            else:
                if factor.size % need:
                    raise LayoutError(f"reshape to {tuple(out_shape)} splits a digit of size {factor.size} unevenly")
                major, minor = factor.split(need)
                digits.append(major)
                pending.appendleft(minor)
                need = 1
        out.append(digits)
    if pending:
        raise LayoutError(f"reshape to {tuple(out_shape)} leaves input elements over")
    return out


def _shape(node: Any) -> Optional[tuple[int, ...]]:
    value = fake_value(node)
    if value is None:
        return None
    sizes = tuple(static_int(s) for s in value.shape)
    return None if any(s is None for s in sizes) else sizes


@dataclass
class Exchange:
    """What one all-to-all on the way to an SDPA operand did."""

    node: fx.Node
    group_name: str
    world_size: int
    routed_by: Factor
    """The digit whose value is the destination rank on the sending side."""


@dataclass
class OperandLayout:
    source: fx.Node
    source_shape: tuple[int, ...]
    layout: Layout
    exchanges: list[Exchange]
    chain: list[fx.Node] = field(default_factory=list)
    """The shape ops and collectives between ``source`` and the traced node (the traced node first)."""


def _input(node: fx.Node) -> Any:
    return node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))


def trace_operand(node: fx.Node, stop_at_shared: bool = False) -> OperandLayout:
    """Follow ``node`` back through shape ops and all-to-alls to the tensor they start from, then replay the chain
    on digits. ``stop_at_shared``: start from the first tensor on the way that has other users too (the chain is
    then used by ``node`` alone). Raises `LayoutError` where an op of the chain cannot be followed."""
    chain: list[fx.Node] = []
    current = node
    while isinstance(current, fx.Node) and current.op in ("call_function", "call_method"):
        name = op_name(current)
        if not (current.target in ALL_TO_ALL or current.target in WAIT or name in IDENTITY_OPS
                or name in REGROUP_OPS or name in PERMUTE_OPS):
            break
        if stop_at_shared and current is not node and len(current.users) > 1:
            break
        chain.append(current)
        current = _input(current)
    if not isinstance(current, fx.Node):
        raise LayoutError(f"{node.name} is not computed from a tensor in the graph")
    shape = _shape(current)
    if shape is None:
        raise LayoutError(f"{current.name} has no static shape")
    layout = source_layout(shape)
    exchanges: list[Exchange] = []
    for op in reversed(chain):
        name = op_name(op)
        if op.target in WAIT or name in IDENTITY_OPS:
            continue
        if name in PERMUTE_OPS:
            dims = permute_dims(op, len(layout))
            if dims is None:
                raise LayoutError(f"{op.name}: cannot read the permutation")
            layout = [layout[d] for d in dims]
            continue
        out_shape = _shape(op)
        if out_shape is None:
            raise LayoutError(f"{op.name} has no static shape")
        if op.target in ALL_TO_ALL:
            layout = [_exchange(op, layout, exchanges)]
        else:
            layout = regroup(layout, out_shape)
        if len(layout) != len(out_shape):
            raise LayoutError(f"{op.name}: layout rank {len(layout)} differs from its shape {out_shape}")
    return OperandLayout(current, shape, layout, exchanges, chain)


def _exchange(op: fx.Node, layout: Layout, exchanges: list[Exchange]) -> list[Factor]:
    """The digits of an all-to-all's 1-D output: the sending rank, then what every rank sent to this one."""
    group_name = arg(op, 3, "group_name")
    if not isinstance(group_name, str):
        raise LayoutError(f"{op.name}: group is not a name")
    world_size = _group_size(group_name)
    if len(layout) != 1:
        raise LayoutError(f"{op.name}: all-to-all of a {len(layout)}-D tensor (diffusers flattens it first)")
    numel = 1
    for f in layout[0]:
        numel *= f.size
    for index, name in ((1, "output_split_sizes"), (2, "input_split_sizes")):
        splits = arg(op, index, name)
        if splits is not None and (len(splits) != world_size or any(static_int(s) != numel // world_size for s in splits)):
            raise LayoutError(f"{op.name}: uneven split sizes {splits} (the exchange must give every rank one equal chunk)")
    digits = list(layout[0])
    if not digits or digits[0].size % world_size:
        raise LayoutError(f"{op.name}: the slowest digit does not divide into {world_size} equal chunks")
    routed, rest = digits[0].split(world_size) if digits[0].size != world_size else (digits[0], None)
    exchanges.append(Exchange(op, group_name, world_size, routed))
    return [Factor(PEER, 1, world_size)] + ([rest] if rest is not None else []) + digits[1:]


def _group_size(group_name: str) -> int:
    group = resolve_group(group_name)
    return int(torch.distributed.get_world_size(group))


def resolve_group(group_name: str):
    """The ``ProcessGroup`` a functional collective names (only in the process that traced the graph)."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    if not dist.is_available() or not dist.is_initialized():
        raise LayoutError(f"process group {group_name!r} is not known here: torch.distributed is not initialized")
    try:
        return _resolve_process_group(group_name)
    except Exception as error:  # a graph compiled in another process
        raise LayoutError(f"process group {group_name!r} cannot be resolved: {error}") from error


@dataclass
class HeadShard:
    """The global heads one site's local heads are, on this rank."""

    group_name: Optional[str]
    world_size: int
    rank: int
    heads: tuple[int, ...]
    """Global head index of every local head, in the site's head order."""
    global_heads: int
    source: str
    """"graph" (read from the all-to-all) or "option" (``options={"heads": ...}``)."""

    @property
    def contiguous(self) -> bool:
        return list(self.heads) == list(range(self.heads[0], self.heads[0] + len(self.heads)))

    def describe(self) -> str:
        span = (f"heads [{self.heads[0]}, {self.heads[-1] + 1})" if self.contiguous
                else f"heads {list(self.heads)}")
        if self.group_name is None:  # stated by the option alone: the graph shows no exchange
            return f"{span} (option)"
        return f"ulysses {self.world_size} ranks, rank {self.rank}: {span} of {self.global_heads} ({self.source})"


@dataclass
class ParallelSite:
    """What the pass found at one site."""

    site_id: str
    kind: str
    """"none" (no collective around it), "ulysses", "ring", "unknown" (a collective the tracker cannot read), or
    "stated" (heads given by ``options={"heads": ...}`` where the graph shows no readable exchange)."""
    shard: Optional[HeadShard] = None
    reason: str = ""


def _digits_value(digits: Sequence[Factor], values: Sequence[int]) -> int:
    return sum(d.stride * v for d, v in zip(digits, values))


def _covers(digits: list[Factor], extent: int) -> bool:
    """``digits`` (any order) are the whole index range [0, extent): dense, strides from 1 upwards."""
    stride = 1
    for d in sorted(digits, key=lambda f: f.stride):
        if d.stride != stride:
            return False
        stride *= d.size
    return stride == extent


def read_ulysses_heads(q: OperandLayout, rank: int) -> tuple[tuple[int, ...], int]:
    """(global head of every local head, global head count) from q's traced layout [B, H_local, N, D] on ``rank``.
    Raises `LayoutError` unless the exchange routed by head digits and the token axis is (sending rank, local
    tokens)."""
    if len(q.exchanges) != 1:
        raise LayoutError(f"{len(q.exchanges)} all-to-alls on the way to the query (Ulysses has one)")
    routed = q.exchanges[0].routed_by
    if len(q.layout) != 4:
        raise LayoutError("the query is not 4-D")
    batch, head_axis, token_axis, dim_axis = q.layout
    if any(d.source != routed.source for d in head_axis):  # empty: one local head
        raise LayoutError("the exchange is not routed by the digits of SDPA's head axis")
    if not token_axis or token_axis[0].source != PEER:
        raise LayoutError("the token axis does not start with the sending rank (tokens are not in rank-major order)")
    local_tokens = token_axis[1:]
    token_sources = {d.source for d in local_tokens}
    if len(token_sources) != 1:
        raise LayoutError("the local tokens do not come from one axis of the exchanged tensor")
    token_dim = token_sources.pop()
    if sorted(local_tokens, key=lambda f: -f.stride) != local_tokens or not _covers(local_tokens, q.source_shape[token_dim[1]]):
        raise LayoutError("the local tokens are reordered by the exchange")
    head_dim = routed.source[1] if isinstance(routed.source, tuple) else None
    if head_dim is None:
        raise LayoutError("the exchange is routed by the sending rank")
    head_digits = [routed] + head_axis
    unit = min(d.stride for d in head_digits)
    packed = [d for d in dim_axis if d.source == routed.source]
    separate = [d for d in dim_axis if d.source != routed.source]
    if packed and separate:
        raise LayoutError("SDPA's head_dim axis mixes two axes of the exchanged tensor")
    if packed and not _covers(packed, unit):
        raise LayoutError("the head digits do not sit directly above head_dim")
    if separate:
        sources = {d.source for d in separate}
        if unit != 1 or len(sources) != 1 or not _covers(separate, q.source_shape[sources.pop()[1]]):
            raise LayoutError("SDPA's head_dim axis is not one whole axis of the exchanged tensor")
    if not _covers(head_digits + packed, q.source_shape[head_dim]):
        raise LayoutError("the head digits do not cover the exchanged head axis")
    batch_sources = {d.source for d in batch}
    if batch and (len(batch_sources) != 1 or PEER in batch_sources
                  or not _covers(batch, q.source_shape[batch_sources.pop()[1]])
                  or sorted(batch, key=lambda f: -f.stride) != batch):
        raise LayoutError("the batch axis is reordered by the exchange")
    global_heads = q.source_shape[head_dim] // unit
    local_heads = 1
    for d in head_axis:
        local_heads *= d.size
    heads = []
    for local in range(local_heads):
        values, rest = [], local
        for d in reversed(head_axis):
            values.append(rest % d.size)
            rest //= d.size
        values.reverse()
        heads.append((rank * routed.stride + _digits_value(head_axis, values)) // unit)
    return tuple(heads), global_heads


def comes_from_all_to_all(node: fx.Node, limit: int = 32) -> bool:
    """True when ``node`` comes out of an all-to-all through shape ops only."""
    current = node
    for _ in range(limit):
        if not isinstance(current, fx.Node) or current.op not in ("call_function", "call_method"):
            return False
        if current.target in ALL_TO_ALL:
            return True
        if not (current.target in WAIT or op_name(current) in IDENTITY_OPS | REGROUP_OPS | PERMUTE_OPS):
            return False
        current = _input(current)
    return False


def is_exchange_chain_op(node: Any) -> bool:
    """An op diffusers' exchange is made of: a collective's wait, a copy or dtype change, a reshape, a permute."""
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and (
        node.target in WAIT or node.target in ALL_TO_ALL or op_name(node) in IDENTITY_OPS | REGROUP_OPS | PERMUTE_OPS)


def exchange_result(node: fx.Node) -> bool:
    """True for the last node of an exchange chain: it comes out of an all-to-all through shape ops only, and some
    user of it is not one more shape op (where the exchanged tensor is used: SDPA, a linear)."""
    return comes_from_all_to_all(node) and any(not is_exchange_chain_op(user) for user in node.users)


@dataclass(frozen=True)
class TokenSharding:
    """The token axis split over a Ulysses group: rank ``rank`` holds chunk ``rank`` of ``world`` equal chunks of the
    sequence (diffusers' ``EquipartitionSharder``: ``chunk(world, dim)[rank]``), and every rank runs the same graph
    with its own rank in it (Dynamo traces the rank as a constant)."""

    group_name: str
    world: int
    rank: int


def exchanged_token_axis(traced: OperandLayout, out_dim: int) -> Optional[tuple[int, bool]]:
    """(axis of the exchanged source, gathers) when axis ``out_dim`` of ``traced``'s node holds the tokens of one
    source axis, kept in order by its one all-to-all; None otherwise.

    ``gathers``: the axis is (sending rank, the sender's local tokens), i.e. the whole sequence when every rank's
    source axis holds its chunk of it (the exchange before attention). Not ``gathers``: the exchange routed by the
    top digit of the source's token axis, so this rank received the chunk ``rank`` of the source's tokens (the
    exchange after attention)."""
    if len(traced.exchanges) != 1 or out_dim >= len(traced.layout):
        return None
    exchange = traced.exchanges[0]
    digits = traced.layout[out_dim]
    if digits and digits[0].source == PEER:
        local = digits[1:]
        sources = {d.source for d in local}
        if digits[0].size != exchange.world_size or len(sources) != 1:
            return None
        source = sources.pop()
        if not isinstance(source, tuple) or sorted(local, key=lambda f: -f.stride) != local:
            return None
        return (source[1], True) if _covers(local, traced.source_shape[source[1]]) else None
    sources = {d.source for d in digits}
    if len(sources) != 1:
        return None
    source = sources.pop()
    routed = exchange.routed_by
    if not isinstance(source, tuple) or routed.source != source or sorted(digits, key=lambda f: -f.stride) != digits:
        return None
    extent = 1
    for d in digits:
        extent *= d.size
    if routed.size != exchange.world_size or routed.stride != extent or not _covers(digits, extent) \
            or extent * routed.size != traced.source_shape[source[1]]:
        return None
    return source[1], False


def trace_exchanged_tokens(node: fx.Node, dim: int) -> tuple[fx.Node, int, int]:
    """For layout inference, backwards: (the exchanged source, its token axis, the shift of the positions) for axis
    ``dim`` of ``node``, which comes out of an all-to-all. Position ``i`` of ``node``'s axis is position ``i + shift``
    of the source's axis read on this rank's sequence: ``+rank·L`` when the exchange gathers every rank's ``L`` local
    tokens (this rank's own chunk sits at ``rank·L``), ``-rank·L`` when it hands this rank its chunk of ``L``. Raises
    `LayoutError` when the axis is not a token axis the exchange keeps in order."""
    traced = trace_operand(node)
    found = exchanged_token_axis(traced, dim)
    if found is None:
        raise LayoutError(f"{node.name}: axis {dim} is not a token axis the exchange keeps in order")
    source_dim, gathers = found
    exchange = traced.exchanges[0]
    rank = int(torch.distributed.get_rank(resolve_group(exchange.group_name)))
    if gathers:
        local = traced.source_shape[source_dim]
        return traced.source, source_dim, rank * local
    local = traced.source_shape[source_dim] // exchange.world_size
    return traced.source, source_dim, -rank * local


RING_CHAIN_OPS = IDENTITY_OPS | REGROUP_OPS | PERMUTE_OPS | {"getitem", "chunk", "split", "narrow"}
RING_BUFFER_OPS = {"flatten", "view", "reshape", "contiguous", "cat"}


def _is_ring_operand(node: fx.Node) -> bool:
    """True when ``node`` (a key or value) is a chunk of an all-gathered KV buffer, or is itself put into one
    (the first ring step attends the local chunk and all-gathers it in the same graph)."""
    chain, current = [], node
    while isinstance(current, fx.Node) and len(chain) < 16:
        chain.append(current)
        if current.op == "call_function" and current.target in ALL_GATHER:
            return True
        if current.op not in ("call_function", "call_method") or not (
                current.target in WAIT or op_name(current) in RING_CHAIN_OPS):
            break
        current = _input(current)
    for start in chain:
        frontier = [start]
        for _ in range(4):
            frontier = [user for n in frontier for user in n.users
                        if user.target in ALL_GATHER or user.target in WAIT or op_name(user) in RING_BUFFER_OPS]
            if any(user.op == "call_function" and user.target in ALL_GATHER for user in frontier):
                return True
    return False


def detect_site(site: Any) -> ParallelSite:
    """How ``site`` (an `AttentionSite`) is parallelised in its graph (see module docstring)."""
    operands = [site.q, site.k, site.v]
    if not all(isinstance(n, fx.Node) for n in operands):
        return ParallelSite(site.site_id, "none")
    if any(_is_ring_operand(n) for n in operands[1:]):
        return ParallelSite(site.site_id, "ring", reason=(
            "ring attention (context parallelism with ring_degree > 1): keys and values are all-gathered and attended "
            "chunk by chunk with ATen flash/cuDNN returning the log-sum-exp, while a PARO order moves tokens across "
            "every chunk; use ulysses_degree instead (docs/context_parallel.md)"))
    if not any(comes_from_all_to_all(n) for n in operands):
        return ParallelSite(site.site_id, "none")
    try:
        traced = [trace_operand(n) for n in operands]
        if not traced[0].exchanges:
            raise LayoutError("the query does not pass through the all-to-all")
        group_name = traced[0].exchanges[0].group_name
        group = resolve_group(group_name)
        rank = int(torch.distributed.get_rank(group))
        heads, global_heads = read_ulysses_heads(traced[0], rank)
        for name, other in zip("kv", traced[1:]):
            if not other.exchanges or other.exchanges[0].group_name != group_name:
                raise LayoutError(f"{name} is not exchanged over the query's group")
            if read_ulysses_heads(other, rank) != (heads, global_heads):
                raise LayoutError(f"{name} holds other heads than the query")
    except LayoutError as error:
        return ParallelSite(site.site_id, "unknown", reason=f"context parallel layout not understood: {error}")
    world = traced[0].exchanges[0].world_size
    return ParallelSite(site.site_id, "ulysses", HeadShard(group_name, world, rank, heads, global_heads, "graph"))


def resolve_heads_option(option: HeadsOption, site_id: str, local_heads: int) -> Optional[tuple[int, ...]]:
    """The global heads ``options={"heads": ...}`` gives a site with ``local_heads`` heads: ``(start, stop)``, a list
    of global head indices (one per local head), or a callable ``(site_id, local_heads) -> either`` (None: not
    stated for this site). A tuple is always ``(start, stop)``; a list always names the heads one by one."""
    if option is None:
        return None
    value = option(site_id, local_heads) if callable(option) else option
    if value is None:
        return None
    if isinstance(value, range):
        value = list(value)
    if isinstance(value, tuple):
        if len(value) != 2:
            raise ValueError(f"options['heads'] gave the tuple {value!r} for site {site_id}: a tuple is (start, stop); "
                             "give explicit global head indices as a list")
        heads = tuple(range(int(value[0]), int(value[1])))
    elif isinstance(value, (tuple, list)):
        heads = tuple(int(h) for h in value)
    else:
        raise ValueError(f"options['heads'] gave {value!r} for site {site_id}: expected (start, stop), a list of "
                         "global head indices, or a callable returning one of them")
    if len(heads) != local_heads:
        raise ValueError(f"options['heads'] gives site {site_id} {len(heads)} heads {list(heads)}, its graph has "
                         f"{local_heads}: give (start, stop) with stop - start == {local_heads}")
    if len(set(heads)) != len(heads) or min(heads) < 0:
        raise ValueError(f"options['heads'] for site {site_id}: {list(heads)} must be distinct head indices >= 0")
    return heads


@dataclass
class ContextParallelResult:
    plan: Any
    """The plan with every parallelised site cut to this rank's heads (the input plan when nothing changed)."""
    sites: list[ParallelSite] = field(default_factory=list)

    def notes(self) -> list[str]:
        return [f"{s.site_id}: {s.shard.describe() if s.shard else s.kind}{': ' + s.reason if s.reason else ''}"
                for s in self.sites if s.kind != "none"]

    @property
    def ulysses(self) -> bool:
        """Whether some site's heads were read from an all-to-all in the graph."""
        return any(s.kind == "ulysses" and s.shard is not None and s.shard.group_name for s in self.sites)

    def token_sharding(self) -> TokenSharding | str:
        """The group the graph's Ulysses sites exchange over, as a `TokenSharding`, or why there is no one such group
        (no Ulysses site, or sites exchanging over different groups)."""
        groups = {(s.shard.group_name, s.shard.world_size, s.shard.rank) for s in self.sites
                  if s.kind == "ulysses" and s.shard is not None and s.shard.group_name}
        if not groups:
            return "no attention site exchanges heads for tokens over a process group"
        if len(groups) > 1:
            return f"the attention sites exchange over {len(groups)} process groups {sorted(g[0] for g in groups)}"
        return TokenSharding(*groups.pop())


def localize_plan(sites: list[Any], plan: Any, heads_option: HeadsOption = None) -> ContextParallelResult:
    """Detect the parallel layout of every site; cut the plan to this rank's heads; mark ring and unreadable sites.

    Sites whose collectives show ring attention, or an exchange this pass cannot read, get a reason (they stay on
    SDPA: a plan applied to unknown heads would be silently wrong) unless ``heads_option`` states their heads. A site
    with an explicit ``heads_option`` that disagrees with what the graph shows is an error."""
    from paro_compile.parallel import select_plan_heads

    found: list[ParallelSite] = []
    selection: dict[str, tuple[int, ...]] = {}
    dropped: set[str] = set()  # sites that stay on SDPA: their plan rows would not fit what the rank holds
    for site in sites:
        parallel = detect_site(site)
        local_heads = static_int(site.heads)
        # the option speaks of plan rows: sites the plan does not cover, or that stay on SDPA anyway, need no heads
        planned = plan is not None and site.site_id in plan.sites and site.supported
        stated = (resolve_heads_option(heads_option, site.site_id, local_heads)
                  if planned and local_heads is not None else None)
        if stated is not None:
            if parallel.shard is not None and tuple(parallel.shard.heads) != stated:
                raise ValueError(f"options['heads'] gives site {site.site_id} heads {list(stated)}, but its all-to-all "
                                 f"gives this rank heads {list(parallel.shard.heads)}; drop the option or fix it")
            if parallel.kind == "ring":
                site.reasons.append(parallel.reason)
                dropped.add(site.site_id)
            else:
                shard = parallel.shard or HeadShard(None, 1, 0, stated, max(stated) + 1, "option")
                shard.source = "option" if parallel.shard is None else "graph+option"
                parallel = ParallelSite(site.site_id, "ulysses" if parallel.kind == "ulysses" else "stated", shard)
                selection[site.site_id] = stated
        elif parallel.kind in ("ring", "unknown"):
            if site.supported or parallel.kind == "ring":
                site.reasons.append(parallel.reason + ("" if parallel.kind == "ring" else
                                                       "; state the heads with options={'heads': (start, stop)}"))
            dropped.add(site.site_id)
        elif parallel.shard is not None:
            problem = _token_order_problem(plan.sites.get(site.site_id) if plan is not None else None)
            if problem and site.supported:
                site.reasons.append(problem)
                dropped.add(site.site_id)
            else:
                selection[site.site_id] = parallel.shard.heads
        found.append(parallel)
        if parallel.kind != "none":
            log.info("paro context parallel: %s", found[-1].shard.describe() if found[-1].shard else parallel.reason)
    if plan is not None and dropped & set(plan.sites):
        plan = _without_sites(plan, dropped)
    if plan is not None and selection:
        covered = {sid: heads for sid, heads in selection.items() if sid in plan.sites}
        for site in sites:
            if site.site_id in covered and site.supported:
                plan_heads = plan.sites[site.site_id].heads
                if max(covered[site.site_id]) >= plan_heads:
                    raise ValueError(
                        f"site {site.site_id}: this rank holds global heads {list(covered[site.site_id])}, the plan has "
                        f"{plan_heads} heads; calibrate the plan on the whole model (one process, or "
                        "paro_compile.calibrate under context parallelism, which gathers every rank's heads)")
        if covered:
            plan = select_plan_heads(plan, covered)
    return ContextParallelResult(plan, found)


def token_order_problem(grid: Any) -> str:
    """Why the exchanged token axis may not be in the order of ``grid`` ("" when it is). The all-to-all concatenates
    the ranks' chunks; that is the model's order when the ranks split one sequence into contiguous chunks. A joint
    text + visual sequence is split per stream (diffusers' Flux plan, ParaAttention's CogVideoX: text and visual
    chunks concatenated on each rank), so its exchanged order interleaves the ranks' text and visual tokens."""
    if grid is None:
        return ("context parallelism: the plan site has no token grid, so it cannot be checked that the exchanged "
                "tokens are in the model's order; calibrate the plan with a grid")
    if grid.text_tokens:
        return (f"context parallelism on a joint sequence ({grid.text_tokens} text + {grid.visual_tokens} visual "
                "tokens): each rank exchanges its own text and visual chunks, so the tokens attention sees are not in "
                "the model's order (docs/context_parallel.md)")
    return ""


def _token_order_problem(site_plan: Any) -> str:
    return "" if site_plan is None else token_order_problem(getattr(site_plan, "grid", None))


def _without_sites(plan: Any, site_ids: set[str]) -> Any:
    from paro_compile.parallel import _with_sites

    return _with_sites(plan, {sid: site for sid, site in plan.sites.items() if sid not in site_ids})
