"""Calibration: block-pooled attention statistics → PARO order per head → static block masks → `Plan`.

Statistics (`SiteStatistics.update`) are collected in query chunks so no N×N tensor ever exists: a chunk of
C query rows is a complete softmax row block [B, H, C, N] (all keys are present), and for every candidate
order it is pooled at once: the key axis by gathering the columns in that order's position sequence
(padded to whole blocks with a zero column) and reducing each 64-wide group, the query axis by
``index_add_`` of every row into its block under that order. So one pass over the attention rows feeds all
orders; per order and head the pass keeps three [nb, nb] block maps: mass (sum of P), max of P, and the
count of entries below ε. Peak memory ≈ 2.3 × ``max_chunk_elements`` floats + the [O, H, nb, nb] maps.

Scores per (order, head), computed per observed call and averaged over calls:
- block sparsity (paper): share of blocks in which >= sigma = 90 % of the entries are < eps = 1e-3;
- kept mass: share of the attention mass that a mask of the target density keeps (diagonal and text
  blocks included), the quantity the sparse kernel's error depends on;
- incoherence Psi = max|P| / mean|P| per block, averaged over blocks (lower quantizes better).
``sparsity_metric`` picks the sparsity score: "mass" (kept mass, the default), "paper" (block sparsity) or
"both" (their mean). Each score is normalised over the candidate orders (sparsity / max, min Psi / Psi)
and mixed: ``score = alpha * sparsity + (1 - alpha) * quantization``; each head takes the best order (the
model's own order on ties).

Default alpha = 0.9 with sparsity_metric="mass" (``DEFAULT_ALPHA``), chosen by `_alpha_sweep`
(``python -m paro_compile.calibration``): 48 synthetic heads with random per-axis locality, three
noise/temperature settings, density 0.2; regret = best candidate's kept mass - chosen order's kept mass,
Psi ratio = chosen order's Psi / best candidate's Psi:

    metric alpha  kept-mass regret mean / worst   Psi ratio mean / worst
    mass   0.0    0.0146 / 0.270                  1.000 / 1.00
    mass   0.5    0.0080 / 0.122                  1.004 / 1.11
    mass   0.7    0.0044 / 0.111                  1.012 / 1.31
    mass   0.8    0.0024 / 0.070                  1.021 / 1.41
    mass   0.9    0.0007 / 0.020                  1.034 / 1.48
    mass   1.0    0.0000 / 0.000                  1.070 / 1.97
    both   0.8    0.0023 / 0.070                  1.021 / 1.41
    paper  0.8    0.0055 / 0.122                  1.026 / 1.66
    paper  1.0    0.1079 / 0.797                  2.297 / 13.6

Kept mass is what a block-sparse kernel's error depends on; Psi matters less for our numerics because P is
quantized with a fixed scale (P in [0, 1]; see kernels/reference.py), it still matters for Q/K-style
per-block scales. The paper's block-sparsity share alone saturates on local heads (many orders tie), and
at alpha >= 0.9 it picks orders that lose up to 80 % of the mass. With "mass", alpha = 0.9 keeps the
worst-case mass regret at 2 % while Psi stays within 3.4 % of the best on average; alpha = 1.0 would
ignore Psi completely (and double it on some heads). So 0.9: sparsity-led, Psi breaks near-ties.

Masks (`select_blocks`): per head, in the chosen order, blocks are ranked by calibration mass and kept
until the target density (or, with ``mass_threshold``, until that share of the mass is kept); diagonal
blocks and the blocks holding text rows or text columns are always kept. ``allocation`` ("uniform" by
default) moves that budget between heads: "site" ranks the blocks of all heads of a site together,
"global" those of all sites of the model (`allocate_blocks`, on row-normalised mass: `row_normalized_mass`),
so heads and sites with concentrated attention get fewer blocks and diffuse ones more, at the same
average. ``block_score="output"`` ranks blocks instead by the first-order output change of dropping them
(dropped probability mass × distance of the dropped values from the row's output, summed over query rows:
one more [O, H, nb, nb] map, accumulated in the same chunked pass from P·V per key block). Step buckets: one mask set per range of timesteps (`Plan.step_boundaries`), optionally with
dense first steps.

Model-level API: `calibrate(model, inputs_iter, ...)` compiles the model with its own Dynamo backend that
replaces every supported SDPA site by `_observe_sdpa` (dense SDPA + statistics), runs the inputs eagerly
through the FX graph and builds the plan. `calibrate_site(q, k, grid, ...)` does the same for one site's
tensors.
"""
from __future__ import annotations

import copy
import functools
import inspect
import itertools
import math
import re
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
import torch.fx as fx
import torch.nn.functional as F

from paro_compile.grid import TokenGrid, candidate_orders, inverse_permutation, order_permutation, orders_permutation
from paro_compile.kernels.reference import num_blocks
from paro_compile.plan import Plan, SitePlan, model_fingerprint

DEFAULT_ALPHA = 0.9
DEFAULT_EPS = 1e-3
DEFAULT_SIGMA = 0.9
SPARSITY_METRICS = ("both", "paper", "mass")
ALLOCATIONS = ("uniform", "site", "global")
BLOCK_SCORES = ("mass", "output")
EMPTY_HEAD_POLICIES = ("keep", "minimal")
CUDA_CHUNK_ELEMENTS = 2**27
CPU_CHUNK_ELEMENTS = 2**22
TIE_TOLERANCE = 1e-4
LATENT_NAMES = ("hidden_states", "sample", "latent", "video", "image")

GridSpec = Union[None, TokenGrid, Mapping[str, TokenGrid]]
GridHook = Callable[[Any], Optional[TokenGrid]]


class CalibrationError(ValueError):
    """Calibration cannot proceed (unknown token layout, no timesteps for step buckets, ...)."""


@dataclass
class CalibrationOptions:
    """Everything that shapes statistics, order choice and masks (shared by `calibrate` and auto-calibration)."""

    density: float = 0.3
    alpha: float = DEFAULT_ALPHA
    block_size: int = 64
    mass_threshold: Optional[float] = None
    """Keep blocks until this share of the calibration mass is kept (per head; with ``allocation`` "site" /
    "global": of the site's / model's row-normalised mass) instead of a fixed density."""
    allocation: str = "uniform"
    """How the kept-block budget of a step bucket is spread (mandatory diagonal/text blocks always kept):
    "uniform" (default): every head of every site keeps ``ceil(density · nb²)`` blocks, its heaviest;
    "site": the heaviest blocks of all heads of a site together, ``ceil(density · H · nb²)`` in all, so the
    site's density is ``density`` but its heads' densities differ; "global": the heaviest blocks of all
    heads of all sites (step bucket by step bucket), so only the model's block-weighted average density
    (`Plan.overall_density`) is ``density``. Blocks are ranked by `row_normalized_mass` (each query row's
    attention sums to 1, so rows of different heads, sites, call counts and batch sizes compare): this
    maximises the summed kept attention share over all query rows and heads."""
    block_score: str = "mass"
    """What ranks the blocks of a mask: "mass" (default: calibrated attention mass of the block) or "output"
    (output-aware: the first-order change of the attention output that dropping the block causes,
    ``score(i, j) = sum over query rows r of block i (and calls, batch) of || P_r(j) · o_r − sum_{c in j} P_rc v_c ||``
    = ``P_r(j) · || o_r − vbar_r(j) ||`` with P_r(j) the row's probability mass in key block j, vbar_r(j) the
    P-weighted mean of the block's values and o_r the row's output; accumulated in the same chunked pass,
    no N×N map; needs v). A block whose values equal the output costs nothing to drop whatever its mass.
    Only ranking changes: orders are still chosen by mass; uniform allocation only."""
    eps: float = DEFAULT_EPS
    sigma: float = DEFAULT_SIGMA
    sparsity_metric: str = "mass"
    orders: Optional[list[str]] = None
    """Candidate orders (default: all permutations of the grid's axes)."""
    chunk_rows: Optional[int] = None
    """Query rows per chunk (default: as many as fit in ``max_chunk_elements``)."""
    max_chunk_elements: Optional[int] = None
    """Bound on B·H·rows·N of one chunk (default 2**27 on CUDA, 2**22 on the CPU)."""
    empty_head_tol: Optional[float] = 1e-2
    """A head is "empty" if its output RMS is below this fraction of the site's median head output RMS."""
    empty_heads: str = "keep"
    """What masks empty heads get: "keep" (normal mask; reported only) or "minimal" (diagonal + text only)."""
    stats_device: Optional[Union[str, torch.device]] = None
    """Where the accumulated [O, H, nb, nb] mass maps live (default: the attention inputs' device)."""

    def __post_init__(self) -> None:
        if not 0.0 < float(self.density) <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.mass_threshold is not None and not 0.0 < float(self.mass_threshold) <= 1.0:
            raise ValueError(f"mass_threshold must be in (0, 1], got {self.mass_threshold}")
        if self.sparsity_metric not in SPARSITY_METRICS:
            raise ValueError(f"sparsity_metric must be one of {SPARSITY_METRICS}, got {self.sparsity_metric!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.block_score not in BLOCK_SCORES:
            raise ValueError(f"block_score must be one of {BLOCK_SCORES}, got {self.block_score!r}")
        if self.block_score != "mass" and self.allocation != "uniform":
            raise ValueError("block_score='output' supports allocation='uniform' only")
        if self.empty_heads not in EMPTY_HEAD_POLICIES:
            raise ValueError(f"empty_heads must be one of {EMPTY_HEAD_POLICIES}, got {self.empty_heads!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")


# ------------------------------------------------------------------------------------------------------
# Block selection
# ------------------------------------------------------------------------------------------------------
def mandatory_blocks(grid: TokenGrid, block_size: int, device=None) -> torch.Tensor:
    """bool [nb, nb]: diagonal blocks, and every block in a row or column that holds a text token."""
    nb = num_blocks(grid.num_tokens, block_size)
    mask = torch.eye(nb, dtype=torch.bool, device=device)
    if grid.text_tokens:
        text_blocks = torch.zeros(nb, dtype=torch.bool, device=device)
        sl = grid.text_slice
        text_blocks[sl.start // block_size: (sl.stop - 1) // block_size + 1] = True
        mask |= text_blocks[:, None] | text_blocks[None, :]
    return mask


def select_blocks(
    mass: torch.Tensor,
    density: float,
    mandatory: Optional[torch.Tensor] = None,
    mass_threshold: Optional[float] = None,
) -> torch.Tensor:
    """Per map of ``mass`` [..., nb, nb], keep the heaviest blocks → bool [..., nb, nb].

    Mandatory blocks are kept first (they count toward the density); then blocks by descending mass until
    ``ceil(density · nb²)`` blocks are kept, or, with ``mass_threshold``, until that share of the map's mass
    is kept.
    """
    *lead, mq, nk = mass.shape
    total = mq * nk
    flat = mass.reshape(*lead, total).float()
    if mandatory is None:
        mandatory = torch.zeros(mq, nk, dtype=torch.bool, device=mass.device)
    mand = mandatory.reshape(total).to(mass.device)
    n_mand = int(mand.sum().item())
    key = torch.where(mand, torch.full_like(flat, math.inf), flat)
    order = key.argsort(dim=-1, descending=True, stable=True)
    if mass_threshold is not None:
        sorted_mass = flat.gather(-1, order)
        cum = sorted_mass.cumsum(-1) / flat.sum(-1, keepdim=True).clamp_min(1e-30)
        keep_count = ((cum < mass_threshold - 1e-7).sum(-1) + 1).clamp(max=total).clamp(min=n_mand)
    else:
        k = max(math.ceil(float(density) * total - 1e-9), n_mand, 1)
        keep_count = torch.full(flat.shape[:-1], min(k, total), device=mass.device)
    keep_sorted = torch.arange(total, device=mass.device) < keep_count[..., None]
    return torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted).view(*lead, mq, nk)


def row_normalized_mass(mass: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """[..., nb, nb] block mass → share of each query block row's attention, weighted by its valid rows.

    Every query row's attention sums to 1 (per head and call), so ``mass[..., i, :]`` sums to
    calls · batch · rows(i). Dividing by that row sum and multiplying by rows(i) / block_size gives every
    block its mean attention share per query slot of the block: the last, partial query block counts for its
    rows only, and maps accumulated over different call counts or batch sizes (other sites, buckets) compare.
    The sum of the kept values over all blocks of all heads is the kept attention share summed over query
    rows (/ block_size), the quantity `allocate_blocks` maximises.
    """
    nb = mass.shape[-2]
    rows = torch.full((nb,), float(block_size), dtype=torch.float32, device=mass.device)
    rows[-1] = seq_len - (nb - 1) * block_size
    mass = mass.float()
    row_sum = mass.sum(-1, keepdim=True)
    share = torch.where(row_sum > 0, mass / row_sum.clamp_min(1e-30), torch.zeros_like(mass))
    return share * (rows / block_size)[:, None]


def allocate_blocks(
    maps: list[torch.Tensor],
    density: float,
    mandatory: list[torch.Tensor],
    mass_threshold: Optional[float] = None,
) -> list[torch.Tensor]:
    """Keep the heaviest blocks of several maps *together* → one bool mask per map.

    maps[i]: [H_i, nb_i, nb_i] block scores (`row_normalized_mass`), mandatory[i]: bool [nb_i, nb_i] blocks every
    head of map i keeps. The mandatory blocks of all maps are kept first (they count toward the budget); then
    the remaining blocks of all maps are ranked together by score and kept until ``ceil(density · total
    blocks)`` are kept, or, with ``mass_threshold``, until that share of the summed scores is kept. So each
    map's (and head's) density follows its scores; only the overall density is ``density``. One map = the
    per-site allocation. Memory: the concatenated scores (4 B/block) and their sort order (8 B/block).
    """
    if not maps:
        return []
    keys, values, sizes, n_mand = [], [], [], 0
    for score, mand in zip(maps, mandatory):
        score = score.float().cpu()
        mand = mand.cpu().expand_as(score)
        flat = score.reshape(-1)
        values.append(flat)
        keys.append(torch.where(mand.reshape(-1), torch.full_like(flat, math.inf), flat))
        sizes.append(flat.numel())
        n_mand += int(mand.sum())
    key, value = torch.cat(keys), torch.cat(values)
    total = key.numel()
    order = key.argsort(descending=True, stable=True)
    if mass_threshold is not None:
        cum = value[order].cumsum(0) / value.sum().clamp_min(1e-30)
        keep_count = int((cum < mass_threshold - 1e-7).sum()) + 1
    else:
        keep_count = math.ceil(float(density) * total - 1e-9)
    keep_count = min(max(keep_count, n_mand, 1), total)
    keep = torch.zeros(total, dtype=torch.bool)
    keep[order[:keep_count]] = True
    return [part.view(m.shape) for part, m in zip(keep.split(sizes), maps)]


# ------------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------------
def default_chunk_elements(device: torch.device) -> int:
    return CUDA_CHUNK_ELEMENTS if torch.device(device).type == "cuda" else CPU_CHUNK_ELEMENTS


def chunk_rows_for(batch: int, heads: int, seq_len: int, max_elements: int, chunk_rows: Optional[int] = None) -> int:
    """Query rows per chunk so that one chunk's attention rows B·H·rows·(N+1) stay within ``max_elements``."""
    fit = max(1, max_elements // max(1, batch * heads * (seq_len + 1)))
    return max(1, min(chunk_rows or fit, fit, seq_len))


class SiteStatistics:
    """Accumulates block-pooled attention statistics of one site for every candidate order.

    Call `update(q, k, v, bucket=...)` once per observed attention call; then `choose_orders` and
    `build_site_plan`.
    """

    def __init__(
        self,
        grid: TokenGrid,
        heads: int,
        options: Optional[CalibrationOptions] = None,
        *,
        num_buckets: int = 1,
        device: Optional[Union[str, torch.device]] = None,
    ) -> None:
        self.grid = grid
        self.heads = int(heads)
        self.options = options or CalibrationOptions()
        self.num_buckets = int(num_buckets)
        self.orders = list(self.options.orders or candidate_orders(grid))
        for order in self.orders:
            order_permutation(grid, order)  # validates
        self.block_size = self.options.block_size
        self.seq_len = grid.num_tokens
        self.nb = num_blocks(self.seq_len, self.block_size)
        self.device = torch.device(device) if device is not None else None
        self.calls = 0
        self.bucket_calls = [0] * self.num_buckets
        self.score_sums: dict[str, torch.Tensor] = {}
        self.mass: list[Optional[torch.Tensor]] = [None] * self.num_buckets
        self.output_score: list[Optional[torch.Tensor]] = [None] * self.num_buckets
        """[O, H, nb, nb] per bucket with ``block_score="output"``: summed first-order output change of dropping
        each block (see `CalibrationOptions.block_score`)."""
        self.out_sq = torch.zeros(self.heads, dtype=torch.float64)
        self.out_count = 0
        self._tables: dict[str, Any] = {}

    # ---- per-device index tables ---------------------------------------------------------------
    def tables(self, device: torch.device) -> dict[str, torch.Tensor]:
        key = str(device)
        if key not in self._tables:
            n, bs, nb = self.seq_len, self.block_size, self.nb
            perms = torch.stack([order_permutation(self.grid, o) for o in self.orders])  # [O, N]
            positions = inverse_permutation(perms)  # [O, N]: position of token t under order o
            pad = nb * bs - n
            key_index = torch.cat([perms, torch.full((len(self.orders), pad), n, dtype=torch.long)], 1)
            rows = torch.full((nb,), bs, dtype=torch.float32)
            rows[-1] = n - (nb - 1) * bs
            self._tables[key] = {
                "block_of": (positions // bs).to(device),
                "key_index": key_index.to(device),
                "rows": rows.to(device),
                "pad": torch.tensor(pad),
                "mandatory": mandatory_blocks(self.grid, bs, device),
            }
        return self._tables[key]

    # ---- accumulation --------------------------------------------------------------------------
    @torch.no_grad()
    def update(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: Optional[torch.Tensor] = None,
        *,
        scale: Optional[float] = None,
        bucket: int = 0,
    ) -> None:
        """Add one attention call (q, k, v [B, H, N, D], model token order) to the statistics of ``bucket``."""
        if q.dim() != 4 or k.shape != q.shape[:3] + k.shape[3:]:
            raise ValueError(f"expected q, k of shape [B, H, N, D] with equal B, H, N; got {tuple(q.shape)}, {tuple(k.shape)}")
        bsz, heads, n, d = q.shape
        if n != self.seq_len:
            raise CalibrationError(f"sequence length {n} does not match the grid {self.grid} ({self.seq_len} tokens)")
        if heads != self.heads:
            raise CalibrationError(f"{heads} heads, statistics were set up for {self.heads}")
        if not 0 <= bucket < self.num_buckets:
            raise IndexError(f"bucket {bucket} out of range ({self.num_buckets} buckets)")
        opts = self.options
        device = q.device
        stats_device = torch.device(opts.stats_device) if opts.stats_device is not None else (self.device or device)
        tab = self.tables(device)
        n_orders, nb, bs = len(self.orders), self.nb, self.block_size
        sm_scale = float(scale) if scale is not None else 1.0 / math.sqrt(d)
        max_elements = opts.max_chunk_elements or default_chunk_elements(device)
        rows_per_chunk = chunk_rows_for(bsz, heads, n, max_elements, opts.chunk_rows)

        zero_row = q.new_zeros(bsz, heads, 1, d, dtype=torch.float32)
        k_ext = torch.cat([k.float(), zero_row], 2)  # the zero key N is masked to -inf: a zero column of P
        v_ext = torch.cat([v.float(), zero_row[..., : v.shape[-1]]], 2) if v is not None else None
        mass = torch.zeros(n_orders, heads, nb, nb, device=device)
        small = torch.zeros(n_orders, heads, nb, nb, device=device)
        peak = torch.zeros(n_orders, heads, nb, nb, device=device)
        out_sq = torch.zeros(heads, device=device, dtype=torch.float64)
        want_output = opts.block_score == "output"
        if want_output and v is None:
            raise CalibrationError("block_score='output' needs v in the statistics update")
        out_score = torch.zeros(n_orders, heads, nb, nb, device=device) if want_output else None
        v_blocks = ([v_ext.index_select(2, tab["key_index"][o]).view(bsz, heads, nb, bs, -1) for o in range(n_orders)]
                    if want_output else None)  # values per key block under each order

        for start in range(0, n, rows_per_chunk):
            stop = min(n, start + rows_per_chunk)
            rows = stop - start
            p = torch.matmul(q[:, :, start:stop].float() * sm_scale, k_ext.transpose(-1, -2))  # [B, H, C, N+1]
            p[..., n] = -math.inf
            p.sub_(p.amax(-1, keepdim=True)).exp_()
            p.div_(p.sum(-1, keepdim=True))
            out = None
            if v_ext is not None:
                out = torch.matmul(p, v_ext)  # [B, H, C, D]
                out_sq += out.double().pow_(2).sum((0, 2, 3))
            for o in range(n_orders):
                po = p.index_select(-1, tab["key_index"][o]).view(bsz, heads, rows, nb, bs)
                batch_mass = po.sum(-1)  # [B, H, C, nb]
                row_mass = batch_mass.sum(0)  # [H, C, nb]
                if want_output:
                    # sum_{c in block j} P_rc v_c for every row r and key block j: [B, H, nb, C, D]
                    part = torch.matmul(po.permute(0, 1, 3, 2, 4), v_blocks[o])
                    part.sub_(batch_mass.permute(0, 1, 3, 2)[..., None] * out[:, :, None])
                    err = torch.linalg.vector_norm(part, dim=-1).sum(0).transpose(1, 2)  # [H, C, nb]
                    del part
                    out_score[o].index_add_(1, tab["block_of"][o, start:stop], err)
                row_max = po.amax(-1).amax(0)
                row_small = (po < opts.eps).sum(-1, dtype=torch.float32).sum(0)
                del po
                qb = tab["block_of"][o, start:stop]
                mass[o].index_add_(1, qb, row_mass)
                small[o].index_add_(1, qb, row_small)
                peak[o].scatter_reduce_(1, qb[None, :, None].expand(heads, rows, nb), row_max, "amax")
            del p

        # The padded key columns are zeros in the last key block: remove them from the "small" counts.
        pad = int(tab["pad"])
        if pad:
            small[..., -1] -= bsz * pad * tab["rows"][None, None, :]
        valid = bsz * tab["rows"][:, None] * tab["rows"][None, :]  # entries per block
        scores = {
            "block_sparsity": (small >= opts.sigma * valid - 0.5).float().mean((-1, -2)),
            "incoherence": torch.where(mass > 0, peak * valid / mass.clamp_min(1e-30), torch.ones_like(mass)).mean((-1, -2)),
            "kept_mass": self._kept_share(mass, select_blocks(mass, opts.density, tab["mandatory"])),
        }
        for name, value in scores.items():
            value = value.double().cpu()
            self.score_sums[name] = self.score_sums.get(name, torch.zeros_like(value)) + value
        mass = mass.to(stats_device)
        self.mass[bucket] = mass if self.mass[bucket] is None else self.mass[bucket] + mass
        if out_score is not None:
            out_score = out_score.to(stats_device)
            self.output_score[bucket] = out_score if self.output_score[bucket] is None else self.output_score[bucket] + out_score
        self.out_sq += out_sq.cpu()
        self.out_count += bsz * n * (v.shape[-1] if v is not None else 0)
        self.calls += 1
        self.bucket_calls[bucket] += 1

    @staticmethod
    def _kept_share(mass: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        total = mass.sum((-1, -2)).clamp_min(1e-30)
        return (mass * mask).sum((-1, -2)) / total

    # ---- decisions -----------------------------------------------------------------------------
    def scores(self) -> dict[str, torch.Tensor]:
        """Mean per-call scores, each [O, H] (float64, CPU)."""
        if not self.calls:
            raise CalibrationError("no attention call was observed for this site")
        return {name: value / self.calls for name, value in self.score_sums.items()}

    def combined_scores(self, alpha: Optional[float] = None) -> torch.Tensor:
        """[O, H]: α · normalised sparsity + (1 − α) · normalised quantization score."""
        alpha = self.options.alpha if alpha is None else float(alpha)
        s = self.scores()
        metric = self.options.sparsity_metric
        if metric == "paper":
            sparsity = s["block_sparsity"]
        elif metric == "mass":
            sparsity = s["kept_mass"]
        else:
            sparsity = 0.5 * (s["block_sparsity"] + s["kept_mass"])
        sparsity_norm = sparsity / sparsity.amax(0, keepdim=True).clamp_min(1e-12)
        sparsity_norm = torch.where(sparsity.amax(0, keepdim=True) > 0, sparsity_norm, torch.ones_like(sparsity_norm))
        psi = s["incoherence"].clamp_min(1e-12)
        quant_norm = psi.amin(0, keepdim=True) / psi
        return alpha * sparsity_norm + (1.0 - alpha) * quant_norm

    def choose_orders(self, alpha: Optional[float] = None) -> list[str]:
        """Best order per head (the natural order when within `TIE_TOLERANCE` of the best)."""
        combined = self.combined_scores(alpha)
        best = combined.argmax(0)
        natural = self.orders.index(self.grid.natural_order) if self.grid.natural_order in self.orders else None
        chosen = []
        for h in range(self.heads):
            index = int(best[h])
            if natural is not None and combined[natural, h] >= combined[index, h] - TIE_TOLERANCE:
                index = natural
            chosen.append(self.orders[index])
        return chosen

    def empty_heads(self) -> list[int]:
        tol = self.options.empty_head_tol
        if tol is None or not self.out_count:
            return []
        rms = (self.out_sq / self.out_count).sqrt()
        reference = rms.median()
        if reference <= 0:
            return []
        return [h for h in range(self.heads) if rms[h] < tol * reference]

    def bucket_mass(self, bucket: int) -> torch.Tensor:
        """[O, H, nb, nb] accumulated mass of ``bucket`` (all calls' mass if the bucket saw none)."""
        if self.mass[bucket] is not None:
            return self.mass[bucket]
        seen = [m for m in self.mass if m is not None]
        if not seen:
            raise CalibrationError("no attention call was observed for this site")
        return torch.stack(seen).sum(0)

    def bucket_block_score(self, bucket: int) -> torch.Tensor:
        """[O, H, nb, nb] map that ranks the blocks of ``bucket``: its mass, or with ``block_score="output"`` its
        accumulated output-change score (all calls' scores if the bucket saw none)."""
        if self.options.block_score == "mass":
            return self.bucket_mass(bucket)
        if self.output_score[bucket] is not None:
            return self.output_score[bucket]
        seen = [m for m in self.output_score if m is not None]
        if not seen:
            raise CalibrationError("block_score='output': no output statistics were collected (calibrate with "
                                   "block_score='output' and v)")
        return torch.stack(seen).sum(0)

    def chosen_mass(self, bucket: int, orders: list[str]) -> torch.Tensor:
        """[H, nb, nb] (float32, CPU) mass of ``bucket``, each head in its order of ``orders``."""
        order_index = torch.tensor([self.orders.index(o) for o in orders])
        return self.bucket_mass(bucket).float().cpu()[order_index, torch.arange(self.heads)]

    def build_site_plan(
        self,
        site_id: str = "site",
        *,
        dense_buckets: Iterable[int] = (),
        orders: Optional[list[str]] = None,
        masks: Optional[Mapping[int, torch.Tensor]] = None,
    ) -> SitePlan:
        """Choose orders, build the masks of every bucket and return the `SitePlan` (with a JSON report).

        ``masks``: {bucket: bool [H, nb, nb]} chosen elsewhere (``allocation="global"``: `build_site_plans`)
        for those sparse buckets; the others follow ``options.allocation`` ("global" alone = "site").
        """
        opts = self.options
        dense_buckets = sorted(set(int(b) for b in dense_buckets))
        orders = orders or self.choose_orders()
        order_index = torch.tensor([self.orders.index(o) for o in orders])
        heads = torch.arange(self.heads)
        empty = self.empty_heads()
        natural = self.orders.index(self.grid.natural_order) if self.grid.natural_order in self.orders else 0
        given = dict(masks or {})
        masks, densities, kept, kept_per_head, natural_kept = [], [], [], [], []
        for bucket in range(self.num_buckets):
            mass = self.bucket_mass(bucket).float().cpu()
            chosen_mass = mass[order_index, heads]  # [H, nb, nb]
            mandatory = mandatory_blocks(self.grid, self.block_size)
            if bucket in dense_buckets:
                mask = torch.ones(self.heads, self.nb, self.nb, dtype=torch.bool)
            else:
                if bucket in given:
                    mask = given[bucket].to(torch.bool).cpu().clone()
                elif opts.allocation == "uniform":
                    rank = chosen_mass if opts.block_score == "mass" else \
                        self.bucket_block_score(bucket).float().cpu()[order_index, heads]
                    mask = select_blocks(rank, opts.density, mandatory, opts.mass_threshold)
                else:
                    score = row_normalized_mass(chosen_mass, self.seq_len, self.block_size)
                    mask, = allocate_blocks([score], opts.density, [mandatory], opts.mass_threshold)
                if opts.empty_heads == "minimal" and empty:
                    mask[empty] = mandatory
            natural_mask = select_blocks(mass[natural], opts.density, mandatory, opts.mass_threshold)
            share = self._kept_share(chosen_mass, mask)
            masks.append(mask)
            densities.append(float(mask.float().mean()))
            kept.append(float(share.mean()))
            kept_per_head.append([round(float(x), 6) for x in share])
            natural_kept.append([round(float(x), 6) for x in self._kept_share(mass[natural], natural_mask)])
        scores = self.scores()
        chosen_scores = {name: [round(float(value[order_index[h], h]), 6) for h in range(self.heads)]
                         for name, value in scores.items()}
        stats = {
            "calls": self.calls,
            "bucket_calls": list(self.bucket_calls),
            "density": densities,
            "kept_mass": kept,
            "kept_mass_per_head": kept_per_head,
            "natural_kept_mass_per_head": natural_kept,
            "scores": chosen_scores,
            "candidate_orders": list(self.orders),
        }
        return SitePlan(
            site_id=site_id,
            heads=self.heads,
            seq_len=self.seq_len,
            block_size=self.block_size,
            perm=orders_permutation(self.grid, orders),
            block_masks=torch.stack(masks),
            orders=list(orders),
            grid=self.grid,
            empty_heads=empty,
            dense_buckets=dense_buckets,
            stats=stats,
        )


def build_site_plans(
    statistics: Mapping[str, SiteStatistics],
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
        for s, mask in zip(sids, allocate_blocks(scores, first.options.density, mandatory, first.options.mass_threshold)):
            given[s][bucket] = mask
    return {sid: stats.build_site_plan(sid, dense_buckets=dense, orders=chosen[sid], masks=given[sid])
            for sid, stats in statistics.items()}


def calibrate_site(
    q: torch.Tensor,
    k: torch.Tensor,
    grid: TokenGrid,
    *,
    v: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    site_id: str = "site",
    **options: Any,
) -> SitePlan:
    """Calibrate one site from its q, k (and optionally v) [B, H, N, D]; options are `CalibrationOptions` fields."""
    stats = SiteStatistics(grid, q.shape[1], CalibrationOptions(**options))
    stats.update(q, k, v, scale=scale)
    return stats.build_site_plan(site_id)


# ------------------------------------------------------------------------------------------------------
# Token layout inference (until the layout pass provides grids)
# ------------------------------------------------------------------------------------------------------
def _patch_sizes_from_model(model: Optional[torch.nn.Module]) -> tuple[Optional[list[int]], Optional[list[int]]]:
    config = getattr(model, "config", None)
    if config is None:
        return None, None
    get = config.get if isinstance(config, Mapping) else lambda key, default=None: getattr(config, key, default)
    patch = get("patch_size", None)
    patch_t = get("patch_size_t", None)
    spatial = temporal = None
    if isinstance(patch, (list, tuple)) and len(patch) == 3:
        temporal, spatial = [int(patch[0])], [int(patch[1])]
    elif isinstance(patch, (list, tuple)) and len(patch) == 2:
        spatial = [int(patch[0])]
    elif isinstance(patch, int):
        spatial = [patch]
    if isinstance(patch_t, int):
        temporal = [patch_t]
    elif patch is not None and temporal is None and "patch_size_t" in (config if isinstance(config, Mapping) else vars(config)):
        temporal = [1]  # CogVideoX 1.0: patch_size_t=None means no temporal patching
    return spatial, temporal


def infer_grid(
    seq_len: int,
    tensors: Mapping[str, Any],
    *,
    patch_sizes: Optional[Iterable[int]] = None,
    temporal_patch_sizes: Optional[Iterable[int]] = None,
    text_position: str = "prefix",
) -> Optional[TokenGrid]:
    """Guess the layout of a length-``seq_len`` sequence from the model's input tensors; None if not unique.

    Candidates: 5-D latents [B, F, C, H, W] or [B, C, F, H, W] and 4-D [B, C, H, W] among the inputs named
    like a latent (``LATENT_NAMES``: hidden_states, sample, latent, video, image), divided by the patch
    sizes (default 1, 2, 4, 8 spatial and 1, 2, 4 temporal), Flux-style ``img_ids`` [n, 3] (row and column
    ids); the text length must be 0 or the sequence length of a 3-D input (e.g. encoder_hidden_states).
    """
    spatial = list(patch_sizes or (1, 2, 4, 8))
    temporal = list(temporal_patch_sizes or (1, 2, 4))
    shaped = {name: tuple(t.shape) for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    text_lengths = {0} | {s[1] for s in shaped.values() if len(s) == 3}
    visual: set[tuple[Optional[int], int, int]] = set()
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        shape = tuple(tensor.shape)
        if "img_ids" in name and tensor.dim() in (2, 3) and shape[-1] == 3 and tensor.numel():
            ids = tensor.reshape(-1, 3)
            if not ids.is_floating_point() or bool((ids == ids.round()).all()):
                h, w = int(ids[:, 1].max().item()) + 1, int(ids[:, 2].max().item()) + 1
                if h * w == ids.shape[0]:
                    visual.add((None, h, w))
                    text_lengths |= {s[0] for n2, s in shaped.items() if "txt_ids" in n2 and len(s) >= 1}
                    text_lengths |= {s[-2] for n2, s in shaped.items() if "txt_ids" in n2 and len(s) >= 2}
        if not any(word in name.lower() for word in LATENT_NAMES) or "encoder" in name.lower():
            continue  # only latent-like inputs: a 4-D q/k/v or conv weight would give false layouts
        if len(shape) == 5:
            for f, h, w in ((shape[1], shape[3], shape[4]), (shape[2], shape[3], shape[4])):
                for pt, p in itertools.product(temporal, spatial):
                    if f % pt == 0 and h % p == 0 and w % p == 0:
                        visual.add((f // pt, h // p, w // p))
        elif len(shape) == 4:
            for p in spatial:
                if shape[2] % p == 0 and shape[3] % p == 0:
                    visual.add((None, shape[2] // p, shape[3] // p))
    grids = set()
    for f, h, w in visual:
        text = seq_len - (f or 1) * h * w
        if text in text_lengths:
            grids.add(TokenGrid(frames=f, height=h, width=w, text_tokens=text, text_position=text_position))
    return grids.pop() if len(grids) == 1 else None


def named_inputs(model: Optional[torch.nn.Module], args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Model inputs by parameter name (positional ones bound through the forward signature when possible)."""
    named: dict[str, Any] = {}
    if args and model is not None:
        try:
            bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
            named.update(bound.arguments)
            for key, value in list(named.items()):
                if isinstance(value, dict) and key not in kwargs:  # **kwargs collector
                    named.pop(key)
                    named.update(value)
        except (TypeError, ValueError):
            named.update({f"arg{i}": a for i, a in enumerate(args)})
    elif args:
        named.update({f"arg{i}": a for i, a in enumerate(args)})
    named.update(kwargs)
    return named


def placeholder_inputs(gm: fx.GraphModule, example_inputs: Iterable[Any]) -> dict[str, Any]:
    """Graph inputs by (cleaned) placeholder name, leaving out lifted parameters and buffers."""
    named = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        name = node.name
        if "_parameters_" in name or "_buffers_" in name:
            continue
        clean = re.sub(r"^l_", "", name.lower()).strip("_")
        named[clean] = value
    return named


def layout_pass_grid(site: Any) -> Optional[TokenGrid]:
    """The grid the layout-inference pass (`passes.layout`) finds for ``site`` in its graph; None if it cannot."""
    try:
        from paro_compile.passes.layout import infer_site_layout

        grid = infer_site_layout(site).token_grid()
    except Exception:  # the pass must never break calibration: fall back to the input-shape heuristics
        return None
    return grid if isinstance(grid, TokenGrid) else None


class GridResolver:
    """Picks each site's `TokenGrid`, first found wins: the per-site dict, the ``grid_for_site`` hook, the one
    grid for all sites, the layout-inference pass on the site's graph, the input-shape heuristics (`infer_grid`)."""

    def __init__(
        self,
        grid: GridSpec = None,
        grid_for_site: Optional[GridHook] = None,
        *,
        model: Optional[torch.nn.Module] = None,
        text_position: str = "prefix",
        use_layout_pass: bool = True,
    ) -> None:
        self.grid = grid
        self.hook = grid_for_site
        self.text_position = text_position
        self.use_layout_pass = use_layout_pass
        self.patch_sizes, self.temporal_patch_sizes = _patch_sizes_from_model(model)
        self.inputs: dict[str, Any] = {}

    def __call__(self, site: Any) -> TokenGrid:
        seq_len = int(site.seq_len)
        found: Optional[TokenGrid] = None
        how = ""
        if isinstance(self.grid, Mapping) and site.site_id in self.grid:
            found, how = self.grid[site.site_id], f"grid[{site.site_id!r}]"
        if found is None and self.hook is not None:
            found, how = self.hook(site), "grid_for_site"
        if found is None and isinstance(self.grid, TokenGrid):
            found, how = self.grid, "grid"
        if found is None and self.use_layout_pass:
            found, how = layout_pass_grid(site), "the layout pass"
        if found is None:
            found = infer_grid(seq_len, self.inputs, patch_sizes=self.patch_sizes,
                               temporal_patch_sizes=self.temporal_patch_sizes, text_position=self.text_position)
            how = "inferred from the inputs"
        if found is None:
            shapes = {name: tuple(t.shape) for name, t in self.inputs.items() if isinstance(t, torch.Tensor)}
            raise CalibrationError(
                f"cannot determine the token layout of attention site {site.site_id} (sequence length {seq_len}, "
                f"inputs {shapes}): pass grid=TokenGrid(frames=F, height=H, width=W, text_tokens=T) so that "
                f"T + F*H*W == {seq_len} (or a dict {{site_id: TokenGrid}}, or grid_for_site=...)"
            )
        if not isinstance(found, TokenGrid):
            raise CalibrationError(f"{how} gave {found!r} for site {site.site_id}, expected a TokenGrid")
        if found.num_tokens != seq_len:
            raise CalibrationError(
                f"attention site {site.site_id} has {seq_len} tokens but the grid ({how}) {found} has "
                f"{found.num_tokens}: pass a per-site dict grid={{site_id: TokenGrid(...)}}"
            )
        return found


# ------------------------------------------------------------------------------------------------------
# Graph instrumentation
# ------------------------------------------------------------------------------------------------------
_RECORDERS: dict[int, "Recorder"] = {}
_RECORDER_IDS = itertools.count()


def _observe_sdpa(recorder_id: int, site_id: str, q, k, v, scale=None):
    """What an instrumented graph calls instead of SDPA: dense SDPA plus statistics for ``site_id``."""
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    recorder = _RECORDERS.get(recorder_id)
    if recorder is not None:
        recorder.observe(site_id, q, k, v, scale)
    return out


class Recorder:
    """Statistics of every observed site of one calibration run, keyed by site id."""

    def __init__(
        self,
        options: CalibrationOptions,
        resolver: GridResolver,
        *,
        num_buckets: int = 1,
        progress: bool = False,
    ) -> None:
        self.options = options
        self.resolver = resolver
        self.num_buckets = num_buckets
        self.bucket = 0
        self.grids: dict[str, TokenGrid] = {}
        self.sites: dict[str, SiteStatistics] = {}
        self.skipped: dict[str, list[str]] = {}
        self.progress = progress
        self.id = next(_RECORDER_IDS)
        _RECORDERS[self.id] = self

    def close(self) -> None:
        _RECORDERS.pop(self.id, None)

    def observe(self, site_id: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float]) -> None:
        stats = self.sites.get(site_id)
        if stats is None:
            stats = SiteStatistics(self.grids[site_id], q.shape[1], self.options, num_buckets=self.num_buckets)
            self.sites[site_id] = stats
        stats.update(q.detach(), k.detach(), v.detach(), scale=scale, bucket=self.bucket)

    def instrument(self, gm: fx.GraphModule) -> fx.GraphModule:
        """Replace every supported SDPA site of ``gm`` (in place) by `_observe_sdpa`."""
        from paro_compile.config import ParoConfig
        from paro_compile.passes.discover import find_attention_sites

        sites = find_attention_sites(gm, ParoConfig(allow_fp32=True))
        for site in sites:
            if not site.supported:
                self.skipped[site.site_id] = list(site.reasons)
                continue
            self.grids[site.site_id] = self.resolver(site)
            node = site.node
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(_observe_sdpa, (self.id, site.site_id, site.q, site.k, site.v, site.scale))
            new.meta = copy.copy(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        gm.graph.lint()
        gm.recompile()
        return gm

    def build_plan(self, *, step_boundaries: list[float], dense_buckets: Iterable[int] = (), timestep_arg: str = "timestep",
                   fingerprint: Optional[str] = None, meta: Optional[dict] = None) -> Plan:
        if not self.sites:
            reasons = "; ".join(f"{sid}: {', '.join(r)}" for sid, r in self.skipped.items()) or "no SDPA call found"
            raise CalibrationError(f"no supported attention site was observed ({reasons})")
        sites = build_site_plans(self.sites, dense_buckets=dense_buckets)
        return Plan(
            sites=sites,
            step_boundaries=list(step_boundaries),
            timestep_arg=timestep_arg,
            fingerprint=fingerprint,
            density=self.options.density,
            alpha=self.options.alpha,
            meta={"skipped_sites": self.skipped, **(meta or {})},
        )


# ------------------------------------------------------------------------------------------------------
# Step buckets
# ------------------------------------------------------------------------------------------------------
def timestep_value(timestep: Any) -> Optional[float]:
    if timestep is None:
        return None
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0].item()) if timestep.numel() else None
    try:
        return float(timestep)
    except (TypeError, ValueError):
        return None


def derive_step_boundaries(timesteps: Iterable[float], step_buckets: int, dense_steps: int = 0) -> tuple[list[float], list[int]]:
    """Boundaries (descending) and dense bucket indices from the calibration timesteps.

    The ``dense_steps`` largest distinct timesteps form a dense bucket 0; the remaining ones are split into
    ``step_buckets`` groups of (nearly) equal count; boundaries are midpoints between neighbouring groups.
    """
    distinct = sorted({float(t) for t in timesteps}, reverse=True)
    needed = step_buckets + (1 if dense_steps else 0)
    if len(distinct) < needed or (dense_steps and len(distinct) - dense_steps < step_buckets):
        raise CalibrationError(
            f"step_buckets={step_buckets}, dense_steps={dense_steps} need at least {dense_steps + step_buckets} distinct "
            f"timesteps in the calibration inputs, got {len(distinct)} ({distinct[:8]}); pass step_boundaries=[...]"
        )
    boundaries: list[float] = []
    rest = distinct
    if dense_steps:
        boundaries.append((distinct[dense_steps - 1] + distinct[dense_steps]) / 2)
        rest = distinct[dense_steps:]
    cuts = [round(i * len(rest) / step_buckets) for i in range(1, step_buckets)]
    boundaries += [(rest[c - 1] + rest[c]) / 2 for c in cuts]
    return boundaries, ([0] if dense_steps else [])


def solve_sparse_density(average_density: float, boundaries: list[float], dense_buckets: list[int],
                         timesteps: Iterable[float]) -> tuple[float, float]:
    """Density of the sparse buckets that makes the kept share, averaged over ``timesteps`` (dense buckets count
    1.0), equal ``average_density``. Returns (sparse density, share of the timesteps that fall in dense buckets).

    With a share w of dense steps: ``sparse = (average - w) / (1 - w)``. The plan's mandatory diagonal and text
    blocks can push the achieved average above the target at very low sparse densities (the plan records it)."""
    ts = [float(t) for t in timesteps]
    if not ts:
        raise CalibrationError("average_density needs at least one timestep to average over")
    shell = Plan(sites={}, step_boundaries=list(boundaries))
    dense_share = sum(shell.bucket_for_timestep(t) in dense_buckets for t in ts) / len(ts)
    if dense_share >= 1.0:
        raise CalibrationError(f"every one of the {len(ts)} timesteps falls in a dense bucket: there is no sparse step "
                               f"to bring the average down to {average_density}; lower dense_steps")
    sparse = (average_density - dense_share) / (1.0 - dense_share)
    if sparse <= 0.0:
        raise CalibrationError(
            f"average_density={average_density} is not reachable: the dense bucket already holds {dense_share:.0%} of the "
            f"{len(ts)} timesteps; lower dense_steps or raise average_density above {dense_share:.3f}")
    return min(sparse, 1.0), dense_share


# ------------------------------------------------------------------------------------------------------
# Model-level calibration
# ------------------------------------------------------------------------------------------------------
def _calibration_timesteps(model: torch.nn.Module, items: list, timestep_arg: str, why: str) -> list[float]:
    """The ``timestep_arg`` value of every calibration input (raises `CalibrationError` saying ``why`` if absent)."""
    out = []
    for item in items:
        args, kwargs = _split_inputs(item)
        t = timestep_value(named_inputs(model, args, kwargs).get(timestep_arg))
        if t is None:
            raise CalibrationError(f"{why}: input {timestep_arg!r} not found in a calibration input (set timestep_arg=...)")
        out.append(t)
    return out


def _split_inputs(item: Any) -> tuple[tuple, dict]:
    if isinstance(item, Mapping):
        return (), dict(item)
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], (tuple, list)) and isinstance(item[1], Mapping):
        return tuple(item[0]), dict(item[1])
    raise TypeError(f"calibration inputs must be (args, kwargs) tuples or dicts of keyword arguments, got {type(item).__name__}")


def _fresh_runner(tag: int) -> Callable:
    """``run(model, args, kwargs)`` with a code object of its own.

    Dynamo keeps compiled graphs on the code object of the frame it compiles (with a per-code recompile
    limit) and guards them on the backend's identity. Compiling this fresh function instead of the model
    keeps our entries off ``model.forward``'s code: the user's own compiled model is untouched, repeated
    calibrations never hit the recompile limit, and the entries die with the function.
    """

    def run(model, args, kwargs):
        return model(*args, **kwargs)

    code = run.__code__.replace(co_name=f"paro_calibration_{tag}")
    return types.FunctionType(code, run.__globals__, code.co_name)


def _progress(iterable, total, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="call")


def calibrate(
    model: torch.nn.Module,
    inputs_iter: Iterable[Any],
    *,
    density: Optional[float] = None,
    average_density: Optional[float] = None,
    sampling_timesteps: Optional[Iterable[float]] = None,
    grid: GridSpec = None,
    alpha: float = DEFAULT_ALPHA,
    step_buckets: int = 1,
    dense_steps: int = 0,
    step_boundaries: Optional[list[float]] = None,
    timestep_arg: str = "timestep",
    block_size: int = 64,
    mass_threshold: Optional[float] = None,
    allocation: str = "uniform",
    block_score: str = "mass",
    grid_for_site: Optional[GridHook] = None,
    text_position: str = "prefix",
    use_layout_pass: bool = True,
    progress: bool = True,
    **options: Any,
) -> Plan:
    """Run ``model`` on ``inputs_iter`` with instrumented attention and build a `Plan`.

    inputs_iter yields ``(args, kwargs)`` or a dict of keyword arguments, one model call each.
    density: kept share of the blocks in every sparse bucket (default 0.3). average_density (instead of
    ``density``): the kept share averaged over the sampling steps, dense buckets counting 1.0; the sparse
    buckets' density is solved from it (`solve_sparse_density`) over ``sampling_timesteps`` (default: the
    calibration calls' timesteps). This is how to spend a fixed budget on dense high-noise steps
    (``dense_steps``) without raising the average cost (docs/quality_tuning.md). The plan's ``meta`` records
    the target, the solved sparse density, the dense share and the achieved average.
    grid: one `TokenGrid` for every site, a dict {site_id: TokenGrid}, or None. Sites it does not cover ask
    ``grid_for_site(site)``, then the layout-inference pass (``use_layout_pass``), then the inputs' shapes
    (`infer_grid`); a layout none of them determines raises `CalibrationError`.
    step_buckets: mask sets per range of timesteps (read from the ``timestep_arg`` input); boundaries are
    derived from the calibration timesteps (or given as ``step_boundaries``, descending). dense_steps: with
    derived boundaries, that many largest timesteps form an extra all-dense bucket 0; with explicit
    boundaries, any value > 0 makes bucket 0 dense.
    allocation: how each sparse bucket's block budget is spread (`CalibrationOptions.allocation`):
    "uniform" (default, every head keeps the same share ``density``), "site" (the heaviest blocks of all
    heads of a site, by row-normalised calibration mass; each site at ``density``) or "global" (of all
    heads of all sites; only the model's average density is ``density``). Diagonal and text blocks are
    always kept.
    block_score: what ranks the blocks (`CalibrationOptions.block_score`): "mass" (default, calibrated
    attention mass) or "output" (output-aware: dropped probability mass times the distance of the dropped
    values from the row's output, summed over query rows; uniform allocation only). Orders are chosen by mass
    either way.
    Other keyword options: `CalibrationOptions` fields (eps, sigma, sparsity_metric, chunk_rows,
    max_chunk_elements, empty_head_tol, empty_heads, stats_device, orders).
    """
    if density is not None and average_density is not None:
        raise ValueError("pass density (per sparse bucket) or average_density (over the sampling steps), not both")
    if average_density is not None and not 0.0 < float(average_density) <= 1.0:
        raise ValueError(f"average_density must be in (0, 1], got {average_density}")
    if sampling_timesteps is not None and average_density is None:
        raise ValueError("sampling_timesteps only weights average_density; pass average_density too")
    if average_density is not None and mass_threshold is not None:
        raise ValueError("average_density and mass_threshold both set the kept-block budget; pass one")
    opts = CalibrationOptions(density=0.3 if density is None else density, alpha=alpha, block_size=block_size,
                              mass_threshold=mass_threshold, allocation=allocation, block_score=block_score, **options)
    if step_buckets < 1:
        raise ValueError(f"step_buckets must be >= 1, got {step_buckets}")
    model = getattr(model, "_orig_mod", model)  # an already compiled module: calibrate the original
    items: Iterable[Any] = inputs_iter
    total = len(items) if hasattr(items, "__len__") else None
    dense_buckets: list[int] = []
    timesteps: list[float] = []
    if step_boundaries is not None:
        boundaries = sorted((float(b) for b in step_boundaries), reverse=True)
        if dense_steps:
            if not boundaries:
                raise CalibrationError("dense_steps with explicit step_boundaries needs at least one boundary")
            dense_buckets = [0]
    elif step_buckets > 1 or dense_steps:
        items = list(items)
        total = len(items)
        timesteps = _calibration_timesteps(model, items, timestep_arg, "step buckets need the timestep")
        boundaries, dense_buckets = derive_step_boundaries(timesteps, step_buckets, dense_steps)
    else:
        boundaries = []
    average_meta: dict[str, float] = {}
    if average_density is not None:
        # a list: the timesteps are read twice (the solve, then the achieved average), and may come as a generator
        weights_from = None if sampling_timesteps is None else [float(t) for t in sampling_timesteps]
        if weights_from is None and dense_buckets:
            if not timesteps:  # explicit boundaries: read the calibration timesteps now
                items = list(items)
                total = len(items)
                timesteps = _calibration_timesteps(model, items, timestep_arg,
                                                   "average_density with dense buckets needs the timestep "
                                                   "(or pass sampling_timesteps=[...])")
            weights_from = timesteps
        if dense_buckets:
            sparse, dense_share = solve_sparse_density(float(average_density), boundaries, dense_buckets, weights_from)
        else:
            sparse, dense_share = float(average_density), 0.0
        opts.density = sparse
        average_meta = {"average_density_target": float(average_density), "sparse_density": sparse,
                        "dense_step_share": dense_share}
        weights_ts = weights_from or []
    plan_shell = Plan(sites={}, step_boundaries=boundaries)
    resolver = GridResolver(grid, grid_for_site, model=model, text_position=text_position, use_layout_pass=use_layout_pass)
    recorder = Recorder(opts, resolver, num_buckets=plan_shell.num_buckets, progress=progress)

    def backend(gm: fx.GraphModule, example_inputs):
        return recorder.instrument(gm).forward

    try:
        compiled = functools.partial(torch.compile(_fresh_runner(recorder.id), backend=backend, dynamic=False), model)
        calls = 0
        with torch.no_grad():
            for item in _progress(items, total, progress, "paro calibration"):
                args, kwargs = _split_inputs(item)
                named = named_inputs(model, args, kwargs)
                resolver.inputs = named
                if boundaries:
                    t = timestep_value(named.get(timestep_arg))
                    if t is None:
                        raise CalibrationError(f"step buckets need the timestep: input {timestep_arg!r} not found")
                    recorder.bucket = plan_shell.bucket_for_timestep(t)
                try:
                    compiled(args, kwargs)
                except Exception as error:  # unwrap our own errors raised inside the Dynamo backend
                    inner = getattr(error, "inner_exception", None) or error.__cause__
                    if isinstance(inner, CalibrationError):
                        raise inner from None
                    raise
                calls += 1
        if not calls:
            raise CalibrationError("inputs_iter yielded no calibration inputs")
        plan = recorder.build_plan(step_boundaries=boundaries, dense_buckets=dense_buckets, timestep_arg=timestep_arg,
                                   fingerprint=model_fingerprint(model),
                                   meta={"calls": calls, **({"allocation": opts.allocation} if opts.allocation != "uniform" else {}),
                                         **({"block_score": opts.block_score} if opts.block_score != "mass" else {}),
                                         **average_meta})
        if average_meta:
            plan.meta["average_density_achieved"] = (
                sum(plan.overall_density(plan.bucket_for_timestep(t)) for t in weights_ts) / len(weights_ts)
                if weights_ts else plan.overall_density())
    finally:
        recorder.close()
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(plan.summary())
    return plan


# ------------------------------------------------------------------------------------------------------
# α sweep on synthetic heads (documentation of DEFAULT_ALPHA): python -m paro_compile.calibration
# ------------------------------------------------------------------------------------------------------
def synthetic_qk(grid: TokenGrid, head_axes: list[dict[str, float]], *, dim: int = 64, temperature: float = 1.0,
                 noise: float = 0.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [1, H, N, dim] whose scores are −|x_i − x_j|² / temperature (+ noise), x = token position weighted per axis.

    ``head_axes[h]`` maps axis names ("F", "H", "W") to weights: a large weight makes the head local along
    that axis (attention stays within ±1/weight), 0 makes it ignore the axis. Text tokens sit far away and
    attend among themselves.
    """
    gen = torch.Generator().manual_seed(seed)
    n = grid.num_tokens
    coords = torch.zeros(n, 3)
    axes = grid.axes
    sizes = [grid.sizes[a] for a in axes]
    mesh = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in sizes], indexing="ij"), -1)
    vis = mesh.reshape(-1, len(axes))
    qs, ks = [], []
    for weights in head_axes:
        x = torch.zeros(n, len(axes) + 1)
        for i, a in enumerate(axes):
            x[grid.visual_slice, i] = vis[:, i] * weights.get(a, 0.0)
        x[grid.text_slice, -1] = 1e3
        sq = x.pow(2).sum(-1, keepdim=True)
        q = torch.cat([2 * x, -torch.ones(n, 1)], -1) / temperature
        k = torch.cat([x, sq], -1)
        pad = dim - q.shape[-1]
        q = torch.cat([q, noise * torch.randn(n, pad, generator=gen)], -1)
        k = torch.cat([k, noise * torch.randn(n, pad, generator=gen)], -1)
        qs.append(q)
        ks.append(k)
    del coords
    return torch.stack(qs)[None], torch.stack(ks)[None]


def _alpha_sweep(num_heads: int = 48, seed: int = 1) -> None:  # pragma: no cover - documentation experiment
    """Regret of each (sparsity_metric, α) on random synthetic heads (takes ~2.5 min on 2 CPU cores).

    Heads have random per-axis locality weights (log-uniform in [0.03, 10]); three (noise, temperature)
    settings. For each choice: kept-mass regret (best candidate's kept mass at density 0.2 minus the chosen
    order's) and Ψ ratio (chosen order's Ψ over the best candidate's), mean and worst over heads.
    """
    grid = TokenGrid(frames=8, height=16, width=16, text_tokens=32)
    gen = torch.Generator().manual_seed(seed)
    heads = [{a: float(10 ** (torch.rand(1, generator=gen).item() * 2.5 - 1.5)) for a in "FHW"} for _ in range(num_heads)]
    results: dict[tuple[str, float], list[tuple[float, float, float, float]]] = {}
    for noise, temperature in ((0.0, 1.0), (0.5, 2.0), (1.0, 4.0)):
        q, k = synthetic_qk(grid, heads, temperature=temperature, noise=noise, seed=3)
        for metric in SPARSITY_METRICS:
            stats = SiteStatistics(grid, len(heads), CalibrationOptions(density=0.2, sparsity_metric=metric))
            stats.update(q, k)
            s = stats.scores()
            best_kept, best_psi = s["kept_mass"].amax(0), s["incoherence"].amin(0)
            for alpha in (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
                idx = torch.tensor([stats.orders.index(o) for o in stats.choose_orders(alpha)])
                kept = s["kept_mass"][idx, torch.arange(len(heads))]
                psi = s["incoherence"][idx, torch.arange(len(heads))]
                results.setdefault((metric, alpha), []).append((
                    (best_kept - kept).mean().item(), (best_kept - kept).max().item(),
                    (psi / best_psi).mean().item(), (psi / best_psi).max().item()))
    for (metric, alpha), rows in results.items():
        r = torch.tensor(rows)
        print(f"{metric:5s} alpha {alpha:.1f}: kept-mass regret mean {r[:, 0].mean():.4f} max {r[:, 1].max():.4f} | "
              f"Psi ratio mean {r[:, 2].mean():.3f} max {r[:, 3].max():.3f}")


if __name__ == "__main__":  # pragma: no cover
    _alpha_sweep()
