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


# ---------------------------------------------------------------------------------------------------
# calibration under context parallelism

HEAD_AXIS = {"mass": 1, "output_score": 1, "score_sums": 1, "out_sq": 0}
"""`SiteStatistics` accumulators that hold one slice per head, and their head axis; every rank holds the slices of
its heads. The other fields (call counts, grid, options) are the same on every rank."""
SHARED_TENSORS = {"_tables"}
"""Tensor-holding fields of `SiteStatistics` that hold no per-head data (index tables)."""


def _per_head_fields(stats: "SiteStatistics") -> dict[str, Any]:
    fields = {}
    for name, value in vars(stats).items():
        holds_tensors = isinstance(value, torch.Tensor) or (
            isinstance(value, (list, dict)) and any(isinstance(v, torch.Tensor)
                                                    for v in (value.values() if isinstance(value, dict) else value)))
        if name in HEAD_AXIS:
            fields[name] = value
        elif holds_tensors and name not in SHARED_TENSORS:
            raise RuntimeError(f"SiteStatistics.{name} holds tensors that gather_site_statistics does not know how to "
                               "gather over ranks: add it to paro_compile.parallel.HEAD_AXIS (per-head data) or "
                               "SHARED_TENSORS")
    return fields


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


def _place(parts: list[tuple[Sequence[int], Any]], axis: int, heads: int) -> Any:
    """Put every rank's per-head slices at their global head indices along ``axis``."""
    first = parts[0][1]
    if first is None:
        return None
    if isinstance(first, dict):
        return {key: _place([(h, v[key]) for h, v in parts], axis, heads) for key in first}
    if isinstance(first, list):
        return [_place([(h, v[i]) for h, v in parts], axis, heads) for i in range(len(first))]
    shape = list(first.shape)
    shape[axis] = heads
    out = first.new_zeros(shape)
    for head_index, value in parts:
        out.index_copy_(axis, torch.tensor(list(head_index), dtype=torch.long), value)
    return out


def gather_site_statistics(statistics: Mapping[str, "SiteStatistics"], shards: Mapping[str, Any],
                           group: Any = None) -> dict[str, "SiteStatistics"]:
    """Every rank's statistics of the sites in ``shards`` (site → `HeadShard` of the heads this rank observed)
    gathered over the Ulysses group into statistics of all heads, on every rank; other sites are returned as they
    are. The plan built from the result is the plan one process builds from the same calibration inputs: orders,
    masks of every step bucket (any ``allocation``, which ranks heads of several ranks together), empty heads and
    stats. Memory: each rank then holds every head's block maps, as one process would (`docs/context_parallel.md`)."""
    import copy

    import torch.distributed as dist

    from paro_compile.passes.context_parallel import resolve_group

    sharded = [sid for sid in statistics if sid in shards]
    if not sharded:
        return dict(statistics)
    group_names = {shards[sid].group_name for sid in sharded}
    if len(group_names) != 1:
        raise ValueError(f"sites are sharded over several process groups {sorted(map(str, group_names))}")
    group = group if group is not None else resolve_group(group_names.pop())
    payload = {sid: (tuple(shards[sid].heads), shards[sid].global_heads, statistics[sid].calls,
                     list(statistics[sid].bucket_calls), _to_cpu(_per_head_fields(statistics[sid])))
               for sid in sharded}
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, payload, group=group)
    out = dict(statistics)
    for sid in sharded:
        entries = [rank_payload.get(sid) for rank_payload in gathered]
        if any(entry is None for entry in entries):
            raise RuntimeError(f"site {sid} was observed on some ranks only: every rank must run the same calibration "
                               "inputs through the same model")
        global_heads = entries[0][1]
        covered = sorted(h for entry in entries for h in entry[0])
        if covered != list(range(global_heads)):
            raise RuntimeError(f"site {sid}: the ranks observed heads {covered}, not each of its {global_heads} heads once")
        if any(entry[2] != entries[0][2] or entry[3] != entries[0][3] for entry in entries):
            raise RuntimeError(f"site {sid}: ranks observed different numbers of calls ({[e[2] for e in entries]}); "
                               "every rank must run the same calibration inputs")
        local = statistics[sid]
        merged = copy.copy(local)
        merged._tables = {}
        merged.heads = global_heads
        for name, axis in HEAD_AXIS.items():  # on the CPU: the plan is built there
            if name in vars(local):
                setattr(merged, name, _place([(entry[0], entry[4][name]) for entry in entries], axis, global_heads))
        out[sid] = merged
    return out

