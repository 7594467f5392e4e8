"""The context-parallel pass on its own: digit tracking through reshapes, reading heads from an exchange's layout,
the heads option, and plan rows of some heads (no process group needed)."""
import pytest
import torch

from paro_compile.calibration.masks import mandatory_blocks
from paro_compile.grid import TokenGrid
from paro_compile.parallel import select_heads, select_plan_heads
from paro_compile.passes.context_parallel import (
    PEER, Exchange, Factor, LayoutError, OperandLayout, read_ulysses_heads, regroup, resolve_heads_option,
    source_layout, _token_order_problem,
)
from paro_compile.plan import Plan, SitePlan


def test_regroup_splits_and_merges_digits():
    layout = source_layout((2, 12, 6))
    split = regroup(layout, (2, 3, 4, 6))
    assert split[1] == [Factor(("dim", 1), 4, 3)] and split[2] == [Factor(("dim", 1), 1, 4)]
    merged = regroup(split, (6, 4, 6))
    assert merged[0] == [Factor(("dim", 0), 1, 2), Factor(("dim", 1), 4, 3)]
    assert regroup(layout, (144,)) == [[Factor(("dim", 0), 1, 2), Factor(("dim", 1), 1, 12), Factor(("dim", 2), 1, 6)]]
    with pytest.raises(LayoutError):
        regroup(source_layout((6, 4)), (4, 6))  # a 6 cannot be cut into a 4
    with pytest.raises(LayoutError):
        regroup(layout, (2, 12, 7))


def _exchanged_q(source_shape, send_permute, send_shape, world):
    """q's layout after diffusers-style code: source [B, S, H, D] → reshape(send_shape) → permute → all-to-all →
    [U, S, B, H/U, D] → flatten(0, 1) → permute to [B, H/U, N, D]."""
    layout = regroup(source_layout(source_shape), send_shape)
    layout = [layout[d] for d in send_permute]
    flat = regroup(layout, (int(torch.tensor(source_shape).prod()),))[0]
    routed, rest = flat[0].split(world) if flat[0].size != world else (flat[0], None)
    received = [Factor(PEER, 1, world)] + ([rest] if rest else []) + flat[1:]
    b, s, h, d = source_shape
    after = regroup([received], (world, s, b, h // world, d))
    after = regroup(after, (world * s, b, h // world, d))
    after = [after[1], after[2], after[0], after[3]]
    return OperandLayout(None, source_shape, after, [Exchange(None, "0", world, routed)])


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_contiguous_and_strided_heads(rank):
    contiguous = _exchanged_q((1, 8, 6, 4), (2, 1, 0, 3, 4), (1, 8, 3, 2, 4), 3)
    assert read_ulysses_heads(contiguous, rank) == ((2 * rank, 2 * rank + 1), 6)
    strided = _exchanged_q((1, 8, 6, 4), (3, 1, 0, 2, 4), (1, 8, 2, 3, 4), 3)
    assert read_ulysses_heads(strided, rank) == ((rank, rank + 3), 6)


def test_exchange_by_tokens_is_not_read_as_heads():
    # routing by the token axis (sequence parallel the other way round) gives SDPA no head digits from the exchange
    layout = _exchanged_q((1, 8, 6, 4), (2, 1, 0, 3, 4), (1, 8, 3, 2, 4), 3)
    layout.exchanges[0].routed_by = Factor(("dim", 1), 4, 2)
    with pytest.raises(LayoutError, match="head axis"):
        read_ulysses_heads(layout, 0)


def test_heads_option_forms_and_errors():
    assert resolve_heads_option((2, 4), "s", 2) == (2, 3)
    assert resolve_heads_option([5, 1], "s", 2) == (5, 1)
    assert resolve_heads_option(lambda sid, n: (n, 2 * n), "s", 2) == (2, 3)
    assert resolve_heads_option(lambda sid, n: None, "s", 2) is None
    assert resolve_heads_option(None, "s", 2) is None
    with pytest.raises(ValueError, match="has 3"):
        resolve_heads_option((0, 2), "s", 3)
    with pytest.raises(ValueError, match="distinct"):
        resolve_heads_option([1, 1], "s", 2)
    with pytest.raises(ValueError, match="tuple is"):
        resolve_heads_option((0, 1, 2), "s", 3)
    with pytest.raises(ValueError, match="expected"):
        resolve_heads_option("0:2", "s", 2)


def _site(heads=4, text=0):
    grid = TokenGrid(frames=2, height=4, width=4, text_tokens=text)
    nb = -(-grid.num_tokens // 16)
    masks = torch.rand(2, heads, nb, nb, generator=torch.Generator().manual_seed(0)) < 0.5
    masks |= mandatory_blocks(grid, 16)
    site = SitePlan.from_orders("a#0", ["FHW", "HWF", "WFH", "HFW"][:heads], grid, block_size=16, block_masks=masks)
    site.empty_heads = [1, 3]
    site.stats = {"density": [0.5, 0.5], "kept_mass": [0.9, 0.8],
                  "kept_mass_per_head": [[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]],
                  "natural_kept_mass_per_head": [[1, 2, 3, 4], [5, 6, 7, 8]],
                  "scores": {"incoherence": [10, 20, 30, 40]}, "calls": 3}
    return site


def test_select_heads_takes_every_per_head_field():
    site = _site()
    part = select_heads(site, [3, 1])
    assert part.heads == 2 and part.orders == ["HFW", "HWF"]
    assert torch.equal(part.perm, site.perm[[3, 1]])
    assert torch.equal(part.block_masks, site.block_masks[:, [3, 1]])
    assert part.empty_heads == [0, 1]
    assert part.stats["kept_mass_per_head"] == [[0.4, 0.2], [0.8, 0.6]]
    assert part.stats["natural_kept_mass_per_head"] == [[4, 2], [8, 6]]
    assert part.stats["scores"] == {"incoherence": [40, 20]}
    assert part.stats["kept_mass"] == pytest.approx([0.3, 0.7])
    assert part.stats["density"] == [float(site.block_masks[b][[3, 1]].float().mean()) for b in range(2)]
    assert part.stats["heads"] == [3, 1] and part.stats["calls"] == 3
    with pytest.raises(ValueError, match="distinct"):
        select_heads(site, [0, 4])


def test_select_plan_heads_keeps_other_sites_and_plan_fields():
    other = _site()
    other.site_id = "b#0"
    plan = Plan(sites={"a#0": _site(), "b#0": other}, step_boundaries=[500.0], fingerprint="f", density=0.5,
                meta={"calls": 3})
    local = select_plan_heads(plan, {"a#0": [2, 3]})
    assert local.sites["a#0"].heads == 2 and local.sites["b#0"] is other
    assert local.step_boundaries == [500.0] and local.fingerprint == "f" and local.meta == {"calls": 3}


def test_token_order_is_checked_from_the_plan_grid():
    assert _token_order_problem(_site()) == ""
    assert "joint sequence" in _token_order_problem(_site(text=8))
    stored = _site()
    stored.grid = None
    assert "no token grid" in _token_order_problem(stored)


def test_heads_option_without_an_exchange_in_the_graph():
    """An engine whose exchange is not in the graph: the site shows H/U heads, the option names them."""
    pytest.importorskip("diffusers")
    import paro_compile
    from tests.parallel import cp_workers as cw

    site = "blocks.0.attn1#0"
    wide = cw.wan_plan({site: ["FHW", "HWF", "WFH", "HFW", "HWF", "FWH", "WHF", "FHW"]})  # a model of 8 heads
    model, inputs = cw.tiny_wan()  # holds 4 of them
    with torch.no_grad():
        stated = torch.compile(model, backend=cw.paro_passes({**cw.EXACT, "plan": wide, "heads": (4, 8)}))(**inputs)[0]
        report = paro_compile.last_report()
        torch._dynamo.reset()
        rows = select_plan_heads(wide, {site: [4, 5, 6, 7]})
        expected = torch.compile(model, backend=cw.paro_passes({**cw.EXACT, "plan": rows}))(**inputs)[0]
        torch._dynamo.reset()
        with pytest.raises(Exception, match="its graph has 4"):
            torch.compile(model, backend=cw.paro_passes({**cw.EXACT, "plan": wide, "heads": (0, 2)}))(**inputs)
    assert report.context_parallel == [f"{site}: heads [4, 8) (option)"]
    assert torch.equal(stated, expected)
