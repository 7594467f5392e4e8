"""ParoPlan: per attention site, the token order and the static block masks.

The backend consumes `Plan.sites[site_id]` (`SitePlan.perm`, `SitePlan.block_masks` or `SitePlan.csr(bucket)`),
`Plan.step_boundaries` and `Plan.timestep_arg`; `Plan.check_sites(sites)` validates a plan against the
attention sites `passes.discover.find_attention_sites` found in a graph.

A plan may hold several entries per site, one per token grid (resolution × frames × text length): ``sites`` holds
each site's first entry, ``other_shapes`` the others. `Plan.select` picks, for a graph, the entry of each site for the
graph's token count (and grid, when two entries share a count) and returns a single-shape plan (one entry per site)
that the passes read; `Plan.add_shape` and `Plan.merge` add the entries of another calibration. That logic lives in
`paro_compile.plan_shapes`, the content checks shared with plan files in `paro_compile.plan_checks`; both modules'
public names are importable from here too.

A `SitePlan` or `Plan` checks itself when it is built (`validate`): every permutation row is a permutation, every
mask keeps its diagonal blocks and the blocks of text rows and columns (the method always keeps them), dense
buckets are all ones, orders name the grid's axes and agree with the permutation. A plan that passes can be saved
and loaded back. The file format (`Plan.save`, `Plan.load`) lives in `paro_compile.plan_file` and is documented
in docs/plan_format.md.
"""
from __future__ import annotations

import hashlib
import operator
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import torch

from paro_compile.grid import TokenGrid, orders_permutation
from paro_compile.kernels.block_mask import block_mask_to_csr, num_blocks
from paro_compile.kernels.reference import PV_DTYPES, QK_BITS
from paro_compile.passes.fx_utils import static_int
from paro_compile.plan_checks import (  # noqa: F401 - VISUAL_AXES, text_block_range: re-exported
    VISUAL_AXES,
    is_finite_number,
    mandatory_blocks_problem,
    order_problem,
    permutation_problem,
    text_block_range,
)
from paro_compile.plan_shapes import (  # noqa: F401 - ShapeSelection, describe_grid: re-exported
    ShapeSelection,
    add_entries,
    describe_grid,
    describe_shape,
    grid_layout_key,
    merge_plans,
    select_entries,
    shape_conflict,
)

PLAN_FORMAT = "paro_plan"
PLAN_FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
"""Version 1 holds one entry per site; version 2 may hold several per site (one per token grid)."""
METADATA_KEY = "paro_plan"


class PlanError(ValueError):
    """A plan that cannot be used: a file that is not a plan, has another version or is corrupt, or a plan
    built in code whose fields contradict each other."""


class PlanMismatchError(PlanError):
    """A plan that does not fit the model or graph it is applied to."""


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the parameter names and shapes (not values, not dtypes): same architecture ⇒ same fingerprint."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(remove_duplicate=False), key=lambda item: item[0]):
        digest.update(f"{name}:{tuple(param.shape)};".encode())
    return digest.hexdigest()[:24]


def _fields_equal(a: Any, b: Any) -> bool:
    """Dataclass field equality that compares tensors by value (never "ambiguous truth value" errors)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu()))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_fields_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_fields_equal(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _dataclass_eq(self, other) -> bool:
    # torch.compile compares backend options (a Plan among them) when it looks up cached graphs, so
    # equality must work on tensors: compiling one model twice with two plans used to raise here.
    if type(self) is not type(other):
        return NotImplemented
    return all(_fields_equal(getattr(self, f.name), getattr(other, f.name)) for f in fields(self) if f.compare)


# ---- checks shared by plans built in code and plans read from files ----------------------------------------
def _whole_number(value: Any, what: str, minimum: int) -> int:
    """``value`` as an int ≥ ``minimum``; bools and floats are refused (True is not a head count)."""
    if isinstance(value, bool):
        raise PlanError(f"{what} must be an int >= {minimum}, got the bool {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise PlanError(f"{what} must be an int >= {minimum}, got {type(value).__name__} {value!r}") from None
    if number < minimum:
        raise PlanError(f"{what} must be an int >= {minimum}, got {number}")
    return number


@dataclass(eq=False)
class SitePlan:
    """What the backend needs to lower one site.

    perm: [H, N] int64, per head the PARO order (perm[h, i] = model token at position i); None = identity.
    block_masks: bool [S, H, ceil(N/block_size), ceil(N/block_size)], one mask per step bucket, in the
    permuted order. S == 1 when masks do not depend on the denoising step.
    """

    __eq__ = _dataclass_eq

    site_id: str
    heads: int
    seq_len: int
    block_size: int
    perm: Optional[torch.Tensor]
    block_masks: torch.Tensor
    orders: list[str] = field(default_factory=list)
    grid: Optional[TokenGrid] = None
    """The token layout the orders refer to (None: perm is stored as is)."""
    empty_heads: list[int] = field(default_factory=list)
    """Heads whose calibration output was negligible (reported; masks pruned only with empty_heads="minimal")."""
    dense_buckets: list[int] = field(default_factory=list)
    """Step buckets whose mask is all ones (``dense_steps``)."""
    stats: dict[str, Any] = field(default_factory=dict)
    """JSON-able calibration report: density and kept mass per bucket, per-head scores."""

    def __post_init__(self) -> None:
        if isinstance(self.block_masks, torch.Tensor) and self.block_masks.dim() == 3:
            self.block_masks = self.block_masks.unsqueeze(0)
        self.validate()

    @property
    def num_buckets(self) -> int:
        return int(self.block_masks.shape[0])

    @property
    def num_blocks(self) -> int:
        return num_blocks(self.seq_len, self.block_size)

    @property
    def shape_key(self) -> tuple:
        """(seq_len, grid layout): what tells a site's entries for different token grids apart (`grid_layout_key`)."""
        return (self.seq_len, grid_layout_key(self.grid))

    @property
    def shape_description(self) -> str:
        """The token grid this entry is for, e.g. ``seq_len 1250 (2×16×16 + 226 text)``."""
        return describe_shape(self.seq_len, self.grid)

    def validate(self) -> None:
        """Raise PlanError naming the site and the field when the site plan is malformed: sizes, mask shape and
        dtype, a permutation row that is not a permutation, a mask without its diagonal or text blocks, a dense
        bucket that is not all ones, orders that do not name the grid's axes or disagree with ``perm``."""
        if not isinstance(self.site_id, str) or not self.site_id:
            raise PlanError(f"site_id must be a non-empty string, got {self.site_id!r}")
        where = f"site {self.site_id!r}"
        self.heads = _whole_number(self.heads, f"{where}: heads", 1)
        self.seq_len = _whole_number(self.seq_len, f"{where}: seq_len", 1)
        self.block_size = _whole_number(self.block_size, f"{where}: block_size", 1)
        if self.grid is not None:
            if not isinstance(self.grid, TokenGrid):
                raise PlanError(f"{where}: grid must be a TokenGrid or None, got {type(self.grid).__name__}")
            if self.grid.num_tokens != self.seq_len:
                raise PlanError(f"{where}: grid {self.grid} has {self.grid.num_tokens} tokens, site has {self.seq_len}")
        self._validate_masks(where)
        self._validate_perm_and_orders(where)
        for name, values, bound in (("empty_heads", self.empty_heads, self.heads),
                                    ("dense_buckets", self.dense_buckets, self.num_buckets)):
            if not isinstance(values, list):
                raise PlanError(f"{where}: {name} must be a list of ints, got {type(values).__name__}")
            for value in values:
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < bound:
                    raise PlanError(f"{where}: {name} holds {value!r}; expected ints in range(0, {bound})")
            if len(set(values)) != len(values):
                raise PlanError(f"{where}: {name} {values} repeats an entry")
        for bucket in self.dense_buckets:
            if not bool(self.block_masks[bucket].all()):
                raise PlanError(f"{where}: dense_buckets lists bucket {bucket} but its masks are not all ones")
        if not isinstance(self.stats, dict):
            raise PlanError(f"{where}: stats must be a dict (a JSON object), got {type(self.stats).__name__}")

    def _validate_masks(self, where: str) -> None:
        masks = self.block_masks
        if not isinstance(masks, torch.Tensor):
            raise PlanError(f"{where}: block_masks must be a bool tensor, got {type(masks).__name__}")
        nb = self.num_blocks
        expected = (self.heads, nb, nb)
        if masks.dim() != 4 or tuple(masks.shape[1:]) != expected or masks.shape[0] < 1:
            raise PlanError(
                f"{where}: block_masks has shape {tuple(masks.shape)}, expected "
                f"[S, {self.heads}, {nb}, {nb}] for {self.heads} heads, N={self.seq_len}, block {self.block_size}"
            )
        if masks.dtype != torch.bool:
            if masks.dtype.is_floating_point or masks.dtype.is_complex:
                raise PlanError(f"{where}: block_masks has dtype {masks.dtype}; masks are bool (or 0/1 integers)")
            if not bool(((masks == 0) | (masks == 1)).all()):
                raise PlanError(f"{where}: block_masks of dtype {masks.dtype} holds values other than 0 and 1")
            self.block_masks = masks = masks.bool()
        problem = mandatory_blocks_problem(masks, self.block_size, self.grid)
        if problem:
            raise PlanError(f"{where}: block_masks: {problem}; masks always keep the diagonal and text blocks "
                            "(calibration keeps them), a mask without them leaves query rows without keys")

    def _validate_perm_and_orders(self, where: str) -> None:
        grid = self.grid
        if not isinstance(self.orders, list):
            raise PlanError(f"{where}: orders must be a list of order strings, got {type(self.orders).__name__}")
        if self.orders and len(self.orders) != self.heads:
            raise PlanError(f"{where}: {len(self.orders)} orders for {self.heads} heads")
        for head, order in enumerate(self.orders):
            problem = order_problem(order, grid.axes if grid is not None else None)
            if problem:
                raise PlanError(f"{where}: orders[{head}] {problem}")
        perm = self.perm
        if perm is not None:
            if not isinstance(perm, torch.Tensor):
                raise PlanError(f"{where}: perm must be an integer tensor [H, N] or None, got {type(perm).__name__}")
            if tuple(perm.shape) != (self.heads, self.seq_len):
                raise PlanError(f"{where}: perm has shape {tuple(perm.shape)}, expected ({self.heads}, {self.seq_len})")
            problem = permutation_problem(perm, self.seq_len)
            if problem:
                raise PlanError(f"{where}: perm {problem}")
        if grid is not None and self.orders:
            derived = orders_permutation(grid, self.orders, device=perm.device if perm is not None else None)
            actual = perm.long() if perm is not None else torch.arange(self.seq_len, device=derived.device).expand_as(derived)
            if not torch.equal(actual, derived):
                head = int((actual != derived).any(-1).nonzero()[0])
                raise PlanError(f"{where}: perm row {head} is not the order {self.orders[head]!r} of grid {grid} "
                                f"({'identity perm' if perm is None else 'another permutation'}); with dynamic shapes "
                                "the orders are applied, with static shapes the perm: they must agree")
        elif grid is not None and grid.text_tokens and perm is not None:
            text = grid.text_slice
            kept = torch.arange(text.start, text.stop, device=perm.device)
            moved = (perm[:, text].long() != kept).any(-1)
            if bool(moved.any()):
                raise PlanError(f"{where}: perm row {int(moved.nonzero()[0])} moves text tokens "
                                f"{text.start}..{text.stop - 1} of grid {grid}; text tokens are never reordered")

    def csr(self, bucket: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(kv_counts [H, Mq] int32, kv_indices [H, Mq, Nk] int32) of the mask of step bucket ``bucket``."""
        if not 0 <= bucket < self.num_buckets:
            raise IndexError(f"site {self.site_id}: bucket {bucket} out of range (plan has {self.num_buckets})")
        return block_mask_to_csr(self.block_masks[bucket])

    def density(self, bucket: Optional[int] = None) -> float:
        """Share of kept blocks (of one bucket, or averaged over buckets)."""
        masks = self.block_masks if bucket is None else self.block_masks[bucket]
        return float(masks.float().mean().item()) if masks.numel() else 1.0

    def applies_to_symbolic_grid(self) -> bool:
        """True when the site can be applied to a graph whose token count is symbolic (dynamic=True): an
        identity order, or per-head order strings (axis permutations of whatever grid the graph has)."""
        return self.perm is None or self.is_identity_perm() or (bool(self.orders) and len(self.orders) == self.heads)

    @classmethod
    def from_orders(cls, site_id: str, orders: list[str], grid: TokenGrid, block_size: int = 64,
                    block_masks: Optional[torch.Tensor] = None) -> "SitePlan":
        """An order plan: per-head order strings on ``grid`` (perm derived), dense masks unless given.
        With dynamic shapes only the orders are used (applied to the graph's symbolic grid)."""
        heads, n = len(orders), grid.num_tokens
        if block_masks is None:
            nb = num_blocks(n, block_size)
            block_masks = torch.ones(1, heads, nb, nb, dtype=torch.bool)
        return cls(site_id, heads, n, block_size, orders_permutation(grid, list(orders)), block_masks,
                   orders=list(orders), grid=grid)

    def is_identity_perm(self) -> bool:
        if self.perm is None:
            return True
        ident = torch.arange(self.seq_len, device=self.perm.device)
        return bool((self.perm == ident).all().item())


@dataclass(eq=False)
class Plan:
    __eq__ = _dataclass_eq

    sites: dict[str, SitePlan]
    step_boundaries: list[float] = field(default_factory=list)
    """Descending timesteps; bucket = number of boundaries greater than the current timestep."""
    timestep_arg: str = "timestep"
    fingerprint: Optional[str] = None
    """`model_fingerprint` of the calibrated model (or a graph fingerprint for auto-calibrated plans)."""
    density: Optional[float] = None
    """Target density asked for at calibration (per-site achieved density is in SitePlan.stats / density())."""
    alpha: Optional[float] = None
    qk_bits: Optional[int] = None
    pv_dtype: Optional[str] = None
    meta: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_FORMAT_VERSION
    other_shapes: dict[str, list[SitePlan]] = field(default_factory=dict)
    """Further entries of a site for other token grids, by site id (``sites`` holds each site's first entry). A site's
    entries have the same heads and differ in token count, or in grid layout when two share a count."""
    source: Optional[str] = field(default=None, compare=False, repr=False)
    """The file the plan was read from (`Plan.load`), named by the errors the backend raises; None: built in code."""

    def __post_init__(self) -> None:
        if isinstance(self.other_shapes, dict):  # a site without other grids has no key (as a loaded plan)
            self.other_shapes = {key: entries for key, entries in self.other_shapes.items()
                                 if not (isinstance(entries, list) and not entries)}
        self.validate()

    def validate(self) -> None:
        """Raise PlanError naming the field when plan-level fields are malformed or a site's bucket count differs
        from the step boundaries' (each site validated itself when it was built)."""
        if not isinstance(self.sites, dict):
            raise PlanError(f"Plan.sites must be a dict of site id → SitePlan, got {type(self.sites).__name__}")
        for key, site in self.sites.items():
            if not isinstance(site, SitePlan):
                raise PlanError(f"Plan.sites[{key!r}] is a {type(site).__name__}, not a SitePlan")
            if key != site.site_id:
                raise PlanError(f"Plan.sites key {key!r} differs from its SitePlan's site_id {site.site_id!r}")
        bounds = self.step_boundaries
        if not isinstance(bounds, (list, tuple)) or not all(is_finite_number(b) for b in bounds):
            raise PlanError(f"Plan.step_boundaries must be a list of finite numbers, got {bounds!r}")
        if any(not a > b for a, b in zip(bounds, bounds[1:])):
            raise PlanError(f"Plan.step_boundaries {list(bounds)} must be strictly descending (each bucket is the "
                            "range of timesteps between two boundaries)")
        if not isinstance(self.timestep_arg, str) or not self.timestep_arg.isidentifier():
            raise PlanError(f"Plan.timestep_arg must name a model argument (an identifier), got {self.timestep_arg!r}")
        if self.fingerprint is not None and not isinstance(self.fingerprint, str):
            raise PlanError(f"Plan.fingerprint must be a string or None, got {self.fingerprint!r}")
        for name, low, low_open in (("density", 0.0, True), ("alpha", 0.0, False)):
            value = getattr(self, name)
            if value is not None and not (is_finite_number(value) and (value > low if low_open else value >= low)
                                          and value <= 1.0):
                interval = f"({low}, 1]" if low_open else f"[{low}, 1]"
                raise PlanError(f"Plan.{name} must be None or a number in {interval}, got {value!r}")
        if self.qk_bits is not None and (isinstance(self.qk_bits, bool) or self.qk_bits not in QK_BITS):
            raise PlanError(f"Plan.qk_bits must be None or one of {QK_BITS}, got {self.qk_bits!r}")
        if self.pv_dtype is not None and self.pv_dtype not in PV_DTYPES:
            raise PlanError(f"Plan.pv_dtype must be None or one of {PV_DTYPES}, got {self.pv_dtype!r}")
        if not isinstance(self.meta, dict):
            raise PlanError(f"Plan.meta must be a dict (a JSON object), got {type(self.meta).__name__}")
        _whole_number(self.version, "Plan.version", 1)
        self._validate_other_shapes()
        for site in self.all_entries():
            if site.num_buckets != self.num_buckets:
                raise PlanError(f"site {site.site_id!r} ({site.shape_description}): {site.num_buckets} mask bucket(s), "
                                f"step_boundaries {list(bounds)} make {self.num_buckets}")

    def _validate_other_shapes(self) -> None:
        if not isinstance(self.other_shapes, dict):
            raise PlanError(f"Plan.other_shapes must be a dict of site id → list of SitePlan, got "
                            f"{type(self.other_shapes).__name__}")
        for key, entries in self.other_shapes.items():
            if key not in self.sites:
                raise PlanError(f"Plan.other_shapes has entries for site {key!r}, which Plan.sites does not have (a "
                                "site's first entry lives in Plan.sites; use Plan.add_shape to add entries)")
            if not isinstance(entries, list):
                raise PlanError(f"Plan.other_shapes[{key!r}] must be a list of SitePlan, got {type(entries).__name__}")
            first = self.sites[key]
            seen = {first.shape_key: first}
            for entry in entries:
                if not isinstance(entry, SitePlan):
                    raise PlanError(f"Plan.other_shapes[{key!r}] holds a {type(entry).__name__}, not a SitePlan")
                if entry.site_id != key:
                    raise PlanError(f"Plan.other_shapes[{key!r}] holds an entry of site {entry.site_id!r}")
                if entry.heads != first.heads:
                    raise PlanError(f"site {key!r}: the entry for {entry.shape_description} has {entry.heads} heads, the "
                                    f"entry for {first.shape_description} {first.heads}; a site's heads do not change "
                                    "with the token grid")
                problem = shape_conflict(entry, seen.values())
                if problem:
                    raise PlanError(f"site {key!r}: {problem}")
                seen[entry.shape_key] = entry

    # ---- shapes --------------------------------------------------------------------------------
    def entries(self, site_id: str) -> list[SitePlan]:
        """Every entry of ``site_id``, its first (``sites[site_id]``) first; empty for a site the plan lacks."""
        if site_id not in self.sites:
            return []
        return [self.sites[site_id], *self.other_shapes.get(site_id, [])]

    def all_entries(self) -> list[SitePlan]:
        """Every entry of every site: the first entries in site order, then the other shapes' (the file's order)."""
        return list(self.sites.values()) + [e for entries in self.other_shapes.values() for e in entries]

    def shapes(self) -> list[tuple[str, list[str]]]:
        """The token grids the plan covers: (description, site ids with an entry for it), first entries' grids first."""
        covered: dict[tuple, tuple[str, list[str]]] = {}
        for entry in self.all_entries():
            covered.setdefault(entry.shape_key, (entry.shape_description, []))[1].append(entry.site_id)
        return list(covered.values())

    def common_dense_buckets(self) -> list[int]:
        """The step buckets every entry keeps dense (``dense_steps`` at calibration)."""
        entries = self.all_entries()
        common = set(entries[0].dense_buckets) if entries else set()
        for entry in entries[1:]:
            common &= set(entry.dense_buckets)
        return sorted(common)

    def block_size_of(self, site_ids: Iterable[str]) -> Optional[int]:
        """The most common block size of the entries of ``site_ids``; None when the plan has none of them."""
        sizes = Counter(entry.block_size for sid in site_ids for entry in self.entries(sid))
        return sizes.most_common(1)[0][0] if sizes else None

    def describe_shapes(self) -> str:
        """``seq_len 1250 (2×16×16 + 226 text) at 6 sites; seq_len 4322 (...) at 6 sites``."""
        return "; ".join(f"{description} at {len(ids)} site{'s' if len(ids) != 1 else ''}"
                         for description, ids in self.shapes())

    def select(self, graph_shapes: Mapping[str, tuple[Any, Optional[TokenGrid]]]) -> "ShapeSelection":
        """The entries for a graph's shapes. ``graph_shapes``: site id → (token count, or None when it is symbolic;
        the grid the graph's tokens form, or None when unknown).

        A site with a static token count gets its entry with that count; when several entries share the count, the
        one whose grid layout is the graph's (unknown graph grid: none, the choice would be a guess); an entry whose
        grid differs from a known graph grid is not used. A symbolic token count gets the site's first entry (its
        orders are applied to the symbolic grid). Sites the plan lacks are left out (`check_sites` reports them).
        Returns the single-shape plan of the chosen entries and, per site left without one, why."""
        return select_entries(self, graph_shapes)

    def add_shape(self, sites: Union["Plan", Mapping[str, SitePlan], Iterable[SitePlan]], *, replace: bool = False) -> None:
        """Add, in place, the entries of another token grid: a `Plan`'s entries (only its sites: `merge` also checks
        that the two plans are calibrated alike), a dict of site id → `SitePlan`, or `SitePlan`s. A site the plan lacks
        gets its first entry; an entry for a grid a site already covers raises PlanError unless ``replace``. Every
        entry must have the plan's step-bucket count and its site's heads. Nothing changes when an entry is refused."""
        add_entries(self, sites, replace=replace)

    def merge(self, other: "Plan", *, replace: bool = False) -> "Plan":
        """A new plan with this plan's entries and ``other``'s (neither plan changes): one model calibrated at several
        token grids. The plans must agree on what makes them one plan (model fingerprint, timestep argument, step
        boundaries, calibration density and α, numerics); PlanError names the field that differs and how to
        calibrate alike. ``other``'s ``meta`` is kept under ``meta["merged"]`` when it differs. ``replace``: ``other``'s
        entry wins where both cover a site's grid (else that is an error)."""
        return merge_plans(self, other, replace=replace)

    # ---- run time ------------------------------------------------------------------------------
    @property
    def num_buckets(self) -> int:
        return len(self.step_boundaries) + 1

    def bucket_for_timestep(self, timestep: Any) -> int:
        """Number of boundaries greater than ``timestep`` (a number or a tensor: its first element)."""
        if isinstance(timestep, torch.Tensor):
            timestep = timestep.reshape(-1)[0].item()
        t = float(timestep)
        return sum(1 for b in self.step_boundaries if b > t)

    def overall_density(self, bucket: Optional[int] = None) -> float:
        """Kept blocks over all blocks of all sites' first entries (weighted by block count)."""
        kept = total = 0.0
        for site in self.sites.values():
            masks = site.block_masks if bucket is None else site.block_masks[bucket]
            kept += float(masks.sum().item())
            total += masks.numel()
        return kept / total if total else 1.0

    def summary(self) -> str:
        lines = [f"paro plan v{self.version}: {len(self.sites)} site(s), {self.num_buckets} step bucket(s), "
                 f"boundaries {self.step_boundaries}, overall density {self.overall_density():.3f}"]
        shapes = self.shapes()
        if len(shapes) > 1:
            lines.append(f"  {len(shapes)} token grids: {self.describe_shapes()}")
        for site in self.all_entries():
            per_bucket = ", ".join(f"{site.density(b):.3f}" for b in range(site.num_buckets))
            orders = ",".join(sorted(set(site.orders))) if site.orders else "identity"
            grid = f" ({describe_grid(site.grid)})" if len(shapes) > 1 and site.grid is not None else ""
            lines.append(f"  {site.site_id}: H={site.heads} N={site.seq_len}{grid} orders[{orders}] density[{per_bucket}]"
                         + (f" empty heads {site.empty_heads}" if site.empty_heads else ""))
        return "\n".join(lines)

    # ---- checks --------------------------------------------------------------------------------
    def check_model(self, model: torch.nn.Module) -> None:
        """Raise PlanMismatchError if the plan was calibrated on a model with other parameter names/shapes."""
        if self.fingerprint is None:
            return
        actual = model_fingerprint(model)
        if actual != self.fingerprint:
            raise PlanMismatchError(
                f"plan was calibrated on a model with fingerprint {self.fingerprint}, this model has {actual} "
                "(parameter names/shapes differ): re-run paro_compile.calibrate on this model"
            )

    def check_sites(self, sites: Iterable[Any], *, block_size: Optional[int] = None, allow_missing: bool = False,
                    allow_extra: bool = False) -> None:
        """Check the plan against the `AttentionSite`s of a graph; raise PlanMismatchError naming every mismatch.

        - a plan site id that is not in the graph → error ("extra"), unless ``allow_extra`` (the backend sets it:
          with graph breaks each graph holds only some of the model's sites);
        - a supported graph site that the plan does not cover → error ("missing"), unless ``allow_missing``;
        - a site whose heads differ from the plan's, or whose sequence length no entry of the site has → error;
        - a symbolic sequence length (``dynamic=True``) → accepted only for order plans
          (`SitePlan.applies_to_symbolic_grid`: per-head order strings, applied by the folding pass to the
          symbolic grid, masks dense), else an error; a symbolic head count → error;
        - ``block_size`` given and no entry of the site (at the graph's length) has it → error.
        Sites present in both but unsupported in the graph are not errors: they stay SDPA with their reason.
        """
        problems = self.site_problems(sites, block_size=block_size, allow_missing=allow_missing, allow_extra=allow_extra)
        if problems:
            raise PlanMismatchError("plan does not match this model/graph:\n  - "
                                    + "\n  - ".join(problem for _, problem in problems)
                                    + "\nre-run calibration for this model and input shape")

    def site_problems(self, sites: Iterable[Any], *, block_size: Optional[int] = None, allow_missing: bool = False,
                      allow_extra: bool = False) -> list[tuple[Optional[str], str]]:
        """What `check_sites` would raise, as (site id or None, problem) pairs; empty when the plan fits."""
        sites = list(sites)
        by_id = {site.site_id: site for site in sites}
        problems: list[tuple[Optional[str], str]] = []
        extra = [sid for sid in self.sites if sid not in by_id]
        if extra and not allow_extra:
            problems.append((extra[0], f"plan has site(s) the graph does not: {extra}"))
        missing = [s.site_id for s in sites if s.supported and s.site_id not in self.sites]
        if missing and not allow_missing:
            problems.append((missing[0], f"graph has attention site(s) the plan does not cover: {missing}"))
        for sid, site_plan in self.sites.items():
            site = by_id.get(sid)
            if site is None:
                continue
            heads, seq_len = static_int(site.heads), static_int(site.seq_len)
            if site.heads is not None and heads is None:
                problems.append((sid, f"site {sid}: symbolic head count ({site.heads}); plans need a static number of "
                                      "heads"))
                continue
            if site.seq_len is not None and seq_len is None and not site_plan.applies_to_symbolic_grid():
                problems.append((sid, f"site {sid}: symbolic sequence length ({site.seq_len}) and the plan has a fixed "
                                      "[H, N] permutation without per-head order strings; compile with dynamic=False, "
                                      "or use an order plan (SitePlan.orders + grid, e.g. SitePlan.from_orders) whose "
                                      "orders are applied to the symbolic grid (block masks are then dense)"))
                continue
            if heads is not None and heads != site_plan.heads:
                problems.append((sid, f"site {sid}: plan has {site_plan.heads} heads, graph has {heads}"))
            entries = self.entries(sid)
            if seq_len is not None:
                entries = [e for e in entries if e.seq_len == seq_len]
                if not entries:
                    counts = " or ".join(str(n) for n in dict.fromkeys(e.seq_len for e in self.entries(sid)))
                    problems.append((sid, f"site {sid}: plan has seq_len {counts}, graph has {seq_len}"))
            if block_size is not None and entries and all(e.block_size != block_size for e in entries):
                problems.append((sid, f"site {sid}: plan has block_size {entries[0].block_size}, backend uses "
                                      f"{block_size}"))
        return problems

    # ---- file ----------------------------------------------------------------------------------
    def save(self, path: Union[str, Path]) -> Path:
        """Write the plan as one safetensors file (tensors + JSON header), atomically; returns the path.
        Raises PlanError, writing nothing, for a plan that `load` would refuse (docs/plan_format.md)."""
        from paro_compile.plan_file import save_plan

        return save_plan(self, path)

    @classmethod
    def load(cls, path: Union[str, Path], model: Optional[torch.nn.Module] = None) -> "Plan":
        """Read and validate a plan file; with ``model``, also check its fingerprint (`check_model`). Every
        malformed file raises PlanError naming the file, the site and the field (docs/plan_format.md)."""
        from paro_compile.plan_file import load_plan

        plan = load_plan(path)
        if model is not None:
            try:
                plan.check_model(model)
            except PlanMismatchError as error:
                raise PlanMismatchError(f"plan file {path}: {error}") from error
        return plan
