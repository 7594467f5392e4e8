"""ParoPlan: per attention site, the token order and the static block masks, and the plan file.

The backend consumes `Plan.sites[site_id]` (`SitePlan.perm`, `SitePlan.block_masks` or `SitePlan.csr(bucket)`),
`Plan.step_boundaries` and `Plan.timestep_arg`; `Plan.check_sites(sites)` validates a plan against the
attention sites `passes.discover.find_attention_sites` found in a graph.

File format (one ``.safetensors`` file, see docs/calibration.md):
- tensors, per site number ``i`` (the position of the site in the header's ``sites`` list):
  ``"{i}/block_masks"`` uint8, the bool masks [S, H, Mq, Nk] bit-packed little-endian (flattened, 8 per byte);
  ``"{i}/perm"`` int32 [H, N], only when the permutation cannot be rebuilt from the grid and the orders.
- the header's ``__metadata__["paro_plan"]``: a JSON document with ``format`` ("paro_plan"), ``version``,
  ``fingerprint``, ``timestep_arg``, ``step_boundaries``, ``density``, ``alpha``, ``qk_bits``, ``pv_dtype``,
  ``meta`` and ``sites`` (a list of per-site objects: ``site_id``, ``heads``, ``seq_len``, ``block_size``,
  ``num_buckets``, ``orders``, ``grid``, ``perm`` ("identity" | "derived" | "stored"), ``empty_heads``,
  ``dense_buckets``, ``stats``).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch

from paro_compile.grid import TokenGrid, orders_permutation
from paro_compile.kernels.block_mask import block_mask_to_csr, num_blocks

PLAN_FORMAT = "paro_plan"
PLAN_FORMAT_VERSION = 1
METADATA_KEY = "paro_plan"


class PlanError(ValueError):
    """A plan file that cannot be read (not a plan, wrong version, corrupt)."""


class PlanMismatchError(PlanError):
    """A plan that does not fit the model or graph it is applied to."""


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the parameter names and shapes (not values, not dtypes): same architecture ⇒ same fingerprint."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(remove_duplicate=False), key=lambda item: item[0]):
        digest.update(f"{name}:{tuple(param.shape)};".encode())
    return digest.hexdigest()[:24]


def pack_bool(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor → uint8 [ceil(numel/8)], bit j of byte i = element 8i+j."""
    flat = mask.reshape(-1).to(torch.uint8).cpu()
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = (2 ** torch.arange(8, dtype=torch.int32)).to(torch.int32)
    return (flat.view(-1, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)


def unpack_bool(packed: torch.Tensor, shape: Iterable[int]) -> torch.Tensor:
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    bits = (packed.to(torch.int32)[:, None] >> torch.arange(8, dtype=torch.int32)) & 1
    flat = bits.reshape(-1)
    if flat.numel() < numel:
        raise PlanError(f"packed mask holds {flat.numel()} bits, shape {shape} needs {numel}")
    return flat[:numel].view(shape).bool()


def _as_int(value: Any) -> Optional[int]:
    """The value as an int, or None when it is symbolic. Never calls int() on a SymInt: that would guard on
    (specialize) the size and turn a dynamic graph static."""
    if isinstance(value, torch.SymInt):
        expr = value.node.expr
        return int(expr) if getattr(expr, "is_number", False) else None
    try:
        return int(value)
    except Exception:  # symbolic sizes (sympy expressions)
        return None


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
    return all(_fields_equal(getattr(self, f.name), getattr(other, f.name)) for f in fields(self))


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
        if self.block_masks.dim() == 3:
            self.block_masks = self.block_masks.unsqueeze(0)
        self.validate()

    @property
    def num_buckets(self) -> int:
        return int(self.block_masks.shape[0])

    @property
    def num_blocks(self) -> int:
        return num_blocks(self.seq_len, self.block_size)

    def validate(self) -> None:
        nb = self.num_blocks
        expected = (self.heads, nb, nb)
        if self.block_masks.dim() != 4 or tuple(self.block_masks.shape[1:]) != expected:
            raise PlanError(
                f"site {self.site_id}: block_masks has shape {tuple(self.block_masks.shape)}, expected "
                f"[S, {self.heads}, {nb}, {nb}] for {self.heads} heads, N={self.seq_len}, block {self.block_size}"
            )
        if self.block_masks.dtype != torch.bool:
            self.block_masks = self.block_masks.bool()
        if self.perm is not None and tuple(self.perm.shape) != (self.heads, self.seq_len):
            raise PlanError(f"site {self.site_id}: perm has shape {tuple(self.perm.shape)}, expected ({self.heads}, {self.seq_len})")
        if self.orders and len(self.orders) != self.heads:
            raise PlanError(f"site {self.site_id}: {len(self.orders)} orders for {self.heads} heads")
        if self.grid is not None and self.grid.num_tokens != self.seq_len:
            raise PlanError(f"site {self.site_id}: grid {self.grid} has {self.grid.num_tokens} tokens, site has {self.seq_len}")

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
        """Kept blocks over all blocks of all sites (weighted by block count)."""
        kept = total = 0.0
        for site in self.sites.values():
            masks = site.block_masks if bucket is None else site.block_masks[bucket]
            kept += float(masks.sum().item())
            total += masks.numel()
        return kept / total if total else 1.0

    def summary(self) -> str:
        lines = [f"paro plan v{self.version}: {len(self.sites)} site(s), {self.num_buckets} step bucket(s), "
                 f"boundaries {self.step_boundaries}, overall density {self.overall_density():.3f}"]
        for site in self.sites.values():
            per_bucket = ", ".join(f"{site.density(b):.3f}" for b in range(site.num_buckets))
            orders = ",".join(sorted(set(site.orders))) if site.orders else "identity"
            lines.append(f"  {site.site_id}: H={site.heads} N={site.seq_len} orders[{orders}] density[{per_bucket}]"
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
                "(parameter names/shapes differ): re-run paro_compile.calibration on this model"
            )

    def check_sites(self, sites: Iterable[Any], *, block_size: Optional[int] = None, allow_missing: bool = False,
                    allow_extra: bool = False) -> None:
        """Check the plan against the `AttentionSite`s of a graph; raise PlanMismatchError naming every mismatch.

        - a plan site id that is not in the graph → error ("extra"), unless ``allow_extra`` (the backend sets it:
          with graph breaks each graph holds only some of the model's sites);
        - a supported graph site that the plan does not cover → error ("missing"), unless ``allow_missing``;
        - a site whose heads or sequence length differ from the plan's → error;
        - a symbolic sequence length (``dynamic=True``) → accepted only for order plans
          (`SitePlan.applies_to_symbolic_grid`: per-head order strings, applied by the folding pass to the
          symbolic grid, masks dense), else an error; a symbolic head count → error;
        - ``block_size`` given and different from a site's → error.
        Sites present in both but unsupported in the graph are not errors: they stay SDPA with their reason.
        """
        sites = list(sites)
        by_id = {site.site_id: site for site in sites}
        problems: list[str] = []
        extra = [sid for sid in self.sites if sid not in by_id]
        if extra and not allow_extra:
            problems.append(f"plan has site(s) the graph does not: {extra}")
        missing = [s.site_id for s in sites if s.supported and s.site_id not in self.sites]
        if missing and not allow_missing:
            problems.append(f"graph has attention site(s) the plan does not cover: {missing}")
        for sid, site_plan in self.sites.items():
            site = by_id.get(sid)
            if site is None:
                continue
            heads, seq_len = _as_int(site.heads), _as_int(site.seq_len)
            if site.heads is not None and heads is None:
                problems.append(f"site {sid}: symbolic head count ({site.heads}); plans need a static number of heads")
                continue
            if site.seq_len is not None and seq_len is None and not site_plan.applies_to_symbolic_grid():
                problems.append(f"site {sid}: symbolic sequence length ({site.seq_len}) and the plan has a fixed "
                                "[H, N] permutation without per-head order strings; compile with dynamic=False, or "
                                "use an order plan (SitePlan.orders + grid, e.g. SitePlan.from_orders) whose orders "
                                "are applied to the symbolic grid (block masks are then dense)")
                continue
            if heads is not None and heads != site_plan.heads:
                problems.append(f"site {sid}: plan has {site_plan.heads} heads, graph has {heads}")
            if seq_len is not None and seq_len != site_plan.seq_len:
                problems.append(f"site {sid}: plan has seq_len {site_plan.seq_len}, graph has {seq_len}")
            if block_size is not None and block_size != site_plan.block_size:
                problems.append(f"site {sid}: plan has block_size {site_plan.block_size}, backend uses {block_size}")
        if problems:
            raise PlanMismatchError("plan does not match this model/graph:\n  - " + "\n  - ".join(problems)
                                    + "\nre-run calibration for this model and input shape")

    # ---- file ----------------------------------------------------------------------------------
    def to_header(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": self.version,
            "fingerprint": self.fingerprint,
            "timestep_arg": self.timestep_arg,
            "step_boundaries": [float(b) for b in self.step_boundaries],
            "density": self.density,
            "alpha": self.alpha,
            "qk_bits": self.qk_bits,
            "pv_dtype": self.pv_dtype,
            "meta": self.meta,
            "sites": [],
        }

    def save(self, path: Union[str, Path]) -> Path:
        """Write the plan as one safetensors file (tensors + JSON header); returns the path."""
        from safetensors.torch import save_file

        path = Path(path)
        header = self.to_header()
        tensors: dict[str, torch.Tensor] = {}
        for i, site in enumerate(self.sites.values()):
            site.validate()
            if site.perm is None or site.is_identity_perm():
                perm_kind = "identity"
            elif site.grid is not None and site.orders and torch.equal(
                site.perm.cpu().long(), orders_permutation(site.grid, site.orders)
            ):
                perm_kind = "derived"
            else:
                perm_kind = "stored"
                tensors[f"{i}/perm"] = site.perm.detach().to(device="cpu", dtype=torch.int32).contiguous()
            tensors[f"{i}/block_masks"] = pack_bool(site.block_masks).contiguous()
            header["sites"].append({
                "site_id": site.site_id,
                "heads": int(site.heads),
                "seq_len": int(site.seq_len),
                "block_size": int(site.block_size),
                "num_buckets": site.num_buckets,
                "orders": list(site.orders),
                "grid": site.grid.to_dict() if site.grid is not None else None,
                "perm": perm_kind,
                "empty_heads": [int(h) for h in site.empty_heads],
                "dense_buckets": [int(b) for b in site.dense_buckets],
                "stats": site.stats,
            })
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(header)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Union[str, Path], model: Optional[torch.nn.Module] = None) -> "Plan":
        """Read a plan file; with ``model``, also check its fingerprint (`check_model`)."""
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"plan file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except SafetensorError as error:
            raise PlanError(f"{path} is not a paro plan file (not safetensors: {error})") from error
        if METADATA_KEY not in metadata:
            raise PlanError(f"{path} is a safetensors file without a paro plan header (key {METADATA_KEY!r})")
        header = json.loads(metadata[METADATA_KEY])
        if header.get("format") != PLAN_FORMAT:
            raise PlanError(f"{path}: header format {header.get('format')!r}, expected {PLAN_FORMAT!r}")
        version = header.get("version")
        if version != PLAN_FORMAT_VERSION:
            header = migrate_header(header, path)
        sites: dict[str, SitePlan] = {}
        for i, entry in enumerate(header["sites"]):
            sid = entry["site_id"]
            heads, seq_len, block = int(entry["heads"]), int(entry["seq_len"]), int(entry["block_size"])
            nb = num_blocks(seq_len, block)
            key = f"{i}/block_masks"
            if key not in tensors:
                raise PlanError(f"{path}: site {sid} has no tensor {key!r}")
            masks = unpack_bool(tensors[key], (int(entry["num_buckets"]), heads, nb, nb))
            grid = TokenGrid.from_dict(entry["grid"]) if entry.get("grid") else None
            orders = list(entry.get("orders") or [])
            kind = entry.get("perm", "identity")
            if kind == "identity":
                perm = None
            elif kind == "derived":
                if grid is None or not orders:
                    raise PlanError(f"{path}: site {sid} has a derived perm but no grid/orders")
                perm = orders_permutation(grid, orders)
            elif kind == "stored":
                perm = tensors[f"{i}/perm"].long()
            else:
                raise PlanError(f"{path}: site {sid} has unknown perm kind {kind!r}")
            sites[sid] = SitePlan(
                site_id=sid, heads=heads, seq_len=seq_len, block_size=block, perm=perm, block_masks=masks,
                orders=orders, grid=grid, empty_heads=list(entry.get("empty_heads") or []),
                dense_buckets=list(entry.get("dense_buckets") or []), stats=dict(entry.get("stats") or {}),
            )
        plan = cls(
            sites=sites,
            step_boundaries=[float(b) for b in header.get("step_boundaries") or []],
            timestep_arg=header.get("timestep_arg") or "timestep",
            fingerprint=header.get("fingerprint"),
            density=header.get("density"),
            alpha=header.get("alpha"),
            qk_bits=header.get("qk_bits"),
            pv_dtype=header.get("pv_dtype"),
            meta=dict(header.get("meta") or {}),
        )
        for site in sites.values():
            if site.num_buckets != plan.num_buckets:
                raise PlanError(f"{path}: site {site.site_id} has {site.num_buckets} mask buckets, "
                                f"step_boundaries imply {plan.num_buckets}")
        if model is not None:
            plan.check_model(model)
        return plan


def migrate_header(header: dict[str, Any], path: Union[str, Path] = "<plan>") -> dict[str, Any]:
    """Bring an older header to the current version, or refuse. No older format exists yet (v1 is the first)."""
    version = header.get("version")
    if isinstance(version, int) and version > PLAN_FORMAT_VERSION:
        raise PlanError(f"{path}: plan file version {version} is newer than this paro_compile reads "
                        f"(version {PLAN_FORMAT_VERSION}); upgrade paro_compile or re-run calibration")
    raise PlanError(f"{path}: plan file version {version!r} is not supported (this paro_compile reads version "
                    f"{PLAN_FORMAT_VERSION} and has no migration from it); re-run calibration")
