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

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
import torch.fx as fx

from paro_compile.grid import TokenGrid, candidate_orders, order_permutation
from paro_compile.passes.fold_analysis import FoldError, State, TokenRegion, analyse_region
from paro_compile.passes.fold_rewrite import AppliedOrder, Rewriter, apply_order, common_permutation, residual_permutation
from paro_compile.passes.fx_utils import fake_value, static_int

if TYPE_CHECKING:
    from paro_compile.config import ParoConfig
    from paro_compile.passes.discover import AttentionSite
    from paro_compile.plan import Plan, SitePlan


class DynamicPlanError(FoldError):
    """A plan that cannot be applied to a graph with symbolic token counts."""


@dataclass
class FoldResult:
    """What the pass did; the backend copies `descriptions` and `gathers` into the compile report."""

    kernel_perms: dict[str, Optional[torch.Tensor | fx.Node]] = field(default_factory=dict)
    """site → what its kernel still applies: an [H, N] permutation, a graph node computing it, or None."""
    descriptions: dict[str, str] = field(default_factory=dict)
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
                      grid: Optional[TokenGrid] = None) -> FoldResult:
    """Fold the plan's per-site permutations into layout ops (see module docstring). Mutates ``gm``.

    ``config.fold_permutations=False`` leaves the graph alone (the kernels then apply the plan's
    permutations). ``grid`` gives the token grid where the graph does not form the tokens from one and the
    plan has none. With a symbolic sequence length (``dynamic=True``) the plan's per-head order strings are
    applied to the inferred grid: the common order goes into the layout ops and the residuals are computed
    in the graph from the grid sizes (`Rewriter.residual`). A plan without order strings raises
    DynamicPlanError.
    """
    result = FoldResult()
    if not config.fold_permutations:
        result.reason = "fold_permutations=False"
        return result
    by_id = {s.site_id: s for s in sites}
    planned = {s.site_id: plan.sites.get(s.site_id) for s in sites if s.supported}
    planned = {k: v for k, v in planned.items() if v is not None and v.perm is not None}
    symbolic_sites = {sid for sid in planned if static_int(by_id[sid].seq_len) is None}
    for sid, sp in list(planned.items()):
        if sp.is_identity_perm():
            result.kernel_perms[sid] = None
            result.descriptions[sid] = "identity"
            del planned[sid]
            continue
        if sid in symbolic_sites and not (sp.orders and len(sp.orders) == sp.heads):
            raise DynamicPlanError(
                f"site {sid} has a symbolic sequence length and its plan holds a [H, N] permutation but no per-head "
                "order strings: with dynamic shapes only order plans (SitePlan.orders + grid) apply; compile with "
                "dynamic=False or use a plan with orders")
        result.kernel_perms[sid] = _on_device(sp.perm, site_device(by_id[sid])) if sid not in symbolic_sites else None
        result.descriptions[sid] = "kernel"
    if not planned:
        result.reason = "no site has a permutation"
        return result
    try:
        region = analyse_region(gm, sites, plan, grid)
    except FoldError as error:
        if symbolic_sites & set(planned):
            raise DynamicPlanError(f"symbolic shapes with a permuted plan need the token grid from the graph: {error}") from error
        result.reason = str(error)
        return result
    site_states = {s.site_id: region.analysis.state.get(s.node) for s in sites}
    if region.symbolic or symbolic_sites & set(planned):
        # a symbolic grid, or a static grid next to a symbolic text length: no [H, N] constant fits
        return _fold_symbolic(gm, sites, planned, region, site_states, result)
    counts: Counter = Counter()
    site_grids: dict[str, TokenGrid] = {}
    for sid, sp in planned.items():
        st = site_states.get(sid)
        if st is None:
            continue
        text = sum(static_int(s.length) for s in st.segs if s.kind == "txt")
        g = region.static_grid(text, "prefix" if st.segs[0].kind == "txt" else "suffix")
        if g is None or _visual_segments(st) != 1 or (sp.grid is not None and sp.grid.sizes != g.sizes):
            continue
        site_grids[sid] = g
        counts.update(o for o in _head_orders(sp, g) if o is not None)
    if not counts:
        result.reason = "no planned site is reached from the token sources"
        return result
    order = _most_used_order(counts, region.axes)
    if order == region.axes:
        result.reason = f"most heads use the natural order {region.axes}: nothing to fold"
        return result
    result.record(apply_order(gm, sites, region, order), order)
    for sid, sp in planned.items():
        st = site_states.get(sid)
        if sid not in site_grids:
            # unreached sites keep the whole permutation in model order; a reached site runs in the common
            # order, and without its grid its residual cannot be built
            if st is not None:
                raise RuntimeError(f"site {sid} is in the permuted region but its grid is unknown")
            continue
        residual = residual_permutation(sp.perm, common_permutation(st.segs, site_grids[sid], order))
        if bool((residual == torch.arange(residual.shape[-1], device=residual.device)).all()):
            result.kernel_perms[sid] = None
            result.descriptions[sid] = result.folded_label
        else:
            result.kernel_perms[sid] = _on_device(residual, site_device(by_id[sid]))
            result.descriptions[sid] = "kernel"
    # sites reached without a plan entry run in the permuted order: attention is equivariant, nothing to do.
    result.grid = {"axes": region.axes, "order": order}
    return result


def _fold_symbolic(gm: fx.GraphModule, sites: list[AttentionSite], planned: dict[str, SitePlan], region: TokenRegion,
                   site_states: dict[str, Optional[State]], result: FoldResult) -> FoldResult:
    """Order plans on symbolic sizes: fold the common order, residuals computed in the graph."""
    by_id = {s.site_id: s for s in sites}
    axes = region.axes
    counts: Counter = Counter()
    for sid, sp in planned.items():
        if not sp.orders or len(sp.orders) != sp.heads:
            raise DynamicPlanError(f"site {sid}: a plan applied to a symbolic grid needs per-head order strings")
        if _visual_segments(site_states.get(sid)) != 1:
            raise DynamicPlanError(f"site {sid}: its tokens are not reached from the visual token source of the "
                                   "graph, so its orders cannot be applied to the symbolic grid")
        bad = [o for o in sp.orders if sorted(o) != sorted(axes)]
        if bad:
            raise DynamicPlanError(f"site {sid}: orders {sorted(set(bad))} do not name the grid axes {axes!r}")
        counts.update(sp.orders)
    order = _most_used_order(counts, axes)
    if order != axes:
        applied = apply_order(gm, sites, region, order)
        result.record(applied, order)
        rw = applied.rewriter
    else:
        rw = Rewriter(gm, order, axes, region.grid_factors)
        result.reason = f"most heads use the natural order {axes}: nothing to fold"
    residuals: dict[tuple, fx.Node] = {}
    first_site = next(n for n in gm.graph.nodes if any(n is by_id[sid].node for sid in planned))
    for sid, sp in planned.items():
        if all(o == order for o in sp.orders):
            result.kernel_perms[sid] = None
            result.descriptions[sid] = result.folded_label
            continue
        st = site_states[sid]
        key = (tuple(sp.orders), tuple((seg.kind, str(seg.length)) for seg in st.segs))
        if key not in residuals:  # one index computation per distinct (orders, layout), not per layer
            residuals[key] = rw.residual(st.segs, list(sp.orders), site_device(by_id[sid]), first_site)
        result.kernel_perms[sid] = residuals[key]
        result.descriptions[sid] = "kernel"
    gm.graph.lint()
    gm.recompile()
    result.grid = {"axes": axes, "order": order}
    return result


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
    result.record(apply_order(gm, sites, region, order), order)
    for site in sites:
        if site.supported and site.node in region.analysis.state:
            result.kernel_perms[site.site_id] = None
            result.descriptions[site.site_id] = result.folded_label
    return result
