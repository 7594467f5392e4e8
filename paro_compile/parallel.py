"""Plans on several GPUs: the heads of one rank, head load balance, and calibration gathered over ranks.

- `select_heads` / `select_plan_heads`: a site's plan rows for some of its heads (per-head permutation rows, the
  masks of every step bucket, orders, empty heads, per-head statistics), built with the public `SitePlan` / `Plan`
  constructors. The context-parallel pass (`paro_compile.passes.context_parallel`) calls it with the heads the
  graph's all-to-all gives this rank, so one global plan file works on every rank.
- `balance_heads`: a static per-site head order that evens out the kept blocks of the ranks of a Ulysses group,
  applied by permuting the head blocks of the q/k/v/out projection weights (no run-time cost).
- `gather_site_statistics`: calibration under context parallelism: every rank observes its heads; the statistics
  are gathered over the group so the plan is the one a single process would build from the same inputs.

docs/context_parallel.md describes the whole flow.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import torch

from paro_compile.plan import Plan, SitePlan

if TYPE_CHECKING:
    from paro_compile.calibration.statistics import SiteStatistics

PER_HEAD_STATS = ("kept_mass_per_head", "natural_kept_mass_per_head")
"""`SitePlan.stats` entries that hold one list per step bucket with one value per head."""


def _select_stats(stats: Mapping[str, Any], heads: Sequence[int], masks: torch.Tensor) -> dict[str, Any]:
    out = dict(stats)
    for key in PER_HEAD_STATS:
        if key in out and isinstance(out[key], list):
            out[key] = [[row[h] for h in heads] if isinstance(row, list) else row for row in out[key]]
    if isinstance(out.get("scores"), dict):
        out["scores"] = {name: [values[h] for h in heads] if isinstance(values, list) else values
                         for name, values in out["scores"].items()}
    if "density" in out:
        out["density"] = [float(masks[b].float().mean()) for b in range(masks.shape[0])]
    if "kept_mass" in out and isinstance(out.get("kept_mass_per_head"), list):
        out["kept_mass"] = [sum(row) / len(row) if row else 1.0 for row in out["kept_mass_per_head"]]
    out["heads"] = [int(h) for h in heads]
    return out


def select_heads(site: SitePlan, heads: Sequence[int]) -> SitePlan:
    """``site``'s plan for the global heads ``heads``, in that order: local head i is global head ``heads[i]``.

    Every per-head field follows (permutation rows, every step bucket's masks, orders, empty heads renumbered,
    per-head statistics); ``stats["heads"]`` records the global indices. A permutation of all heads reorders them."""
    heads = [int(h) for h in heads]
    if not heads or min(heads) < 0 or max(heads) >= site.heads or len(set(heads)) != len(heads):
        raise ValueError(f"site {site.site_id}: heads {heads} are not distinct indices below its {site.heads} heads")
    index = torch.tensor(heads, dtype=torch.long)
    masks = site.block_masks.index_select(1, index)
    position = {h: i for i, h in enumerate(heads)}
    return SitePlan(
        site_id=site.site_id,
        heads=len(heads),
        seq_len=site.seq_len,
        block_size=site.block_size,
        perm=site.perm.index_select(0, index.to(site.perm.device)) if site.perm is not None else None,
        block_masks=masks,
        orders=[site.orders[h] for h in heads] if site.orders else [],
        grid=site.grid,
        empty_heads=[position[h] for h in site.empty_heads if h in position],
        dense_buckets=list(site.dense_buckets),
        stats=_select_stats(site.stats, heads, masks),
    )


def select_plan_heads(plan: Plan, heads_by_site: Mapping[str, Sequence[int]]) -> Plan:
    """A copy of ``plan`` whose sites in ``heads_by_site`` hold only those global heads (`select_heads`)."""
    sites = {sid: select_heads(site, heads_by_site[sid]) if sid in heads_by_site else site
             for sid, site in plan.sites.items()}
    return _with_sites(plan, sites)


def _with_sites(plan: Plan, sites: dict[str, SitePlan], meta: Optional[Mapping[str, Any]] = None) -> Plan:
    return Plan(sites=sites, step_boundaries=list(plan.step_boundaries), timestep_arg=plan.timestep_arg,
                fingerprint=plan.fingerprint, density=plan.density, alpha=plan.alpha, qk_bits=plan.qk_bits,
                pv_dtype=plan.pv_dtype, meta=dict(plan.meta if meta is None else meta))
