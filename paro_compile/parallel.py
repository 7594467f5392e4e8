"""Plans on several GPUs: the heads of one rank, head load balance, and calibration gathered over ranks.

- `select_heads` / `select_plan_heads`: a site's plan rows for some of its heads (per-head permutation rows, the
  masks of every step bucket, orders, empty heads, per-head statistics), built with the public `SitePlan` / `Plan`
  constructors. The context-parallel pass (`paro_compile.passes.context_parallel`) calls it with the heads the
  graph's all-to-all gives this rank, so one global plan file works on every rank.
- `balance_heads`: a static per-site head order that evens out the kept blocks of the ranks of a Ulysses group,
  applied by permuting the head blocks of the q/k/v/out projection weights (no run-time cost).
- `gather_site_statistics`: calibration under context parallelism: every rank observes its heads; the statistics
  are gathered over the group so the plan is the one a single process would build from the same inputs.
- `make_context_parallel_traceable` (from `parallel_tracing`): lets Dynamo trace diffusers' hooks through the final
  all-gather on installs where it would break the graph there, so the token order folds across the sharding.

docs/context_parallel.md describes the whole flow.
"""
from __future__ import annotations

import dataclasses

from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import torch

from paro_compile.parallel_tracing import context_parallel_tracing_gaps, make_context_parallel_traceable  # noqa: F401
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
        empty_heads=sorted(position[h] for h in site.empty_heads if h in position),
        dense_buckets=list(site.dense_buckets),
        stats=_select_stats(site.stats, heads, masks),
    )


def select_plan_heads(plan: Plan, heads_by_site: Mapping[str, Sequence[int]]) -> Plan:
    """A copy of ``plan`` whose sites in ``heads_by_site`` hold only those global heads (`select_heads`)."""
    sites = {sid: select_heads(site, heads_by_site[sid]) if sid in heads_by_site else site
             for sid, site in plan.sites.items()}
    return _with_sites(plan, sites)


def _with_sites(plan: Plan, sites: dict[str, SitePlan], meta: Optional[Mapping[str, Any]] = None) -> Plan:
    # other token grids' entries are dropped: a plan is localized after its entries for the graph's grid are selected
    return dataclasses.replace(plan, sites=sites, meta=dict(plan.meta if meta is None else meta), other_shapes={})


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
        elif name == "outliers":
            fields[name] = value.worst if value is not None else None
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
        if getattr(local, "outliers", None) is not None:  # worst-call Q/K outlier measurements, one value per head
            merged.outliers = copy.copy(local.outliers)
            merged.outliers.heads = global_heads
            merged.outliers.worst = _place([(entry[0], entry[4]["outliers"]) for entry in entries], 0, global_heads)
        out[sid] = merged
    return out



# ---------------------------------------------------------------------------------------------------
# head load balance

def head_costs(site: SitePlan) -> torch.Tensor:
    """[S, H] kept blocks of every head in every step bucket: the work of that head's attention (the kernel walks
    the kept blocks of every query block)."""
    return site.block_masks.flatten(2).sum(-1).to(torch.float64)


def rank_loads(costs: torch.Tensor, order: Sequence[int], world_size: int) -> torch.Tensor:
    """[S, U] kept blocks of every rank when rank r holds heads ``order[r·H/U:(r+1)·H/U]`` (Ulysses)."""
    heads = costs.shape[1]
    if heads % world_size:
        raise ValueError(f"{heads} heads do not split over {world_size} ranks")
    index = torch.tensor(list(order), dtype=torch.long).view(world_size, heads // world_size)
    return costs[:, index].sum(-1)


def imbalance(costs: torch.Tensor, order: Sequence[int], world_size: int) -> float:
    """Slowest rank over the mean rank, minus 1, in the worst step bucket (0.0: perfectly even)."""
    loads = rank_loads(costs, order, world_size)
    mean = loads.mean(-1).clamp_min(1e-12)
    return float((loads.amax(-1) / mean).max() - 1.0)


def _step_cost(costs: torch.Tensor, order: Sequence[int], world_size: int) -> float:
    """Sum over step buckets of the slowest rank's load (each bucket's steps wait for its slowest rank)."""
    return float(rank_loads(costs, order, world_size).amax(-1).sum())


def balanced_head_order(costs: torch.Tensor, world_size: int, max_rounds: int = 64) -> list[int]:
    """A head order (rank r holds ``order[r·H/U:(r+1)·H/U]``) that evens out the ranks' kept blocks in every step
    bucket: heads sorted by their total kept blocks dealt to the ranks in snake order (0..U-1, U-1..0, ...), then
    pairwise swaps between ranks while one lowers the summed slowest-rank load. Never worse than the model's order."""
    heads = costs.shape[1]
    if heads % world_size:
        raise ValueError(f"{heads} heads do not split over {world_size} ranks")
    per_rank = heads // world_size
    by_cost = sorted(range(heads), key=lambda h: (-float(costs[:, h].sum()), h))
    groups: list[list[int]] = [[] for _ in range(world_size)]
    for i, head in enumerate(by_cost):
        lap, pos = divmod(i, world_size)
        groups[pos if lap % 2 == 0 else world_size - 1 - pos].append(head)
    order = [h for group in groups for h in sorted(group)]
    best = _step_cost(costs, order, world_size)
    for _ in range(max_rounds):
        improved = False
        for a in range(heads):
            for b in range(a + 1, heads):
                if a // per_rank == b // per_rank:
                    continue
                trial = list(order)
                trial[a], trial[b] = trial[b], trial[a]
                cost = _step_cost(costs, trial, world_size)
                if cost < best - 1e-9:
                    order, best, improved = trial, cost, True
        if not improved:
            break
    identity = list(range(heads))
    if _step_cost(costs, identity, world_size) <= best + 1e-9:
        return identity
    return [h for r in range(world_size) for h in sorted(order[r * per_rank:(r + 1) * per_rank])]


HEAD_ROWS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
"""Linears of a diffusers attention module whose output features are the heads' channels."""
HEAD_COLUMNS = ("to_out.0", "to_add_out")
"""Linears whose input features are the heads' channels."""
HEAD_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
"""Norms whose weight may span every head's channels (diffusers' ``rms_norm_across_heads``)."""


def permute_attention_heads(module: torch.nn.Module, order: Sequence[int], heads: int) -> None:
    """Reorder the heads of a diffusers attention ``module`` in place: new head i is old head ``order[i]``.

    The q/k/v projections' output rows (and biases), the output projection's input columns and norms over all heads'
    channels move in head-sized blocks; RoPE and per-head norms are the same for every head. The module computes the
    same function (the output projection sums its inputs in another order, so not bitwise). Raises ValueError for a
    module with fused projections or other parameters that span the heads."""
    order = [int(h) for h in order]
    if sorted(order) != list(range(heads)):
        raise ValueError(f"order {order} is not a permutation of {heads} heads")
    if getattr(module, "fused_projections", False):
        raise ValueError(f"{type(module).__name__} has fused q/k/v projections: call unfuse_projections() first")
    inner = None
    for name in HEAD_ROWS:
        linear = _submodule(module, name)
        if linear is not None:
            inner = linear.out_features
            break
    if inner is None or inner % heads:
        raise ValueError(f"{type(module).__name__} has no q/k/v projection ({', '.join(HEAD_ROWS)}) whose output "
                         f"splits into {heads} heads")
    head_dim = inner // heads
    channels = torch.tensor(order).repeat_interleave(head_dim) * head_dim + torch.arange(head_dim).repeat(heads)
    handled = set()
    with torch.no_grad():
        for name in HEAD_ROWS:
            linear = _submodule(module, name)
            if linear is None or linear.out_features != inner:
                continue
            linear.weight.copy_(linear.weight[channels.to(linear.weight.device)])
            if linear.bias is not None:
                linear.bias.copy_(linear.bias[channels.to(linear.bias.device)])
            handled.update(id(p) for p in linear.parameters())
        for name in HEAD_COLUMNS:
            linear = _submodule(module, name)
            if linear is None or linear.in_features != inner:
                continue
            linear.weight.copy_(linear.weight[:, channels.to(linear.weight.device)])
            handled.update(id(p) for p in linear.parameters())
        for name in HEAD_NORMS:
            norm = _submodule(module, name)
            weight = getattr(norm, "weight", None) if norm is not None else None
            if isinstance(weight, torch.Tensor) and weight.numel() == inner:
                weight.copy_(weight[channels.to(weight.device)])
                handled.update(id(p) for p in norm.parameters())
    spanning = [name for name, p in module.named_parameters() if id(p) not in handled and inner in p.shape
                and inner != head_dim]
    if spanning:
        raise ValueError(f"{type(module).__name__}: parameters {spanning} have the heads' {inner} channels and are not "
                         "a known q/k/v/out projection or norm; their heads cannot be reordered safely")


def _submodule(module: torch.nn.Module, name: str) -> Optional[torch.nn.Module]:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def balance_plan(plan: Plan, world_size: int, sites: Optional[Sequence[str]] = None) -> tuple[Plan, dict[str, list[int]]]:
    """The plan with each site's heads reordered by `balanced_head_order` for ``world_size`` Ulysses ranks, and
    {site: order}. The model must be reordered the same way (`balance_heads` does both)."""
    orders: dict[str, list[int]] = {}
    for sid in sites if sites is not None else plan.sites:
        order = balanced_head_order(head_costs(plan.sites[sid]), world_size)
        if order != list(range(len(order))):
            orders[sid] = order
    balanced = select_plan_heads(plan, orders)
    previous = dict(plan.meta.get("head_order") or {})
    for sid, order in orders.items():  # compose with an earlier balance of the same plan
        before = previous.get(sid, list(range(len(order))))
        previous[sid] = [before[h] for h in order]
    meta = {**balanced.meta, "head_order": previous, "balanced_for": int(world_size)}
    return _with_sites(balanced, balanced.sites, meta), orders


def balance_heads(model: torch.nn.Module, plan: Plan, world_size: int) -> Plan:
    """Even out the Ulysses ranks' attention work at no run-time cost: reorder each planned site's heads (model
    weights, in place, and plan rows) so that every rank's heads keep about as many blocks as the others'.

    Call it on every rank with the same plan before ``enable_parallelism`` and ``torch.compile`` (it is
    deterministic); the returned plan records the order in ``meta["head_order"]`` (site → old head of every new
    head) and can be saved: load it together with `apply_head_order` on the original weights."""
    balanced, orders = balance_plan(plan, world_size)
    _permute_model(model, plan, orders)
    return balanced


def apply_head_order(model: torch.nn.Module, plan: Plan) -> None:
    """Reorder ``model``'s attention heads as a balanced plan's ``meta["head_order"]`` says (the model as
    calibrated, e.g. freshly loaded, before applying a saved balanced plan)."""
    _permute_model(model, plan, dict(plan.meta.get("head_order") or {}))


def _permute_model(model: torch.nn.Module, plan: Plan, orders: Mapping[str, Sequence[int]]) -> None:
    for sid, order in orders.items():
        path = sid.rsplit("#", 1)[0]
        if path == "<root>":
            path = ""
        try:
            module = model.get_submodule(path)
        except AttributeError as error:
            raise ValueError(f"site {sid}: the model has no module {path!r} to reorder the heads of") from error
        permute_attention_heads(module, order, len(order))
