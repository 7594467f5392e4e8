"""Block statistics of the attention map under a token order, without materialising the map (Triton).

Calibration (`calibration.statistics.SiteStatistics`) ranks orders and blocks by three numbers per (order, head, query
block, key block), summed or maxed over the batch: the block's attention mass (sum of P), its peak (max of P) and how
many of its valid entries are below ``eps``. `block_stats_reference.block_stats_reference` computes them from the
dense P in float64; this module computes the same without P in memory:

- `row_stats`: per (batch, head, query token) the row max m and the sum l of exp2 of the base-2 scores (key bias
  included): the softmax's normalisation, which no order changes. One pass over the keys in model order.
- `block_stats`: per order, one program per (tile of query positions in that order, head) walks every key tile in that
  order, recomputes S = Q Kᵀ on tensor cores (16-bit inputs: exact products, fp32 sums), P = exp2(s − m) / l, and
  reduces each bs × bs sub-block of the tile to its three numbers; the batch is walked inside the program, so every
  output entry has one writer. Rows and columns are gathered through the order's permutation.

The work per order is one attention forward without the P·V product, so all six orders of a 720p site cost about as
much as a few dense attention calls, where the PyTorch pass moves the whole fp32 map through memory several times per
order. Sub-blocks smaller than 64 tokens share a 64-token tile (tensor cores need 16 at least; 64 keeps them busy).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from paro_compile.kernels.device_guard import first_tensor_device, runs_on_device_of

LOG2E = 1.4426950408889634


def supported(block_size: int, head_dim: int) -> Optional[str]:
    """None where the kernels handle this block size and head dim, else why not."""
    if block_size < 16 or block_size > 128 or block_size & (block_size - 1):
        return f"block_size {block_size} is not a power of two in [16, 128]"
    if head_dim > 256:
        return f"head dim {head_dim} > 256"
    return None


def _bias_view(key_bias: Optional[torch.Tensor], q: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """key_bias [B|1, H|1, N] as (tensor, strides) with broadcast axes of stride 0; a dummy without a bias."""
    if key_bias is None:
        return q.new_zeros(1, dtype=torch.float32), (0, 0, 0)
    bias = key_bias.to(device=q.device, dtype=torch.float32)
    if bias.dim() != 3 or bias.shape[-1] != q.shape[2]:
        raise ValueError(f"key_bias must be [B|1, H|1, N={q.shape[2]}], got {tuple(key_bias.shape)}")
    bias = bias.expand(q.shape[0], q.shape[1], q.shape[2])
    return bias, tuple(bias.stride())


@triton.jit
def _dot(a, b, FP32_INPUTS: tl.constexpr):
    if FP32_INPUTS:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _row_stats_kernel(Q, K, BIAS, M, L, N, H, scale_log2,
                      sqb, sqh, sqn, sqd, skb, skh, skn, skd, sbb, sbh, sbn,
                      BLOCK: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, HAS_BIAS: tl.constexpr,
                      FP32_INPUTS: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_m * BLOCK + tl.arange(0, BLOCK)
    rd = tl.arange(0, DP)
    row_ok = rows < N
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None].to(tl.int64) * sqn + rd[None, :] * sqd,
                mask=row_ok[:, None] & (rd[None, :] < D), other=0.0)
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        col_ok = cols < N
        k = tl.load(K + b * skb + h * skh + cols[:, None].to(tl.int64) * skn + rd[None, :] * skd,
                    mask=col_ok[:, None] & (rd[None, :] < D), other=0.0)
        s = _dot(q, tl.trans(k), FP32_INPUTS) * scale_log2
        if HAS_BIAS:
            s += tl.load(BIAS + b * sbb + h * sbh + cols * sbn, mask=col_ok, other=0.0)[None, :] * 1.4426950408889634
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_sum = s_sum * tl.math.exp2(m - m_safe) + tl.sum(tl.math.exp2(s - m_safe[:, None]), 1)
        m = m_new
    out = pid_bh * N + rows
    tl.store(M + out, m, mask=row_ok)
    tl.store(L + out, s_sum, mask=row_ok)


@triton.jit
def _block_stats_kernel(Q, K, BIAS, M, L, PERM, MASS, PEAK, SMALL, N, B, H, NB, eps, scale_log2,
                        sqb, sqh, sqn, sqd, skb, skh, skn, skd, sbb, sbh, sbn,
                        BS: tl.constexpr, TILE: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                        HAS_BIAS: tl.constexpr, FP32_INPUTS: tl.constexpr):
    SUB: tl.constexpr = TILE // BS
    pid_t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    pos_q = pid_t * TILE + tl.arange(0, TILE)
    row_ok = pos_q < N
    tok_q = tl.load(PERM + pos_q, mask=row_ok, other=0).to(tl.int64)
    rd = tl.arange(0, DP)
    d_ok = rd[None, :] < D
    qb = pid_t * SUB + tl.arange(0, SUB)
    out_rows = (h * NB + qb) * NB
    for b32 in range(B):
        b = h * 0 + b32  # 64-bit offsets (the loop index is 32-bit on the GPU, a Python int in the interpreter)
        q = tl.load(Q + b * sqb + h * sqh + tok_q[:, None] * sqn + rd[None, :] * sqd, mask=row_ok[:, None] & d_ok,
                    other=0.0)
        stat = (b * H + h) * N + tok_q
        m = tl.load(M + stat, mask=row_ok, other=0.0)
        m = tl.where(m == float("-inf"), 0.0, m)
        s_sum = tl.load(L + stat, mask=row_ok, other=0.0)
        has_sum = row_ok & (s_sum > 0)
        inv_l = tl.where(has_sum, 1.0 / tl.where(has_sum, s_sum, 1.0), 0.0)
        for kt in range(0, tl.cdiv(N, TILE)):
            pos_k = kt * TILE + tl.arange(0, TILE)
            col_ok = pos_k < N
            tok_k = tl.load(PERM + pos_k, mask=col_ok, other=0).to(tl.int64)
            k = tl.load(K + b * skb + h * skh + tok_k[:, None] * skn + rd[None, :] * skd, mask=col_ok[:, None] & d_ok,
                        other=0.0)
            s = _dot(q, tl.trans(k), FP32_INPUTS) * scale_log2
            if HAS_BIAS:
                s += tl.load(BIAS + b * sbb + h * sbh + tok_k * sbn, mask=col_ok, other=0.0)[None, :] * 1.4426950408889634
            p = tl.math.exp2(s - m[:, None]) * inv_l[:, None]
            p = tl.where(col_ok[None, :], p, 0.0)
            below = tl.where(row_ok[:, None] & col_ok[None, :] & (p < eps), 1.0, 0.0)
            kb = kt * SUB + tl.arange(0, SUB)
            offs = out_rows[:, None] + kb[None, :]
            keep = (qb[:, None] < NB) & (kb[None, :] < NB)
            if SUB == 1:
                mass = tl.sum(tl.sum(p, 1, keep_dims=True), 0, keep_dims=True)
                peak = tl.max(tl.max(p, 1, keep_dims=True), 0, keep_dims=True)
                small = tl.sum(tl.sum(below, 1, keep_dims=True), 0, keep_dims=True)
            else:
                p4 = tl.reshape(p, [SUB, BS, SUB, BS])
                mass = tl.sum(tl.sum(p4, 3), 1)
                peak = tl.max(tl.max(p4, 3), 1)
                small = tl.sum(tl.sum(tl.reshape(below, [SUB, BS, SUB, BS]), 3), 1)
            if b > 0:
                mass += tl.load(MASS + offs, mask=keep, other=0.0)
                peak = tl.maximum(peak, tl.load(PEAK + offs, mask=keep, other=0.0))
                small += tl.load(SMALL + offs, mask=keep, other=0.0)
            tl.store(MASS + offs, mass, mask=keep)
            tl.store(PEAK + offs, peak, mask=keep)
            tl.store(SMALL + offs, small, mask=keep)


def _check(q: torch.Tensor, k: torch.Tensor) -> None:
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"expected q, k of equal shape [B, H, N, D]; got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.dtype != k.dtype or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k must share a float16 / bfloat16 / float32 dtype; got {q.dtype}, {k.dtype}")


@runs_on_device_of(first_tensor_device)
def row_stats(q: torch.Tensor, k: torch.Tensor, scale: float,
              key_bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, l), each [B, H, N] float32: per query row the max of the base-2 scores ``(q·k)·scale·log2 e + bias·log2 e``
    and the sum of exp2 of the scores minus that max."""
    _check(q, k)
    bsz, heads, n, d = q.shape
    m = torch.empty(bsz, heads, n, device=q.device, dtype=torch.float32)
    s_sum = torch.empty_like(m)
    bias, bias_strides = _bias_view(key_bias, q)
    block = 64
    _row_stats_kernel[(triton.cdiv(n, block), bsz * heads)](
        q, k, bias, m, s_sum, n, heads, float(scale) * LOG2E, *q.stride(), *k.stride(), *bias_strides,
        BLOCK=block, D=d, DP=triton.next_power_of_2(max(d, 16)), HAS_BIAS=key_bias is not None,
        FP32_INPUTS=q.dtype == torch.float32, num_warps=4)
    return m, s_sum


@runs_on_device_of(first_tensor_device)
def block_stats(q: torch.Tensor, k: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor], perm: torch.Tensor,
                block_size: int, eps: float, scale: float, *, key_bias: Optional[torch.Tensor] = None,
                out: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mass, peak, small), each [H, nb, nb] float32, of the attention map in the order ``perm`` ([N], position →
    token), summed (mass, small) or maxed (peak) over the batch; ``rows`` is `row_stats` of the same q, k, scale and
    bias. ``out`` receives them in place (three contiguous [H, nb, nb] float32 tensors on q's device)."""
    _check(q, k)
    why = supported(block_size, q.shape[-1])
    if why is not None:
        raise ValueError(f"block_stats: {why}")
    bsz, heads, n, d = q.shape
    nb = triton.cdiv(n, block_size)
    if perm.shape != (n,):
        raise ValueError(f"perm must be [N={n}], got {tuple(perm.shape)}")
    if out is None:
        out = tuple(torch.empty(heads, nb, nb, device=q.device, dtype=torch.float32) for _ in range(3))
    for t in out:
        if t.shape != (heads, nb, nb) or t.dtype != torch.float32 or not t.is_contiguous() or t.device != q.device:
            raise ValueError(f"out tensors must be contiguous float32 [{heads}, {nb}, {nb}] on {q.device}")
    m, s_sum = rows
    bias, bias_strides = _bias_view(key_bias, q)
    tile = max(64, block_size)
    perm = perm.to(device=q.device, dtype=torch.int32).contiguous()
    _block_stats_kernel[(triton.cdiv(n, tile), heads)](
        q, k, bias, m.contiguous(), s_sum.contiguous(), perm, *out, n, bsz, heads, nb, float(eps),
        float(scale) * LOG2E, *q.stride(), *k.stride(), *bias_strides,
        BS=block_size, TILE=tile, D=d, DP=triton.next_power_of_2(max(d, 16)), HAS_BIAS=key_bias is not None,
        FP32_INPUTS=q.dtype == torch.float32, num_warps=8 if tile * max(d, 64) >= 128 * 128 else 4)
    return out
