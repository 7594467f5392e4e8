"""Head load balance over Ulysses ranks: a static head order per site, applied by reordering the heads of the
attention weights and of the plan."""
import pytest
import torch

from paro_compile.parallel import (
    apply_head_order, balance_heads, balance_plan, balanced_head_order, head_costs, imbalance, permute_attention_heads,
    rank_loads,
)
from tests.parallel import cp_workers as cw


def test_rank_loads_follow_the_order():
    costs = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert rank_loads(costs, [0, 1, 2, 3], 2).tolist() == [[7.0, 3.0]]
    assert rank_loads(costs, [0, 3, 1, 2], 2).tolist() == [[5.0, 5.0]]
    assert imbalance(costs, [0, 1, 2, 3], 2) == pytest.approx(0.4)
    assert imbalance(costs, [0, 3, 1, 2], 2) == 0.0


@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("seed", range(4))
def test_balanced_order_within_three_percent_on_uneven_heads(world, seed):
    """40 heads (Wan's), two step buckets, kept blocks spread as site/global allocation spreads them (up to 6x)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.rand(40, generator=generator) * 5 + 1
    costs = torch.stack([base * 1000, (base * (0.8 + 0.4 * torch.rand(40, generator=generator))) * 1000]).round()
    order = balanced_head_order(costs, world)
    assert sorted(order) == list(range(40))
    assert imbalance(costs, order, world) <= 0.03
    assert imbalance(costs, order, world) <= imbalance(costs, list(range(40)), world)


def test_balanced_order_keeps_an_even_model_order():
    costs = torch.ones(2, 8)
    assert balanced_head_order(costs, 2) == list(range(8))


def test_uneven_head_split_is_refused():
    with pytest.raises(ValueError, match="do not split"):
        balanced_head_order(torch.ones(1, 6), 4)


@torch.no_grad()
def test_permuted_heads_compute_the_same_attention():
    pytest.importorskip("diffusers")
    model, inputs = cw.tiny_wan()
    reference = model(**inputs)[0]
    attn = model.get_submodule("blocks.0.attn1")
    weights = attn.to_q.weight.clone()
    permute_attention_heads(attn, [2, 0, 3, 1], cw.WAN_HEADS)
    assert torch.equal(attn.to_q.weight[:64], weights[128:192])
    torch.testing.assert_close(model(**inputs)[0], reference, rtol=1e-5, atol=1e-6)


def test_fused_projections_are_refused():
    pytest.importorskip("diffusers")
    model, _ = cw.tiny_wan()
    attn = model.get_submodule("blocks.0.attn1")
    attn.fuse_projections()
    with pytest.raises(ValueError, match="unfuse_projections"):
        permute_attention_heads(attn, [1, 0, 2, 3], cw.WAN_HEADS)


def test_balance_heads_reorders_model_and_plan_together(tmp_path):
    pytest.importorskip("diffusers")
    from paro_compile.plan import Plan

    site = "blocks.0.attn1#0"
    plan = cw.wan_plan({site: ["FHW", "HWF", "WFH", "HFW"]}, density=[0.9, 0.73, 0.22, 0.44])
    assert imbalance(head_costs(plan.sites[site]), range(4), 2) > 0.03
    model, _ = cw.tiny_wan()
    original = model.get_submodule("blocks.0.attn1").to_k.weight.clone()
    balanced = balance_heads(model, plan, 2)
    order = balanced.meta["head_order"][site]
    assert imbalance(head_costs(balanced.sites[site]), range(4), 2) <= 0.03
    assert balanced.sites[site].orders == [plan.sites[site].orders[h] for h in order]
    assert torch.equal(balanced.sites[site].block_masks, plan.sites[site].block_masks[:, order])
    assert torch.equal(model.get_submodule("blocks.0.attn1").to_k.weight[:64], original[64 * order[0]:64 * order[0] + 64])
    # a saved balanced plan and apply_head_order on the original weights give the same model
    balanced.save(tmp_path / "balanced.paro.safetensors")
    loaded = Plan.load(tmp_path / "balanced.paro.safetensors")
    fresh, _ = cw.tiny_wan()
    apply_head_order(fresh, loaded)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    # balancing a balanced plan again changes nothing
    again, orders = balance_plan(balanced, 2)
    assert orders == {} and again.meta["head_order"] == balanced.meta["head_order"]


def test_cp_benchmark_plan_has_mixed_orders_and_the_mean_density():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import bench_cp

    args = bench_cp.parse_args(["--heads", "8", "--grid", "8,32,32", "--out", "unused"])
    site = bench_cp.build_plan(args)
    assert site.heads == 8 and len(set(site.orders)) == 6
    assert abs(site.density() - args.density) < 0.03  # the kept diagonal adds 1/128
    costs = head_costs(site)
    assert imbalance(costs, range(8), 2) > imbalance(costs, balanced_head_order(costs, 2), 2)


def test_ring_fragmentation_counts_shards():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from ring_fragmentation import shards_per_block

    from paro_compile.grid import TokenGrid, order_permutation

    grid = TokenGrid(frames=4, height=4, width=4)
    assert shards_per_block(order_permutation(grid, "FHW"), 2, 16).tolist() == [1, 1, 1, 1]
    assert shards_per_block(order_permutation(grid, "HWF"), 2, 16).tolist() == [2, 2, 2, 2]


@pytest.mark.slow
def test_cp_benchmark_runs_and_matches_one_process_on_cpu(tmp_path):
    """`bench_cp.py --device cpu`: the benchmark's exchange, plan rows and head orders on gloo, every rank's output
    against one process's (what the GPU run also checks before it times)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import bench_cp

    results = bench_cp.main(["--device", "cpu", "--world", "2", "--heads", "4", "--grid", "2,8,8", "--head-dim", "64",
                             "--iters", "2", "--rep-ms", "5", "--out", str(tmp_path)])
    rows = {row["order"]: row for row in results["rows"] if row["gpus"] == 2}
    assert set(rows) == {"model", "balanced"}
    for row in rows.values():
        assert row["max_abs_diff_vs_one_process"] == 0.0, row
        assert row["layer_ms"] > 0 and row["all_to_all_ms"] > 0 and len(row["kernel_ms"]) == 2
    assert [m["gpus"] for m in results["model"]] == [2, 4]
    assert (tmp_path / "cp_wan720.md").exists()
