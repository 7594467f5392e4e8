"""The plan file: one ``.safetensors`` file, tensors plus a JSON header (docs/plan_format.md).

- tensors, per site number ``i`` (the position of the site in the header's ``sites`` list):
  ``"{i}/block_masks"`` uint8, the bool masks [S, H, Mq, Nk] bit-packed little-endian (flattened, 8 per byte);
  ``"{i}/perm"`` int32 [H, N], only when the permutation cannot be rebuilt from the grid and the orders.
- the header's ``__metadata__["paro_plan"]``: a JSON document with ``format`` ("paro_plan"), ``version``,
  ``fingerprint``, ``timestep_arg``, ``step_boundaries``, ``density``, ``alpha``, ``qk_bits``, ``pv_dtype``,
  ``meta`` and ``sites`` (a list of per-site objects: ``site_id``, ``heads``, ``seq_len``, ``block_size``,
  ``num_buckets``, ``orders``, ``grid``, ``perm`` ("identity" | "derived" | "stored"), ``empty_heads``,
  ``dense_buckets``, ``stats``). Version 2: a site id may appear in several entries, one per token grid (same heads,
  another token count or grid layout); the first is the site's first entry (`Plan.sites`), the others
  `Plan.other_shapes`. Version 1 files (one entry per site) are read and migrated (`migrate_header`).

`load_plan` is a validating parser. It reads the file once (`plan_container.read_container`: one open, so a plan
renamed over the path meanwhile cannot mix in), checks the safetensors layout, then each header field's type and range, the fields against each
other and against the dtype and shape of the tensors actually in the file, and only then builds anything from the
tensor data: what it allocates is bounded by the file's own size (and by `MAX_PERM_ELEMENTS` for permutations
rebuilt from orders). The content checks (permutations, mandatory blocks, dense buckets, orders against the
permutation) are `SitePlan.validate`'s, shared with plans built in code. Every problem is a `PlanError` naming the
file, the site and the field.

`save_plan` refuses a plan that `load_plan` would refuse and writes through a temporary file of a unique name in
the target directory, renamed over the target: readers and concurrent writers see a whole file or none.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch

from paro_compile.grid import TEXT_POSITIONS, TokenGrid, orders_permutation
from paro_compile.kernels.reference import PV_DTYPES, QK_BITS, num_blocks
from paro_compile.plan import (
    METADATA_KEY,
    PLAN_FORMAT,
    PLAN_FORMAT_VERSION,
    READABLE_FORMAT_VERSIONS,
    Plan,
    PlanError,
    SitePlan,
)
from paro_compile.plan_checks import is_finite_number, order_problem
from paro_compile.plan_shapes import describe_shape, grid_layout_key, shape_conflict
from paro_compile.plan_container import Container, ContainerError, read_container

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)
"""Token blocks the attention kernel runs (`ParoConfig.block_size`)."""
PERM_KINDS = ("identity", "derived", "stored")
MAX_HEADS = 4096
MAX_SEQ_LEN = 2**24
MAX_PERM_ELEMENTS = 2**28
"""Bound on heads · seq_len: a permutation rebuilt from orders is allocated from the header alone (int64)."""
MAX_MASK_BITS = 2**36
"""Bound on buckets · heads · nb² (mask bits; the packed bytes must also be in the file)."""
HEADER_FIELDS = ("format", "version", "fingerprint", "timestep_arg", "step_boundaries", "density", "alpha",
                 "qk_bits", "pv_dtype", "meta", "sites")
SITE_FIELDS = ("site_id", "heads", "seq_len", "block_size", "num_buckets", "orders", "grid", "perm", "empty_heads",
               "dense_buckets", "stats")
GRID_FIELDS = ("frames", "height", "width", "text_tokens", "text_position")
MASK_DTYPE, PERM_DTYPE = "U8", "I32"
REBUILD_HINT = "the file is damaged or was not written by Plan.save; re-run calibration to rebuild it"
SAVE_HINT = "Plan.load would refuse this file, so nothing was written; fix the plan (or re-run calibration)"


def pack_bool(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor → uint8 [ceil(numel/8)], bit j of byte i = element 8i+j (one byte of work space per element)."""
    flat = mask.reshape(-1).to(device="cpu", dtype=torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def unpack_bool(packed: torch.Tensor, shape: Iterable[int]) -> torch.Tensor:
    """Inverse of `pack_bool`: uint8 [ceil(numel/8)] → bool ``shape``."""
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise PlanError(f"packed mask must be a 1-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    if packed.numel() * 8 < numel:
        raise PlanError(f"packed mask holds {packed.numel() * 8} bits, shape {shape} needs {numel}")
    packed = packed[: -(-numel // 8)]
    bits = (packed[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(-1)[:numel].view(shape).bool()


def migrate_header(header: dict[str, Any], path: Union[str, Path] = "<plan>") -> dict[str, Any]:
    """``header`` brought to the current version (a new dict; the current version is returned as is), or PlanError.

    Version 1 is version 2 with one entry per site, so its header migrates by its version number alone; that it
    holds one entry per site is checked by `parse_header`, which knows the version the file had. A newer version
    asks to upgrade paro_compile; any other value is refused."""
    version = header.get("version")
    is_int = isinstance(version, int) and not isinstance(version, bool)
    if is_int and version == PLAN_FORMAT_VERSION:
        return header
    if is_int and version > PLAN_FORMAT_VERSION:
        raise PlanError(f"plan file {path}: plan file version {version} is newer than this paro_compile reads "
                        f"(versions {', '.join(map(str, READABLE_FORMAT_VERSIONS))}); upgrade paro_compile or re-run "
                        "calibration")
    if is_int and version == 1:
        return {**header, "version": PLAN_FORMAT_VERSION}
    raise PlanError(f"plan file {path}: plan file version {_short(version)} is not supported (this paro_compile reads "
                    f"versions {', '.join(map(str, READABLE_FORMAT_VERSIONS))}); re-run calibration")


# ---- header schema ---------------------------------------------------------------------------------------------
def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


class _Where:
    """Names the file and, inside a site entry, the site of a problem."""

    def __init__(self, path: Union[str, Path], index: Optional[int] = None, site_id: Optional[str] = None,
                 hint: str = REBUILD_HINT):
        self.path, self.index, self.site_id, self.hint = path, index, site_id, hint

    def site(self, index: int, site_id: Optional[str] = None) -> "_Where":
        return _Where(self.path, index, site_id, self.hint)

    def prefix(self) -> str:
        if self.index is None:
            return f"plan file {self.path}: "
        name = f"site {self.site_id!r} " if self.site_id is not None else ""
        return f"plan file {self.path}: {name}(sites[{self.index}]): "

    def error(self, field: str, problem: str, hint: Optional[str] = None) -> PlanError:
        return PlanError(f"{self.prefix()}field {field!r} {problem}; {hint or self.hint}")


def _object(value: Any, where: _Where, field: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise where.error(field, f"must be a JSON object with fields {list(keys)}, got {_short(value)}")
    missing = [k for k in keys if k not in value]
    unknown = [k for k in value if k not in keys]
    if missing or unknown:
        detail = "; ".join(part for part in (missing and f"missing {missing}", unknown and f"unknown {unknown}") if part)
        raise where.error(field, f"has the wrong fields ({detail}); a version {PLAN_FORMAT_VERSION} plan has exactly "
                                 f"{list(keys)}")
    return value


def _int(value: Any, where: _Where, field: str, low: int, high: Optional[int] = None) -> int:
    in_range = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not in_range:
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise where.error(field, f"must be an integer {bounds}, got {_short(value)}")
    return value


def _number(value: Any, where: _Where, field: str, low: float, high: float, low_open: bool) -> Optional[float]:
    """None, or a finite number in [low, high] ((low, high] when ``low_open``)."""
    if value is None:
        return None
    ok = is_finite_number(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        interval = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise where.error(field, f"must be null or a finite number in {interval}, got {_short(value)}")
    return float(value)


def _index_list(value: Any, where: _Where, field: str, bound: int) -> list[int]:
    if not isinstance(value, list):
        raise where.error(field, f"must be a list of integers in [0, {bound - 1}], got {_short(value)}")
    items = [_int(item, where, f"{field}[{i}]", 0, bound - 1) for i, item in enumerate(value)]
    if len(set(items)) != len(items):
        raise where.error(field, f"repeats an entry: {_short(items)}")
    return items


def _decode_json(text: str, where: _Where) -> Any:
    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise where.error(key, "appears twice in one JSON object (the second would silently win)")
            seen[key] = value
        return seen

    try:
        return json.loads(text, object_pairs_hook=unique_keys)
    except PlanError:
        raise
    except (ValueError, RecursionError) as error:  # JSONDecodeError, an integer too long to convert, deep nesting
        raise PlanError(f"{where.prefix()}header {METADATA_KEY!r} is not valid JSON ({type(error).__name__}: "
                        f"{error}); {where.hint}") from error


@dataclass
class SiteEntry:
    """One checked entry of the header's ``sites`` list (plain values; no tensor read yet)."""

    index: int
    site_id: str
    heads: int
    seq_len: int
    block_size: int
    num_buckets: int
    orders: list[str]
    grid: Optional[TokenGrid]
    perm_kind: str
    empty_heads: list[int]
    dense_buckets: list[int]
    stats: dict[str, Any]

    @property
    def mask_bits(self) -> int:
        return self.num_buckets * self.heads * num_blocks(self.seq_len, self.block_size) ** 2

    @property
    def shape_key(self) -> tuple:
        return (self.seq_len, grid_layout_key(self.grid))

    @property
    def shape_description(self) -> str:
        return describe_shape(self.seq_len, self.grid)

    def expected_tensors(self) -> dict[str, tuple[str, list[int]]]:
        """Tensor key → (safetensors dtype, shape) this entry needs, nothing else."""
        tensors = {f"{self.index}/block_masks": (MASK_DTYPE, [-(-self.mask_bits // 8)])}
        if self.perm_kind == "stored":
            tensors[f"{self.index}/perm"] = (PERM_DTYPE, [self.heads, self.seq_len])
        return tensors


@dataclass
class Header:
    """The checked header: plan fields and site entries."""

    fields: dict[str, Any]
    sites: list[SiteEntry]


def _grid(value: Any, where: _Where, seq_len: int) -> Optional[TokenGrid]:
    if value is None:
        return None
    entry = _object(value, where, "grid", GRID_FIELDS)
    frames = None if entry["frames"] is None else _int(entry["frames"], where, "grid.frames", 1, MAX_SEQ_LEN)
    height = _int(entry["height"], where, "grid.height", 1, MAX_SEQ_LEN)
    width = _int(entry["width"], where, "grid.width", 1, MAX_SEQ_LEN)
    text_tokens = _int(entry["text_tokens"], where, "grid.text_tokens", 0, MAX_SEQ_LEN)
    if entry["text_position"] not in TEXT_POSITIONS:
        raise where.error("grid.text_position", f"must be one of {list(TEXT_POSITIONS)}, got {_short(entry['text_position'])}")
    tokens = (frames or 1) * height * width + text_tokens
    if tokens != seq_len:
        raise where.error("grid", f"describes {tokens} tokens ({_short(entry)}), the site's seq_len is {seq_len}")
    return TokenGrid(frames, height, width, text_tokens, entry["text_position"])


def parse_site(value: Any, where: _Where, num_buckets: int) -> SiteEntry:
    """Check one ``sites`` entry against the schema and the plan's bucket count (no tensor read)."""
    site_id = value.get("site_id") if isinstance(value, dict) else None
    where = where.site(where.index, site_id if isinstance(site_id, str) else None)
    entry = _object(value, where, f"sites[{where.index}]", SITE_FIELDS)
    if not isinstance(site_id, str) or not site_id:
        raise where.error("site_id", f"must be a non-empty string, got {_short(site_id)}")
    heads = _int(entry["heads"], where, "heads", 1, MAX_HEADS)
    seq_len = _int(entry["seq_len"], where, "seq_len", 1, MAX_SEQ_LEN)
    if heads * seq_len > MAX_PERM_ELEMENTS:
        raise where.error("seq_len", f"{seq_len} with {heads} heads exceeds the bound heads·seq_len <= "
                                     f"{MAX_PERM_ELEMENTS} on permutation entries")
    block_size = entry["block_size"]
    if type(block_size) is not int or block_size not in SUPPORTED_BLOCK_SIZES:
        raise where.error("block_size", f"is {_short(block_size)}, the kernel runs token blocks of "
                                        f"{', '.join(map(str, SUPPORTED_BLOCK_SIZES))}",
                          "re-run calibration with one of them")
    buckets = _int(entry["num_buckets"], where, "num_buckets", 1)
    if buckets != num_buckets:
        raise where.error("num_buckets", f"is {buckets}, the plan's step_boundaries make {num_buckets} bucket(s)")
    nb = num_blocks(seq_len, block_size)
    if buckets * heads * nb * nb > MAX_MASK_BITS:
        raise where.error("seq_len", f"{seq_len} at block {block_size} with {heads} heads and {buckets} bucket(s) makes "
                                     f"{buckets * heads * nb * nb} mask bits, over the bound {MAX_MASK_BITS}")
    grid = _grid(entry["grid"], where, seq_len)
    orders = entry["orders"]
    if not isinstance(orders, list) or (orders and len(orders) != heads):
        raise where.error("orders", f"must be a list of {heads} order strings (one per head) or empty, got "
                                    f"{_short(orders)}")
    for head, order in enumerate(orders):
        problem = order_problem(order, grid.axes if grid is not None else None)
        if problem:
            raise where.error(f"orders[{head}]", problem)
    kind = entry["perm"]
    if kind not in PERM_KINDS:
        raise where.error("perm", f"is {_short(kind)}, expected one of {list(PERM_KINDS)}")
    if kind == "derived" and (grid is None or not orders):
        raise where.error("perm", "is 'derived' but the site has no grid or no orders to derive it from")
    empty_heads = _index_list(entry["empty_heads"], where, "empty_heads", heads)
    dense_buckets = _index_list(entry["dense_buckets"], where, "dense_buckets", buckets)
    if not isinstance(entry["stats"], dict):
        raise where.error("stats", f"must be a JSON object, got {_short(entry['stats'])}")
    return SiteEntry(where.index, site_id, heads, seq_len, block_size, buckets, list(orders), grid, kind,
                     empty_heads, dense_buckets, entry["stats"])


def parse_header(header: Any, path: Union[str, Path], hint: str = REBUILD_HINT) -> Header:
    """Check the decoded JSON header field by field (no tensor read); raise PlanError naming the field."""
    where = _Where(path, hint=hint)
    if not isinstance(header, dict):
        raise where.error(METADATA_KEY, f"must be a JSON object, got {_short(header)}")
    if header.get("format") != PLAN_FORMAT:
        raise where.error("format", f"is {_short(header.get('format'))}, expected {PLAN_FORMAT!r}")
    file_version = header.get("version")
    header = migrate_header(header, path)  # refuses True and 1.0: neither is version 1
    _object(header, where, METADATA_KEY, HEADER_FIELDS)
    fingerprint = header["fingerprint"]
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise where.error("fingerprint", f"must be a string or null, got {_short(fingerprint)}")
    timestep_arg = header["timestep_arg"]
    if not isinstance(timestep_arg, str) or not timestep_arg.isidentifier():
        raise where.error("timestep_arg", f"must name a model argument (an identifier), got {_short(timestep_arg)}")
    bounds = header["step_boundaries"]
    if not isinstance(bounds, list):
        raise where.error("step_boundaries", f"must be a list of numbers, got {_short(bounds)}")
    for i, bound in enumerate(bounds):
        if not is_finite_number(bound):
            raise where.error(f"step_boundaries[{i}]", f"must be a finite number, got {_short(bound)}")
    if any(not a > b for a, b in zip(bounds, bounds[1:])):
        raise where.error("step_boundaries", f"{_short(bounds)} must be strictly descending")
    fields = {
        "fingerprint": fingerprint,
        "timestep_arg": timestep_arg,
        "step_boundaries": [float(b) for b in bounds],
        "density": _number(header["density"], where, "density", 0.0, 1.0, low_open=True),
        "alpha": _number(header["alpha"], where, "alpha", 0.0, 1.0, low_open=False),
    }
    qk_bits, pv_dtype = header["qk_bits"], header["pv_dtype"]
    if qk_bits is not None and (type(qk_bits) is not int or qk_bits not in QK_BITS):
        raise where.error("qk_bits", f"must be null or one of {list(QK_BITS)}, got {_short(qk_bits)}")
    if pv_dtype is not None and pv_dtype not in PV_DTYPES:
        raise where.error("pv_dtype", f"must be null or one of {list(PV_DTYPES)}, got {_short(pv_dtype)}")
    if not isinstance(header["meta"], dict):
        raise where.error("meta", f"must be a JSON object, got {_short(header['meta'])}")
    fields.update(qk_bits=qk_bits, pv_dtype=pv_dtype, meta=header["meta"])
    if not isinstance(header["sites"], list):
        raise where.error("sites", f"must be a list of site objects, got {_short(header['sites'])}")
    sites: list[SiteEntry] = []
    seen: dict[str, list[SiteEntry]] = {}
    for i, value in enumerate(header["sites"]):
        entry = parse_site(value, where.site(i), len(bounds) + 1)
        earlier = seen.setdefault(entry.site_id, [])
        if earlier:
            _check_another_entry(entry, earlier, where.site(i, entry.site_id), file_version)
        earlier.append(entry)
        sites.append(entry)
    return Header(fields, sites)


def _check_another_entry(entry: SiteEntry, earlier: list[SiteEntry], where: _Where, file_version: int) -> None:
    """A second (third, ...) entry of one site: version 1 holds one entry per site; version 2 one per token grid,
    each with the site's heads."""
    first = earlier[0]
    if file_version == 1:
        raise where.error("site_id", f"repeats the site id of sites[{first.index}] (a version 1 plan holds one entry "
                                     "per site)")
    if entry.heads != first.heads:
        raise where.error("heads", f"is {entry.heads}, the site's entry sites[{first.index}] has {first.heads} (a "
                                   "site's entries differ in token grid only)")
    problem = shape_conflict(entry, earlier)
    if problem:
        others = ", ".join(f"sites[{e.index}]" for e in earlier)
        raise where.error("seq_len", f"(with the grid) makes {problem} of this site, with {others}: a site has one "
                                     "entry per token grid")


# ---- tensors ---------------------------------------------------------------------------------------------------
def _check_inventory(header: Header, present: dict[str, tuple[str, list[int]]], where: _Where) -> None:
    """Every tensor a site needs is in the file with its exact dtype and shape, and nothing else is."""
    owner: dict[str, SiteEntry] = {}
    for entry in header.sites:
        site = where.site(entry.index, entry.site_id)
        for key, (dtype, shape) in entry.expected_tensors().items():
            owner[key] = entry
            field = key.split("/", 1)[1]
            if key not in present:
                why = f" (perm is {entry.perm_kind!r})" if field == "perm" else ""
                raise site.error(field, f"needs tensor {key!r}{why}, the file has none")
            got_dtype, got_shape = present[key]
            if (got_dtype, list(got_shape)) != (dtype, shape):
                raise site.error(field, f"tensor {key!r} is {got_dtype} of shape {list(got_shape)}, expected {dtype} of "
                                        f"shape {shape} ({entry.heads} heads, seq_len {entry.seq_len}, block "
                                        f"{entry.block_size}, {entry.num_buckets} bucket(s))")
    extra = sorted(key for key in present if key not in owner)
    if extra:
        raise where.error("tensors", f"holds {extra} that no site entry uses (a perm tensor for a site whose perm is "
                                     "'identity' or 'derived', or a site index past the sites list)")


def _site_plan(entry: SiteEntry, container: Container, where: _Where) -> SitePlan:
    site = where.site(entry.index, entry.site_id)
    packed = container.tensor(f"{entry.index}/block_masks", torch.uint8)
    spare = packed.numel() * 8 - entry.mask_bits
    if spare and int(packed[-1]) >> (8 - spare):
        raise site.error("block_masks", f"has non-zero padding bits after its {entry.mask_bits} mask bits")
    nb = num_blocks(entry.seq_len, entry.block_size)
    masks = unpack_bool(packed, (entry.num_buckets, entry.heads, nb, nb))
    if entry.perm_kind == "identity":
        perm = None
    elif entry.perm_kind == "derived":
        perm = orders_permutation(entry.grid, entry.orders)
    else:
        perm = container.tensor(f"{entry.index}/perm", torch.int32).long()
    try:
        return SitePlan(site_id=entry.site_id, heads=entry.heads, seq_len=entry.seq_len, block_size=entry.block_size,
                        perm=perm, block_masks=masks, orders=entry.orders, grid=entry.grid,
                        empty_heads=entry.empty_heads, dense_buckets=entry.dense_buckets, stats=entry.stats)
    except PlanError as error:
        raise PlanError(f"plan file {where.path}: {error}; {REBUILD_HINT}") from error


def load_plan(path: Union[str, Path]) -> Plan:
    """Read and validate a plan file (module docstring); raise PlanError for anything malformed."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"plan file {path} does not exist")
    if path.is_dir():
        raise PlanError(f"plan file {path} is a directory, not a plan file")
    where = _Where(path)
    try:
        container = read_container(path)
    except ContainerError as error:
        raise PlanError(f"{path} is not a paro plan file (not safetensors: {error}); {REBUILD_HINT}") from error
    if METADATA_KEY not in container.metadata:
        raise PlanError(f"{path} is a safetensors file without a paro plan header (key {METADATA_KEY!r})")
    header = parse_header(_decode_json(container.metadata[METADATA_KEY], where), path)
    _check_inventory(header, {key: (dtype, shape) for key, (dtype, shape, _, _) in container.entries.items()}, where)
    sites: dict[str, SitePlan] = {}
    other_shapes: dict[str, list[SitePlan]] = {}
    for entry in header.sites:
        site = _site_plan(entry, container, where)
        if entry.site_id in sites:
            other_shapes.setdefault(entry.site_id, []).append(site)
        else:
            sites[entry.site_id] = site
    try:
        return Plan(sites=sites, other_shapes=other_shapes, source=str(path), **header.fields)
    except PlanError as error:
        raise PlanError(f"plan file {path}: {error}; {REBUILD_HINT}") from error


# ---- writing ---------------------------------------------------------------------------------------------------
def _perm_kind(site: SitePlan) -> str:
    if site.perm is None or site.is_identity_perm():
        return "identity"
    if site.grid is not None and site.orders:
        return "derived"  # SitePlan.validate makes perm equal the orders' permutation
    return "stored"


def encode_plan(plan: Plan) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, tensors) of ``plan``, in the file's layout."""
    header = {
        "format": PLAN_FORMAT,
        "version": plan.version,
        "fingerprint": plan.fingerprint,
        "timestep_arg": plan.timestep_arg,
        "step_boundaries": [float(b) for b in plan.step_boundaries],
        "density": plan.density,
        "alpha": plan.alpha,
        "qk_bits": plan.qk_bits,
        "pv_dtype": plan.pv_dtype,
        "meta": plan.meta,
        "sites": [],
    }
    tensors: dict[str, torch.Tensor] = {}
    for i, site in enumerate(plan.all_entries()):
        kind = _perm_kind(site)
        if kind == "stored":
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
            "perm": kind,
            "empty_heads": [int(h) for h in site.empty_heads],
            "dense_buckets": [int(b) for b in site.dense_buckets],
            "stats": site.stats,
        })
    return header, tensors


def _header_text(plan: Plan, header: dict[str, Any], path: Path) -> str:
    """The JSON header, refused (naming the field) when a free-form field is not JSON or load would refuse it."""
    if plan.version != PLAN_FORMAT_VERSION:
        raise PlanError(f"cannot save {path}: Plan.version is {plan.version!r}, this paro_compile writes version "
                        f"{PLAN_FORMAT_VERSION} only")
    parts = [("meta", plan.meta)] + [(f"site {s.site_id!r}: stats", s.stats) for s in plan.all_entries()]
    for name, value in parts:
        try:
            json.dumps(value)
        except (TypeError, ValueError) as error:
            raise PlanError(f"cannot save {path}: {name} is not JSON-serialisable ({error}); keep plain numbers, "
                            "strings, lists and dicts there") from error
    text = json.dumps(header)
    parse_header(_decode_json(text, _Where(path, hint=SAVE_HINT)), path, SAVE_HINT)
    return text


def _unique_temp_path(target: Path) -> tuple[int, str]:
    # os.open with 0o666 lets the umask set the mode as for any new file (mkstemp's 0o600 would make a plan in a
    # shared cache unreadable to other users); O_EXCL makes the name ours alone.
    for _ in range(100):
        name = str(target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp"))
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a unique temporary file next to {target}")


def save_plan(plan: Plan, path: Union[str, Path]) -> Path:
    """Write ``plan`` to ``path`` atomically (module docstring); raise PlanError, writing nothing, for a plan that
    `load_plan` would refuse."""
    from safetensors.torch import save_file

    path = Path(path)
    plan.validate()
    for site in plan.all_entries():
        site.validate()
    header, tensors = encode_plan(plan)
    text = _header_text(plan, header, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = _unique_temp_path(path)
    try:
        mode = os.fstat(fd).st_mode & 0o777
        os.close(fd)
        save_file(tensors, temp, metadata={METADATA_KEY: text})
        os.chmod(temp, mode)  # save_file may recreate the file with its own mode
        with open(temp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    return path
