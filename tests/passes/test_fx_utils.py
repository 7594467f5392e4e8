"""Shared FX helpers (`passes/fx_utils.py`): sizes compared and read without guards, axis maps, fake values."""
import sympy
import torch
import torch.fx as fx
from torch._dynamo.source import ConstantSource
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from paro_compile.passes.fx_utils import (
    fake_value, known_equal, map_view_backward, map_view_forward, propagate_fake_values, static_int, to_sym,
)


def symbolic_sizes(*hints):
    """SymInts of one fresh ShapeEnv, one symbol each (distinct hints: equal hints would share a symbol)."""
    env = ShapeEnv()
    return env, [env.create_symintnode(env.create_symbol(h, ConstantSource(f"size{i}")), hint=h) for i, h in enumerate(hints)]


def test_view_axis_maps():
    s = lambda *xs: tuple(sympy.Integer(x) for x in xs)  # noqa: E731
    assert map_view_forward(s(2, 40, 128), s(2, 40, 2, 64), 1) == 1
    assert map_view_forward(s(2, 40, 128), s(80, 128), 1) is None
    assert map_view_backward(s(1, 128, 2, 4, 4), s(1, 128, 32), 2) == ("merge", [2, 3, 4])
    assert map_view_backward(s(1, 3, 16, 128), s(1, 48, 128), 1) == ("merge", [1, 2])


def test_symbolic_sizes_are_compared_and_read_without_guards():
    env, (f, h, w) = symbolic_sizes(3, 4, 5)
    assert known_equal(f * h * w, w * (h * f)) and known_equal((f, h * w), (f, w * h))
    assert not known_equal(f, h) and not known_equal(f, 3) and not known_equal((f, h), (f,))
    assert static_int(f) is None and static_int(f * h) is None and static_int(sympy.Symbol("n")) is None
    assert static_int(7) == 7 and static_int(sympy.Integer(7)) == 7
    assert to_sym(f * h) == to_sym(h) * to_sym(f) and to_sym(7) == sympy.Integer(7)
    # a symbolic patchify: [B, F, H·W, C] → [B, F·H·W, C] merges axes 1 and 2, and the inverse splits them back
    assert map_view_backward((2, f, h * w, 64), (2, f * h * w, 64), 1) == ("merge", [1, 2])
    assert map_view_forward((2, f * h * w, 64), (2, f, h * w, 64), 1) is None
    assert map_view_forward((2, f * h * w, 64), (2, f * h * w, 4, 16), 1) == 1
    assert not env.guards
    int(f)  # what the helpers avoid: reading a symbolic size as an int specializes it
    assert env.guards


def test_propagate_fake_values_runs_the_new_nodes_under_the_graphs_fake_mode():
    captured = {}

    def backend(gm, example_inputs, **kwargs):
        captured["gm"] = gm
        return gm.forward

    torch.compile(lambda x: x.flatten(2) * 2, backend=backend, dynamic=True)(torch.randn(2, 4, 3, 5))
    torch._dynamo.reset()
    gm = captured["gm"]
    flat = next(n for n in gm.graph.nodes if n.target == "flatten")
    with gm.graph.inserting_after(flat):
        transposed = gm.graph.call_method("transpose", (flat, 1, 2))
    with gm.graph.inserting_after(transposed):
        summed = gm.graph.call_function(torch.sum, (transposed,), {"dim": 1})
    propagate_fake_values(gm, [transposed, summed])
    b, c, n = fake_value(flat).shape
    assert isinstance(fake_value(transposed), torch._subclasses.FakeTensor)
    assert known_equal(tuple(fake_value(transposed).shape), (b, n, c))
    assert known_equal(tuple(fake_value(summed).shape), (b, c))
    assert static_int(n) is None  # still symbolic: nothing was specialized
    orphan = fx.Graph().call_function(torch.neg, (fx.Graph().placeholder("x"),))
    propagate_fake_values(gm, [orphan])  # inputs without fake values: skipped
    assert "example_value" not in orphan.meta


def test_symbolic_slice_bounds_are_read_as_sizes():
    """``x[:, text_len:]`` with a symbolic text length: the bound is a SymInt node, read as its size (compared like
    a literal, no guard); a bound holding anything else stays "dynamic"; a symbolic step is not known to be one."""
    from paro_compile.passes.fx_utils import getitem_axis_map, index_size_nodes, meta_value, unit_step

    captured = {}

    def backend(gm, example_inputs, **kwargs):
        captured["gm"] = gm
        return gm.forward

    torch.compile(lambda x, text: x[:, text.shape[1]:] * 2, backend=backend, dynamic=True)(
        torch.randn(2, 9, 4), torch.randn(2, 3, 4))
    torch._dynamo.reset()
    gm = captured["gm"]
    getitem = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "getitem"
                   and isinstance(n.args[1], tuple))
    (bound,) = index_size_nodes(getitem.args[1])
    text_len = meta_value(bound)
    assert isinstance(text_len, torch.SymInt) and static_int(text_len) is None
    axes = getitem_axis_map(getitem.args[1], 3)
    assert axes[1][0] == "in" and axes[1][2].start is text_len and axes[1][2].stop is None
    tensor_bound = next(n for n in gm.graph.nodes if n.op == "placeholder" and fake_value(n) is not None)
    assert getitem_axis_map((slice(None), slice(tensor_bound, None)), 3)[1][2] == "dynamic"
    assert not index_size_nodes((slice(None), slice(tensor_bound, None)))
    _, (n,) = symbolic_sizes(5)
    assert unit_step(slice(0, 4)) and unit_step(slice(0, 4, 1)) and not unit_step(slice(0, 4, 2))
    assert not unit_step(slice(0, 4, n))
