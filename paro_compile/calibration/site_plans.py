"""From statistics to `SitePlan`s: each site's orders, the masks of every step bucket, and a JSON report.

Masks follow ``allocation``: "uniform" selects each head's blocks alone (`masks.select_blocks`), "site" ranks the
heads of a site together and "global" the heads of all sites (`budget.allocate_blocks` on
`masks.row_normalized_mass`), one step bucket at a time. Dense buckets keep every block. Each `SitePlan.stats`
reports, per bucket, the density, the kept mass (per head), and the mass the model's own order would keep at the
same density.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Mapping, Optional

import torch

from paro_compile.calibration.budget import allocate_blocks
from paro_compile.calibration.masks import kept_share, mandatory_blocks, row_normalized_mass, select_blocks
from paro_compile.calibration.options import CalibrationError
from paro_compile.grid import orders_permutation
from paro_compile.plan import SitePlan

if TYPE_CHECKING:
    from paro_compile.calibration.statistics import SiteStatistics


def build_site_plan(
    stats: "SiteStatistics",
    site_id: str = "site",
    *,
    dense_buckets: Iterable[int] = (),
    orders: Optional[list[str]] = None,
    masks: Optional[Mapping[int, torch.Tensor]] = None,
) -> SitePlan:
    """Choose orders (unless given), build the masks of every bucket and return the `SitePlan`.

    ``masks``: {bucket: bool [H, nb, nb]} chosen elsewhere (``allocation="global"``: `build_site_plans`)
    for those sparse buckets; the others follow ``options.allocation`` ("global" alone = "site").
    """
    opts = stats.options
    density = opts.mask_density
    dense_buckets = sorted(set(int(b) for b in dense_buckets))
    orders = orders or stats.choose_orders()
    order_index = torch.tensor([stats.orders.index(o) for o in orders])
    heads = torch.arange(stats.heads)
    empty = stats.empty_heads()
    natural = stats.orders.index(stats.grid.natural_order) if stats.grid.natural_order in stats.orders else 0
    mandatory = mandatory_blocks(stats.grid, stats.block_size)
    given = dict(masks or {})
    bucket_masks, densities, kept, kept_per_head, natural_kept = [], [], [], [], []
    for bucket in range(stats.num_buckets):
        # Masks are selected where the maps live (the GPU during a GPU calibration: sorting 720p maps on the host
        # takes seconds per bucket); only the masks and the reported numbers come to the host.
        mass = stats.bucket_mass(bucket).float()
        device = mass.device
        chosen_mass = mass[order_index.to(device), heads.to(device)]  # [H, nb, nb]
        mandatory_here = mandatory.to(device)
        if bucket in dense_buckets:
            mask = torch.ones(stats.heads, stats.nb, stats.nb, dtype=torch.bool, device=device)
        else:
            if bucket in given:
                mask = given[bucket].to(device=device, dtype=torch.bool).clone()
            elif opts.allocation == "uniform":
                rank = chosen_mass if opts.block_score == "mass" else \
                    stats.bucket_block_score(bucket).float()[order_index.to(device), heads.to(device)]
                mask = select_blocks(rank, density, mandatory_here, opts.mass_threshold)
            else:
                score = row_normalized_mass(chosen_mass, stats.seq_len, stats.block_size)
                mask, = allocate_blocks([score], density, [mandatory], opts.mass_threshold)
                mask = mask.to(device)
            if opts.empty_heads == "minimal" and empty:
                mask[empty] = mandatory_here
        natural_mask = select_blocks(mass[natural], density, mandatory_here, opts.mass_threshold)
        share = kept_share(chosen_mass, mask).cpu()
        mask = mask.cpu()
        bucket_masks.append(mask)
        densities.append(float(mask.float().mean()))
        kept.append(float(share.mean()))
        kept_per_head.append([round(float(x), 6) for x in share])
        natural_kept.append([round(float(x), 6) for x in kept_share(mass[natural], natural_mask).cpu()])
    scores = stats.scores()
    chosen_scores = {name: [round(float(value[order_index[h], h]), 6) for h in range(stats.heads)]
                     for name, value in scores.items()}
    gains = stats.order_gains()
    report = {
        "calls": stats.calls,
        "bucket_calls": list(stats.bucket_calls),
        "density": densities,
        "kept_mass": kept,
        "kept_mass_per_head": kept_per_head,
        "natural_kept_mass_per_head": natural_kept,
        "scores": chosen_scores,
        "order_gain_per_head": ([round(float(gains[order_index[h], h]), 6) for h in range(stats.heads)]
                                if gains is not None else None),
        "candidate_orders": list(stats.orders),
    }
    if stats.outliers is not None:
        report["qk_outliers"] = stats.outliers.report()
    return SitePlan(
        site_id=site_id,
        heads=stats.heads,
        seq_len=stats.seq_len,
        block_size=stats.block_size,
        perm=orders_permutation(stats.grid, orders),
        block_masks=torch.stack(bucket_masks),
        orders=list(orders),
        grid=stats.grid,
        empty_heads=empty,
        dense_buckets=dense_buckets,
        stats=report,
    )


def build_site_plans(
    statistics: Mapping[str, "SiteStatistics"],
    *,
    dense_buckets: Iterable[int] = (),
    orders: Optional[Mapping[str, list[str]]] = None,
) -> dict[str, SitePlan]:
    """`SitePlan` of every site; with ``allocation="global"`` (options of the first site) the masks of each
    sparse step bucket are allocated over all sites together (`allocate_blocks`), else per site."""
    orders = dict(orders or {})
    dense = {int(b) for b in dense_buckets}
    if not statistics:
        return {}
    first = next(iter(statistics.values()))
    if first.options.allocation != "global":
        return {sid: stats.build_site_plan(sid, dense_buckets=dense, orders=orders.get(sid)) for sid, stats in statistics.items()}
    num_buckets = {stats.num_buckets for stats in statistics.values()}
    if len(num_buckets) != 1:
        raise CalibrationError(f"allocation='global' needs the same step buckets at every site, got {sorted(num_buckets)}")
    chosen = {sid: orders.get(sid) or stats.choose_orders() for sid, stats in statistics.items()}
    given: dict[str, dict[int, torch.Tensor]] = {sid: {} for sid in statistics}
    for bucket in range(num_buckets.pop()):
        if bucket in dense:
            continue
        sids = list(statistics)
        scores = [row_normalized_mass(statistics[s].chosen_mass(bucket, chosen[s]), statistics[s].seq_len,
                                      statistics[s].block_size) for s in sids]
        mandatory = [mandatory_blocks(statistics[s].grid, statistics[s].block_size) for s in sids]
        for s, mask in zip(sids, allocate_blocks(scores, first.options.mask_density, mandatory,
                                                 first.options.mass_threshold)):
            given[s][bucket] = mask
    return {sid: stats.build_site_plan(sid, dense_buckets=dense, orders=chosen[sid], masks=given[sid])
            for sid, stats in statistics.items()}
