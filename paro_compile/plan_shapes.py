"""Token-grid entries of a plan: what tells a site's entries apart, and choosing, adding and merging them.

A plan may hold several entries per site, one per token grid (resolution × frames × text length). `select_entries`
(`Plan.select`) picks the entry of each site for a graph's token count and grid; `add_entries` (`Plan.add_shape`) and
`merge_plans` (`Plan.merge`) add another calibration's entries. `shape_conflict` is the rule both plans built in code
and plan files (`paro_compile.plan_file`) follow: two entries of one site never share a grid, nor a token count that
no grid tells apart.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Union

from paro_compile.grid import TokenGrid

if TYPE_CHECKING:
    from paro_compile.plan import Plan, SitePlan


def grid_layout_key(grid: Optional[TokenGrid]) -> Optional[tuple]:
    """What makes two grids the same token layout: a one-frame video and an image are; without text tokens the text
    position does not matter. None for no grid."""
    if grid is None:
        return None
    return (grid.frames or 1, grid.height, grid.width, grid.text_tokens,
            grid.text_position if grid.text_tokens else "prefix")


def describe_grid(grid: TokenGrid) -> str:
    """``2×16×16 + 226 text`` (frames×height×width, images height×width; ``(suffix)`` when text follows)."""
    visual = "×".join(str(n) for n in ((grid.frames,) if grid.frames is not None else ()) + (grid.height, grid.width))
    if not grid.text_tokens:
        return visual
    return f"{visual} + {grid.text_tokens} text" + (" (suffix)" if grid.text_position == "suffix" else "")


def describe_shape(seq_len: int, grid: Optional[TokenGrid]) -> str:
    """``seq_len 1250 (2×16×16 + 226 text)``, or ``seq_len 1250`` without a grid."""
    return f"seq_len {seq_len}" + (f" ({describe_grid(grid)})" if grid is not None else "")


def shape_conflict(entry: SitePlan, existing: Iterable[SitePlan]) -> Optional[str]:
    """Why ``entry`` cannot be one more entry of its site next to ``existing``, or None: two entries for one grid, or two
    for one token count that no grid tells apart (the backend could not choose between them)."""
    for other in existing:
        if other.shape_key == entry.shape_key:
            return f"two entries for {entry.shape_description}"
        if other.seq_len == entry.seq_len and (other.grid is None or entry.grid is None):
            return (f"entries for {other.shape_description} and {entry.shape_description} have one token count and no "
                    "grid to tell them apart; give both a grid (calibration records it)")
    return None


@dataclass
class ShapeSelection:
    """`Plan.select`'s answer for one graph."""

    plan: "Plan"
    """A single-shape plan: per site of the graph that has one, the entry for the graph's shape."""
    missing: dict[str, str]
    """Site id → why the plan has no entry for the site's shape in this graph."""


def select_entries(plan: "Plan", graph_shapes: Mapping[str, tuple[Any, Optional[TokenGrid]]]) -> "ShapeSelection":
    """`Plan.select`: the entries of ``plan`` for a graph's shapes."""
    from paro_compile.plan import Plan

    chosen: dict[str, SitePlan] = {}
    missing: dict[str, str] = {}
    for site_id, (seq_len, grid) in graph_shapes.items():
        entries = plan.entries(site_id)
        if not entries:
            continue
        if seq_len is None:
            chosen[site_id] = entries[0]
            continue
        here = describe_shape(seq_len, grid)
        covered_counts = " or ".join(e.shape_description for e in entries)
        candidates = [e for e in entries if e.seq_len == seq_len]
        if grid is not None:
            layout = grid_layout_key(grid)
            fitting = [e for e in candidates if e.grid is None or grid_layout_key(e.grid) == layout]
            if len(fitting) > 1:
                fitting = [e for e in fitting if e.grid is not None]
        else:
            fitting = candidates if len(candidates) == 1 else []
        if len(fitting) == 1:
            chosen[site_id] = fitting[0]
        elif candidates and grid is None:
            missing[site_id] = (f"graph has {here}, plan has {covered_counts}: several entries have this "
                                "seq_len and the graph's grid could not be inferred to choose one")
        else:
            missing[site_id] = f"graph has {here}, plan has {covered_counts} only"
    view = Plan(sites=chosen, step_boundaries=list(plan.step_boundaries), timestep_arg=plan.timestep_arg,
                fingerprint=plan.fingerprint, density=plan.density, alpha=plan.alpha, qk_bits=plan.qk_bits,
                pv_dtype=plan.pv_dtype, meta=plan.meta, version=plan.version, source=plan.source)
    return ShapeSelection(view, missing)


def add_entries(plan: "Plan", sites: Union["Plan", Mapping[str, "SitePlan"], Iterable["SitePlan"]], *,
                replace: bool = False) -> None:
    """`Plan.add_shape`: add, in place, the entries of another token grid to ``plan``."""
    from paro_compile.plan import Plan, PlanError, SitePlan

    if isinstance(sites, Plan):
        new_entries = sites.all_entries()
    elif isinstance(sites, Mapping):
        new_entries = list(sites.values())
    else:
        new_entries = list(sites)
    firsts = dict(plan.sites)
    others = {key: list(entries) for key, entries in plan.other_shapes.items()}
    for entry in new_entries:
        if not isinstance(entry, SitePlan):
            raise PlanError(f"Plan.add_shape takes SitePlans, got a {type(entry).__name__}")
        if entry.num_buckets != plan.num_buckets:
            raise PlanError(f"site {entry.site_id!r} ({entry.shape_description}): {entry.num_buckets} mask "
                            f"bucket(s), this plan's step_boundaries {list(plan.step_boundaries)} make "
                            f"{plan.num_buckets}; calibrate the shape with step_boundaries={list(plan.step_boundaries)}")
        first = firsts.get(entry.site_id)
        if first is None:
            firsts[entry.site_id] = entry
            continue
        current = [first, *others.get(entry.site_id, [])]
        same = [i for i, e in enumerate(current) if e.shape_key == entry.shape_key]
        if same and not replace:
            raise PlanError(f"site {entry.site_id!r} already has an entry for {entry.shape_description}; pass "
                            "replace=True to replace it")
        if same:
            current[same[0]] = entry
        else:
            problem = shape_conflict(entry, current)
            if problem:
                raise PlanError(f"site {entry.site_id!r}: {problem}")
            current.append(entry)
        firsts[entry.site_id] = current[0]
        others[entry.site_id] = current[1:]
    candidate = Plan(sites=firsts, step_boundaries=list(plan.step_boundaries), timestep_arg=plan.timestep_arg,
                     fingerprint=plan.fingerprint, density=plan.density, alpha=plan.alpha, qk_bits=plan.qk_bits,
                     pv_dtype=plan.pv_dtype, meta=plan.meta, version=plan.version,
                     other_shapes={key: entries for key, entries in others.items() if entries})
    plan.sites, plan.other_shapes = candidate.sites, candidate.other_shapes


def merge_plans(plan: "Plan", other: "Plan", *, replace: bool = False) -> "Plan":
    """`Plan.merge`: a new plan with the entries of ``plan`` and ``other``."""
    from paro_compile.plan import Plan, PlanError

    if not isinstance(other, Plan):
        raise TypeError(f"Plan.merge takes a Plan, got {type(other).__name__}")
    fixes = {
        "fingerprint": "the plans were calibrated on different models (parameter names/shapes differ)",
        "timestep_arg": "calibrate with the same timestep_arg",
        "step_boundaries": f"calibrate with step_boundaries={list(plan.step_boundaries)} (paro calibrate "
                           "--add-to uses the plan's boundaries)",
        "density": f"calibrate with density={plan.density}",
        "alpha": f"calibrate with alpha={plan.alpha}",
        "qk_bits": "build both plans for the same qk_bits",
        "pv_dtype": "build both plans for the same pv_dtype",
    }
    for name, fix in fixes.items():
        mine, theirs = getattr(plan, name), getattr(other, name)
        if list(mine) != list(theirs) if name == "step_boundaries" else mine != theirs:
            names = " and ".join(repr(p.source) for p in (plan, other) if p.source) or "the two plans"
            raise PlanError(f"cannot merge {names}: their {name} differs ({mine!r} vs {theirs!r}); {fix}")
    meta = dict(plan.meta)
    if other.meta != plan.meta:
        meta["merged"] = list(plan.meta.get("merged", [])) + [other.meta]
    merged = Plan(sites=dict(plan.sites), step_boundaries=list(plan.step_boundaries), timestep_arg=plan.timestep_arg,
                  fingerprint=plan.fingerprint, density=plan.density, alpha=plan.alpha, qk_bits=plan.qk_bits,
                  pv_dtype=plan.pv_dtype, meta=meta, version=plan.version,
                  other_shapes={key: list(entries) for key, entries in plan.other_shapes.items()})
    merged.add_shape(other, replace=replace)
    return merged
