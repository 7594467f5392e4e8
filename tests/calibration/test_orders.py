"""Order choice: the structured heads get their local orders; normalisation, the α mix and tie handling."""
import pytest
import torch

from paro_compile.calibration import calibrate_site
from paro_compile.calibration.masks import mandatory_blocks
from paro_compile.calibration.orders import TIE_TOLERANCE, best_orders, combined_scores
from paro_compile.grid import TokenGrid, order_permutation
from tests.bench_helpers import load_benchmark
from tests.calibration.calibration_helpers import BLOCK, GOOD_ORDERS, GRID


def test_orders_and_masks_on_structured_heads(qk):
    q, k = qk
    # Orders by score alone: head 2's local order keeps the same mass as the model's and wins on Ψ only, which the
    # default min_order_gain does not pay a permutation for (tests/calibration/test_order_gain.py).
    site = calibrate_site(q, k, GRID, density=0.2, block_size=BLOCK, min_order_gain=0.0)
    for h, order in enumerate(site.orders):
        assert order in GOOD_ORDERS[h], (h, order)
    kept = site.stats["kept_mass_per_head"][0]
    natural = site.stats["natural_kept_mass_per_head"][0]
    assert min(kept) >= 0.9, kept
    assert natural[1] < 0.5, natural  # the model's order scatters head 1 over every frame's block
    assert site.density() == pytest.approx(0.2, abs=0.01)
    assert torch.equal(site.perm[1], order_permutation(GRID, site.orders[1]))
    # Diagonal and text blocks are always kept.
    mandatory = mandatory_blocks(GRID, BLOCK)
    assert bool(site.block_masks[0][:, mandatory].all())


def test_combined_scores_normalise_each_score_over_the_candidates():
    scores = {"kept_mass": torch.tensor([[0.8, 0.0], [0.4, 0.0]], dtype=torch.float64),
              "block_sparsity": torch.tensor([[0.2, 0.5], [0.6, 0.5]], dtype=torch.float64),
              "incoherence": torch.tensor([[10.0, 4.0], [20.0, 2.0]], dtype=torch.float64)}
    sparsity_only = combined_scores(scores, 1.0, "mass")
    torch.testing.assert_close(sparsity_only[:, 0], torch.tensor([1.0, 0.5], dtype=torch.float64))
    assert sparsity_only[:, 1].tolist() == [1.0, 1.0]  # no order keeps anything: all equal, not NaN
    quantization_only = combined_scores(scores, 0.0, "mass")
    torch.testing.assert_close(quantization_only, torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=torch.float64))
    both = combined_scores(scores, 1.0, "both")
    torch.testing.assert_close(both[:, 0], torch.tensor([0.5 / 0.5, 0.5 / 0.5], dtype=torch.float64))
    torch.testing.assert_close(combined_scores(scores, 0.25, "paper"),
                               0.25 * combined_scores(scores, 1.0, "paper") + 0.75 * quantization_only)
    with pytest.raises(ValueError, match="sparsity_metric"):
        combined_scores(scores, 0.5, "entropy")


def test_best_orders_prefer_the_model_order_on_ties():
    orders = ["HWF", "FHW"]  # the model's (natural) order is the second candidate
    near_tie = 1.0 - TIE_TOLERANCE / 2
    combined = torch.tensor([[1.0, 1.0, 0.2], [near_tie, 0.5, 0.9]], dtype=torch.float64)
    assert best_orders(combined, orders, "FHW") == ["FHW", "HWF", "FHW"]
    assert best_orders(combined, orders, None) == ["HWF", "HWF", "FHW"]  # no natural candidate: the argmax


def test_alpha_sweep_regret_vanishes_at_its_ends():
    """benchmarks/alpha_sweep.py on a few small heads: α = 1 picks the best kept mass, α = 0 the best Ψ (up to the
    tie tolerance toward the model's order)."""
    sweep = load_benchmark("alpha_sweep").sweep
    results = sweep(4, seed=2, grid=TokenGrid(frames=2, height=8, width=8, text_tokens=8), alphas=(0.0, 0.9, 1.0),
                    settings=((0.5, 2.0),), block_size=16)
    assert set(results) == {(metric, alpha) for metric in ("both", "paper", "mass") for alpha in (0.0, 0.9, 1.0)}
    assert results[("mass", 1.0)]["regret_worst"] <= TIE_TOLERANCE
    assert results[("mass", 0.0)]["psi_ratio_worst"] <= 1.0 + 2 * TIE_TOLERANCE
    for r in results.values():
        assert r["regret_mean"] >= 0.0 and r["psi_ratio_mean"] >= 1.0 - 1e-9
