"""Folding, rewrite phase (`passes/fold_rewrite.py`): layout ops, the residual algebra, and what the folded graph
costs per layer in Inductor's code."""
import re

import pytest
import torch
import torch.fx as fx
from torch._inductor.utils import run_and_get_code

from paro_compile.grid import TokenGrid, inverse_permutation, order_permutation, orders_permutation
from paro_compile.kernels.reference import permute_tokens
from paro_compile.passes.fold_rewrite import residual_permutation
from paro_compile.passes.fx_utils import fake_value, meta_value
from tests.passes.fold_helpers import GRIDS, capture, compile_and_run, first, make, make_plan, token_gathers


def test_residual_algebra():
    grid = TokenGrid(3, 4, 5, 7)
    orders = ["HWF", "WFH", "FHW", "HWF"]
    perm = orders_permutation(grid, orders)
    common = order_permutation(grid, "HWF")
    residual = residual_permutation(perm, common)
    x = torch.randn(2, len(orders), grid.num_tokens, 8)
    # tokens already in the common order, then the residual == the plan's per-head order
    in_common = permute_tokens(x, common.expand(len(orders), -1))
    torch.testing.assert_close(permute_tokens(in_common, residual), permute_tokens(x, perm), rtol=0, atol=0)
    assert torch.equal(residual[0], torch.arange(grid.num_tokens)) and torch.equal(residual[3], residual[0])
    # composition of consecutive sites: π⁻¹ of one then π of the next is the identity when equal
    inv = inverse_permutation(common)
    assert torch.equal(common[inv], torch.arange(grid.num_tokens))


def test_gather_check_sees_a_gather():
    perm = torch.randperm(40)
    f = torch.compile(lambda x: (x[:, perm] * 2).sum(-1), backend="inductor")
    _, codes = run_and_get_code(f, torch.randn(2, 40, 8))
    with pytest.raises(RuntimeError):
        token_gathers("\n".join(codes))


def _per_layer_ops(code: str) -> list[tuple]:
    """Inductor's `call` split at each paro attention call: per segment, (kernel calls, extern/aten calls,
    buffer allocations). The first segment is everything before the first attention (patch embed etc.)."""
    body = code[code.index("def call("):]
    segments = re.split(r"torch\.ops\.paro\.attention\.default\(", body)
    out = []
    for seg in segments:
        kernels = len(re.findall(r"^\s+(?:cpp_fused\w*|triton_\w+\.run)\(", seg, re.M))
        externs = len(re.findall(r"^\s+\w+ = (?:extern_kernels|aten|torch\.ops\.aten)\.", seg, re.M))
        externs += len(re.findall(r"^\s+extern_kernels\.", seg, re.M))
        allocs = len(re.findall(r"empty_strided", seg))
        out.append((kernels, externs, allocs))
    return out


@pytest.mark.parametrize("name,mixed", [("cogvideox", ["HWF", "WHF"]), ("toy", ["HWF", "WHF"])])
def test_mixed_orders_add_no_kernels_per_layer(name, mixed, monkeypatch):
    """The mixed-order graph (common order folded, residuals in the kernel) has, per layer,
    the same Inductor kernels, extern calls and allocations as the identity-order graph: no extra copy,
    permute or index kernel per layer (the RoPE table permutes fuse into the RoPE kernel), and the residual
    permutation reaches the op as a constant input on the activations' device.

    Inductor assumes every CPU graph input unaligned (`should_assume_input_aligned` is GPU-only), which would
    taint the attention output through the permutation input (one more allocation per layer, CPU only); the
    test applies the GPU rule (aligned when the storage offset is) so the CPU code is what a GPU would get
    for a device-resident permutation. The FX graph cache is off so the rule applies to this compilation."""
    from torch._inductor import config as inductor_config
    from torch._inductor import graph as inductor_graph
    from torch._inductor.utils import tensor_is_aligned

    monkeypatch.setattr(inductor_graph, "should_assume_input_aligned", tensor_is_aligned)
    model, inputs = make(name)
    gm, sites = capture(model, inputs)
    codes = {}
    for tag, orders in (("identity", [GRIDS[name].natural_order]), ("mixed", mixed)):
        plan = make_plan(sites, GRIDS[name], orders)
        torch._dynamo.reset()
        with torch.no_grad():
            ref = first(model(**inputs))
        with inductor_config.patch(fx_graph_cache=False):
            out, codes[tag], report = compile_and_run(model, inputs, plan)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        expected = "identity" if tag == "identity" else "kernel"
        assert [s.permutation for s in report.sites if s.lowered] == [expected] * 2, report.summary()
    ident, mix = _per_layer_ops(codes["identity"]), _per_layer_ops(codes["mixed"])
    assert len(ident) == len(mix) == 3  # before layer 0's attention, between the two, after the last
    # Per layer (segments 1, 2): the same kernels and extern calls, no more allocations. The patch embed
    # (segment 0, once per call) may add one small copy and buffer when the order is folded into the conv's
    # input: the permuted latent (Conv3d: its own copy kernel; Conv2d: fused into the existing layout copy).
    assert [m[:2] for m in mix[1:]] == [i[:2] for i in ident[1:]], (ident, mix)
    assert all(m[2] <= i[2] for m, i in zip(mix[1:], ident[1:])), (ident, mix)
    assert mix[0][1] == ident[0][1] and ident[0][0] <= mix[0][0] <= ident[0][0] + 1, (ident, mix)
    assert ident[0][2] <= mix[0][2] <= ident[0][2] + 1, (ident, mix)
    count = lambda code: len(re.findall(r"async_compile\.(?:cpp|triton)", code))  # noqa: E731
    assert count(codes["identity"]) <= count(codes["mixed"]) <= count(codes["identity"]) + 1  # + the latent copy
    token_gathers(codes["mixed"])  # the residual is applied by the kernel, not by a gather in the graph




def _identity_graph():
    graph = fx.Graph()
    x = graph.placeholder("x")
    out = graph.output(x)
    return fx.GraphModule(torch.nn.Module(), graph), x, out


@pytest.mark.parametrize("order", ["HWF", "WFH"])
def test_layout_ops_apply_the_common_order_segment_by_segment(order):
    """`Rewriter.reorder` on a text prefix + visual grid: forward equals the gather by the common permutation c,
    and the inverse layout op undoes it."""
    from paro_compile.passes.fold_analysis import Seg
    from paro_compile.passes.fold_rewrite import Rewriter, common_permutation

    grid = TokenGrid(2, 3, 4, 5)
    segs = (Seg("txt", 5), Seg("vis", 24))
    gm, x, out = _identity_graph()
    rw = Rewriter(gm, order, "FHW", [2, 3, 4])
    forward = rw.reorder(x, 1, segs, True, out, 3)
    back = rw.reorder(forward, 1, segs, False, out, 3)
    out.args = ((forward, back),)
    gm.recompile()
    tokens = torch.randn(2, grid.num_tokens, 8)
    permuted, restored = gm(tokens)
    c = common_permutation(segs, grid, order)
    assert torch.equal(permuted, tokens[:, c]) and torch.equal(restored, tokens)
    assert torch.equal(c[:5], torch.arange(5))  # text positions never move


def test_in_graph_residual_equals_the_constant():
    """`Rewriter.residual` (built in the graph, for symbolic sizes) computes the same [H, N] index as
    `residual_permutation` of the plan's permutation."""
    from paro_compile.passes.fold_analysis import Seg
    from paro_compile.passes.fold_rewrite import Rewriter, common_permutation

    grid = TokenGrid(2, 3, 4, 5)
    segs = (Seg("txt", 5), Seg("vis", 24))
    orders = ["HWF", "FWH", "WHF"]
    gm, x, out = _identity_graph()
    residual = Rewriter(gm, "HWF", "FHW", [2, 3, 4]).residual(segs, orders, torch.device("cpu"), out)
    out.args = (residual,)
    gm.recompile()
    expected = residual_permutation(orders_permutation(grid, orders), common_permutation(segs, grid, "HWF"))
    assert torch.equal(gm(torch.empty(0)), expected)



def test_symbolic_sizes_are_rebuilt_from_the_graph_inputs():
    """A layout op can sit before the node whose shape first shows a size (LTX reorders its packed-latent input
    before the RoPE grid is built): `InputSizes` computes a symbolic size from the placeholders, right after them,
    so it dominates every use, and it evaluates to each call's value."""
    from paro_compile.passes.fold_rewrite import InputSizes

    captured = {}

    def backend(gm, example_inputs, **kwargs):
        captured["gm"] = gm
        return gm.forward

    def f(x, n: int):
        return x.new_zeros((x.shape[2] // 2) * n + x.shape[1])

    torch.compile(f, backend=backend, dynamic=True)(torch.randn(2, 6, 10), 3)
    torch._dynamo.reset()
    gm = captured["gm"]
    graph = gm.graph
    placeholders = graph.find_nodes(op="placeholder")
    first_op = placeholders[-1].next
    zeros = next(n for n in graph.nodes if n.op == "call_method" and n.target == "new_zeros")
    size = meta_value(zeros).shape[0]
    inputs = InputSizes(graph)
    assert inputs.covers(size) and inputs.covers(7)
    built = inputs.build(size)
    nodes = list(graph.nodes)
    new = nodes[len(placeholders):nodes.index(first_op)]
    assert built in new and all(n.op != "placeholder" for n in new)  # between the placeholders and the first op
    output = graph.output_node()
    output.args = ((*output.args[0], built),)
    gm.recompile()
    args = {"x": torch.randn(2, 5, 14), "n": 4}
    real = [args["x"] if fake_value(p) is not None else _symbol_value(p, args) for p in placeholders]
    assert gm(*real)[-1] == (14 // 2) * 4 + 5


def _symbol_value(placeholder, args):
    """The call value of a SymInt placeholder of ``f`` above: ``n``, or a size of ``x``."""
    x = meta_value(next(p for p in placeholder.graph.find_nodes(op="placeholder") if fake_value(p) is not None))
    symbol = meta_value(placeholder).node.expr
    for dim, s in enumerate(x.shape):
        if isinstance(s, torch.SymInt) and s.node.expr == symbol:
            return args["x"].shape[dim]
    return args["n"]
