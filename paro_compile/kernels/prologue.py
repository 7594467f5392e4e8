"""Fused prologue of the paro attention: permute + smooth K + quantize Q/K + quantize V, one pass.

Computes exactly steps 1-3 of `paro_compile.kernels.reference` (and V's per-channel quantization of
step 4), in the layout the attention kernel (`paro_compile.kernels.attention`) reads:

============  ===========================================  =====================================
tensor        shape (contiguous)                           dtype
============  ===========================================  =====================================
``q``         [B*H, NQB*block_m, DQ]                       int8 (qk_bits 8/4) or q.dtype (16)
``q_scale``   [B*H, NQB]    (amax/qmax · sm_scale·log2e)   float32
``k``         [B*H, NKB*block_n, DQ]                       int8 (qk_bits 8/4) or k.dtype (16)
``k_scale``   [B*H, NKB]    (amax/qmax of smoothed K)      float32
``vt``        [B*H, D, NKB*block_n]  (V **transposed**)    float8_e4m3fn / int8 / v.dtype
``v_scale``   [B*H, D]      (amax/448, amax/127 or 1)      float32
============  ===========================================  =====================================

Rows are in PARO (permuted) order: row ``i`` of head ``h`` holds token ``perm[h, i]``; the gather is
folded into the loads (no permuted copy of the inputs is ever materialised). Rows past N are zero.

- ``DQ = D`` for INT8; for INT4 (values in [-7, 7]) two values share a byte: byte ``c`` of a row
  holds channel ``c`` in its low nibble and channel ``c + D/2`` in its high nibble (two's complement
  nibbles). That split layout lets the attention kernel unpack with shifts and run QKᵀ as two INT8
  dots over the half head dims, with no register shuffles.
- V is stored transposed (token axis contiguous) because Hopper's 8-bit wgmma wants its B operand
  K-major: ``tl.dot(p, tl.trans(vt_tile))`` then needs no layout conversion.

Three launches: a reduction (per-(b, h) channel sums of K for the smoothing mean and channel amax
of V, split over token chunks), a tiny one that turns the chunk partials into K's mean and V's
scale, and the fused quantization pass.
Rounding: values are multiplied by the IEEE reciprocal of their scale (`tl.math.div_rn(1, scale)`
once per block or channel, then one multiply per element, as the reference does in torch: an
element-wise correctly rounded division costs ~10 instructions); integer rounding is half away from
zero, like `reference.round_half_away`; fp32→e4m3 uses the hardware RTNE conversion (the
interpreter's conversion is off by one e4m3 step for some values, see docs/DESIGN_NOTES.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from paro_compile.kernels.device_guard import first_tensor_device, runs_on_device_of
from paro_compile.kernels.launch import launch
from paro_compile.kernels.reference import FP8_MAX, LOG2E, num_blocks

V_MODES = {"fp16": 0, "fp8": 1, "int8": 2}


@dataclass
class Prologue:
    """Output of `paro_prologue` (see the module docstring for layouts)."""

    q: torch.Tensor
    q_scale: torch.Tensor
    k: torch.Tensor
    k_scale: torch.Tensor
    vt: torch.Tensor
    v_scale: torch.Tensor
    qk_bits: int
    pv_dtype: str
    block_m: int
    block_n: int
    n: int
    k_bar: Optional[torch.Tensor] = None
    """[B*H, NKB, D] fp16 mean K row per KV block (smoothed unless qk_bits=16); only with ``pooled=True``."""
    v_bar: Optional[torch.Tensor] = None
    """[B*H, NKB, D] fp16 mean V row per KV block divided by ``v_scale``; only with ``pooled=True``."""
    kbias: Optional[torch.Tensor] = None
    """[B*H, NKB*block_n] fp32 key bias in log2 units, permuted like the keys; only with a ``key_bias``."""
    kbias_flags: Optional[torch.Tensor] = None
    """[B*H, NKB] int32: 1 where a key block holds a nonzero bias; only with a ``key_bias``."""
    n_kv: Optional[int] = None
    """Key tokens (Nk; N for self-attention)."""
    q_bad: Optional[torch.Tensor] = None
    """[B*H, NQB*block_m] int8: 1 for query rows (permuted order) holding a NaN or an infinity (stored NaN)."""


@triton.jit
def _round_half_away(y):
    return tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))


@triton.jit
def pack_int4_pair(lo, hi):
    """Two integer-valued fp32 tiles in [-8, 7] → int8 byte 16·hi + (lo mod 16) (split-nibble layout).

    fp32 arithmetic plus the low byte of a magic-number sum: no integer op is truncated to 8 bits, so
    the compiler cannot narrow it (the GPU and the interpreter give the same bytes; the former
    ``((lo & 15) | (hi << 4)).to(int8)`` relied on backend integer narrowing)."""
    b = 16.0 * hi + tl.where(lo < 0, lo + 16.0, lo)  # in [-128, 127]
    return (b + 12582912.0).to(tl.int32, bitcast=True).to(tl.int8)


@triton.jit
def _rint_even(t):
    r = tl.floor(t + 0.5)
    tie = (r - t) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def fp32_to_fp8e4(x, EMULATE: tl.constexpr):
    """fp32 → e4m3 (round to nearest even). EMULATE rounds in fp32 first: the interpreter's own
    conversion drops the carry into the next binade (e.g. 127.8 → 64), see tests."""
    if EMULATE:
        ax = tl.abs(x)
        e = tl.floor(tl.log2(tl.maximum(ax, 1e-30)))
        e = tl.maximum(e, -6.0)  # subnormal spacing 2^-9
        step = tl.exp2(e - 3.0)
        y = _rint_even(ax / step) * step
        y = tl.minimum(y, 448.0)
        return tl.where(x < 0, -y, y).to(tl.float8e4nv)
    else:
        return x.to(tl.float8e4nv)


@triton.jit
def fp32_to_bf16(x, EMULATE: tl.constexpr):
    """fp32 → bf16 (round to nearest even). The interpreter truncates; EMULATE rounds the bits first."""
    if EMULATE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        bits = bits & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(tl.bfloat16)


@triton.jit
def _stats_kernel(
    K, V, KSUM, KCNT, VAMAX,
    N, H, CHUNK,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    D: tl.constexpr, BLOCK_T: tl.constexpr, NEED_K: tl.constexpr, NEED_V: tl.constexpr,
):
    """Per (b, h, token chunk): sum of K over tokens and amax |V| over tokens, per channel."""
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    nchunks = tl.num_programs(0)
    b = pid_bh // H
    h = pid_bh % H
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, D)
    ksum = tl.zeros([D], dtype=tl.float32)
    kcnt = tl.zeros([D], dtype=tl.float32)
    vamax = tl.zeros([D], dtype=tl.float32)
    start = pid_c * CHUNK
    for t0 in range(start, start + CHUNK, BLOCK_T):
        rows = t0 + offs_t
        rmask = (rows < N)[:, None]
        if NEED_K:
            kt = tl.load(K + b * skb + h * skh + rows[:, None] * skn + offs_d[None, :] * skd, mask=rmask, other=0.0)
            kt = kt.to(tl.float32)
            finite = (kt == kt) & (tl.abs(kt) != float("inf"))  # the smoothing mean is over finite values
            ksum += tl.sum(tl.where(finite, kt, 0.0), axis=0)
            kcnt += tl.sum((finite & rmask).to(tl.float32), axis=0)
        if NEED_V:
            vt = tl.load(V + b * svb + h * svh + rows[:, None] * svn + offs_d[None, :] * svd, mask=rmask, other=0.0)
            av = tl.abs(vt.to(tl.float32))
            # A NaN counts as infinite (max would skip it): a channel holding either gets a NaN scale.
            vamax = tl.maximum(vamax, tl.max(tl.where(av == av, av, float("inf")), axis=0))
    out = (pid_bh * nchunks + pid_c) * D + offs_d
    if NEED_K:
        tl.store(KSUM + out, ksum)
        tl.store(KCNT + out, kcnt)
    if NEED_V:
        tl.store(VAMAX + out, vamax)


@triton.jit
def _stats_finalize_kernel(KSUM, KCNT, VAMAX, KMEAN, VSCALE, NCHUNKS, v_qmax,
                           D: tl.constexpr, NEED_K: tl.constexpr, NEED_V: tl.constexpr):
    """Per (b, h): K's channel mean from the chunk sums, V's per-channel scale amax / qmax (1 where
    amax is 0) from the chunk maxima. One launch instead of ~6 small torch ops per call."""
    pid_bh = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, D)
    ksum = tl.zeros([D], dtype=tl.float32)
    kcnt = tl.zeros([D], dtype=tl.float32)
    vamax = tl.zeros([D], dtype=tl.float32)
    for c in range(0, NCHUNKS):
        if NEED_K:
            ksum += tl.load(KSUM + (pid_bh * NCHUNKS + c) * D + offs_d)
            kcnt += tl.load(KCNT + (pid_bh * NCHUNKS + c) * D + offs_d)
        if NEED_V:
            vamax = tl.maximum(vamax, tl.load(VAMAX + (pid_bh * NCHUNKS + c) * D + offs_d))
    if NEED_K:
        tl.store(KMEAN + pid_bh * D + offs_d, tl.math.div_rn(ksum, tl.maximum(kcnt, 1.0)))
    if NEED_V:
        scale = tl.where(vamax > 0, tl.math.div_rn(vamax, v_qmax), 1.0)
        tl.store(VSCALE + pid_bh * D + offs_d, tl.where(vamax == float("inf"), float("nan"), scale))


_DUMMIES: dict = {}


def dummy_tensor(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A cached empty tensor for pointer arguments a kernel never reads (Triton passes its null pointer).

    Empty, so that it owns no memory: a cached 1-element tensor first made inside a CUDA-graph memory pool (the
    warm-up of ``mode="reduce-overhead"``) stayed alive in that pool and made Inductor's CUDA-graph trees refuse
    to record ("tensors in the cudagraph pool not tracked as outputs")."""
    key = (device, dtype)
    hit = _DUMMIES.get(key)
    if hit is None:
        hit = _DUMMIES[key] = torch.empty(0, device=device, dtype=dtype)
    return hit


@triton.jit
def _load_rows(X, base, src, rmask, offs_d, sxn, sxd):
    return tl.load(X + base + src[:, None] * sxn + offs_d[None, :] * sxd, mask=rmask[:, None], other=0.0).to(tl.float32)


@triton.jit
def _bad_rows(x):
    """[BLOCK] flag of the rows of ``x`` holding a NaN or an infinity."""
    return tl.max(((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32), axis=1) != 0


@triton.jit
def _quant_block(X, XQ, XS, MEAN, ROW_BAD, base, src, rows, rmask, pid_bh, t, nblk, sxn, sxd, scale_mult,
                 D: tl.constexpr, BLOCK: tl.constexpr, QK_BITS: tl.constexpr, SMOOTH: tl.constexpr):
    """Quantize one block of BLOCK gathered rows of X; store values [BLOCK, DQ] and one scale.

    Rows holding a NaN or an infinity (reference step 8) are left out of the block's scale (quantized as zeros) so
    they cannot spread over the block: for keys (SMOOTH) the block's scale becomes NaN, which makes every query row
    that attends to the block NaN; for queries the row is flagged in ROW_BAD and the attention kernel stores it NaN."""
    nrows = nblk * BLOCK
    if QK_BITS == 16:
        offs_d = tl.arange(0, D)
        x = tl.load(X + base + src[:, None] * sxn + offs_d[None, :] * sxd, mask=rmask[:, None], other=0.0)
        tl.store(XQ + (pid_bh * nrows + rows[:, None]) * D + offs_d[None, :], x)
        # (a scalar tensor, so a constexpr scale_mult of 1.0 is stored like a runtime one)
        tl.store(XS + pid_bh * nblk + t, tl.sum(tl.zeros([BLOCK], dtype=tl.float32), axis=0) + scale_mult)
        if not SMOOTH:  # unquantized scores carry NaN and infinities themselves
            tl.store(ROW_BAD + pid_bh * nrows + rows, tl.zeros([BLOCK], dtype=tl.int8))
    elif QK_BITS == 8:
        qmax: tl.constexpr = 127.0
        offs_d = tl.arange(0, D)
        x = _load_rows(X, base, src, rmask, offs_d, sxn, sxd)
        bad = _bad_rows(x) & rmask
        if SMOOTH:
            mean = tl.load(MEAN + pid_bh * D + offs_d)
            x = x - mean[None, :]
        x = tl.where((rmask & ~bad)[:, None], x, 0.0)
        amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
        scale = tl.where(amax > 0, tl.math.div_rn(amax, qmax), 1.0)
        y = _round_half_away(x * tl.math.div_rn(1.0, scale))
        y = tl.minimum(tl.maximum(y, -qmax), qmax)
        tl.store(XQ + (pid_bh * nrows + rows[:, None]) * D + offs_d[None, :], y.to(tl.int8))
        _store_scale(XS, ROW_BAD, bad, pid_bh, t, nblk, rows, nrows, scale * scale_mult, SMOOTH)
    else:
        qmax4: tl.constexpr = 7.0
        HALF: tl.constexpr = D // 2
        offs_h = tl.arange(0, HALF)
        lo = _load_rows(X, base, src, rmask, offs_h, sxn, sxd)
        hi = _load_rows(X, base, src, rmask, offs_h + HALF, sxn, sxd)
        bad = (_bad_rows(lo) | _bad_rows(hi)) & rmask
        if SMOOTH:
            mlo = tl.load(MEAN + pid_bh * D + offs_h)
            mhi = tl.load(MEAN + pid_bh * D + HALF + offs_h)
            lo = lo - mlo[None, :]
            hi = hi - mhi[None, :]
        lo = tl.where((rmask & ~bad)[:, None], lo, 0.0)
        hi = tl.where((rmask & ~bad)[:, None], hi, 0.0)
        amax = tl.maximum(tl.max(tl.max(tl.abs(lo), axis=1), axis=0), tl.max(tl.max(tl.abs(hi), axis=1), axis=0))
        scale = tl.where(amax > 0, tl.math.div_rn(amax, qmax4), 1.0)
        inv = tl.math.div_rn(1.0, scale)
        ylo = tl.minimum(tl.maximum(_round_half_away(lo * inv), -qmax4), qmax4)
        yhi = tl.minimum(tl.maximum(_round_half_away(hi * inv), -qmax4), qmax4)
        packed = pack_int4_pair(ylo, yhi)
        tl.store(XQ + (pid_bh * nrows + rows[:, None]) * HALF + offs_h[None, :], packed)
        _store_scale(XS, ROW_BAD, bad, pid_bh, t, nblk, rows, nrows, scale * scale_mult, SMOOTH)


@triton.jit
def _store_scale(XS, ROW_BAD, bad, pid_bh, t, nblk, rows, nrows, scale, POISON_BLOCK: tl.constexpr):
    """The block's scale; with non-finite rows, a NaN scale (keys: POISON_BLOCK) or the rows' flags (queries)."""
    if POISON_BLOCK:
        scale = tl.where(tl.max(bad.to(tl.int32), axis=0) != 0, float("nan"), scale)
    else:
        tl.store(ROW_BAD + pid_bh * nrows + rows, bad.to(tl.int8))
    tl.store(XS + pid_bh * nblk + t, scale)


@triton.jit
def _permuted_rows(PERM, h, N, rows, rmask):
    """Source tokens of ``rows`` under the head's permutation. Entries outside [0, N) (a malformed permutation, which
    the lowering rejects) read nothing instead of memory past the input."""
    src = tl.load(PERM + h * N + rows, mask=rmask, other=0).to(tl.int64)  # int32 plan constants: 64-bit addresses
    in_range = (src >= 0) & (src < N)
    return tl.where(in_range, src, 0), rmask & in_range


@triton.jit
def _prologue_kernel(
    Q, K, V, PERM, KMEAN, VSCALE, BIAS,
    QQ, QS, Q_BAD, KQ, KS, VT, KBAR, VBAR, KBIAS, KBIAS_FLAGS,
    N, N_K, H, NQB, NKB, q_mult,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sbb, sbh,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    QK_BITS: tl.constexpr, V_MODE: tl.constexpr, HAS_PERM: tl.constexpr, EMULATE: tl.constexpr,
    POOLED: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    t = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    if t < NQB:
        rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < N
        if HAS_PERM:
            src, rmask = _permuted_rows(PERM, h, N, rows, rmask)
        else:
            src = rows
        _quant_block(Q, QQ, QS, KMEAN, Q_BAD, b * sqb + h * sqh, src, rows, rmask, pid_bh, t, NQB, sqn, sqd, q_mult,
                     D, BLOCK_M, QK_BITS, False)
    if t < NKB:
        rows = t * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N_K
        if HAS_PERM:
            src, rmask = _permuted_rows(PERM, h, N_K, rows, rmask)
        else:
            src = rows
        if HAS_BIAS:
            # The key bias in log2 units, permuted like the keys, and whether this block has any: the attention
            # kernel adds it only in flagged blocks (key padding touches a few blocks of a long sequence).
            bias = tl.load(BIAS + b * sbb + h * sbh + src, mask=rmask, other=0.0) * 1.4426950408889634
            tl.store(KBIAS + pid_bh * (NKB * BLOCK_N) + rows, bias)
            tl.store(KBIAS_FLAGS + pid_bh * NKB + t, tl.max((bias != 0.0).to(tl.int32), axis=0))
        _quant_block(K, KQ, KS, KMEAN, Q_BAD, b * skb + h * skh, src, rows, rmask, pid_bh, t, NKB, skn, skd, 1.0,
                     D, BLOCK_N, QK_BITS, QK_BITS != 16)
        # V, stored transposed: VT[pid_bh, d, row].
        offs_d = tl.arange(0, D)
        if POOLED:
            # Block means for skipped-block compensation (reference.pooled_blocks), fp16: K smoothed like the
            # quantized K (the rows were just loaded, so this re-read hits the cache), V in quantized-V units.
            inv_cnt = 1.0 / tl.sum(rmask.to(tl.float32), axis=0)
            kx = _load_rows(K, b * skb + h * skh, src, rmask, offs_d, skn, skd)
            k_mean = tl.sum(kx, axis=0) * inv_cnt
            if QK_BITS != 16:
                k_mean = k_mean - tl.load(KMEAN + pid_bh * D + offs_d)
            tl.store(KBAR + (pid_bh * NKB + t) * D + offs_d, k_mean.to(tl.float16))
            vbar = VBAR + (pid_bh * NKB + t) * D + offs_d
        vptr = V + b * svb + h * svh + src[:, None] * svn + offs_d[None, :] * svd
        dst = VT + (pid_bh * D + offs_d[None, :]) * (NKB * BLOCK_N) + rows[:, None]
        if V_MODE == 0:
            v = tl.load(vptr, mask=rmask[:, None], other=0.0)
            tl.store(dst, v)
            if POOLED:
                tl.store(vbar, (tl.sum(v.to(tl.float32), axis=0) * inv_cnt).to(tl.float16))
        else:
            v = tl.load(vptr, mask=rmask[:, None], other=0.0).to(tl.float32)
            vs = tl.load(VSCALE + pid_bh * D + offs_d)
            inv_vs = tl.math.div_rn(1.0, vs)
            y = v * inv_vs[None, :]
            if POOLED:
                tl.store(vbar, ((tl.sum(v, axis=0) * inv_cnt) * inv_vs).to(tl.float16))
            if V_MODE == 1:
                y = tl.minimum(tl.maximum(y, -448.0), 448.0)
                tl.store(dst, fp32_to_fp8e4(y, EMULATE))
            else:
                y = tl.minimum(tl.maximum(_round_half_away(y), -127.0), 127.0)
                tl.store(dst, y.to(tl.int8))


@dataclass(frozen=True)
class _ProloguePlan:
    """What one prologue call's static arguments (shapes, dtypes, devices, modes) decide: buffer sizes and dtypes,
    grids and constexprs of the three launches, and whether perm / key_bias need a conversion. Built and checked on
    the first call of its key (`_prologue_plan`); every later call with the same key only allocates and launches."""

    bh: int
    heads: int
    n: int
    n_kv: int
    d: int
    dq: int
    nqb: int
    nkb: int
    block_m: int
    block_n: int
    qk_bits: int
    pv_dtype: str
    qk_store: torch.dtype
    v_store: torch.dtype
    need_k: bool
    need_v: bool
    v_qmax: float
    chunk: int
    nchunks: int
    pooled: bool
    has_perm: bool
    perm_ready: bool
    has_bias: bool
    bias_ready: bool
    bias_broadcast: tuple[bool, bool]
    prologue_items: tuple
    """The prologue kernel's constexpr and launch keywords as (name, value) pairs (`launch.launch`)."""
    stats_meta: tuple
    finalize_meta: tuple


_PLANS: dict = {}
_MAX_PLANS = 256  # a bound, so that a stream of ever-new shapes cannot grow the cache without limit


def tensor_layout_key(x: Optional[torch.Tensor]) -> Optional[tuple]:
    """What a launch plan depends on of an optional tensor argument: shape, dtype, device, contiguity."""
    return None if x is None else (x.shape, x.dtype, x.device, x.is_contiguous())


def _prologue_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, perm: Optional[torch.Tensor], qk_bits: int,
                   pv_dtype: str, block_m: int, block_n: int, pooled: bool,
                   key_bias: Optional[torch.Tensor]) -> _ProloguePlan:
    key = (q.shape, q.dtype, q.device, k.shape, k.dtype, v.shape, v.dtype, tensor_layout_key(perm), tensor_layout_key(key_bias),
           qk_bits, pv_dtype, block_m, block_n, pooled)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = _make_prologue_plan(q, k, v, perm, qk_bits, pv_dtype, block_m, block_n, pooled, key_bias)
    return plan


def _make_prologue_plan(q, k, v, perm, qk_bits, pv_dtype, block_m, block_n, pooled, key_bias) -> _ProloguePlan:
    if qk_bits not in (4, 8, 16):
        raise ValueError(f"qk_bits must be 4, 8 or 16, got {qk_bits}")
    if pv_dtype not in V_MODES:
        raise ValueError(f"pv_dtype must be one of {tuple(V_MODES)}, got {pv_dtype!r}")
    bsz, heads, n, d = q.shape
    n_kv = k.shape[2]
    if v.shape != k.shape or k.shape[:2] != q.shape[:2] or k.shape[-1] != d:
        raise ValueError(f"k and v must be [B, H, Nk, D] with q's B, H and D, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if perm is not None and n_kv != n:
        raise ValueError(f"a token permutation needs self-attention (Nk == N), got N={n}, Nk={n_kv}")
    if d not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim must be a power of two in [16, 256], got {d}")
    if perm is not None and tuple(perm.shape) != (heads, n):
        raise ValueError(f"perm must have shape ({heads}, {n}), got {tuple(perm.shape)}")
    if key_bias is not None and (key_bias.dim() != 3 or key_bias.shape[0] not in (1, bsz)
                                 or key_bias.shape[1] not in (1, heads) or key_bias.shape[2] != n_kv):
        raise ValueError(f"key_bias must be [B or 1, H or 1, Nk] = [{bsz}|1, {heads}|1, {n_kv}], "
                         f"got {tuple(key_bias.shape)}")
    bh = bsz * heads
    # Stats pass: ~16 programs per SM (a memory-bound pass needs many loads in flight), at least 1 chunk per (b, h);
    # chunk a multiple of block_t. A second tiny launch reduces the chunk partials.
    target = max(1, min(256, (16 * 132) // max(1, bh)))
    chunk = num_blocks(num_blocks(n_kv, target), STATS_BLOCK_T) * STATS_BLOCK_T
    if pv_dtype == "fp16":
        v_store = v.dtype
    else:
        v_store = torch.float8_e4m3fn if pv_dtype == "fp8" else torch.int8
    qk_store, dq = (q.dtype, d) if qk_bits == 16 else (torch.int8, d if qk_bits == 8 else d // 2)
    dev = q.device
    return _ProloguePlan(
        bh=bh, heads=heads, n=n, n_kv=n_kv, d=d, dq=dq, nqb=num_blocks(n, block_m), nkb=num_blocks(n_kv, block_n),
        block_m=block_m, block_n=block_n, qk_bits=qk_bits, pv_dtype=pv_dtype, qk_store=qk_store, v_store=v_store,
        need_k=qk_bits != 16, need_v=pv_dtype != "fp16", v_qmax=FP8_MAX if pv_dtype == "fp8" else 127.0,
        chunk=chunk, nchunks=num_blocks(n_kv, chunk), pooled=pooled,
        has_perm=perm is not None,
        perm_ready=perm is None or (perm.dtype in (torch.int32, torch.int64) and perm.device == dev
                                    and perm.is_contiguous()),
        has_bias=key_bias is not None,
        bias_ready=key_bias is None or (key_bias.dtype == torch.float32 and key_bias.device == dev
                                        and key_bias.is_contiguous()),
        bias_broadcast=(True, True) if key_bias is None else (key_bias.shape[0] == 1, key_bias.shape[1] == 1),
        prologue_items=tuple(dict(D=d, BLOCK_M=block_m, BLOCK_N=block_n, QK_BITS=qk_bits, V_MODE=V_MODES[pv_dtype],
                                  HAS_PERM=perm is not None, EMULATE=dev.type == "cpu", POOLED=pooled,
                                  HAS_BIAS=key_bias is not None, num_warps=4).items()),
        stats_meta=tuple(dict(D=d, BLOCK_T=STATS_BLOCK_T, NEED_K=qk_bits != 16, NEED_V=pv_dtype != "fp16",
                              num_warps=4).items()),
        finalize_meta=tuple(dict(D=d, NEED_K=qk_bits != 16, NEED_V=pv_dtype != "fp16", num_warps=1).items()),
    )


STATS_BLOCK_T = 64


def _stats(plan: _ProloguePlan, k: torch.Tensor, v: torch.Tensor):
    """(K channel mean [B·H, D] or None, V per-channel scale [B·H, D] or None)."""
    dev, bh, d, nchunks = k.device, plan.bh, plan.d, plan.nchunks
    need_k, need_v = plan.need_k, plan.need_v
    dummy = dummy_tensor(dev, torch.float32)
    ksum = torch.empty(bh, nchunks, d, device=dev, dtype=torch.float32) if need_k else dummy
    kcnt = torch.empty(bh, nchunks, d, device=dev, dtype=torch.float32) if need_k else dummy
    vamax = torch.empty(bh, nchunks, d, device=dev, dtype=torch.float32) if need_v else dummy
    launch(_stats_kernel, (nchunks, bh),
           (k, v, ksum, kcnt, vamax, plan.n_kv, plan.heads, plan.chunk, *k.stride(), *v.stride()),
           plan.stats_meta, dev)
    kmean = torch.empty(bh, d, device=dev, dtype=torch.float32) if need_k else None
    v_scale = torch.empty(bh, d, device=dev, dtype=torch.float32) if need_v else None
    if need_k or need_v:
        launch(_stats_finalize_kernel, (bh,),
               (ksum, kcnt, vamax, kmean if need_k else dummy, v_scale if need_v else dummy, nchunks, plan.v_qmax),
               plan.finalize_meta, dev)
    return kmean, v_scale


def perm_tensor(perm: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A permutation [H, N] as the kernels read it: int32 (the lowering's plan constants) or int64 as given, without a
    copy when it is contiguous on ``device``; other integer dtypes become int32. The kernels widen each loaded entry
    to int64 before addressing with it."""
    dtype = perm.dtype if perm.dtype in (torch.int32, torch.int64) else torch.int32
    return perm.to(device=device, dtype=dtype).contiguous()


@runs_on_device_of(first_tensor_device)
def paro_prologue(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    perm: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    qk_bits: int = 8,
    pv_dtype: str = "fp8",
    block_m: int = 64,
    block_n: int = 64,
    pooled: bool = False,
    key_bias: Optional[torch.Tensor] = None,
) -> Prologue:
    """Permute, smooth and quantize q [B, H, N, D] and k, v [B, H, Nk, D] for the attention kernel (see module
    docstring).

    ``pooled=True`` also stores each KV block's mean K and V rows (``k_bar``/``v_bar``, fp16, for skipped-block
    compensation; `reference.pooled_blocks` computes the same in fp32). ``key_bias`` [B or 1, H or 1, Nk] (fp32,
    natural-log units): stored per (batch·head) in log2 units and permuted like the keys, with a flag per key
    block that holds any nonzero bias (``kbias`` / ``kbias_flags``).

    Shapes, dtypes and modes are checked on the first call of each combination (`_prologue_plan`); later calls with
    the same ones only allocate and launch."""
    plan = _prologue_plan(q, k, v, perm, qk_bits, pv_dtype, block_m, block_n, pooled, key_bias)
    return run_prologue(plan, q, k, v, perm, key_bias, scale if scale is not None else 1.0 / math.sqrt(plan.d))


def run_prologue(plan: _ProloguePlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 perm: Optional[torch.Tensor], key_bias: Optional[torch.Tensor], sm_scale: float) -> Prologue:
    """The prologue's allocations and launches for tensors that match ``plan`` (`_prologue_plan` of the same call)."""
    dev = q.device
    bh, d, nqb, nkb, dq = plan.bh, plan.d, plan.nqb, plan.nkb, plan.dq
    block_m, block_n = plan.block_m, plan.block_n
    if not plan.perm_ready:
        perm = perm_tensor(perm, dev)
    kmean, v_scale = _stats(plan, k, v)
    if not plan.need_v:
        v_scale = torch.ones(bh, d, device=dev, dtype=torch.float32)
    qq = torch.empty(bh, nqb * block_m, dq, device=dev, dtype=plan.qk_store)
    kq = torch.empty(bh, nkb * block_n, dq, device=dev, dtype=plan.qk_store)
    qs = torch.empty(bh, nqb, device=dev, dtype=torch.float32)
    q_bad = torch.empty(bh, nqb * block_m, device=dev, dtype=torch.int8)
    ks = torch.empty(bh, nkb, device=dev, dtype=torch.float32)
    vt = torch.empty(bh, d, nkb * block_n, device=dev, dtype=plan.v_store)
    dummy = dummy_tensor(dev, torch.float32)
    k_bar = v_bar = kbias = kbias_flags = None
    if plan.pooled:
        k_bar = torch.empty(bh, nkb, d, device=dev, dtype=torch.float16)
        v_bar = torch.empty(bh, nkb, d, device=dev, dtype=torch.float16)
    bias_strides = (0, 0)
    if plan.has_bias:
        if not plan.bias_ready:
            key_bias = key_bias.to(device=dev, dtype=torch.float32).contiguous()
        bias_strides = tuple(0 if broadcast else key_bias.stride(i) for i, broadcast in enumerate(plan.bias_broadcast))
        kbias = torch.empty(bh, nkb * block_n, device=dev, dtype=torch.float32)
        kbias_flags = torch.empty(bh, nkb, device=dev, dtype=torch.int32)
    launch(_prologue_kernel, (max(nqb, nkb), bh), (
        q, k, v, perm if perm is not None else dummy,
        kmean if kmean is not None else dummy, v_scale, key_bias if key_bias is not None else dummy,
        qq, qs, q_bad, kq, ks, vt, k_bar if k_bar is not None else dummy, v_bar if v_bar is not None else dummy,
        kbias if kbias is not None else dummy, kbias_flags if kbias_flags is not None else dummy,
        plan.n, plan.n_kv, plan.heads, nqb, nkb, sm_scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *bias_strides,
    ), plan.prologue_items, dev)
    return Prologue(qq, qs, kq, ks, vt, v_scale, plan.qk_bits, plan.pv_dtype, block_m, block_n, plan.n, k_bar, v_bar,
                    kbias, kbias_flags, plan.n_kv, q_bad)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[..., D/2] int8 in the split-nibble layout → [..., D] int8 (channel c low nibble, c + D/2 high)."""
    x = packed.to(torch.int32)
    lo = (x << 28) >> 28
    hi = x >> 4
    return torch.cat([lo, hi], dim=-1).to(torch.int8)


def dequantized_views(p: Prologue) -> dict:
    """Helper for tests/debugging: the prologue's outputs as float32 [B*H, N, D] values and raw scales."""
    n = p.n
    if p.qk_bits == 4:
        qv, kv = unpack_int4(p.q).float(), unpack_int4(p.k).float()
    else:
        qv, kv = p.q.float(), p.k.float()
    return {
        "q": qv[:, :n], "q_scale": p.q_scale,
        "k": kv[:, :n], "k_scale": p.k_scale,
        "v": p.vt.float().transpose(1, 2)[:, :n], "v_scale": p.v_scale,
    }
