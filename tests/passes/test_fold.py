"""Folding pass: PARO orders applied by layout ops, exact outputs, zero runtime gathers."""
import itertools
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code
from torch.testing import FileCheck

import paro_compile
from paro_compile.grid import TokenGrid, inverse_permutation, order_permutation, orders_permutation
from paro_compile.kernels.reference import permute_tokens
from paro_compile.passes.fold import residual_permutation
from tests.passes.fold_helpers import EXACT, GRIDS, capture, first, make, make_plan

GATHER_TARGETS = {torch.ops.aten.index.Tensor, torch.gather, torch.index_select, torch.ops.aten.gather.default,
                  torch.ops.aten.index_select.default}


def token_gathers(code: str) -> None:
    """Inductor code with no indirect load on the token axis (aten.index/gather/index_select lower to
    bounds-checked indirect loads) and no permutation buffer handed to the attention op."""
    FileCheck().check_not("index out of bounds").check_not("aten.index").check_not("gather").check_not("index_select").run(code)


def compile_and_run(model, inputs, plan):
    compiled = torch.compile(model, backend="paro", options={**EXACT, "plan": plan})
    with torch.no_grad():
        out, codes = run_and_get_code(compiled, **inputs)
    return first(out), "\n".join(codes), paro_compile.last_report()


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


@pytest.mark.parametrize("order", ["".join(p) for p in itertools.permutations("FHW")])
def test_toy_every_order_folds_exactly(order):
    model, inputs = make("toy")
    gm, sites = capture(model, inputs)
    plan = make_plan(sites, GRIDS["toy"], [order])
    with torch.no_grad():
        ref = model(**inputs)
    out, code, report = compile_and_run(model, inputs, plan)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert report.gathers_left == 0
    if order == "FHW":
        assert [s.permutation for s in report.sites] == ["identity"] * 2
    else:  # the order is applied to the Conv3d patch embed's input and kernel (see fold_into_conv3d_input)
        assert all(s.permutation.startswith("folded:conv3d input(") for s in report.sites), report.summary()
    token_gathers(code)
    assert not re.search(r"_paro_\w*_perm", code) or order == "FHW"
    fold_pass = next(p for p in report.passes if p["name"] == "fold_permutations")
    if order != "FHW":
        assert "torch.permute" in fold_pass["after"] and "torch.permute" not in fold_pass["before"]


def test_toy_mixed_orders_go_to_kernel_as_residuals():
    model, inputs = make("toy")
    gm, sites = capture(model, inputs)
    plan = make_plan(sites, GRIDS["toy"], ["HWF", "WHF"])
    from paro_compile.config import ParoConfig
    from paro_compile.passes.fold import fold_permutations

    result = fold_permutations(gm, sites, plan, ParoConfig(**EXACT))
    assert result.order == "HWF" and result.gathers == 0
    for sid, sp in plan.sites.items():
        r = result.kernel_perms[sid]
        assert torch.equal(r[0], torch.arange(40))  # head 0 uses the folded order
        common = order_permutation(GRIDS["toy"], "HWF")
        assert torch.equal(common[r[1]], sp.perm[1])  # c ∘ r == perm
        assert result.descriptions[sid] == "kernel"
    with torch.no_grad():
        ref = model(**inputs)
    out, code, report = compile_and_run(model, inputs, plan)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert all(s.permutation == "kernel" for s in report.sites) and report.gathers_left == 0


@pytest.mark.parametrize("name,orders,folded", [
    ("cogvideox", ["HWF"], True), ("cogvideox", ["WHF", "FWH"], False),
    ("wan", ["WFH"], True), ("flux", ["WH"], True), ("flux", ["WH", "HW"], False),
])
def test_diffusers_models_fold(name, orders, folded):
    model, inputs = make(name)
    gm, sites = capture(model, inputs)
    plan = make_plan(sites, GRIDS[name], orders)
    with torch.no_grad():
        ref = first(model(**inputs))
    out, code, report = compile_and_run(model, inputs, plan)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    lowered = [s for s in report.sites if s.lowered]
    assert lowered and report.gathers_left == 0
    if folded:
        assert all(s.permutation.startswith("folded:") for s in lowered), report.summary()
        assert not re.search(r"_paro_\w*_perm", code)
        token_gathers(code)
    else:
        assert all(s.permutation == "kernel" for s in lowered), report.summary()


class FlatTokens(nn.Module):
    """Tokens arrive flat with no layout op, and the plan has no grid: nothing can fold."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(32, 3 * 128)
        self.out = nn.Linear(128, 32)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 64).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, 128))


def test_flat_input_without_grid_stays_in_kernel():
    model = FlatTokens().eval()
    x = torch.randn(1, 40, 32)
    gm, sites = capture(model, {"x": x})
    plan = make_plan(sites, GRIDS["toy"], ["HWF"], with_grid=False)
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend="paro", options={**EXACT, "plan": plan})(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    report = paro_compile.last_report()
    assert [s.permutation for s in report.sites] == ["kernel"] and report.gathers_left == 0


class TokenMixing(nn.Module):
    """The toy DiT plus ops that read token positions (a flip and a cumulative sum over tokens)."""

    def __init__(self):
        super().__init__()
        from paro_compile.toy.dit import ToyVideoDiT

        torch.manual_seed(0)
        self.dit = ToyVideoDiT()

    def forward(self, latent, text, timestep):
        d = self.dit
        tokens = d.patch_embed(latent).flatten(2).transpose(1, 2)
        tokens = tokens + 0.1 * tokens.flip(1) + 0.01 * tokens.cumsum(1)
        x = torch.cat([d.text_proj(text), tokens], dim=1)
        temb = d.time_embed(d.timestep_embedding(timestep, x.shape[-1]))
        for block in d.blocks:
            x = block(x, temb)
        return x.mean(1)


def test_token_position_ops_get_inverse_layout_ops():
    from paro_compile.toy.dit import toy_inputs

    model, inputs = TokenMixing().eval(), toy_inputs()
    gm, sites = capture(model, inputs)
    plan = make_plan(sites, GRIDS["toy"], ["WHF"])
    with torch.no_grad():
        ref = model(**inputs)
    out, code, report = compile_and_run(model, inputs, plan)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert report.gathers_left == 0
    token_gathers(code)


@torch.no_grad()
def test_dynamic_shapes_fold_symbolic_grid():
    """Without a plan, the dynamic path folds an order string on the inferred symbolic grid:
    `fold_order(gm, sites, "HWF")`, kernels get no permutation (with a plan: the test below)."""
    from torch._inductor.compile_fx import compile_fx

    from paro_compile.config import ParoConfig
    from paro_compile.toy.dit import ToyVideoDiT, toy_inputs
    from paro_compile.passes.discover import find_attention_sites
    from paro_compile.passes.fold import fold_order
    from paro_compile.passes.lower import lower_attention_sites

    results = []

    def backend(gm, example_inputs, **kwargs):
        config = ParoConfig(**EXACT)
        sites = find_attention_sites(gm, config)
        results.append(fold_order(gm, sites, "HWF"))
        lower_attention_sites(gm, sites, config, None, results[-1].kernel_perms)
        return compile_fx(gm, example_inputs)

    torch.manual_seed(0)
    model = ToyVideoDiT().eval()
    compiled = torch.compile(model, backend=backend, dynamic=True)
    for size in (8, 12):
        inputs = toy_inputs(height=size, width=size, frames=3 if size == 12 else 2)
        torch.testing.assert_close(compiled(**inputs), model(**inputs), rtol=1e-5, atol=1e-5)
    assert results and all(r.order == "HWF" for r in results)
    assert all(d.startswith("folded:") for d in results[-1].descriptions.values())


@torch.no_grad()
@pytest.mark.parametrize("orders", [["HWF"], ["HWF", "WHF"]])
def test_dynamic_shapes_with_order_plan_through_backend(orders):
    """dynamic=True + a plan of per-head order strings: the orders are applied to the symbolic grid (common
    order folded, residuals computed in the graph), block masks cannot apply (dense, reason recorded)."""
    from paro_compile.toy.dit import ToyVideoDiT, toy_inputs
    from paro_compile.plan import Plan, SitePlan

    torch.manual_seed(0)
    model = ToyVideoDiT().eval()
    _, sites = capture(model, toy_inputs())
    grid = GRIDS["toy"]
    empty = torch.zeros(1, 2, 1, 1, dtype=torch.bool)  # not dense (would zero the output): dropped with symbolic N
    plan = Plan({s.site_id: SitePlan.from_orders(s.site_id, (orders * 2)[:2], grid, block_masks=empty)
                 for s in sites if s.supported})
    compiled = torch.compile(model, backend="paro", dynamic=True, options={**EXACT, "plan": plan})
    for size, frames in ((8, 2), (12, 3)):  # text length 5 ≠ the grid sizes, so Dynamo keeps separate symbols
        inputs = toy_inputs(height=size, width=size, frames=frames, text_tokens=5)
        torch.testing.assert_close(compiled(**inputs), model(**inputs), rtol=1e-5, atol=1e-5)
        report = paro_compile.last_report()
        lowered = [s for s in report.sites if s.lowered]
        assert len(lowered) == 2 and report.gathers_left == 0
        assert all(not isinstance(s.shape[2], int) for s in lowered), "expected a symbolic sequence length"
        for record in lowered:
            assert record.density == 1.0
            assert "block masks need static shapes; dense at this site" in record.reasons
            assert record.permutation == ("kernel" if len(orders) > 1 else "folded:flatten(flatten)")


def test_dynamic_shapes_plan_without_orders_is_a_clear_error():
    from paro_compile.toy.dit import ToyVideoDiT, toy_inputs
    from paro_compile.plan import PlanMismatchError

    torch.manual_seed(0)
    model = ToyVideoDiT().eval()
    _, sites = capture(model, toy_inputs())
    plan = make_plan(sites, GRIDS["toy"], ["HWF", "WHF"])
    for sp in plan.sites.values():
        sp.orders = []
    compiled = torch.compile(model, backend="paro", dynamic=True, options={**EXACT, "plan": plan})
    with pytest.raises(Exception, match="order strings"):
        with torch.no_grad():
            compiled(**toy_inputs(text_tokens=5))
    torch._dynamo.reset()


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
    """Issue 4 follow-up: the mixed-order graph (common order folded, residuals in the kernel) has, per layer,
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


def test_kernel_permutations_live_on_the_activation_device(monkeypatch):
    """A CPU [H, N] residual handed to a CUDA kernel is copied host→device on every call (twice per site):
    the pass places kernel permutations on the device of the site's activations."""
    from paro_compile.config import ParoConfig
    from paro_compile.passes import fold

    model, inputs = make("toy")
    gm, sites = capture(model, inputs)
    plan = make_plan(sites, GRIDS["toy"], ["HWF", "WHF"])
    monkeypatch.setattr(fold, "site_device", lambda site: torch.device("meta"))
    result = fold.fold_permutations(gm, sites, plan, ParoConfig(**EXACT))
    perms = [p for p in result.kernel_perms.values() if p is not None]
    assert perms and all(p.device.type == "meta" for p in perms)


def _bench_fold_stack():
    """benchmarks/bench_fold.py's `Stack`: CogVideoX-style Conv2d patch embed per frame → view/flatten/transpose/
    flatten → text prefix → attention blocks → unpatchify."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_fold.py"
    spec = importlib.util.spec_from_file_location("bench_fold", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Stack


@pytest.mark.parametrize("order", ["".join(p) for p in itertools.permutations("FHW") if "".join(p) != "FHW"])
def test_order_folds_into_the_patch_conv_input(order):
    """The common order is applied to the conv's input latent (B = 2, so the batch/axis reshuffle is
    exercised), the conv emits tokens already in the PARO order: exact output, no layout permute on the
    conv output, zero gathers."""
    torch.manual_seed(0)
    model = _bench_fold_stack()(128, 2, 2, channels=4, text_dim=16).eval()
    inputs = {"latent": torch.randn(2, 3, 4, 8, 6), "text": torch.randn(2, 5, 16)}
    grid = TokenGrid(3, 4, 3, 5)
    gm, sites = capture(model, inputs)
    plan = make_plan(sites, grid, [order])
    with torch.no_grad():
        ref = model(**inputs)
    out, code, report = compile_and_run(model, inputs, plan)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    lowered = [s for s in report.sites if s.lowered]
    assert len(lowered) == 2 and report.gathers_left == 0
    assert all(s.permutation.startswith("folded:conv2d input") for s in lowered), report.summary()
    token_gathers(code)
    folded = next(p["after"] for p in report.passes if p["name"] == "fold_permutations")
    # the conv reads the rearranged latent; the only token-axis layout permute left is the unpatchify's inverse
    assert re.search(r"conv2d\((reshape\w*)", folded), folded
    assert folded.count("torch.unflatten(") == 1, folded


def test_conv_arguments_are_normalised_however_they_are_spelled():
    """``F.conv2d(x, w, b, 2)`` passes the stride as an int; the patch-conv rules read it as (2, 2)."""
    import torch.fx as fx

    from paro_compile.passes.fold import CONV2D_TARGETS, CONV3D_TARGETS, _sole_conv_args

    def patchify(x, w):
        return torch.conv2d(x, w, None, 2) + 0

    conv = next(n for n in fx.symbolic_trace(patchify).graph.nodes if n.target is torch.conv2d)
    _, _, bias, stride, padding, dilation, groups = _sole_conv_args(conv, CONV2D_TARGETS, 2)
    assert (bias, stride, padding, dilation, groups) == (None, (2, 2), (0, 0), (1, 1), 1)
    assert _sole_conv_args(conv, CONV3D_TARGETS, 3) is None  # another op
