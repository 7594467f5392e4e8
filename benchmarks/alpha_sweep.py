"""The experiment behind calibration's default α (`paro_compile.calibration.DEFAULT_ALPHA`): order-choice regret of
each (sparsity_metric, α) on synthetic attention heads.

Heads have random per-axis locality weights (log-uniform in [0.03, 10]) over an 8×16×16 video + 32 text tokens;
three (noise, temperature) settings; density 0.2. For each choice it reports the kept-mass regret (best candidate
order's kept mass minus the chosen order's) and the Ψ ratio (chosen order's block incoherence over the best
candidate's), mean and worst over heads. The table and its reading are in docs/calibration.md ("Order choice and α").

    python benchmarks/alpha_sweep.py [--heads 48] [--seed 1]

`synthetic_qk` builds q, k whose attention is local along chosen axes; the calibration tests and
benchmarks/calibrate_cog_site.py use it too.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from paro_compile.calibration.options import SPARSITY_METRICS, CalibrationOptions  # noqa: E402
from paro_compile.calibration.statistics import SiteStatistics  # noqa: E402
from paro_compile.grid import TokenGrid  # noqa: E402

ALPHAS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SETTINGS = ((0.0, 1.0), (0.5, 2.0), (1.0, 4.0))  # (noise, temperature)
SWEEP_GRID = TokenGrid(frames=8, height=16, width=16, text_tokens=32)


def synthetic_qk(grid: TokenGrid, head_axes: list[dict[str, float]], *, dim: int = 64, temperature: float = 1.0,
                 noise: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [1, H, N, dim] whose scores are −|x_i − x_j|² / temperature (+ noise), x = token position weighted per axis.

    ``head_axes[h]`` maps axis names ("F", "H", "W") to weights: a large weight makes the head local along
    that axis (attention stays within ±1/weight), 0 makes it ignore the axis. Text tokens sit far away and
    attend among themselves.
    """
    gen = torch.Generator().manual_seed(seed)
    n = grid.num_tokens
    axes = grid.axes
    sizes = [grid.sizes[a] for a in axes]
    mesh = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in sizes], indexing="ij"), -1)
    vis = mesh.reshape(-1, len(axes))
    qs, ks = [], []
    for weights in head_axes:
        x = torch.zeros(n, len(axes) + 1)
        for i, a in enumerate(axes):
            x[grid.visual_slice, i] = vis[:, i] * weights.get(a, 0.0)
        x[grid.text_slice, -1] = 1e3
        sq = x.pow(2).sum(-1, keepdim=True)
        q = torch.cat([2 * x, -torch.ones(n, 1)], -1) / temperature
        k = torch.cat([x, sq], -1)
        pad = dim - q.shape[-1]
        q = torch.cat([q, noise * torch.randn(n, pad, generator=gen)], -1)
        k = torch.cat([k, noise * torch.randn(n, pad, generator=gen)], -1)
        qs.append(q)
        ks.append(k)
    return torch.stack(qs)[None], torch.stack(ks)[None]


def random_heads(num_heads: int, seed: int) -> list[dict[str, float]]:
    """Per-axis locality weights, log-uniform in [0.03, 10], of ``num_heads`` heads."""
    gen = torch.Generator().manual_seed(seed)
    return [{a: float(10 ** (torch.rand(1, generator=gen).item() * 2.5 - 1.5)) for a in "FHW"} for _ in range(num_heads)]


def sweep(num_heads: int = 48, seed: int = 1, *, grid: TokenGrid = SWEEP_GRID, alphas: Iterable[float] = ALPHAS,
          settings: Iterable[tuple[float, float]] = SETTINGS, density: float = 0.2,
          block_size: Optional[int] = None) -> dict[tuple[str, float], dict[str, float]]:
    """{(sparsity_metric, α): regret mean / worst and Ψ ratio mean / worst over all heads and settings}."""
    heads = random_heads(num_heads, seed)
    alphas = tuple(alphas)
    rows: dict[tuple[str, float], list[tuple[float, float, float, float]]] = {}
    block = {} if block_size is None else {"block_size": block_size}
    for noise, temperature in settings:
        q, k = synthetic_qk(grid, heads, temperature=temperature, noise=noise, seed=3)
        for metric in SPARSITY_METRICS:
            stats = SiteStatistics(grid, len(heads), CalibrationOptions(density=density, sparsity_metric=metric, **block))
            stats.update(q, k)
            s = stats.scores()
            best_kept, best_psi = s["kept_mass"].amax(0), s["incoherence"].amin(0)
            for alpha in alphas:
                idx = torch.tensor([stats.orders.index(o) for o in stats.choose_orders(alpha, min_gain=0.0)])
                kept = s["kept_mass"][idx, torch.arange(len(heads))]
                psi = s["incoherence"][idx, torch.arange(len(heads))]
                rows.setdefault((metric, alpha), []).append((
                    (best_kept - kept).mean().item(), (best_kept - kept).max().item(),
                    (psi / best_psi).mean().item(), (psi / best_psi).max().item()))
    results = {}
    for key, values in rows.items():
        r = torch.tensor(values)
        results[key] = {"regret_mean": float(r[:, 0].mean()), "regret_worst": float(r[:, 1].max()),
                        "psi_ratio_mean": float(r[:, 2].mean()), "psi_ratio_worst": float(r[:, 3].max())}
    return results


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=48)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    results = sweep(args.heads, args.seed)
    print("| metric | α | kept-mass regret mean / worst | Ψ ratio to best, mean / worst |")
    print("|---|---|---|---|")
    for (metric, alpha), r in results.items():
        print(f"| {metric} | {alpha:.1f} | {r['regret_mean']:.4f} / {r['regret_worst']:.3f} | "
              f"{r['psi_ratio_mean']:.3f} / {r['psi_ratio_worst']:.2f} |")
    return results


if __name__ == "__main__":
    main()
