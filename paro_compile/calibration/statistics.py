"""Block statistics: per site, the attention map pooled into blocks under every candidate order, without N×N.

`SiteStatistics.update` collects the statistics in query chunks: a chunk of C query rows is a complete softmax
row block [B, H, C, N] (all keys are present), and for every candidate order it is pooled at once: the key axis
by gathering the columns in that order's position sequence (padded to whole blocks with a zero column) and
reducing each block-wide group, the query axis by ``index_add_`` of every row into its block under that order.
So one pass over the attention rows feeds all orders; per order and head the pass keeps three [nb, nb] block
maps: mass (sum of P), max of P, and the count of entries below ε. Peak memory ≈ 2.3 × ``max_chunk_elements``
floats + the [O, H, nb, nb] maps. With ``block_score="output"`` the same pass also accumulates each block's
first-order output change (`CalibrationOptions.block_score`) from P·V per key block.

On CUDA (``stats_kernel``, `CalibrationOptions`) the three maps come from `kernels.block_stats` instead: per order one
pass that recomputes the scores tile by tile and reduces them in registers, so no attention row is held and memory
stays at the maps plus one attention output; the chunked pass above remains the CPU path and the one that computes
``block_score="output"``.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional, Union

import torch

from paro_compile import envs
from paro_compile.calibration.masks import kept_share, mandatory_blocks, select_blocks
from paro_compile.calibration.options import CalibrationError, CalibrationOptions
from paro_compile.calibration.orders import best_orders, combined_scores, order_gains
from paro_compile.calibration.outliers import OutlierStatistics
from paro_compile.grid import TokenGrid, candidate_orders, inverse_permutation, order_permutation
from paro_compile.kernels import block_stats
from paro_compile.kernels.reference import num_blocks
from paro_compile.plan import SitePlan

CUDA_CHUNK_ELEMENTS = 2**27
CPU_CHUNK_ELEMENTS = 2**22


def default_chunk_elements(device: Union[str, torch.device]) -> int:
    return CUDA_CHUNK_ELEMENTS if torch.device(device).type == "cuda" else CPU_CHUNK_ELEMENTS


def chunk_rows_for(batch: int, heads: int, seq_len: int, max_elements: int, chunk_rows: Optional[int] = None) -> int:
    """Query rows per chunk so that one chunk's attention rows B·H·rows·(N+1) stay within ``max_elements``."""
    fit = max(1, max_elements // max(1, batch * heads * (seq_len + 1)))
    return max(1, min(chunk_rows or fit, fit, seq_len))


class SiteStatistics:
    """Accumulates block-pooled attention statistics of one site for every candidate order.

    Call `update(q, k, v, bucket=...)` once per observed attention call; then `choose_orders` and
    `build_site_plan`. ``options`` must give the masks' density (``density``, not only ``average_density``,
    which `calibrate` solves over a whole run).
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
        self.options.mask_density  # noqa: B018 - refuses options that carry only an average_density target
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
        self.outliers = (OutlierStatistics(self.heads, self.block_size, self.options.qk_outlier_error)
                         if self.options.qk_outlier_error is not None else None)
        """Q/K block incoherence and the INT8 error it implies (`outliers`), unless ``qk_outlier_error`` is unset."""
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
                "perms": perms.to(device=device, dtype=torch.int32),
                "rows": rows.to(device),
                "pad": torch.tensor(pad),
                "mandatory": mandatory_blocks(self.grid, bs, device),
            }
        return self._tables[key]

    def uses_kernel(self, q: torch.Tensor) -> bool:
        """Whether `update` computes the block maps with the Triton kernels (`CalibrationOptions.stats_kernel`)."""
        choice = self.options.stats_kernel
        why_not = block_stats.supported(self.block_size, q.shape[-1])
        if self.options.block_score != "mass":
            why_not = why_not or "block_score='output' needs P·V per key block (the PyTorch pass computes it)"
        if choice == "torch":
            return False
        if choice == "auto":
            return q.is_cuda and why_not is None
        if why_not is not None:
            raise CalibrationError(f"stats_kernel='triton': {why_not}; use stats_kernel='torch' or 'auto'")
        if not q.is_cuda and not envs.TRITON_INTERPRET:
            raise CalibrationError("stats_kernel='triton' on CPU tensors needs the Triton interpreter: set "
                                   "TRITON_INTERPRET=1 before paro_compile is imported, or use stats_kernel='torch'")
        return True

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
        key_bias: Optional[torch.Tensor] = None,
    ) -> None:
        """Add one attention call (q, k, v [B, H, N, D], model token order) to the statistics of ``bucket``.
        ``key_bias`` [B|1, H|1, N] (a key-padding mask as the op takes it) is added to every row's scores."""
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
        n_orders, nb = len(self.orders), self.nb
        sm_scale = float(scale) if scale is not None else 1.0 / math.sqrt(d)
        max_elements = opts.max_chunk_elements or default_chunk_elements(device)
        rows_per_chunk = chunk_rows_for(bsz, heads, n, max_elements, opts.chunk_rows)
        if self.outliers is not None:
            self.outliers.update(q, k, v, scale=sm_scale, max_elements=max_elements)

        mass = torch.zeros(n_orders, heads, nb, nb, device=device)
        small = torch.zeros(n_orders, heads, nb, nb, device=device)
        peak = torch.zeros(n_orders, heads, nb, nb, device=device)
        out_sq = torch.zeros(heads, device=device, dtype=torch.float64)
        want_output = opts.block_score == "output"
        if want_output and v is None:
            raise CalibrationError("block_score='output' needs v in the statistics update")
        out_score = torch.zeros(n_orders, heads, nb, nb, device=device) if want_output else None
        if self.uses_kernel(q):
            self._kernel_maps(q, k, v, sm_scale, key_bias, tab, (mass, peak, small), out_sq)
            pad = 0  # the kernels count valid entries only
        else:
            self._chunked_maps(q, k, v, sm_scale, key_bias, tab, rows_per_chunk, (mass, peak, small, out_score), out_sq)
            pad = int(tab["pad"])
        # The padded key columns are zeros in the last key block: remove them from the "small" counts.
        if pad:
            small[..., -1] -= bsz * pad * tab["rows"][None, None, :]
        valid = bsz * tab["rows"][:, None] * tab["rows"][None, :]  # entries per block
        scores = {
            "block_sparsity": (small >= opts.sigma * valid - 0.5).float().mean((-1, -2)),
            "incoherence": torch.where(mass > 0, peak * valid / mass.clamp_min(1e-30), torch.ones_like(mass)).mean((-1, -2)),
            # One order at a time: the block sort of all orders at once needs ~12 B per block of every order's map.
            "kept_mass": torch.stack([kept_share(m, select_blocks(m, opts.mask_density, tab["mandatory"])) for m in mass]),
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

    def _kernel_maps(self, q, k, v, sm_scale: float, key_bias, tab: dict, maps: tuple, out_sq: torch.Tensor) -> None:
        """mass, peak, small of every order into ``maps`` with `kernels.block_stats`, and the output's squared norm per
        head into ``out_sq`` (one SDPA call: the kernels never form the output)."""
        rows = block_stats.row_stats(q, k, sm_scale, key_bias)
        for o in range(len(self.orders)):
            block_stats.block_stats(q, k, rows, tab["perms"][o], self.block_size, self.options.eps, sm_scale,
                                    key_bias=key_bias, out=tuple(m[o] for m in maps))
        del rows
        if v is not None:
            mask = None
            if key_bias is not None:
                mask = key_bias.to(device=q.device, dtype=q.dtype)[:, :, None, :]
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v.to(q.dtype), attn_mask=mask, scale=sm_scale)
            for h in range(out.shape[1]):  # per head: no float64 copy of the whole output
                out_sq[h] += out[:, h].double().pow(2).sum()

    def _chunked_maps(self, q, k, v, sm_scale: float, key_bias, tab: dict, rows_per_chunk: int, maps: tuple,
                      out_sq: torch.Tensor) -> None:
        """The same maps (and the output-change score with ``block_score="output"``) from complete softmax rows,
        ``rows_per_chunk`` query rows at a time (module docstring)."""
        mass, peak, small, out_score = maps
        bsz, heads, n, d = q.shape
        n_orders, nb, bs = len(self.orders), self.nb, self.block_size
        opts = self.options
        want_output = out_score is not None
        zero_row = q.new_zeros(bsz, heads, 1, d, dtype=torch.float32)
        k_ext = torch.cat([k.float(), zero_row], 2)  # the zero key N is masked to -inf: a zero column of P
        v_ext = torch.cat([v.float(), zero_row[..., : v.shape[-1]]], 2) if v is not None else None
        v_blocks = ([v_ext.index_select(2, tab["key_index"][o]).view(bsz, heads, nb, bs, -1) for o in range(n_orders)]
                    if want_output else None)  # values per key block under each order
        for start in range(0, n, rows_per_chunk):
            stop = min(n, start + rows_per_chunk)
            rows = stop - start
            p = torch.matmul(q[:, :, start:stop].float() * sm_scale, k_ext.transpose(-1, -2))  # [B, H, C, N+1]
            if key_bias is not None:
                p[..., :n] += key_bias.to(device=p.device, dtype=p.dtype)[:, :, None, :]
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


    # ---- what the statistics say ---------------------------------------------------------------
    def scores(self) -> dict[str, torch.Tensor]:
        """Mean per-call scores, each [O, H] (float64, CPU)."""
        if not self.calls:
            raise CalibrationError("no attention call was observed for this site")
        return {name: value / self.calls for name, value in self.score_sums.items()}

    def combined_scores(self, alpha: Optional[float] = None) -> torch.Tensor:
        """[O, H]: α · normalised sparsity + (1 − α) · normalised quantization score (`orders.combined_scores`)."""
        alpha = self.options.alpha if alpha is None else float(alpha)
        return combined_scores(self.scores(), alpha, self.options.sparsity_metric)

    @property
    def natural_index(self) -> Optional[int]:
        """Index of the model's own order among the candidates (None when it is not one of them)."""
        natural = self.grid.natural_order
        return self.orders.index(natural) if natural in self.orders else None

    def order_gains(self, alpha: Optional[float] = None) -> Optional[torch.Tensor]:
        """[O, H] gain of every order over the model's own (`orders.order_gains`); None without a natural candidate."""
        if self.natural_index is None:
            return None
        alpha = self.options.alpha if alpha is None else float(alpha)
        return order_gains(self.scores(), alpha, self.options.sparsity_metric, self.natural_index)

    def choose_orders(self, alpha: Optional[float] = None, min_gain: Optional[float] = None) -> list[str]:
        """Best order per head; the natural order on ties and where the best order's gain over it does not exceed
        ``min_gain`` (default: the ``min_order_gain`` option; `orders.best_orders`)."""
        min_gain = self.options.min_order_gain if min_gain is None else float(min_gain)
        return best_orders(self.combined_scores(alpha), self.orders, self.grid.natural_order,
                           self.order_gains(alpha), min_gain)

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
        """Choose orders, build the masks of every bucket and return the `SitePlan` (`site_plans.build_site_plan`)."""
        from paro_compile.calibration.site_plans import build_site_plan  # site_plans reads these statistics

        return build_site_plan(self, site_id, dense_buckets=dense_buckets, orders=orders, masks=masks)
