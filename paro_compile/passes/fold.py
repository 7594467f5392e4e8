"""Folding pass: apply the PARO token order with layout ops instead of runtime gathers.

See docs/folding.md for the algebra. In short, with c the common order of a token-wise region (one
permutation of the visual grid axes, e.g. "HWF") and perm[h] the order of head h of a site:

1. sources (the op that forms the flat visual token axis: the patchify flatten, or a flat graph input
   whose grid is known) get ``unflatten(grid) → permute(axes of c) → flatten``, or the order goes into the
   patch conv's input;
2. the permuted order flows forward through every token-wise op (linear, norms, elementwise ops with
   broadcast modulation, residual adds, MLPs, cat/split with text, RoPE); position-dependent operands met
   on the way (RoPE cos/sin tables, positional embeddings) get the same layout permute; between two sites
   nothing is inserted (π⁻¹ of one site composed with π of the next is the identity);
3. where the order must be undone (unpatchify, graph outputs, any op that is not token-wise) the inverse
   layout permute is inserted;
4. each site's kernel gets only the residual ``r[h] = c⁻¹[perm[h]]`` (None when every head uses c).

Phases, one module each: `fold_analysis` (which nodes carry the tokens, where the boundaries are; no
mutation), `fold_rewrite` (the layout ops and residuals), `fold_patch_embed` (the conv-input rules). This
module is the driver: it picks the common order and says what each site's kernel still applies.

Nothing here emits a gather: the residuals go to the attention kernel (its fused prologue/epilogue), so
`FoldResult.gathers` counts zero unless a future rule has to fall back to one.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
import torch.fx as fx

from paro_compile.grid import TokenGrid, candidate_orders, order_permutation
from paro_compile.passes.context_parallel import TokenSharding
from paro_compile.passes.fold_analysis import FoldError, Seg, State, TokenRegion, analyse_region
from paro_compile.passes.fold_rewrite import (
    AppliedOrder, InputSizes, Rewriter, apply_order, common_permutation, residual_permutation,
)
from paro_compile.passes.fx_utils import fake_value, known_equal, shape_of, static_int
from paro_compile.passes.layout import Factor, SiteLayout, infer_layouts

if TYPE_CHECKING:
    from paro_compile.config import ParoConfig
    from paro_compile.passes.discover import AttentionSite
    from paro_compile.plan import Plan, SitePlan
    from paro_compile.report import SiteRecord


class DynamicPlanError(FoldError):
    """A plan that cannot be applied to a graph with symbolic token counts."""


KERNEL_PERMUTATIONS = ("none", "residual", "full")
"""What a site's kernel still applies: nothing, the per-head residual after the folded order, or the whole plan
permutation (nothing folded for the site)."""


@dataclass
class FoldResult:
    """What the pass did; the backend copies it into the site records (`describe_permutations`)."""

    kernel_perms: dict[str, Optional[torch.Tensor | fx.Node]] = field(default_factory=dict)
    """site → what its kernel still applies: an [H, N] permutation, a graph node computing it, or None."""
    descriptions: dict[str, str] = field(default_factory=dict)
    """site → `SiteRecord.permutation`: "identity", "folded:<source>", or "kernel"."""
    folded_orders: dict[str, Optional[str]] = field(default_factory=dict)
    """site → the order folded into layout ops upstream of it (None: its tokens arrive in model order)."""
    kernel_permutation: dict[str, str] = field(default_factory=dict)
    """site → "none" | "residual" | "full" (`KERNEL_PERMUTATIONS`)."""
    fallbacks: dict[str, str] = field(default_factory=dict)
    """site → why its plan could not be applied: the site stays on SDPA (the reason is in its record)."""
    gathers: int = 0
    order: Optional[str] = None
    """The common order folded into the layout ops (None: nothing folded)."""
    grid: Optional[dict] = None
    sources: list[str] = field(default_factory=list)
    exits: list[str] = field(default_factory=list)
    table_permutes: list[str] = field(default_factory=list)
    reason: str = ""
    """Why nothing was folded (empty when folded)."""

    def record(self, applied: AppliedOrder, order: str) -> None:
        self.order = order
        self.sources += applied.sources
        self.exits += applied.exits
        self.table_permutes += applied.table_permutes

    @property
    def folded_label(self) -> str:
        return f"folded:{self.sources[0] if self.sources else 'layout'}"

    def set_site(self, site_id: str, perm: Optional[torch.Tensor | fx.Node], kernel: str,
                 folded_order: Optional[str]) -> None:
        """Record what site ``site_id``'s kernel applies (``kernel`` in `KERNEL_PERMUTATIONS`) after
        ``folded_order`` (or nothing) was folded upstream of it."""
        if kernel not in KERNEL_PERMUTATIONS:
            raise ValueError(f"kernel permutation {kernel!r} is not one of {KERNEL_PERMUTATIONS}")
        self.kernel_perms[site_id] = perm
        self.kernel_permutation[site_id] = kernel
        self.folded_orders[site_id] = folded_order
        if kernel != "none":
            self.descriptions[site_id] = "kernel"
        else:
            self.descriptions[site_id] = self.folded_label if folded_order is not None else "identity"


def describe_permutations(records: list[SiteRecord], result: Optional[FoldResult]) -> None:
    """Fill the lowered records' ``permutation``, ``folded_order`` and ``kernel_permutation`` from the folding
    pass (``result``; None when it did not run: a plan permutation then stays whole in the kernel)."""
    for record in records:
        if not record.lowered:
            continue
        if result is not None and record.site_id in result.descriptions:
            record.permutation = result.descriptions[record.site_id]
            record.folded_order = result.folded_orders.get(record.site_id)
            record.kernel_permutation = result.kernel_permutation.get(record.site_id, "none")
        else:
            record.folded_order = None
            record.kernel_permutation = "full" if record.permutation == "kernel" else "none"


def describe_context_parallel_fold(result: Optional[FoldResult], sharding: TokenSharding | str | None) -> str:
    """One line for the report under Ulysses: the order folded across the token sharding, or why nothing was
    (``result`` None: the pass did not run)."""
    if result is None:
        return "fold: not run (no plan, or fold_permutations=False); the kernels apply each head's whole order"
    if result.order is not None:
        exits = ", ".join(result.exits) or "none"
        return (f"fold: order {result.order} folded into the whole sequence before the token sharding over "
                f"{sharding.world} ranks (sources {', '.join(result.sources)}; inverse at {exits}); each rank's "
                "kernels apply their heads' residuals")
    why = sharding if isinstance(sharding, str) else result.reason
    return f"fold: nothing folded ({why}); the kernels apply each head's whole order"


def site_device(site: AttentionSite) -> Optional[torch.device]:
    """Device of the site's activations (from the graph's fake values), None when unknown."""
    value = fake_value(site.q)
    return value.device if value is not None else None


def _on_device(perm: Optional[torch.Tensor], device: Optional[torch.device]) -> Optional[torch.Tensor]:
    """Kernel permutations live on the activations' device: a CPU [H, N] buffer handed to a CUDA kernel is
    copied host→device (pageable, synchronising) on every call, twice per site (prologue and epilogue)."""
    if perm is None or device is None or perm.device == device:
        return perm
    return perm.to(device)


def _head_orders(site_plan: SitePlan, grid: TokenGrid) -> list[Optional[str]]:
    if site_plan.perm is None:
        return [grid.natural_order] * site_plan.heads
    if site_plan.orders and len(site_plan.orders) == site_plan.heads:
        return list(site_plan.orders)
    candidates = {o: order_permutation(grid, o) for o in candidate_orders(grid)}
    return [next((o for o, p in candidates.items() if torch.equal(row.cpu().long(), p)), None) for row in site_plan.perm]


def _most_used_order(counts: Counter, natural: str) -> str:
    """The order most heads use; a tie with the natural order keeps the natural order (nothing to fold)."""
    best = max(counts.values())
    return natural if counts.get(natural, 0) == best else next(o for o, c in counts.most_common() if c == best)


def _visual_segments(state: Optional[State]) -> int:
    return 0 if state is None else sum(1 for s in state.segs if s.kind == "vis")


def fold_permutations(gm: fx.GraphModule, sites: list[AttentionSite], plan: Plan, config: ParoConfig,
                      grid: Optional[TokenGrid] = None, *, order_plan: Optional[Plan] = None,
                      sharding: Optional[TokenSharding] = None) -> FoldResult:
    """Fold the plan's per-site permutations into layout ops (see module docstring). Mutates ``gm``.

    Under Ulysses context parallelism ``plan`` holds this rank's heads of every site, ``order_plan`` the global plan
    (all heads) and ``sharding`` the group the tokens are sharded over. The common order is chosen from
    ``order_plan``'s heads, so every rank folds the same order into its (identical) graph: the exchange hands each
    rank the whole sequence in that order only when every rank permuted its chunk alike. Each rank's kernels get the
    residuals of its own heads (``plan``).

    ``config.fold_permutations=False`` leaves the graph alone (the kernels then apply the plan's
    permutations). ``grid`` gives the token grid where the graph does not form the tokens from one and the
    plan has none. With a symbolic sequence length (``dynamic=True``) the plan's per-head order strings are
    applied to the inferred grid (`_fold_symbolic`); a site whose orders cannot be applied there stays on SDPA
    with the reason (`FoldResult.fallbacks`; with ``config.fallback="error"`` a DynamicPlanError lists them). A
    plan without order strings raises DynamicPlanError.
    """
    result = FoldResult()
    if not config.fold_permutations:
        result.reason = "fold_permutations=False"
        return result
    order_plan = plan if order_plan is None else order_plan
    by_id = {s.site_id: s for s in sites}
    planned = {s.site_id: plan.sites.get(s.site_id) for s in sites if s.supported and not s.is_cross}
    planned = {k: v for k, v in planned.items() if v is not None and v.perm is not None}
    symbolic_sites = {sid for sid in planned if static_int(by_id[sid].seq_len) is None}
    if symbolic_sites:
        sharding = None  # the sharded rules need static sizes; unfolded, the kernels take each site's whole order
    # sites whose rows are the model's order: nothing for their kernels unless the common order reaches them
    identity_here: dict[str, SitePlan] = {}
    for sid, sp in list(planned.items()):
        if sp.is_identity_perm():
            result.set_site(sid, None, "none", None)
            del planned[sid]
            if not symbolic_sites:
                identity_here[sid] = sp
            continue
        if sid in symbolic_sites and not (sp.orders and len(sp.orders) == sp.heads):
            raise DynamicPlanError(
                f"site {sid} has a symbolic sequence length and its plan holds a [H, N] permutation but no per-head "
                "order strings: with dynamic shapes only order plans (SitePlan.orders + grid) apply; compile with "
                "dynamic=False or use a plan with orders")
        if sid not in symbolic_sites:
            result.set_site(sid, _on_device(sp.perm, site_device(by_id[sid])), "full", None)
    # decided on the global plan: every rank folds, or none does
    moving = [sid for sid in {**planned, **identity_here} if not order_plan.sites.get(sid, plan.sites[sid]).is_identity_perm()]
    if not moving:
        result.reason = "no site has a permutation"
        return result
    if symbolic_sites:
        # no [H, N] constant fits a symbolic sequence: the orders are applied to the graph's symbolic grid
        return _fold_symbolic(gm, sites, plan, planned, grid, config, result)
    try:
        region = analyse_region(gm, sites, plan, grid, sharding)
    except FoldError as error:
        result.reason = str(error)
        return result
    site_states = {s.site_id: region.analysis.state.get(s.node) for s in sites}
    if region.symbolic:
        return _fold_symbolic(gm, sites, plan, planned, grid, config, result)
    counts: Counter = Counter()
    site_grids: dict[str, TokenGrid] = {}
    for sid, sp in {**planned, **identity_here}.items():
        st = site_states.get(sid)
        if st is None:
            continue
        text = sum(static_int(s.length) for s in st.segs if s.kind == "txt")
        g = region.static_grid(text, "prefix" if st.segs[0].kind == "txt" else "suffix")
        if g is None or _visual_segments(st) != 1 or (sp.grid is not None and sp.grid.sizes != g.sizes):
            continue
        site_grids[sid] = g
        if sid in moving:
            counts.update(o for o in _head_orders(order_plan.sites.get(sid, sp), g) if o is not None)
    if not counts:
        result.reason = "no planned site is reached from the token sources"
        return result
    blind = [sid for sid in {**planned, **identity_here} if site_states.get(sid) is not None and sid not in site_grids]
    if blind:
        # a reached site runs in the common order, and without its grid its residual cannot be built
        result.reason = f"site {blind[0]} is in the token region but its grid is not the region's"
        return result
    order = _most_used_order(counts, region.axes)
    if order == region.axes:
        result.reason = f"most heads use the natural order {region.axes}: nothing to fold"
        return result
    result.record(apply_order(gm, sites, region, order), order)
    for sid, sp in {**planned, **identity_here}.items():
        st = site_states.get(sid)
        if sid not in site_grids:
            # unreached sites keep the whole permutation in model order; a reached site runs in the common
            # order, and without its grid its residual cannot be built
            if st is not None:
                raise RuntimeError(f"site {sid} is in the permuted region but its grid is unknown")
            continue
        residual = residual_permutation(sp.perm, common_permutation(st.segs, site_grids[sid], order))
        if bool((residual == torch.arange(residual.shape[-1], device=residual.device)).all()):
            result.set_site(sid, None, "none", order)
        else:
            result.set_site(sid, _on_device(residual, site_device(by_id[sid])), "residual", order)
    # sites reached without a plan entry run in the permuted order: attention is equivariant, nothing to do.
    result.grid = {"axes": region.axes, "order": order}
    return result


def project_orders(orders: list[str], axes: str) -> Optional[list[str]]:
    """The orders over the graph grid's ``axes``: as given, or with the axes the graph's grid does not have
    dropped (layout inference drops axes of size 1, e.g. one latent frame: "HWF" is then "HW"). None when an
    order misses one of ``axes``."""
    if any(not set(axes) <= set(o) or len(set(o)) != len(o) for o in orders):
        return None
    return ["".join(a for a in o if a in axes) for o in orders]


def _fold_symbolic(gm: fx.GraphModule, sites: list[AttentionSite], plan: Plan, planned: dict[str, SitePlan],
                   grid_hint: Optional[TokenGrid], config: ParoConfig, result: FoldResult) -> FoldResult:
    """Order plans on symbolic sizes: the common order folded, residuals computed in the graph.

    Every size the inserted ops need is rebuilt from the graph's inputs (`InputSizes`). A planned site the
    folded region does not reach (or all of them, when the region cannot run in the common order) gets its whole
    permutation computed in the graph from the grid layout inference finds for it, applied by the kernel; a site
    whose orders cannot be applied at all stays on SDPA with the reason. Every decision is taken before the graph
    is touched."""
    by_id = {s.site_id: s for s in sites}
    inputs = InputSizes(gm.graph)
    problem = ""
    try:
        region: Optional[TokenRegion] = analyse_region(gm, sites, plan, grid_hint)
    except FoldError as error:
        region, problem = None, str(error)
    if region is not None and not _region_sizes_covered(region, sites, inputs):
        region, problem = None, "a size of the token region is carried by no graph input"
    in_region: dict[str, list[str]] = {}
    unreached: list[str] = []
    for sid, sp in planned.items():
        state = region.analysis.state.get(by_id[sid].node) if region is not None else None
        has_orders = bool(sp.orders) and len(sp.orders) == sp.heads
        if state is None:
            if has_orders:
                unreached.append(sid)
            # else: a static site with a stored [H, N] permutation: it stays whole in the kernel (set before)
            continue
        orders = project_orders(list(sp.orders), region.axes) if has_orders else None
        # the site's tokens run in the common order: SDPA is exact there (attention is equivariant)
        if orders is None:
            result.fallbacks[sid] = (f"orders {sorted(set(sp.orders))} do not name the graph's grid axes "
                                     f"{region.axes!r}" if has_orders else "the plan has no per-head order strings")
        elif _visual_segments(state) != 1:
            result.fallbacks[sid] = "its tokens are not one visual segment of the graph's grid"
        else:
            in_region[sid] = orders
    layouts = infer_layouts(gm, [by_id[sid] for sid in unreached]) if unreached else {}
    whole: dict[str, WholePermutation] = {}
    for sid in unreached:
        found = _whole_permutation(planned[sid], layouts[sid], inputs)
        if isinstance(found, str):
            result.fallbacks[sid] = f"{problem}; {found}" if problem else found
        else:
            whole[sid] = found
    for sid, why in result.fallbacks.items():
        result.fallbacks[sid] = (f"plan orders cannot be applied with symbolic shapes: {why}; kept on SDPA (compile "
                                 "with dynamic=False, or fix the plan, to apply them)")
    if result.fallbacks and config.fallback == "error":
        details = "\n".join(f"  {sid}: {why}" for sid, why in result.fallbacks.items())
        raise DynamicPlanError(f"{len(result.fallbacks)} planned site(s) cannot use their plan:\n{details}")
    for sid, reason in result.fallbacks.items():
        by_id[sid].reasons.append(reason)
        for table in (result.kernel_perms, result.descriptions, result.folded_orders, result.kernel_permutation):
            table.pop(sid, None)
    # the graph changes from here on
    order = region.axes if region is not None else None
    if in_region:
        order = _most_used_order(Counter(o for orders in in_region.values() for o in orders), region.axes)
    if order is not None and order != region.axes:
        applied = apply_order(gm, sites, region, order, inputs)
        result.record(applied, order)
        rw: Optional[Rewriter] = applied.rewriter
    elif region is not None:
        rw = Rewriter(gm, region.axes, region.axes, region.grid_factors, inputs)
        result.reason = f"most heads use the natural order {region.axes}: nothing to fold"
    else:
        rw = None
        result.reason = problem
    if not in_region and not whole:
        return result
    folded = result.order
    built = {by_id[sid].node for sid in list(in_region) + list(whole)}
    first_site = next(n for n in gm.graph.nodes if n in built)
    residuals: dict[tuple, fx.Node] = {}
    for sid, orders in in_region.items():
        if all(o == order for o in orders):
            result.set_site(sid, None, "none", folded)
            continue
        state = region.analysis.state[by_id[sid].node]
        key = (order, tuple(orders), tuple((seg.kind, str(seg.length)) for seg in state.segs))
        if key not in residuals:  # one index computation per distinct (orders, layout), not per layer
            residuals[key] = rw.residual(state.segs, orders, site_device(by_id[sid]), first_site)
        result.set_site(sid, residuals[key], "residual" if folded else "full", folded)
    for sid, found in whole.items():
        key = ("model", tuple(found.orders), tuple(str(f.size) for f in found.factors),
               tuple((seg.kind, str(seg.length)) for seg in found.segs))
        if key not in residuals:
            model_order = Rewriter(gm, found.axes, found.axes, [(f.node, f.dim) for f in found.factors], inputs)
            residuals[key] = model_order.residual(found.segs, found.orders, site_device(by_id[sid]), first_site)
        result.set_site(sid, residuals[key], "full", None)
    gm.graph.lint()
    gm.recompile()
    if region is not None:
        result.grid = {"axes": region.axes, "order": order}
    return result


def _region_sizes_covered(region: TokenRegion, sites: list[AttentionSite], inputs: InputSizes) -> bool:
    """Whether every size the rewrite of ``region`` reads (grid axes, segment lengths) comes from the inputs."""
    sizes = [f if isinstance(f, int) else shape_of(f[0])[f[1]] for f in region.grid_factors]
    states = [b.state for b in region.analysis.boundaries] + [region.analysis.state[n] for n, _ in region.sources]
    states += [region.analysis.state[s.node] for s in sites if s.node in region.analysis.state]
    sizes += [seg.length for st in states for seg in st.segs]
    return all(inputs.covers(size) for size in sizes)


@dataclass
class WholePermutation:
    """A site's whole permutation over the grid layout inference found for it (tokens in model order)."""

    axes: str
    orders: list[str]
    factors: list[Factor]
    segs: tuple[Seg, ...]


def _whole_permutation(site_plan: SitePlan, layout: SiteLayout, inputs: InputSizes) -> WholePermutation | str:
    """How to compute a site's permutation in the graph from its own grid, or why it cannot be."""
    factors = layout.factors
    if factors is None or layout.seq_len is None:
        return "no layout op forms this site's tokens from a grid in the graph"
    axes = "FHW" if len(factors) == 3 else "HW"
    orders = project_orders(list(site_plan.orders), axes)
    if orders is None:
        return f"orders {sorted(set(site_plan.orders))} do not name the site's grid axes {axes!r}"
    visual = math.prod(f.size for f in factors)
    text, offset = layout.seq_len - visual, layout.visual_offset
    if known_equal(text, 0):
        segs: tuple[Seg, ...] = (Seg("vis", visual),)
    elif known_equal(offset, 0):
        segs = (Seg("vis", visual), Seg("txt", text))
    elif known_equal(offset, text):
        segs = (Seg("txt", text), Seg("vis", visual))
    else:
        return "text tokens on both sides of the visual tokens"
    if not all(inputs.covers(size) for size in [f.size for f in factors] + [seg.length for seg in segs]):
        return "a size of its grid is carried by no graph input"
    return WholePermutation(axes, orders, factors, segs)


def fold_order(gm: fx.GraphModule, sites: list[AttentionSite], order: str, grid: Optional[TokenGrid] = None) -> FoldResult:
    """Fold one axis-order string (e.g. "HWF") for every site, without a plan: works on symbolic grids
    (dynamic=True). Sites then need no kernel permutation for that order."""
    result = FoldResult()
    try:
        region = analyse_region(gm, sites, None, grid)
    except FoldError as error:
        result.reason = str(error)
        return result
    if sorted(order) != sorted(region.axes):
        raise ValueError(f"order {order!r} does not name the grid axes {region.axes!r}")
    if order == region.axes:
        result.reason = "natural order"
        return result
    inputs = InputSizes(gm.graph)
    if not _region_sizes_covered(region, sites, inputs):
        result.reason = "a size of the token region is carried by no graph input"
        return result
    result.record(apply_order(gm, sites, region, order, inputs), order)
    for site in sites:
        if site.supported and site.node in region.analysis.state:
            result.set_site(site.site_id, None, "none", order)
    return result
