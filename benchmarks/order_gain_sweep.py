"""The experiment behind calibration's default ``min_order_gain``: how often each threshold moves a head off the
model's own token order, and what that costs in kept mass, on synthetic heads of four families.

- ``uniform``: q = k = 0, every map exactly uniform;
- ``random σ``: unstructured Gaussian q, k with attention logits of standard deviation σ (0.5, 1, 2);
- ``faint``: `alpha_sweep.synthetic_qk` heads with per-axis locality weights log-uniform in [0.01, 0.1] and noise
  (near-uniform maps with a faint positional structure);
- ``local``: the heads of benchmarks/alpha_sweep.py (weights log-uniform in [0.03, 10]) in its three (noise,
  temperature) settings.

Same grid (8×16×16 video + 32 text tokens), density (0.2), block (64) and α (0.9, "mass") as the α sweep. Per family
it reports the gain (`paro_compile.calibration.orders.order_gains`) of the best order over the model's own (max, 95th
percentile, median over heads) and, per threshold, the share of heads that leave the model's order, their kept-mass
gain over it, and the kept-mass regret (best candidate's kept mass − chosen order's), mean and worst. The table and its
reading are in docs/calibration.md ("Order choice and α").

    python benchmarks/order_gain_sweep.py [--heads 48] [--seed 1] [--out DIR]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Iterable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from alpha_sweep import SETTINGS, SWEEP_GRID, random_heads, synthetic_qk  # noqa: E402
from paro_compile.calibration.options import CalibrationOptions  # noqa: E402
from paro_compile.calibration.statistics import SiteStatistics  # noqa: E402
from paro_compile.grid import TokenGrid  # noqa: E402

THRESHOLDS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)
RANDOM_SIGMAS = (0.5, 1.0, 2.0)
DIM = 64


def gaussian_qk(grid: TokenGrid, heads: int, sigma: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unstructured q, k [1, H, N, 64] whose logits q·k/√64 have standard deviation ``sigma``."""
    gen = torch.Generator().manual_seed(seed)
    std = math.sqrt(sigma)  # var(q·k / √D) = D · std⁴ / D = std⁴
    shape = (1, heads, grid.num_tokens, DIM)
    return torch.randn(shape, generator=gen) * std, torch.randn(shape, generator=gen) * std


def faint_heads(num_heads: int, seed: int) -> list[dict[str, float]]:
    gen = torch.Generator().manual_seed(seed)
    return [{a: float(10 ** (torch.rand(1, generator=gen).item() - 2.0)) for a in "FHW"} for _ in range(num_heads)]


def families(num_heads: int, seed: int, grid: TokenGrid, small_heads: int) -> Iterable[tuple[str, torch.Tensor, torch.Tensor]]:
    """(family, q, k) of every family and setting; the unstructured families use ``small_heads`` heads."""
    zeros = torch.zeros(1, small_heads, grid.num_tokens, DIM)
    yield "uniform", zeros, zeros
    for sigma in RANDOM_SIGMAS:
        yield (f"random σ={sigma:g}", *gaussian_qk(grid, small_heads, sigma, seed))
    yield ("faint", *synthetic_qk(grid, faint_heads(num_heads, seed), temperature=2.0, noise=0.5, seed=seed + 2))
    heads = random_heads(num_heads, seed)
    for noise, temperature in SETTINGS:
        yield ("local", *synthetic_qk(grid, heads, temperature=temperature, noise=noise, seed=3))


def sweep(num_heads: int = 48, seed: int = 1, *, grid: TokenGrid = SWEEP_GRID, thresholds: Iterable[float] = THRESHOLDS,
          density: float = 0.2, block_size: Optional[int] = None, small_heads: Optional[int] = None) -> dict:
    """{"gains": rows per family, "thresholds": rows per (family, threshold)} (see the module docstring)."""
    thresholds = tuple(thresholds)
    block = {} if block_size is None else {"block_size": block_size}
    gains: dict[str, list[torch.Tensor]] = {}
    picks: dict[tuple[str, float], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    for family, q, k in families(num_heads, seed, grid, small_heads or max(1, num_heads // 3)):
        stats = SiteStatistics(grid, q.shape[1], CalibrationOptions(density=density, **block))
        stats.update(q, k)
        kept = stats.scores()["kept_mass"]
        heads = torch.arange(q.shape[1])
        natural = stats.natural_index
        best_order = torch.tensor([stats.orders.index(o) for o in stats.choose_orders(min_gain=0.0)])
        gains.setdefault(family, []).append(stats.order_gains()[best_order, heads].float())
        for threshold in thresholds:
            chosen = torch.tensor([stats.orders.index(o) for o in stats.choose_orders(min_gain=threshold)])
            picks.setdefault((family, threshold), []).append(
                (chosen != natural, kept[chosen, heads] - kept[natural], kept.amax(0) - kept[chosen, heads]))
    gain_rows = []
    for family, values in gains.items():
        g = torch.cat(values)
        gain_rows.append({"family": family, "heads": g.numel(), "gain_max": float(g.max()),
                          "gain_p95": float(g.quantile(0.95)), "gain_median": float(g.median())})
    threshold_rows = []
    for (family, threshold), values in picks.items():
        moved = torch.cat([m for m, _, _ in values])
        kept_gain = torch.cat([g for _, g, _ in values])[moved]
        regret = torch.cat([r for _, _, r in values])
        threshold_rows.append({
            "family": family, "min_order_gain": threshold, "off_natural": float(moved.float().mean()),
            "kept_gain_of_moved_min": float(kept_gain.min()) if kept_gain.numel() else None,
            "kept_gain_of_moved_max": float(kept_gain.max()) if kept_gain.numel() else None,
            "regret_mean": float(regret.double().mean()), "regret_worst": float(regret.max()),
        })
    return {"gains": gain_rows, "thresholds": threshold_rows}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=48)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="result folder (default $OUT)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    run_stamp = harness.stamp(__file__, argv)
    results = sweep(args.heads, args.seed)
    print(harness.markdown_table(results["gains"]))
    print()
    print(harness.markdown_table(results["thresholds"]))
    if args.out:
        harness.write_results(Path(args.out) / "order_gain_sweep.json", results, run_stamp,
                              title="order gain threshold on synthetic heads", table=results["thresholds"])
    return results


if __name__ == "__main__":
    main()
