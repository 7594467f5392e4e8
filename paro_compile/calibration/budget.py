"""Budget solving: how many blocks each head, site and step bucket keeps.

- `allocate_blocks`: one kept-block budget over several block maps ranked together (``allocation`` "site" and
  "global"), so heads and sites with concentrated attention get fewer blocks and diffuse ones more, at the same
  average;
- `derive_step_boundaries`: step-bucket boundaries (and the dense bucket of ``dense_steps``) from the calibration
  timesteps; at run time a timestep's bucket is the number of boundaries above it (`Plan.bucket_for_timestep`);
- `solve_sparse_density`: the sparse buckets' density that makes the average over the sampling steps equal
  ``average_density``.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch

from paro_compile.calibration.masks import block_priority
from paro_compile.calibration.options import CalibrationError
from paro_compile.plan import Plan


def allocate_blocks(
    maps: list[torch.Tensor],
    density: float,
    mandatory: list[torch.Tensor],
    mass_threshold: Optional[float] = None,
) -> list[torch.Tensor]:
    """Keep the heaviest blocks of several maps *together* → one bool mask per map.

    maps[i]: [H_i, nb_i, nb_i] block scores (`masks.row_normalized_mass`), mandatory[i]: bool [nb_i, nb_i] blocks
    every head of map i keeps. The mandatory blocks of all maps are kept first (they count toward the budget); then
    the remaining blocks of all maps are ranked together by score and kept until ``ceil(density · total
    blocks)`` are kept, or, with ``mass_threshold``, until that share of the summed scores is kept. So each
    map's (and head's) density follows its scores; only the overall density is ``density``. One map = the
    per-site allocation. Equal scores go round-robin over heads and query rows (`masks.block_priority`). Memory: the
    concatenated scores (4 B/block), priorities and their sort order (8 B/block each).
    """
    if not maps:
        return []
    maps = [score.float().cpu() for score in maps]
    top = torch.stack([score.amax() if score.numel() else score.new_zeros(()) for score in maps]).amax()
    columns = max(score.shape[-1] for score in maps)
    keys, values, sizes, n_mand = [], [], [], 0
    for score, mand in zip(maps, mandatory):
        mand = mand.cpu().expand_as(score)
        values.append(score.reshape(-1))
        keys.append(block_priority(score, mand, top, columns).reshape(-1))
        sizes.append(score.numel())
        n_mand += int(mand.sum())
    key, value = torch.cat(keys), torch.cat(values)
    total = key.numel()
    order = key.argsort(descending=True, stable=True)
    if mass_threshold is not None:
        cum = value[order].cumsum(0) / value.sum().clamp_min(1e-30)
        keep_count = int((cum < mass_threshold - 1e-7).sum()) + 1
    else:
        keep_count = math.ceil(float(density) * total - 1e-9)
    keep_count = min(max(keep_count, n_mand, 1), total)
    keep = torch.zeros(total, dtype=torch.bool)
    keep[order[:keep_count]] = True
    return [part.view(m.shape) for part, m in zip(keep.split(sizes), maps)]


def timestep_value(timestep: Any) -> Optional[float]:
    """A model input's timestep as a float (first element of a tensor); None if it is absent or not a number."""
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0].item()) if timestep.numel() else None
    try:
        return float(timestep)
    except (TypeError, ValueError):
        return None


def derive_step_boundaries(timesteps: Iterable[float], step_buckets: int, dense_steps: int = 0) -> tuple[list[float], list[int]]:
    """Boundaries (descending) and dense bucket indices from the calibration timesteps.

    The ``dense_steps`` largest distinct timesteps form a dense bucket 0; the remaining ones are split into
    ``step_buckets`` groups of (nearly) equal count; boundaries are midpoints between neighbouring groups.
    """
    distinct = sorted({float(t) for t in timesteps}, reverse=True)
    needed = step_buckets + (1 if dense_steps else 0)
    if len(distinct) < needed or (dense_steps and len(distinct) - dense_steps < step_buckets):
        raise CalibrationError(
            f"step_buckets={step_buckets}, dense_steps={dense_steps} need at least {dense_steps + step_buckets} distinct "
            f"timesteps in the calibration inputs, got {len(distinct)} ({distinct[:8]}); pass step_boundaries=[...]"
        )
    boundaries: list[float] = []
    rest = distinct
    if dense_steps:
        boundaries.append((distinct[dense_steps - 1] + distinct[dense_steps]) / 2)
        rest = distinct[dense_steps:]
    cuts = [round(i * len(rest) / step_buckets) for i in range(1, step_buckets)]
    boundaries += [(rest[c - 1] + rest[c]) / 2 for c in cuts]
    return boundaries, ([0] if dense_steps else [])


def solve_sparse_density(average_density: float, boundaries: list[float], dense_buckets: list[int],
                         timesteps: Iterable[float]) -> tuple[float, float]:
    """Density of the sparse buckets that makes the kept share, averaged over ``timesteps`` (dense buckets count
    1.0), equal ``average_density``. Returns (sparse density, share of the timesteps that fall in dense buckets).

    With a share w of dense steps: ``sparse = (average - w) / (1 - w)``. The plan's mandatory diagonal and text
    blocks can push the achieved average above the target at very low sparse densities (the plan records it)."""
    ts = [float(t) for t in timesteps]
    if not ts:
        raise CalibrationError("average_density needs at least one timestep to average over")
    shell = Plan(sites={}, step_boundaries=list(boundaries))
    dense_share = sum(shell.bucket_for_timestep(t) in dense_buckets for t in ts) / len(ts)
    if dense_share >= 1.0:
        raise CalibrationError(f"every one of the {len(ts)} timesteps falls in a dense bucket: there is no sparse step "
                               f"to bring the average down to {average_density}; lower dense_steps")
    sparse = (average_density - dense_share) / (1.0 - dense_share)
    if sparse <= 0.0:
        raise CalibrationError(
            f"average_density={average_density} is not reachable: the dense bucket already holds {dense_share:.0%} of the "
            f"{len(ts)} timesteps; lower dense_steps or raise average_density above {dense_share:.3f}")
    return min(sparse, 1.0), dense_share
