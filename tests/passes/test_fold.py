"""Folding pass, driver (`passes/fold.py`): the common order chosen, folded end to end with exact outputs and zero
runtime gathers; what each site's kernel still applies; symbolic shapes."""
import itertools
import re

import pytest
import torch
from torch.utils._pytree import tree_map_only
import torch.nn as nn
import torch.nn.functional as F

import paro_compile
from paro_compile.grid import order_permutation
from tests.passes.fold_helpers import (
    EXACT, GRIDS, PartialStore, capture, compile_and_run, first, make, make_plan, orders_reach_the_kernel,
    token_gathers,
)


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
        assert all((s.folded_order, s.kernel_permutation) == (None, "none") for s in report.sites)
    else:  # the order is applied to the Conv3d patch embed's input and kernel (see fold_into_conv3d_input)
        assert all(s.permutation.startswith("folded:conv3d input(") for s in report.sites), report.summary()
        assert all((s.folded_order, s.kernel_permutation) == (order, "none") for s in report.sites)
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
    # partial folding, visible in the record: HWF went into the layout ops, each head's rest stays in the kernel
    assert all((s.folded_order, s.kernel_permutation) == ("HWF", "residual") for s in report.sites)
    assert all("folded=HWF kernel_perm=residual" in line for line in report.summary().splitlines()[1:])


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
    lowered = [s for s in report.sites if s.lowered and not s.cross_attention]  # cross-attention: no order
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
    assert [(s.folded_order, s.kernel_permutation) for s in report.sites] == [(None, "full")]


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
    sparse = torch.ones(1, 2, 3, 3, dtype=torch.bool)  # 16-token blocks: the 40-token grid has 3
    sparse[..., 1, 2] = False  # not dense (and neither a diagonal nor a text block): dropped with symbolic N
    plan = Plan({s.site_id: SitePlan.from_orders(s.site_id, (orders * 2)[:2], grid, block_size=16, block_masks=sparse)
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




@torch.no_grad()
@pytest.mark.parametrize("orders", [["HWF"], ["HWF", "WHF"]])
def test_symbolic_text_length_with_a_static_grid(orders):
    """Only the text length is symbolic (``mark_dynamic`` on the text): the grid is static but the sequence is
    not, so no [H, N] constant fits; the orders are folded as on a symbolic grid, one compilation serves every
    text length."""
    from paro_compile.plan import Plan, SitePlan
    from paro_compile.report import compile_reports
    from paro_compile.toy.dit import ToyVideoDiT, toy_inputs

    torch.manual_seed(0)
    model = ToyVideoDiT().eval()
    _, sites = capture(model, toy_inputs())
    plan = Plan({s.site_id: SitePlan.from_orders(s.site_id, (orders * 2)[:2], GRIDS["toy"])
                 for s in sites if s.supported})
    compiled = torch.compile(model, backend="paro", options={**EXACT, "plan": plan})
    for text_tokens in (5, 7, 9):
        inputs = toy_inputs(text_tokens=text_tokens)
        torch._dynamo.mark_dynamic(inputs["text"], 1)
        torch.testing.assert_close(compiled(**inputs), model(**inputs), rtol=1e-5, atol=1e-5)
    report = paro_compile.last_report()
    lowered = [s for s in report.sites if s.lowered]
    assert len(compile_reports) == 1 and len(lowered) == 2 and report.gathers_left == 0
    assert all(not isinstance(s.shape[2], int) for s in lowered), "expected a symbolic sequence length"
    assert [s.permutation for s in lowered] == ["kernel" if len(orders) > 1 else "folded:conv3d input(flatten_1)"] * 2


def test_the_config_switch_turns_folding_off():
    from paro_compile.config import ParoConfig
    from paro_compile.passes.fold import fold_permutations

    model, inputs = make("toy")
    gm, sites = capture(model, inputs)
    code = gm.code
    result = fold_permutations(gm, sites, make_plan(sites, GRIDS["toy"], ["HWF"]), ParoConfig(**EXACT, fold_permutations=False))
    assert gm.code == code and result.order is None and not result.kernel_perms
    assert result.reason == "fold_permutations=False"


def test_the_passes_never_specialize_a_symbolic_size():
    """Site discovery, layout inference and folding (with residuals computed in the graph) add no guard to the
    graph's ShapeEnv: reading or comparing a symbolic size the wrong way would make a dynamic graph static."""
    from paro_compile.config import ParoConfig
    from paro_compile.passes.discover import find_attention_sites
    from paro_compile.passes.fold import fold_permutations
    from paro_compile.passes.fx_utils import fake_value
    from paro_compile.passes.layout import infer_layouts
    from paro_compile.plan import Plan, SitePlan

    model, inputs = make("toy")
    gm, _ = capture(model, inputs, dynamic=True)
    latent = next(fake_value(n) for n in gm.graph.find_nodes(op="placeholder") if fake_value(n) is not None)
    shape_env = latent.fake_mode.shape_env
    guards = len(shape_env.guards)
    config = ParoConfig(**EXACT)
    sites = find_attention_sites(gm, config)
    assert all(layout.symbolic_grid() is not None for layout in infer_layouts(gm, sites).values())
    plan = Plan({s.site_id: SitePlan.from_orders(s.site_id, ["HWF", "WHF"], GRIDS["toy"]) for s in sites if s.supported})
    result = fold_permutations(gm, sites, plan, config)
    assert result.order == "HWF" and all(isinstance(p, torch.fx.Node) for p in result.kernel_perms.values())
    assert len(shape_env.guards) == guards


# ---------------------------------------------------------------------------------------------------
# dynamic=True with order plans on the diffusers video models

DYNAMIC_SIZES = {
    # (frames, height, width) of the latent; no size equals another input size at the first call (channels 4,
    # text 5, rotary tables): Dynamo gives equal sizes one symbol, and a later call where they differ recompiles
    "cogvideox": [(3, 12, 8), (2, 8, 16)],
    "cogvideox1.5": [(6, 12, 8), (4, 8, 16)],  # frames pair into patch_size_t=2
    "ltx": [(3, 6, 4), (2, 4, 8)],  # packed latent, grid sizes passed as ints
    "wan": [(3, 12, 8), (2, 8, 16)],
    # EasyAnimate's RoPE feeds latent sizes to torch.linspace, which specializes them: Dynamo compiles each
    # resolution anew with any backend (checked against a plain backend below)
    "easyanimate": [(3, 12, 8), (3, 16, 12)],
}


def plain_graph_count(model, inputs_at, sizes) -> int:
    """Graphs Dynamo compiles for ``sizes`` with ``dynamic=True`` and a backend that changes nothing."""
    graphs = []

    def backend(gm, example_inputs, **kwargs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=backend, dynamic=True)
    with torch.no_grad():
        for size in sizes:
            compiled(**inputs_at(*size))
    torch._dynamo.reset()
    return len(graphs)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DYNAMIC_SIZES))
def test_mixed_order_plans_with_dynamic_shapes_on_video_models(name):
    """One dynamic compile serves two resolutions: per call, the query reaching each kernel is the model's query
    in each head's plan order on that call's grid (common order folded into layout ops, per-head residual in the
    kernel, computed in the graph), the output equals eager, and the passes add no guard."""
    from tests.passes.video_models import VIDEO_MODELS

    model, inputs_at, grid_at = VIDEO_MODELS[name]()
    sizes = DYNAMIC_SIZES[name]
    graphs, reports, guards = orders_reach_the_kernel(model, inputs_at, grid_at, ["HWF", "WHF"], sizes)
    expected_graphs = plain_graph_count(model, inputs_at, sizes) if name == "easyanimate" else 1
    assert graphs == expected_graphs and guards == [0] * graphs
    for report in reports:
        lowered = report.lowered
        assert lowered and report.gathers_left == 0, report.summary()
        for site in lowered:
            assert any(not isinstance(size, int) for size in site.shape), "expected symbolic sizes"
            expected = ("identity", None, "none") if site.cross_attention else ("kernel", "HWF", "residual")
            assert (site.permutation, site.folded_order, site.kernel_permutation) == expected


@pytest.mark.slow
@pytest.mark.parametrize("name,orders,expected", [
    ("ltx", ["WFH"], ("folded:", "WFH", "none")),  # every head shares the order: nothing left for the kernel
    ("wan", ["FHW", "WFH"], ("kernel", None, "full")),  # tie with the model order: nothing folded
])
def test_dynamic_order_plans_fold_fully_or_not_at_all(name, orders, expected):
    from tests.passes.video_models import VIDEO_MODELS

    model, inputs_at, grid_at = VIDEO_MODELS[name]()
    graphs, reports, _ = orders_reach_the_kernel(model, inputs_at, grid_at, orders, DYNAMIC_SIZES[name])
    assert graphs == 1
    for site in (s for s in reports[0].lowered if not s.cross_attention):
        assert site.permutation.startswith(expected[0]), reports[0].summary()
        assert (site.folded_order, site.kernel_permutation) == expected[1:]


def on_device(value, device: str):
    """``value`` (tensors in tuples, lists and dicts) with every tensor moved to ``device``."""
    return tree_map_only(torch.Tensor, lambda t: t.to(device), value)


@torch.no_grad()
@pytest.mark.slow
@pytest.mark.parametrize("name", ["cogvideox", "ltx"])
def test_dynamic_video_models_through_inductor(name, device):
    """backend="paro" end to end (Inductor) with dynamic=True and a mixed-order plan: two resolutions, no
    recompilation after the first, output equal to eager."""
    from paro_compile.plan import Plan, SitePlan
    from paro_compile.report import compile_reports
    from tests.passes.video_models import VIDEO_MODELS

    model, inputs_at, grid_at = VIDEO_MODELS[name]()
    model = model.to(device)
    first_size, second_size = DYNAMIC_SIZES[name]
    _, sites = capture(model, on_device(inputs_at(*first_size), device))
    plan = Plan({s.site_id: SitePlan.from_orders(s.site_id, ["HWF", "WHF"], grid_at(*first_size))
                 for s in sites if s.supported})
    compiled = torch.compile(model, backend="paro", dynamic=True, options={**EXACT, "plan": plan})
    for i, size in enumerate((first_size, second_size)):
        inputs = on_device(inputs_at(*size), device)
        torch.testing.assert_close(first(compiled(**inputs)), first(model(**inputs)), rtol=1e-4, atol=1e-4)
        if i == 0:
            reports_after_first_call = len(compile_reports)
    assert len(compile_reports) == reports_after_first_call, "recompiled for the second resolution"
    lowered = [s for s in paro_compile.last_report().lowered if not s.cross_attention]
    assert lowered and all(s.kernel_permutation == "residual" and s.folded_order == "HWF" for s in lowered)


def test_dynamic_unfoldable_region_keeps_the_whole_order_in_the_kernel():
    """Where the region cannot be folded on symbolic shapes, every site still gets its whole per-head order,
    computed in the graph from the grid layout inference finds for it."""
    from tests.passes.video_models import toy

    model, inputs_at, grid_at = toy(model=PartialStore())
    sizes = [(3, 12, 8), (2, 8, 16)]
    graphs, reports, guards = orders_reach_the_kernel(model, inputs_at, grid_at, ["HWF", "WHF"], sizes)
    assert graphs == 1 and guards == [0]
    lowered = reports[0].lowered
    assert len(lowered) == 2
    assert all((s.permutation, s.folded_order, s.kernel_permutation) == ("kernel", None, "full") for s in lowered)


@torch.no_grad()
def test_dynamic_orders_that_miss_a_grid_axis_stay_on_sdpa_with_the_reason():
    from paro_compile.grid import TokenGrid
    from paro_compile.plan import Plan, SitePlan
    from tests.passes.video_models import toy

    model, inputs_at, _ = toy()
    _, sites = capture(model, inputs_at(3, 12, 8))
    image_grid = TokenGrid(None, 6, 12, 5)  # as many tokens as the video's 3×6×4, but no frame axis
    plan = Plan({s.site_id: SitePlan.from_orders(s.site_id, ["WH", "HW"], image_grid) for s in sites if s.supported})
    compiled = torch.compile(model, backend="paro", dynamic=True, options={**EXACT, "plan": plan})
    inputs = inputs_at(3, 12, 8)
    torch.testing.assert_close(compiled(**inputs), model(**inputs), rtol=1e-5, atol=1e-5)
    report = paro_compile.last_report()
    assert report.sites and not report.lowered
    for site in report.sites:
        assert any("do not name the graph's grid axes 'FHW'" in r and "kept on SDPA" in r for r in site.reasons), site
    torch._dynamo.reset()
    strict = torch.compile(model, backend="paro", dynamic=True, options={**EXACT, "plan": plan, "fallback": "error"})
    with pytest.raises(Exception, match="cannot use their plan"):
        strict(**inputs)


@torch.no_grad()
def test_dynamic_flat_tokens_without_a_graph_grid_stay_on_sdpa():
    """Flat input tokens: the plan's grid has static sizes, which say nothing of a symbolic sequence, and no
    layout op forms the tokens: the site keeps SDPA and its record says why."""
    model = FlatTokens().eval()
    x = torch.randn(1, 40, 32)
    _, sites = capture(model, {"x": x})
    plan = make_plan(sites, GRIDS["toy"], ["HWF", "WHF"])
    compiled = torch.compile(model, backend="paro", dynamic=True, options={**EXACT, "plan": plan})
    for n in (40, 60):
        x = torch.randn(1, n, 32)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    (site,) = paro_compile.last_report().sites
    assert not site.lowered and any("no layout op forms this site's tokens" in r for r in site.reasons), site.reasons


def test_partial_folding_is_shown_in_every_report_view():
    """``folded_order`` and ``kernel_permutation`` reach the summary, the JSON, the site table and the HTML."""
    from paro_compile.inspection import SCHEMA_VERSION, SITE_COLUMNS, InspectionReport
    from paro_compile.passes.fold import FoldResult, describe_permutations
    from paro_compile.report import CompileReport, SiteRecord

    report = CompileReport(graph_index=0)
    report.sites = [SiteRecord(f"blocks.{i}.attn#0", (1, 2, 40, 64), "float32", True, qk_bits=16, pv_dtype="fp16",
                               permutation="kernel" if i < 3 else "identity") for i in range(4)]
    report.sites.append(SiteRecord("blocks.4.attn#0", (1, 2, 40, 32), "float32", False, reasons=["head_dim 32"]))
    result = FoldResult(sources=["conv3d input(flatten_1)"])
    result.set_site("blocks.0.attn#0", torch.zeros(2, 40, dtype=torch.long), "residual", "HWF")
    result.set_site("blocks.1.attn#0", None, "none", "HWF")
    describe_permutations(report.sites, result)  # blocks.2 (not folded, plan perm in the kernel) and blocks.3: as lowered
    expected = [("kernel", "HWF", "residual"), ("folded:conv3d input(flatten_1)", "HWF", "none"),
                ("kernel", None, "full"), ("identity", None, "none")]
    assert [(s.permutation, s.folded_order, s.kernel_permutation) for s in report.sites[:4]] == expected
    lines = report.summary().splitlines()
    assert "folded=HWF kernel_perm=residual" in lines[1] and "folded=HWF" in lines[2] and "kernel_perm" not in lines[2]
    assert "kernel_perm=full" in lines[3] and "folded=" not in lines[3] and "SDPA: head_dim 32" in lines[5]
    with pytest.raises(ValueError, match="kernel permutation"):
        result.set_site("blocks.0.attn#0", None, "partial", "HWF")

    inspection = InspectionReport([report])
    data = inspection.to_dict()
    assert data["schema_version"] == SCHEMA_VERSION == 2
    sites = data["graphs"][0]["sites"]
    assert [(d["folded_order"], d["kernel_permutation"]) for d in sites[:4]] == [e[1:] for e in expected]
    assert {"folded order", "kernel perm"} <= set(SITE_COLUMNS)
    text = inspection.to_text(width=300)
    row = next(line for line in text.splitlines() if "blocks.0.attn#0" in line)
    assert "HWF" in row and "residual" in row
    html = inspection.to_html()
    assert "<th>folded order</th><th>kernel perm</th>" in html and "<td>HWF</td><td>residual</td>" in html
