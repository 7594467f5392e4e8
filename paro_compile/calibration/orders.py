"""Order choice: the token order of every head, from its per-order scores.

Scores per (order, head), averaged over the calibration calls (`statistics.SiteStatistics.scores`):
- block sparsity (the paper's): share of blocks in which >= sigma = 90 % of the entries are < eps = 1e-3;
- kept mass: share of the attention mass that a mask of the target density keeps (diagonal and text blocks
  included), the quantity the sparse kernel's error depends on;
- incoherence Ψ = max P / mean P per block, averaged over blocks (lower quantizes better).

``sparsity_metric`` picks the sparsity score: "mass" (kept mass, the default), "paper" (block sparsity) or "both"
(their mean). Each score is normalised over the candidate orders (sparsity / max, min Ψ / Ψ) and mixed:
``score = alpha · sparsity + (1 − alpha) · quantization``. Each head takes the best order; the model's own order
wins ties (within `TIE_TOLERANCE`), so a head that does not care keeps the layout that needs no permutation.

Another order also costs something (a kernel permutation or folded layout ops), so it must be worth it: the best order
replaces the model's own only when its gain over it (`order_gains`) exceeds ``min_order_gain``. The gain is measured
against what the model's order lacks: ``alpha · (S_o − S_nat) / (1 − S_nat) + (1 − alpha) · (1 − Ψ_o / Ψ_nat)``, i.e.
the share of the natural order's shortfall in the sparsity score (with "mass": the attention mass its mask drops)
that the order recovers, mixed with the relative reduction of Ψ. On a near-uniform map every order keeps about the
density's share of the mass, so a small absolute kept-mass gain recovers a tiny share of the dropped mass; on a local
head the same gain can be a large share of it.
Why alpha = 0.9 and the default ``min_order_gain``: docs/calibration.md, "Order choice and α".
"""
from __future__ import annotations

from typing import Optional

import torch

TIE_TOLERANCE = 1e-4


def sparsity_score(scores: dict[str, torch.Tensor], metric: str) -> torch.Tensor:
    """[O, H] sparsity score of ``metric`` ("mass", "paper" or "both") from the per-order scores."""
    if metric == "paper":
        return scores["block_sparsity"]
    if metric == "mass":
        return scores["kept_mass"]
    if metric == "both":
        return 0.5 * (scores["block_sparsity"] + scores["kept_mass"])
    raise ValueError(f"sparsity_metric must be 'mass', 'paper' or 'both', got {metric!r}")


def combined_scores(scores: dict[str, torch.Tensor], alpha: float, metric: str) -> torch.Tensor:
    """[O, H]: α · normalised sparsity + (1 − α) · normalised quantization score (higher is better)."""
    sparsity = sparsity_score(scores, metric)
    best_sparsity = sparsity.amax(0, keepdim=True)
    sparsity_norm = sparsity / best_sparsity.clamp_min(1e-12)
    sparsity_norm = torch.where(best_sparsity > 0, sparsity_norm, torch.ones_like(sparsity_norm))
    psi = scores["incoherence"].clamp_min(1e-12)
    quant_norm = psi.amin(0, keepdim=True) / psi
    return alpha * sparsity_norm + (1.0 - alpha) * quant_norm


def order_gains(scores: dict[str, torch.Tensor], alpha: float, metric: str, natural: int) -> torch.Tensor:
    """[O, H] gain of each order over the order at index ``natural``: α · the share of the natural order's sparsity
    shortfall (1 − S) it recovers + (1 − α) · its relative Ψ reduction. 0 for the natural order itself; 0 sparsity
    gain where the natural order has no shortfall."""
    sparsity = sparsity_score(scores, metric)
    shortfall = 1.0 - sparsity[natural]
    recovered = torch.where(shortfall > 1e-9, (sparsity - sparsity[natural]) / shortfall.clamp_min(1e-9),
                            torch.zeros_like(sparsity))
    psi = scores["incoherence"].clamp_min(1e-12)
    return alpha * recovered + (1.0 - alpha) * (1.0 - psi / psi[natural])


def best_orders(combined: torch.Tensor, orders: list[str], natural_order: Optional[str],
                gains: Optional[torch.Tensor] = None, min_gain: float = 0.0) -> list[str]:
    """Best of ``orders`` per head of ``combined`` [O, H]; ``natural_order`` when within `TIE_TOLERANCE` of the best,
    or when the best order's ``gains`` [O, H] (`order_gains`) over it do not exceed ``min_gain``."""
    best = combined.argmax(0)
    natural = orders.index(natural_order) if natural_order in orders else None
    chosen = []
    for h in range(combined.shape[1]):
        index = int(best[h])
        if natural is not None and combined[natural, h] >= combined[index, h] - TIE_TOLERANCE:
            index = natural
        if natural is not None and gains is not None and index != natural and float(gains[index, h]) <= min_gain:
            index = natural
        chosen.append(orders[index])
    return chosen
