"""An order other than the model's own only for a gain worth its cost (`min_order_gain`): uniform and near-uniform maps
keep the natural order, clearly local heads still get theirs."""
import pytest
import torch

from paro_compile.calibration import CalibrationOptionError, CalibrationOptions, calibrate_site
from paro_compile.calibration.options import DEFAULT_MIN_ORDER_GAIN
from paro_compile.calibration.orders import best_orders, order_gains
from paro_compile.calibration.statistics import SiteStatistics
from tests.bench_helpers import load_benchmark
from tests.calibration.calibration_helpers import BLOCK, GRID

sweep_module = load_benchmark("order_gain_sweep")


def statistics(q, k, **options):
    stats = SiteStatistics(GRID, q.shape[1], CalibrationOptions(density=0.2, block_size=BLOCK, qk_outlier_error=None,
                                                                **options))
    stats.update(q, k)
    return stats


def test_order_gains_are_the_recovered_share_of_the_natural_orders_shortfall():
    scores = {"kept_mass": torch.tensor([[0.20, 0.90, 1.0], [0.21, 0.95, 1.0]], dtype=torch.float64),
              "block_sparsity": torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]], dtype=torch.float64),
              "incoherence": torch.tensor([[4.0, 4.0, 4.0], [4.0, 4.0, 2.0]], dtype=torch.float64)}
    mass_only = order_gains(scores, 1.0, "mass", natural=0)
    # +0.01 kept mass on a near-uniform head recovers 1.25 % of the dropped mass; +0.05 on a local head recovers half.
    torch.testing.assert_close(mass_only[1], torch.tensor([0.01 / 0.80, 0.05 / 0.10, 0.0], dtype=torch.float64))
    assert mass_only[0].tolist() == [0.0, 0.0, 0.0]  # the natural order gains nothing over itself
    mixed = order_gains(scores, 0.9, "mass", natural=0)
    assert mixed[1, 2].item() == pytest.approx(0.1 * (1 - 2.0 / 4.0))  # no shortfall to recover: Ψ alone
    orders = ["FHW", "HWF"]
    combined = torch.tensor([[0.95, 0.5, 0.5], [1.0, 1.0, 1.0]], dtype=torch.float64)
    assert best_orders(combined, orders, "FHW", mass_only, 0.0) == ["HWF", "HWF", "FHW"]
    assert best_orders(combined, orders, "FHW", mass_only, 0.02) == ["FHW", "HWF", "FHW"]
    assert best_orders(combined, orders, "FHW", mass_only, 0.5) == ["FHW", "FHW", "FHW"]  # must exceed the threshold


def test_uniform_and_near_uniform_maps_keep_the_model_order():
    gen = torch.Generator().manual_seed(0)
    zeros = torch.zeros(1, 4, GRID.num_tokens, 64)
    assert set(statistics(zeros, zeros).choose_orders()) == {"FHW"}
    q, k = (torch.randn(1, 8, GRID.num_tokens, 64, generator=gen) for _ in range(2))  # logits of std 1, no structure
    noisy = statistics(q, k)
    assert set(noisy.choose_orders()) == {"FHW"}
    assert set(noisy.choose_orders(min_gain=0.0)) != {"FHW"}  # without the threshold noise moves heads off it
    assert float(noisy.order_gains().amax()) < DEFAULT_MIN_ORDER_GAIN / 2


def test_clearly_local_heads_still_get_their_order(qk):
    q, k = qk
    site = calibrate_site(q, k, GRID, density=0.2, block_size=BLOCK)
    # Head 1 attends across frames at a fixed (h, w): the model's order keeps 36 % of its mass, HWF / WHF all of it.
    assert site.orders[1] in {"HWF", "WHF"} and site.stats["order_gain_per_head"][1] > 0.9
    assert site.stats["natural_kept_mass_per_head"][0][1] < 0.5 <= 0.99 <= site.stats["kept_mass_per_head"][0][1]
    # Heads 0, 2, 3 are local within a frame: the model's order keeps all their mass; head 2's local order FWH would
    # only lower Ψ slightly (gain < min_order_gain), so it stays on FHW.
    assert [site.orders[h] for h in (0, 2, 3)] == ["FHW", "FHW", "FHW"]
    assert calibrate_site(q, k, GRID, density=0.2, block_size=BLOCK, min_order_gain=0.0).orders[2] == "FWH"


def test_min_order_gain_is_a_validated_option():
    assert CalibrationOptions().min_order_gain == DEFAULT_MIN_ORDER_GAIN
    for bad in (-0.1, 1.5, "high"):
        with pytest.raises(CalibrationOptionError, match="min_order_gain"):
            CalibrationOptions(min_order_gain=bad)


def test_order_gain_sweep_runs_and_separates_uniform_from_local_heads():
    """benchmarks/order_gain_sweep.py at a small size: uniform maps never leave the model's order; structured heads do
    at the default threshold; raising the threshold never moves more heads."""
    from paro_compile.grid import TokenGrid

    results = sweep_module.sweep(6, seed=2, grid=TokenGrid(frames=4, height=8, width=8, text_tokens=8), block_size=16,
                                 thresholds=(0.0, DEFAULT_MIN_ORDER_GAIN, 0.2), small_heads=3)
    rows = {(r["family"], r["min_order_gain"]): r for r in results["thresholds"]}
    assert all(r["off_natural"] == 0.0 for (family, _), r in rows.items() if family == "uniform")
    assert rows[("local", DEFAULT_MIN_ORDER_GAIN)]["off_natural"] > 0.3
    for family in {f for f, _ in rows}:
        moved = [rows[(family, t)]["off_natural"] for t in (0.0, DEFAULT_MIN_ORDER_GAIN, 0.2)]
        assert moved == sorted(moved, reverse=True), (family, moved)
    gains = {r["family"]: r for r in results["gains"]}
    assert gains["uniform"]["gain_max"] == 0.0 and gains["local"]["gain_max"] > 10 * DEFAULT_MIN_ORDER_GAIN
