"""Folding's analysis under Ulysses context parallelism: the rules `fold_analysis.Analysis` adds when a graph's
tokens are sharded over ranks (a `TokenSharding`), so the common order is folded into the whole sequence before it
is sharded (docs/context_parallel.md, "Folding under context parallelism").

Under Ulysses context parallelism (a `TokenSharding`) three more rules apply, so that the common order is folded
into the whole sequence before it is sharded (docs/context_parallel.md, "Folding under context parallelism"):

- ``chunk(U, dim)[rank]`` of the token axis makes the state *sharded* (`State.shard`): this rank's chunk of the
  permuted sequence, whose segments stay those of the whole sequence;
- the all-to-all before attention turns this rank's shard into the whole sequence in the common order ((sending
  rank, local token) is the global order when every rank holds its chunk), the one after attention hands each
  rank its chunk again, and an all-gather over the group restores the whole sequence (the inverse goes after it):
  ``all_gather_into_tensor`` stacks the ranks' chunks on dim 0, then a view (one sample) or funcol's
  ``cat(chunk(U, dim=0), dim=token)`` (a batch) puts the rank in front of the local tokens;
- a position-dependent operand that joins a sharded state (RoPE tables) is followed back to its own
  ``chunk(U)[rank]``: the forward layout op goes on the whole table before that chunk (`ShardedOperand`).

A sharded state cannot be put back in model order on one rank (that needs every rank's tokens): where sharded
tokens leave the region, the analysis raises `FoldError` and the graph is left alone.
"""
from __future__ import annotations

from typing import Any, Union

import torch.fx as fx

from paro_compile.passes.context_parallel import (
    IDENTITY_OPS as EXCHANGE_IDENTITY_OPS, PEER, REGROUP_OPS, WAIT, Factor as Digit, LayoutError, OperandLayout,
    TokenSharding, exchange_result, is_exchange_chain_op, exchanged_token_axis, regroup, source_layout, trace_operand,
)
from paro_compile.passes.fold_values import FoldError, ShardedOperand, State
from paro_compile.passes.fx_utils import (
    PERMUTE_OPS, VIEW_OPS, arg, getitem_axis_map, known_equal, map_view_backward, meta_value, norm_dim, op_name,
    permute_dims, shape_of, static_int, unit_step,
)


def chain_inputs(node: fx.Node) -> list[fx.Node]:
    """The nodes an exchange chain ending at ``node`` starts from (its shape ops followed back)."""
    current, seen = node, 0
    while is_exchange_chain_op(current) and seen < 32:
        current = current.args[0] if current.args else None
        seen += 1
    return [current] if isinstance(current, fx.Node) else []


class ShardedTokenRules:
    """Mixin of `fold_analysis.Analysis`: the exchanges, the token sharding chunk, the final all-gather and the
    position tables cut per rank. Reads and fills the analysis' ``state``, ``tuple_state``, ``skip``, ``exchanges``
    and ``sharded_operands``."""

    gm: fx.GraphModule
    sharding: TokenSharding
    state: dict
    tuple_state: dict
    skip: set
    exchanges: dict[fx.Node, Union[OperandLayout, str]]

    def _find_exchanges(self) -> None:
        for node in self.gm.graph.nodes:
            if not exchange_result(node):
                continue
            try:
                traced = trace_operand(node, stop_at_shared=True)
            except LayoutError as error:
                self.exchanges[node] = str(error)
                continue
            self.exchanges[node] = traced
            self.skip.update(n for n in traced.chain if n is not node)

    def _sharded_operand(self, operand: fx.Node, state: State) -> Union[ShardedOperand, str]:
        """How ``operand`` (axis ``state.dim`` along this rank's chunk) is cut from a whole-sequence table by
        ``chunk(U, dim)[rank]``, through single-input ops that keep the axis; or why it is not."""
        chain: list[fx.Node] = []
        node, dim = operand, state.dim
        total = sum(static_int(seg.length) or 0 for seg in state.segs)
        for _ in range(16):
            if not isinstance(node, fx.Node) or node.op not in ("call_function", "call_method"):
                return f"{getattr(node, 'name', node)} is not cut from a table by chunk(U)[rank]"
            name = op_name(node)
            src = node.args[0] if node.args else None
            if name == "getitem" and isinstance(src, fx.Node) and op_name(src) in ("chunk", "split") \
                    and isinstance(node.args[1], int) and shape_of(src) is None:
                return self._table_chunk(src, node, dim, total, chain)
            if not isinstance(src, fx.Node) or shape_of(src) is None:
                return f"{node.name} ({name}) is not followed back to a table"
            others = [a for a in node.all_input_nodes if a is not src]
            src_shape, shape = shape_of(src), shape_of(node)
            if name == "getitem" and not others:
                axes = getitem_axis_map(node.args[1], len(src_shape))
                if axes is None or dim >= len(axes) or axes[dim][0] != "in" or axes[dim][2] == "dynamic" \
                        or not unit_step(axes[dim][2]) or axes[dim][2].start not in (None, 0) \
                        or not (axes[dim][2].stop is None or known_equal(src_shape[axes[dim][1]], shape[dim])):
                    return f"{node.name} indexes the token axis"
                dim = axes[dim][1]
            elif name in PERMUTE_OPS and not others:
                dims = permute_dims(node, len(shape))
                if dims is None:
                    return f"{node.name}: permutation not read"
                dim = dims[dim]
            elif (name in VIEW_OPS or name in EXCHANGE_IDENTITY_OPS) and not others:
                if name in VIEW_OPS and name not in EXCHANGE_IDENTITY_OPS:
                    if name == "expand":
                        return f"{node.name} expands the token axis"
                    mapped = map_view_backward(src_shape, shape, dim)
                    if mapped is None or mapped[0] != "same":
                        return f"{node.name} ({name}) reshapes the token axis"
                    dim = mapped[1]
            else:
                return f"{node.name} ({name}) is not an op the rewrite can replay on the whole table"
            chain.append(node)
            node = src
        return "the chain from the table is too long"

    def _table_chunk(self, split: fx.Node, piece: fx.Node, dim: int, total: int,
                     chain: list[fx.Node]) -> Union[ShardedOperand, str]:
        sharding = self.sharding
        table = split.args[0]
        pieces = meta_value(split)
        table_shape = shape_of(table)
        if table_shape is None or not isinstance(pieces, (list, tuple)):
            return f"{split.name} has no static pieces"
        split_dim = norm_dim(int(arg(split, 2, "dim", 0)), len(table_shape))
        if split_dim != dim or len(pieces) != sharding.world or piece.args[1] != sharding.rank \
                or not known_equal(table_shape[dim], total) \
                or any(not known_equal(p.shape[dim], pieces[0].shape[dim]) for p in pieces):
            return (f"{split.name} is not chunk({sharding.world}, dim={dim})[{sharding.rank}] of a table as long as the "
                    "whole sequence")
        return ShardedOperand(table, dim, split, piece, list(reversed(chain)))

    def _rank_chunk(self, node: fx.Node, pieces: Any, dim: int) -> bool:
        """Whether ``node`` is the token sharding: ``chunk(U, dim)`` into U equal pieces of which this graph uses only
        piece ``rank`` (every rank's graph takes its own piece)."""
        sharding = self.sharding
        if len(pieces) != sharding.world or any(not known_equal(p.shape[dim], pieces[0].shape[dim]) for p in pieces):
            return False
        return all(op_name(user) == "getitem" and user.args[1] == sharding.rank for user in node.users)

    def visit_exchange(self, node: fx.Node) -> None:
        """``node`` comes out of an all-to-all: its tokens are the whole sequence (from this rank's chunk) or this
        rank's chunk (from the whole sequence), or the graph cannot be folded."""
        traced = self.exchanges[node]
        if isinstance(traced, str):
            if any(a in self.state for a in chain_inputs(node)):
                raise FoldError(f"{node.name}: permuted tokens go through an exchange that cannot be traced ({traced})")
            return
        st = self.state.get(traced.source)
        if st is None:
            return
        chain = set(traced.chain)
        for inner in traced.chain:
            if inner is not node and any(user not in chain for user in inner.users):
                raise FoldError(f"{inner.name}, inside the exchange of {traced.source.name}, is used outside it")
        exchange = traced.exchanges[0] if len(traced.exchanges) == 1 else None
        sharding = self.sharding
        if exchange is None or (exchange.group_name, exchange.world_size) != (sharding.group_name, sharding.world):
            raise FoldError(f"{node.name}: permuted tokens go through an exchange over another group than the "
                            "Ulysses group")
        for out_dim in range(len(traced.layout)):
            found = exchanged_token_axis(traced, out_dim)
            if found is None or found[0] != st.dim:
                continue
            gathers = found[1]
            if gathers and st.shard == sharding:
                self.state[node] = State(out_dim, st.segs)
                return
            if not gathers and st.shard is None:
                total = sum(static_int(seg.length) or 0 for seg in st.segs)
                if not known_equal(total, shape_of(traced.source)[st.dim]):
                    break
                self.state[node] = State(out_dim, st.segs, sharding)
                return
            break
        raise FoldError(f"{node.name}: the exchange of {traced.source.name} does not keep its tokens as (rank, local "
                        "token) of the sequence")

    def visit_gather(self, node: fx.Node) -> None:
        """An all-gather of this rank's chunk of the tokens over the Ulysses group: followed through its wait,
        reshapes and funcol's ``chunk`` + ``cat`` to the node whose axis is (rank, local token), the whole sequence
        again. diffusers' final ``all_gather`` of the output is ``all_gather_into_tensor``, which stacks the ranks'
        chunks on dim 0, then funcol's move of the rank to the token axis: a view when the batch is one sample,
        ``cat(chunk(U, dim=0), dim=token)`` otherwise (`_regather_pieces`)."""
        source = node.args[0]
        st = self.state[source]
        sharding = self.sharding
        group_size, group_name = arg(node, 1, "group_size"), arg(node, 2, "group_name")
        if st.shard != sharding or (group_name, group_size) != (sharding.group_name, sharding.world):
            raise FoldError(f"{node.name} gathers permuted tokens over another group than the Ulysses group")
        shape = shape_of(source)
        sizes = [static_int(x) for x in shape]
        if None in sizes:
            raise FoldError(f"{node.name}: all-gather of tokens with a symbolic shape")
        layout = source_layout(sizes)
        token = layout[st.dim]
        layout = [[Digit(PEER, 1, sharding.world)] + layout[0]] + layout[1:]
        chain, current = [], node
        for _ in range(16):
            users = list(current.users)
            if len(users) != 1:
                break
            user = users[0]
            name = op_name(user)
            steps = [user]
            try:
                if user.target in WAIT or name in EXCHANGE_IDENTITY_OPS:
                    pass
                elif name == "chunk":
                    layout, steps = self._regather_pieces(node, user, layout)
                elif name in PERMUTE_OPS:
                    dims = permute_dims(user, len(layout))
                    if dims is None:
                        break
                    layout = [layout[d] for d in dims]
                elif name in REGROUP_OPS and shape_of(user) is not None:
                    layout = regroup(layout, [static_int(x) for x in shape_of(user)])
                else:
                    break
            except LayoutError:
                break
            chain.extend(steps)
            current = steps[-1]
            wanted = [Digit(PEER, 1, sharding.world)] + token
            axis = next((j for j, digits in enumerate(layout) if digits == wanted), None)
            if axis is not None:
                self.skip.update(chain)
                self.state[current] = State(axis, st.segs)
                return
        raise FoldError(f"{node.name}: the all-gather of the permuted tokens is not followed back to one token axis "
                        f"of (rank, local token) (it ends at {current.name}, {op_name(current)})")

    def _regather_pieces(self, gather: fx.Node, split: fx.Node, layout: list) -> tuple[list, list[fx.Node]]:
        """funcol's ``cat(chunk(U, dim=0), dim=d)`` after the all-gather at ``gather``: the chunk takes off the rank,
        the slowest digit of the axis the ranks are stacked on, and the cat puts it in front of axis ``d``. The
        layout after the cat and the nodes from ``split`` to the cat; only that exact pattern (U pieces, each used
        once, in rank order, by one cat), any other raises `FoldError` with what differs."""
        world = self.sharding.world
        peer = Digit(PEER, 1, world)
        rank = len(layout)
        split_dim = norm_dim(int(arg(split, 2, "dim", 0)), rank)
        if arg(split, 1, "chunks") != world or not layout[split_dim] or layout[split_dim][0] != peer:
            raise FoldError(f"{gather.name}: {split.name} after the all-gather is not chunk({world}) of the axis the "
                            "ranks are stacked on")
        pieces: dict[int, fx.Node] = {}
        for piece in split.users:
            index = piece.args[1] if op_name(piece) == "getitem" else None
            if not isinstance(index, int) or not 0 <= index < world or index in pieces:
                raise FoldError(f"{gather.name}: {piece.name} uses the all-gather's chunk {split.name} otherwise than "
                                "by taking each rank's piece once")
            pieces[index] = piece
        ordered = [pieces.get(r) for r in range(world)]
        joins = {user for piece in pieces.values() for user in piece.users}
        join = joins.pop() if len(joins) == 1 else None
        if None in ordered or join is None or op_name(join) != "cat" \
                or any(len(piece.users) != 1 for piece in ordered) or list(arg(join, 0, "tensors")) != ordered:
            raise FoldError(f"{gather.name}: the pieces of the all-gather's chunk {split.name} are not concatenated "
                            "once each, in rank order, by one cat")
        cat_dim = norm_dim(int(arg(join, 1, "dim", 0)), rank)
        layout = [digits[1:] if d == split_dim else digits for d, digits in enumerate(layout)]
        layout = [[peer] + digits if d == cat_dim else digits for d, digits in enumerate(layout)]
        return layout, [split, *ordered, join]
