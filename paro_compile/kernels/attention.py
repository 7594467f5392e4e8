"""Block-sparse INT8/INT4-QKᵀ, FP8/INT8-PV attention over a CSR list of kept KV blocks (Triton).

`paro_attention_triton` computes exactly `paro_compile.kernels.reference.paro_attention_reference`:
the fused prologue (`prologue.py`) permutes, smooths and quantizes Q/K/V once; then one program per
(query tile, batch·head) walks the kept KV blocks of its query block in CSR order:

- QKᵀ on tensor cores: ``tl.dot(int8, int8) → int32`` (qk_bits 8). For qk_bits 4 the prologue
  stores two INT4 per byte (split-nibble layout, see prologue.py) and the kernel unpacks them to
  INT8 with shifts and runs two INT8 dots over the half head dims. **Hopper (sm_90) has no INT4
  tensor cores** (neither does Ada/Blackwell in the mma path Triton uses), so INT4 here is a
  *numerics* mode: it halves Q/K bytes but runs at INT8 tensor-core speed minus the unpack cost;
  it is never faster than qk_bits=8 on an H100. qk_bits 16 runs the dot in the input dtype.
- Dequantize with q_scale·k_scale (sm_scale·log2 e already folded into q_scale), mask key tokens ≥ N,
  online softmax in base 2 (exp2), P = exp2(s − m) ∈ [0, 1]. For integer QKᵀ this is fused: the int32
  scores become fp32 through a 1.5·2^23 magic-number add, the row max is taken on those raw values and
  one FFMA per element gives the exp2 argument, row max included (the combined scale is rounded to 22
  bits; the reference rounds it the same way and subtracts the max in a second step, so the two differ
  by one fp32 rounding of the argument).
- Dense masks issue the next block's QKᵀ before the current block's softmax (``prefetch_qk``), so
  the tensor cores and the softmax overlap (faster on the H100, benchmarks/RESULTS.md). Sparse masks keep the
  plain loop, because prefetching measured slower there.
- P·448 → FP8 e4m3 with FP8 V (pv "fp8"), round(P·127) → INT8 with INT8 V (pv "int8", int32
  accumulate), or P in V's dtype (pv "fp16"); PV accumulates in fp32; the row sum uses the
  unquantized fp32 P. The kernel computes P·448 (P·127) directly as exp2(s − (m − log2 448)), so
  the row sum and the accumulator carry the same factor and it cancels; V's per-channel scale is
  applied once at the end (mathematically identical to the reference; differs by fp rounding).
- Rows are stored through the inverse permutation: row i of the permuted order goes to token
  ``perm[h, i]``; rows ≥ N are not written; query blocks with zero kept KV blocks store zeros.

Tiling: BLOCK_N is the plan's block_n (the P quantization depends on the running max after each
64-key block, so the walk must go block by block). The query tile is block_m rows, or 2·block_m
for dense masks (rows are independent, so two query blocks that share their KV list can share a
tile). Sparse masks with block_m < 64 put GROUP = 64 // block_m query blocks in one 64-row tile (Hopper's
wgmma M) that walks the union of their kept blocks in ascending order; per slot a GROUP-bit word says
which of them keep the block, and the other rows get P = 0 and an unchanged max, so each row sees exactly
its own blocks (`BlockMask` with ``group > 1``, built once by the lowering). num_warps / num_stages (and the
query tile for dense) are autotuned (`tuning.autotune`: Triton's autotuner and its own disk cache under
``<cache_dir>/autotune``), keyed on (N bucket, D, density bucket, dtypes, modes, code switches).
``PARO_AUTOTUNE=0`` uses a fixed config; under ``TRITON_INTERPRET=1`` a single config is used and nothing is
tuned. A CSR slot naming a block outside [0, NKB) and a permutation entry outside [0, N) are never read or written
through (they add nothing / write nothing), so a malformed mask cannot touch memory past its tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
import triton
import triton.language as tl

from paro_compile import envs
from paro_compile.kernels import tuning
from paro_compile.kernels.block_mask import BlockMask, num_blocks, walk_group
from paro_compile.kernels.device_guard import first_tensor_device, runs_on_device_of
from paro_compile.kernels.launch import launch as launch_compiled
from paro_compile.kernels.mask_decode import decode_walk
from paro_compile.kernels.prologue import _PLANS as _PROLOGUE_PLANS
from paro_compile.kernels.prologue import (V_MODES, _prologue_plan, _ProloguePlan, dummy_tensor, fp32_to_bf16,
                                           fp32_to_fp8e4, perm_tensor, run_prologue, tensor_layout_key)
from paro_compile.kernels.reference import P_LOG2, PV_DTYPES, QK_BITS, check_attention_inputs

EXP2_MODES = (0, 1, 2, 3)


def default_exp2_mode() -> int:
    """exp2 of P when the caller passes no ``exp2_mode``: ``$PARO_EXP2_MODE`` (read per call), else
    `DEFAULT_EXP2_MODE`. 0 = MUFU ``ex2.approx`` (tl.math.exp2), 1 = FMA-pipe polynomial for every
    entry, 2 = polynomial for half of the columns (FlashAttention-4 style MUFU/FMA balance)."""
    mode = envs.PARO_EXP2_MODE
    return DEFAULT_EXP2_MODE if mode is None else mode


# MUFU: no polynomial mode measured faster on the H100 (benchmarks/kernel_variants.py, benchmarks/RESULTS.md).
DEFAULT_EXP2_MODE = 0


@triton.jit
def unpack_int4_pair(x):
    """Packed split-nibble byte(s) (int8, any shape) → (low nibble, high nibble) as signed int8 in [-8, 7].

    Done in fp32 arithmetic, not with integer shifts: the byte is sign-extended to fp32 exactly
    (magic-number add, no I2F), hi = floor(x / 16) (the packed byte is 16·hi + (lo mod 16)),
    lo = x − 16·hi mapped to [-8, 7], and both go back to int8 through the low byte of a
    magic-number sum (no F2I). No integer op here is ever truncated to 8 bits, so LLVM cannot
    narrow it to 8/16-bit (packed) integer instructions; the result is the same on the GPU and under
    the interpreter (numpy). The shift version ``(x << 28) >> 28`` / ``x >> 4`` was exact under the
    interpreter but disagreed with the reference on the H100 (see NOTES_attention.md)."""
    xf = (x.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0  # exact, |x| <= 128
    hf = tl.floor(xf * 0.0625)
    lf = xf - 16.0 * hf
    lf = tl.where(lf >= 8.0, lf - 16.0, lf)
    lo = (lf + 12582912.0).to(tl.int32, bitcast=True).to(tl.int8)  # low byte = two's complement of lf
    hi = (hf + 12582912.0).to(tl.int32, bitcast=True).to(tl.int8)
    return lo, hi


@triton.jit
def _load_k_int4(K, kbase, rn, offs_h, HALF: tl.constexpr):
    kp = tl.load(K + (kbase + rn[:, None]) * HALF + offs_h[None, :])
    k_lo, k_hi = unpack_int4_pair(kp)
    return k_lo, k_hi


@triton.jit
def exp2_poly(x):
    """2^x on the FMA pipe (FlashAttention-4 trick), no MUFU, no int<->float conversion instruction.

    x ≤ ~9 here (P·448 = 2^(s − m + log2 448)). j = x + 1.5·2^23 rounds x to the nearest integer n in
    j's low mantissa bits; f = x − n ∈ [-0.5, 0.5]; p(f) ≈ 2^f is a degree-3 minimax polynomial
    (max rel. error 7.5e-5, fp32 Horner); 2^n is applied by adding n to p's exponent field:
    ``bits(p) + (bits(j) << 23)`` (the shift keeps j's low 9 bits = n mod 512, which is n << 23
    mod 2^32). x ≤ -125 (incl. -inf of masked keys) gives exactly 0 (torch.exp2 would give
    < 2^-125: 0 after FP8 rounding and negligible in the row sum)."""
    xc = tl.maximum(x, -125.0)
    j = xc + 12582912.0
    n = j - 12582912.0
    f = xc - n
    p = 0.05517132207751274 * f + 0.24261054396629333
    p = p * f + 0.6932609677314758
    p = p * f + 0.9999281167984009
    bits = p.to(tl.int32, bitcast=True) + (j.to(tl.int32, bitcast=True) << 23)
    return tl.where(x > -125.0, bits.to(tl.float32, bitcast=True), 0.0)


@triton.jit
def _ex2_ftz(x):
    """MUFU ``ex2.approx.ftz.f32`` directly: `tl.math.exp2` may emit the non-ftz form, which ptxas wraps
    in a compare and two predicated multiplies for subnormal inputs/outputs (P never needs them: an
    output below 2^-126 rounds to 0 in FP8/INT8/bf16 P and is negligible in the row sum)."""
    return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def _exp2(x, MODE: tl.constexpr, EMULATE: tl.constexpr):
    """exp2 of a [M, N] tile. MODE 0: MUFU (tl.math.exp2); 1: polynomial everywhere; 2: polynomial on the
    odd columns, MUFU on the even ones (columns split as adjacent pairs, which the MMA accumulator
    layout keeps in one thread's registers, so the split/join should be register-local); 3: MUFU
    through ``ex2.approx.ftz.f32`` inline PTX (the interpreter has no inline PTX: tl.math.exp2 there)."""
    if MODE == 0:
        return tl.math.exp2(x)
    elif MODE == 1:
        return exp2_poly(x)
    elif MODE == 3:
        if EMULATE:
            return tl.math.exp2(x)
        else:
            return _ex2_ftz(x)
    else:
        M: tl.constexpr = x.shape[0]
        N: tl.constexpr = x.shape[1]
        xa, xb = tl.split(tl.reshape(x, [M, N // 2, 2]))
        return tl.reshape(tl.join(tl.math.exp2(xa), exp2_poly(xb)), [M, N])


@triton.jit
def _i32_to_f32(x):
    """Exact int32 → fp32 for |x| < 2^22 without the quarter-rate I2F instruction: add the bits of
    1.5·2^23 and subtract it as a float (|QKᵀ| ≤ 127²·256 < 2^22 for int8 and head_dim ≤ 256)."""
    return (x + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def _round_scale_22bits(c):
    """Clear the 2 low mantissa bits of a positive fp32 (as `reference.round_scale_22bits`)."""
    return (c.to(tl.uint32, bitcast=True) & 0xFFFFFFFC).to(tl.float32, bitcast=True)


@triton.jit
def _bf16_round_bits(p):
    """fp32 → bf16 with integer ops only (round half up on the dropped 16 bits): keeps the
    conversion off the quarter-rate pipe that ``cvt.rn.bf16x2.f32`` shares with MUFU ex2. For P ≥ 0
    this equals round-to-nearest-even except on exact ties (one in 2^16 of the values)."""
    bits = p.to(tl.uint32, bitcast=True) + 0x8000
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _load_k_tile(KQ, k_desc, kbase, j, rn, offs_d, BLOCK_N: tl.constexpr, D: tl.constexpr, TMA: tl.constexpr):
    """Quantized K rows [j·BLOCK_N, (j+1)·BLOCK_N) of this (batch, head): [BLOCK_N, D]."""
    if TMA:
        return k_desc.load([j * BLOCK_N, 0])
    else:
        return tl.load(KQ + (kbase + j * BLOCK_N + rn[:, None]) * D + offs_d[None, :])


@triton.jit
def _in_bounds(j, NKB):
    return tl.where((j >= 0) & (j < NKB), j, 0)


@triton.jit
def _rescale(acc, alpha, LAZY: tl.constexpr):
    """acc · alpha per row. LAZY: skip the multiply when no row's max rose (alpha is exactly 1 in every row, so the
    result is the same bit for bit); the rescale is a [TILE_M, D] multiply per KV block in an issue-bound loop."""
    if LAZY:
        if tl.min(alpha, axis=0) < 1.0:
            acc = acc * alpha[:, None]
    else:
        acc = acc * alpha[:, None]
    return acc


@triton.jit
def _row_max_step(m_i, row_max, row_keep, P_LOG2, GROUP: tl.constexpr):
    """Running max, rescale factor and exp2 shift (m − log2 of P's factor) after one KV block. In grouped tiles
    (GROUP > 1) rows whose query block does not keep the block keep their max and get shift +inf (P = 0)."""
    if GROUP > 1:
        row_max = tl.where(row_keep, row_max, float("-inf"))
    m_new = tl.maximum(m_i, row_max)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    shift = m_safe - P_LOG2
    if GROUP > 1:
        shift = tl.where(row_keep, shift, float("inf"))
    return m_new, tl.math.exp2(m_i - m_safe), shift


@triton.jit
def _attn_fwd(
    QQ, QS, Q_BAD, KQ, KS, VT, VS, OUT, PERM, COUNTS, IDX, KBAR, VBAR, KEPT_BITS, SLOT_BITS, KBIAS, KBIAS_FLAGS,
    N, N_K, H, NQB, NKB, IDX_STRIDE, P_LOG2,
    sob, soh, son, sod,
    n_bucket, density_bucket,  # autotune key only
    TILE_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
    QK_BITS: tl.constexpr, PV_MODE: tl.constexpr, HAS_PERM: tl.constexpr, DENSE: tl.constexpr,
    DOT_F32: tl.constexpr, IEEE: tl.constexpr, EMULATE: tl.constexpr, EXP2_MODE: tl.constexpr,
    FUSED_SOFTMAX: tl.constexpr, P_ROUND_INT: tl.constexpr, WARP_SPEC: tl.constexpr, PREFETCH_QK: tl.constexpr,
    COMPENSATE: tl.constexpr, TMA_KV: tl.constexpr, FMA_EXP_ARG: tl.constexpr, GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr, LAZY_RESCALE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    NQ_ROWS = NQB * BLOCK_M
    NK_ROWS = NKB * BLOCK_N
    rm = pid_m * TILE_M + tl.arange(0, TILE_M)  # rows of the permuted order
    rn = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    row_in = rm < NQ_ROWS

    # Q tile and its per-row dequantization factor (one scale per block_m rows). Rows past the padded
    # end get scale 1 (never 0), so a -inf key score times the scale stays -inf instead of NaN.
    qs = tl.load(QS + pid_bh * NQB + rm // BLOCK_M, mask=row_in, other=1.0)
    if QK_BITS == 4:
        HALF: tl.constexpr = D // 2
        offs_h = tl.arange(0, HALF)
        qp = tl.load(QQ + (pid_bh * NQ_ROWS + rm[:, None]) * HALF + offs_h[None, :], mask=row_in[:, None], other=0)
        q_lo, q_hi = unpack_int4_pair(qp)
    else:
        q = tl.load(QQ + (pid_bh * NQ_ROWS + rm[:, None]) * D + offs_d[None, :], mask=row_in[:, None], other=0)
        if DOT_F32 and QK_BITS == 16:
            q = q.to(tl.float32)

    m_i = tl.full([TILE_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([TILE_M], dtype=tl.float32)
    acc = tl.zeros([TILE_M, D], dtype=tl.float32)

    if DENSE:
        count = NKB
    else:
        # A trimmed CSR (reference.trim_csr) has IDX_STRIDE slots per row; the clamp keeps a malformed one in bounds.
        count = tl.minimum(tl.load(COUNTS + h * tl.cdiv(NQB, GROUP) + pid_m).to(tl.int32), IDX_STRIDE)  # int16 too
    # GROUP > 1 (sparse, block_m < 64): the tile holds GROUP query blocks and walks the union of their kept blocks
    # (COUNTS / IDX are that union's CSR, ascending); SLOT_BITS says per slot which of the GROUP blocks keep it, and
    # the rows of the others get P = 0 and an unchanged max: exactly their own walk, in 64-row tensor-core tiles.
    idx_base = IDX + (h * tl.cdiv(NQB, GROUP) + pid_m) * IDX_STRIDE
    if GROUP > 1:
        sub_block = (rm % TILE_M) // BLOCK_M
    kbase = pid_bh * NK_ROWS
    vbase = VT + pid_bh * D * NK_ROWS + offs_d[:, None] * NK_ROWS
    if TMA_KV:
        # TMA (Hopper tensor-memory-accelerator) loads of this (batch, head)'s K [NK_ROWS, D] and Vᵀ [D, NK_ROWS]:
        # one descriptor per program instead of a pointer tensor per tile (fewer registers and address ops).
        k_desc = tl.make_tensor_descriptor(KQ + kbase * D, shape=[NK_ROWS, D], strides=[D, 1],
                                           block_shape=[BLOCK_N, D])
        v_desc = tl.make_tensor_descriptor(VT + pid_bh * D * NK_ROWS, shape=[D, NK_ROWS], strides=[NK_ROWS, 1],
                                           block_shape=[D, BLOCK_N])
    else:
        k_desc = KQ
        v_desc = VT
    # PREFETCH_QK (INT8 QKᵀ, fused softmax): QKᵀ of the next kept block is issued before the softmax of
    # the current one, so the tensor cores can work while the softmax runs (FA3's intra-warpgroup
    # overlap, left to Triton's async wgmma). The last iteration recomputes its own block (unused).
    # Sparse masks carry the kept-block indices one and two steps ahead (j_cur, j_nxt) so no index load
    # sits between one QKᵀ issue and the next.
    if PREFETCH_QK:
        if DENSE:
            j_first = 0
        else:
            j_first = tl.load(idx_base, mask=count > 0, other=0).to(tl.int32)  # int16 in compact plans
            j_cur = j_first
            j_nxt = tl.load(idx_base + tl.minimum(1, count - 1), mask=count > 0, other=0).to(tl.int32)
        k_first = _load_k_tile(KQ, k_desc, kbase, _in_bounds(j_first, NKB), rn, offs_d, BLOCK_N, D, TMA_KV)
        qk_next = tl.dot(q, tl.trans(k_first), out_dtype=tl.int32)
    for s in tl.range(0, count, warp_specialize=WARP_SPEC):
        if DENSE:
            j = s
        elif PREFETCH_QK:
            j = j_cur
        else:
            j = tl.load(idx_base + s).to(tl.int32)
        # A slot naming a block outside [0, NKB) (a malformed CSR, which BlockMask.validate rejects) reads block 0
        # with every key masked: it adds nothing, as in the reference, and reads no memory past K/V.
        if DENSE:
            n_keys = N_K
        else:
            n_keys = tl.where((j >= 0) & (j < NKB), N_K, 0)
            j = _in_bounds(j, NKB)
        rows_k = j * BLOCK_N + rn
        ks = tl.load(KS + pid_bh * NKB + j)
        if GROUP > 1:
            slot_bits = tl.load(SLOT_BITS + (h * tl.cdiv(NQB, GROUP) + pid_m) * IDX_STRIDE + s).to(tl.int32)
            row_keep = ((slot_bits >> sub_block) & 1) != 0
        else:
            row_keep = None
        # ---- S = Q Kᵀ: int32 for INT8/INT4, else in the input dtype ----
        if QK_BITS == 4:
            k_lo, k_hi = _load_k_int4(KQ, kbase, rows_k, offs_h, HALF)
            qk_i = tl.dot(q_lo, tl.trans(k_lo), out_dtype=tl.int32)
            qk_i = tl.dot(q_hi, tl.trans(k_hi), qk_i, out_dtype=tl.int32)
        elif QK_BITS == 8:
            if PREFETCH_QK:
                qk_i = qk_next
                if DENSE:
                    j_next = tl.minimum(s + 1, count - 1)
                else:
                    j_next = j_nxt
                    j_cur = j_nxt
                    j_nxt = tl.load(idx_base + tl.minimum(s + 2, count - 1)).to(tl.int32)
                k_nx = _load_k_tile(KQ, k_desc, kbase, _in_bounds(j_next, NKB), rn, offs_d, BLOCK_N, D, TMA_KV)
                qk_next = tl.dot(q, tl.trans(k_nx), out_dtype=tl.int32)
            else:
                k = _load_k_tile(KQ, k_desc, kbase, j, rn, offs_d, BLOCK_N, D, TMA_KV)
                qk_i = tl.dot(q, tl.trans(k), out_dtype=tl.int32)
        else:
            k = tl.load(KQ + (kbase + rows_k[:, None]) * D + offs_d[None, :])
            if DOT_F32:
                k = k.to(tl.float32)
            if IEEE:
                qk = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k))
        if HAS_BIAS:  # a key-padding bias in this block (per (batch, head, block) flags from the prologue)
            biased = tl.load(KBIAS_FLAGS + pid_bh * NKB + j) != 0
        else:
            biased = False
        if FUSED_SOFTMAX and QK_BITS != 16:
            # raw = 1.5·2^23 + qkᵀ (exact fp32 bits of an integer add). Dequantization, row max and exp2
            # argument work on raw. The scale c > 0 is rounded to 22 significant bits so that 1.5·2^23·c
            # is exact: fma(raw, c, −1.5·2^23·c) is then exactly round(qkᵀ·c) (one FFMA replaces the FADD
            # of the magic number and the FMUL of the scale).
            raw = (qk_i + 0x4B400000).to(tl.float32, bitcast=True)
            if j * BLOCK_N + BLOCK_N > n_keys:  # only the tail block (or a skipped slot) has masked key columns
                raw = tl.where((rows_k < n_keys)[None, :], raw, float("-inf"))
            c = _round_scale_22bits(qs * ks)
            if GROUP > 1:  # rows of query blocks that skip this block must not see its scale (NaN for a bad key)
                c = tl.where(row_keep, c, 1.0)
            if biased:  # the bias enters before the row max: the plain two-step form for this block
                sc = (raw - 12582912.0) * c[:, None] + tl.load(KBIAS + pid_bh * NK_ROWS + rows_k)[None, :]
                m_new, alpha, shift = _row_max_step(m_i, tl.max(sc, axis=1), row_keep, P_LOG2, GROUP)
                arg = sc - shift[:, None]
            else:
                m_new, alpha, shift = _row_max_step(m_i, (tl.max(raw, axis=1) - 12582912.0) * c, row_keep, P_LOG2,
                                                    GROUP)
                if FMA_EXP_ARG and QK_BITS == 8 and not EMULATE:
                    # The exp2 argument in one FFMA: raw·c − (1.5·2^23·c + m − log2 448), one rounding instead of
                    # the FFMA's and the FADD's (saves one issue slot per score in an issue-bound loop).
                    arg = tl.fma(raw, c[:, None], (-12582912.0 * c - shift)[:, None])
                elif EMULATE:  # the interpreter has no fused multiply-add: same value via the exact subtraction
                    arg = (raw - 12582912.0) * c[:, None] - shift[:, None]
                else:
                    arg = tl.fma(raw, c[:, None], (-12582912.0 * c)[:, None]) - shift[:, None]
        else:
            if QK_BITS != 16:
                qk = _i32_to_f32(qk_i)
            # Key tokens >= N get -inf through an additive column bias (one FMA with the dequantization).
            bias = tl.where(rows_k < n_keys, 0.0, float("-inf"))
            if HAS_BIAS:
                bias = bias + tl.load(KBIAS + pid_bh * NK_ROWS + rows_k)
            c = qs * ks
            if GROUP > 1:
                c = tl.where(row_keep, c, 1.0)
            sc = qk * c[:, None] + bias[None, :]
            m_new, alpha, shift = _row_max_step(m_i, tl.max(sc, axis=1), row_keep, P_LOG2, GROUP)
            arg = sc - shift[:, None]
        # ---- online softmax, base 2. fp8/int8 PV: P·448 (P·127) straight out of exp2 (log2 of the factor
        # folded into the row max), so the row sum and the accumulator carry the same factor and it cancels.
        p = _exp2(arg, EXP2_MODE, EMULATE)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # ---- O += P V ----
        if TMA_KV:
            vt = v_desc.load([0, j * BLOCK_N])
        else:
            vt = tl.load(vbase + rows_k[None, :])  # [D, BLOCK_N], token axis contiguous
        v = tl.trans(vt)
        if PV_MODE == 1:
            pq = fp32_to_fp8e4(p, EMULATE)
            if BLOCK_N < 32:  # 8-bit MMAs need K >= 32: the same products in fp16 (e4m3 values are exact there)
                acc = tl.dot(pq.to(tl.float16), v.to(tl.float16), _rescale(acc, alpha, LAZY_RESCALE))
            else:
                acc = tl.dot(pq, v, _rescale(acc, alpha, LAZY_RESCALE))
        elif PV_MODE == 2 and BLOCK_N < 32:
            # INT8 P·V with K < 32 in fp16 (INT8 values and their 16-term sums are exact in fp16/fp32)
            pq = (p + 12582912.0).to(tl.int32, bitcast=True).to(tl.int8)
            acc = tl.dot(pq.to(tl.float16), v.to(tl.float16), _rescale(acc, alpha, LAZY_RESCALE))
        elif PV_MODE == 2:
            # round(P·127) to INT8 and the int32 PV partial back to fp32, both through the 1.5·2^23
            # magic number (an FADD / IADD+FADD on the full-rate pipes instead of F2I / I2F):
            # P·127 ≤ 127 and |ΣP·V| ≤ 127²·BLOCK_N < 2^22.
            pq = (p + 12582912.0).to(tl.int32, bitcast=True).to(tl.int8)
            acc = _rescale(acc, alpha, LAZY_RESCALE) + _i32_to_f32(tl.dot(pq, v, out_dtype=tl.int32))
        else:
            acc = _rescale(acc, alpha, LAZY_RESCALE)
            if VT.dtype.element_ty == tl.bfloat16:
                if P_ROUND_INT:
                    pq = _bf16_round_bits(p)
                else:
                    pq = fp32_to_bf16(p, EMULATE)
            else:
                pq = p.to(VT.dtype.element_ty)
            if DOT_F32:
                acc = tl.dot(pq.to(tl.float32), v.to(tl.float32), acc)
            elif IEEE:
                acc = tl.dot(pq, v, acc, input_precision="ieee")
            else:
                acc = tl.dot(pq, v, acc)
        m_i = m_new

    if COMPENSATE:
        # Skipped-block compensation (sparse masks only; with GROUP > 1 each row reads its own block's bits): every KV block whose
        # bit in this row's KEPT_BITS words is clear joins the softmax as one pooled key (fp16 mean K, weight
        # log2(token count), fp16 mean V in quantized-V units). The pooled rows are read in order, BLOCK_N
        # at a time (wider steps for 16-/32-token blocks measured slower on the H100, benchmarks/RESULTS.md),
        # and kept vs skipped follows from the mask bits alone (walking the CSR slots past the count measured faster
        # but would make CSR padding part of the op's contract; docs/quality_tuning.md); fp16 dots (the int8 Q is
        # exact in fp16).
        if QK_BITS == 4:
            q_lo16 = q_lo.to(tl.float16)
            q_hi16 = q_hi.to(tl.float16)
        else:
            q16 = q.to(tl.float16)
        bits_base = KEPT_BITS + (h * NQB + pid_m) * tl.cdiv(NKB, 32)
        if GROUP > 1:
            bits_rows = KEPT_BITS + (h * NQB + tl.minimum(pid_m * GROUP + sub_block, NQB - 1)) * tl.cdiv(NKB, 32)
        for t in range(0, NKB, BLOCK_N):
            cols = t + rn
            col_in = cols < NKB
            kb_ptr = KBAR + (pid_bh * NKB + cols[:, None]) * D
            if QK_BITS == 4:
                kb_lo = tl.load(kb_ptr + offs_h[None, :], mask=col_in[:, None], other=0.0)
                kb_hi = tl.load(kb_ptr + HALF + offs_h[None, :], mask=col_in[:, None], other=0.0)
                sb = tl.dot(q_lo16, tl.trans(kb_lo))
                sb = tl.dot(q_hi16, tl.trans(kb_hi), sb)
            else:
                kb = tl.load(kb_ptr + offs_d[None, :], mask=col_in[:, None], other=0.0)
                sb = tl.dot(q16, tl.trans(kb))
            n_tok = tl.minimum(N_K - cols * BLOCK_N, BLOCK_N).to(tl.float32)
            if GROUP > 1:  # each row reads its own query block's kept bits
                words = tl.load(bits_rows[:, None] + (cols // 32)[None, :], mask=col_in[None, :], other=0)
                kept = (words >> (cols % 32)[None, :]) & 1
                sb = sb * qs[:, None] + tl.where(col_in[None, :] & (kept == 0),
                                                 tl.math.log2(tl.maximum(n_tok, 1.0))[None, :], float("-inf"))
            else:  # a per-column bias keeps sb·qs + bias one FFMA (a [1, BLOCK_N] select compiled to FMUL + FADD)
                kept = (tl.load(bits_base + cols // 32, mask=col_in, other=0) >> (cols % 32)) & 1
                bias = tl.where(col_in & (kept == 0), tl.math.log2(tl.maximum(n_tok, 1.0)), float("-inf"))
                sb = sb * qs[:, None] + bias[None, :]
            m_new, alpha, shift = _row_max_step(m_i, tl.max(sb, axis=1), None, P_LOG2, 1)
            pb = tl.math.exp2(sb - shift[:, None])
            l_i = l_i * alpha + tl.sum(pb, axis=1)
            vb = tl.load(VBAR + (pid_bh * NKB + cols[:, None]) * D + offs_d[None, :], mask=col_in[:, None], other=0.0)
            acc = tl.dot(pb.to(tl.float16), vb, acc * alpha[:, None])
            m_i = m_new

    vs = tl.load(VS + pid_bh * D + offs_d)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # a row with no kept block gives zeros; a NaN row stays NaN
    out = acc * vs[None, :] / l_safe[:, None]
    # Query rows holding a NaN or an infinity come out NaN, as SDPA's do (reference step 8).
    q_bad = tl.load(Q_BAD + pid_bh * NQ_ROWS + rm, mask=row_in, other=0)
    out = tl.where((q_bad != 0)[:, None], float("nan"), out)
    valid = rm < N
    if HAS_PERM:
        dst = tl.load(PERM + h * N + rm, mask=valid, other=0).to(tl.int64)  # int32 plan constants: 64-bit addresses
        valid = valid & (dst >= 0) & (dst < N)  # a malformed permutation never writes past the output
    else:
        dst = rm
    if OUT.dtype.element_ty == tl.bfloat16:
        o = fp32_to_bf16(out, EMULATE)
    else:
        o = out.to(OUT.dtype.element_ty)
    tl.store(OUT + b * sob + h * soh + dst[:, None] * son + offs_d[None, :] * sod, o, mask=valid[:, None])


def _prune(configs, named_args, **kwargs):
    dense = kwargs.get("DENSE", named_args.get("DENSE", False))
    block_m = kwargs.get("BLOCK_M", named_args.get("BLOCK_M", 64))
    compensate = kwargs.get("COMPENSATE", named_args.get("COMPENSATE", False))
    tile = block_m * kwargs.get("GROUP", named_args.get("GROUP", 1))  # sparse: one tile = GROUP query blocks
    kept = [c for c in configs if dense or c.kwargs["TILE_M"] == tile]
    kept = [c for c in kept if c.kwargs["TILE_M"] in (tile, 2 * block_m)]
    # Register caps only pay off for the compensated kernel (see tuning.candidate_configs).
    kept = [c for c in kept if compensate or not c.maxnreg]
    return kept or [triton.Config({"TILE_M": tile}, num_warps=4, num_stages=2)]


# Every constexpr that changes the generated code is in the key (argument dtypes are appended by Triton), except
# HAS_PERM: a call with a per-head permutation shares the tuned config of the same call without one (the H100 timed
# them equal, and separate tunings picked configs that differed by noise; benchmarks/RESULTS.md, "Folding").
AUTOTUNE_KEY = ["n_bucket", "D", "density_bucket", "QK_BITS", "PV_MODE", "DENSE", "BLOCK_M", "BLOCK_N", "EXP2_MODE",
                "COMPENSATE", "GROUP", "FUSED_SOFTMAX", "P_ROUND_INT", "WARP_SPEC", "PREFETCH_QK", "TMA_KV",
                "FMA_EXP_ARG", "HAS_BIAS", "LAZY_RESCALE"]
_attn_fwd_tuned = tuning.autotune(AUTOTUNE_KEY, _prune)(_attn_fwd)


@runs_on_device_of(first_tensor_device)
def paro_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    perm: Optional[torch.Tensor] = None,
    mask: Optional[BlockMask] = None,
    key_bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    qk_bits: int = 8,
    pv_dtype: str = "fp8",
    compensate: bool = False,
    out: Optional[torch.Tensor] = None,
    exp2_mode: Optional[int] = None,
    config: Optional[dict] = None,
    variant: Optional[dict] = None,
) -> torch.Tensor:
    """Triton implementation of `paro_attention_reference` (same arguments, same result).

    ``mask`` (`BlockMask`, None = dense with 64-token blocks): walked in shared 64-row tiles when its blocks are
    under 64 rows (`BlockMask.grouped`); pass it as `BlockMask.from_dense` builds it and nothing is derived per call
    but, for a bitmap-form mask, its walk (`mask_decode.decode_walk`: one launch, no host read).
    ``compensate``: skipped-block compensation (reference step 6; sparse masks only; uses the mask's kept bits).
    ``out`` (optional, contiguous [B, H, N, D] of q's dtype) receives the result; rows are only
    written where the kernel computes them (tests poison it with NaN to catch unwritten rows).
    ``exp2_mode`` (0-3, default `default_exp2_mode()`): how P = exp2(·) is computed, see `_exp2`.
    Modes 1/2 differ from the reference's torch.exp2 by ≤ 7.5e-5 relative in P before quantization.
    ``config`` (benchmarks): ``{"TILE_M", "num_warps", "num_stages"}`` launched as is, bypassing the
    autotuner and its cache; TILE_M must be block_m·group, or 2·block_m for a dense mask.
    ``variant`` (benchmarks): code-generation switches, see `KERNEL_VARIANT_DEFAULTS`; each combination
    is its own compiled kernel and its own autotune cache entry.

    Everything the static arguments decide (checks, block counts, constexprs, the launch config) is worked out on the
    first call of each combination of shapes, dtypes, devices, mask layout, modes and PARO_* switches and kept in a
    small per-process cache (`_launch_plan`); later calls with the same combination only allocate and launch.
    """
    mask = mask if mask is not None else BlockMask.dense(q.shape[2], kv_len=k.shape[2])
    plan = _launch_plan(q, k, v, perm, mask, key_bias, qk_bits, pv_dtype, compensate, exp2_mode, config, variant)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, got {tuple(out.shape)} {out.dtype} {out.device}")
    device = q.device
    int32_dummy = dummy_tensor(device, torch.int32)
    dense, compensate, group = plan.dense, plan.compensate, plan.group
    if not dense and not plan.mask_ready:
        mask = _kernel_mask(mask, plan.group, compensate, device)
    elif not dense:
        mask = decode_walk(mask)  # a CSR-form mask comes back as it is
    if plan.has_perm and not plan.perm_ready:
        perm = perm_tensor(perm, device)
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(plan.d)
    pro = run_prologue(plan.prologue, q, k, v, perm, key_bias, sm_scale)
    if dense:
        counts = indices = kept_bits = slot_bits = int32_dummy
        row_width = plan.nkb
    else:
        counts, indices, row_width = mask.counts, mask.indices, int(mask.indices.shape[-1])
        if not plan.mask_ready:
            counts, indices = _index_tensor(counts), _index_tensor(indices)
        kept_bits = (mask.kept_bits if plan.mask_ready else mask.kept_bits.to(torch.int32).contiguous()) \
            if compensate else int32_dummy
        slot_bits = (mask.slot_bits if plan.mask_ready else mask.slot_bits.contiguous()) if group > 1 else int32_dummy
    args = (
        pro.q, pro.q_scale, pro.q_bad, pro.k, pro.k_scale, pro.vt, pro.v_scale, out,
        # An int32 placeholder, like the lowering's perm constants: the autotune key holds the argument dtypes, and a
        # call with a per-head permutation shares the tuned config of the same call without one (see AUTOTUNE_KEY).
        perm if perm is not None else int32_dummy,
        counts, indices,
        pro.k_bar if compensate else int32_dummy, pro.v_bar if compensate else int32_dummy,
        kept_bits, slot_bits,
        pro.kbias if key_bias is not None else int32_dummy, pro.kbias_flags if key_bias is not None else int32_dummy,
        plan.n, plan.n_kv, plan.heads, plan.nqb, plan.nkb, row_width, plan.p_log2,
        *out.stride(),
        plan.n_bucket, plan.density_bucket,
    )
    cfg = plan.config
    if cfg is None:
        # Once a key is tuned its config is launched directly: the autotuner rebuilds its own key from ~45 arguments
        # on every launch (measured host cost: benchmarks/host_overhead.py).
        cfg = _TUNED.get(plan.tuned_key)
    if cfg is None:
        _attn_fwd_tuned[plan.grid](*args, **plan.meta)
        cfg, tuned_now = _attn_fwd_tuned.best_config, _attn_fwd_tuned.benchmarked_now
        if plan.tuned_key is not None:
            _TUNED[plan.tuned_key] = cfg
    else:
        items = plan.launch_items.get(cfg)
        if items is None:
            launch = plan.launch if cfg is plan.config else _launch_kwargs(cfg, plan.interp)
            items = plan.launch_items[cfg] = (*plan.meta.items(), *launch.items())
        launch_compiled(_attn_fwd, plan.grid(cfg.kwargs), args, items, device)
        tuned_now = False
    _LAST["cfg"], _LAST["tuned_now"] = cfg, tuned_now
    return out


@dataclass(frozen=True)
class _LaunchPlan:
    """What one attention call's static arguments decide (`_launch_plan`): checked once, then reused by every call
    with the same shapes, dtypes, devices, mask layout, modes and switches."""

    prologue: _ProloguePlan
    bh: int
    heads: int
    n: int
    n_kv: int
    d: int
    nqb: int
    nkb: int
    block_m: int
    dense: bool
    compensate: bool
    group: int
    mask_ready: bool
    """The mask's tensors are what the kernel reads as they are (walk grouping, kept bits, device, dtype, layout)."""
    has_perm: bool
    perm_ready: bool
    interp: bool
    p_log2: float
    n_bucket: int
    density_bucket: int
    meta: dict
    tuned_key: Optional[tuple]
    """The autotuned configs' key in `_TUNED` (None when ``config`` is fixed)."""
    config: Optional[triton.Config]
    """The config to launch when it does not come from the autotuner (``config=``, PARO_AUTOTUNE=0, interpreter)."""
    launch: dict
    """``config``'s launch keywords (TILE_M, num_warps, num_stages, maxnreg)."""
    launch_items: dict = field(default_factory=dict)
    """Per launched config, the constexpr and launch keywords as the (name, value) pairs `launch.launch` keys on."""

    def grid(self, cfg: dict) -> tuple[int, int]:
        return (-(-(self.nqb * self.block_m) // cfg["TILE_M"]), self.bh)


_LAUNCH_PLANS: dict = {}
_MAX_LAUNCH_PLANS = 256  # a bound, so that a stream of ever-new shapes cannot grow the cache without limit
_SWITCH_VARIABLES = ("PARO_EXP2_MODE", "PARO_KERNEL_VARIANT", "PARO_AUTOTUNE", "TRITON_INTERPRET")


def _launch_plan(q, k, v, perm, mask: BlockMask, key_bias, qk_bits, pv_dtype, compensate, exp2_mode, config,
                 variant) -> _LaunchPlan:
    # The PARO_* switches are part of the key as their raw text (re-read per call, so that A/B runs can change them
    # between calls; parsed and checked only when a new combination is planned).
    key = (q.shape, q.dtype, q.device, k.shape, k.dtype, k.device, v.shape, v.dtype, v.device,
           tensor_layout_key(perm), tensor_layout_key(key_bias),
           mask.block_m, mask.block_n, mask.num_q_blocks, mask.num_kv_blocks, mask.group, mask.density,
           mask.walk_width,
           tensor_layout_key(mask.counts), tensor_layout_key(mask.indices), tensor_layout_key(mask.slot_bits),
           tensor_layout_key(mask.kept_bits),
           qk_bits, pv_dtype, bool(compensate), exp2_mode,
           None if config is None else tuple(sorted(config.items())),
           None if variant is None else tuple(sorted(variant.items())),
           envs.raw_values(_SWITCH_VARIABLES))
    plan = _LAUNCH_PLANS.get(key)
    if plan is None:
        plan = _make_launch_plan(q, k, v, perm, mask, key_bias, qk_bits, pv_dtype, compensate, exp2_mode, config,
                                 variant)
        if len(_LAUNCH_PLANS) >= _MAX_LAUNCH_PLANS:
            _LAUNCH_PLANS.clear()
        _LAUNCH_PLANS[key] = plan
    return plan


def _kernel_mask(mask: BlockMask, group: int, compensate: bool, device: torch.device) -> BlockMask:
    """``mask`` walked with ``group`` query blocks per tile, with kept bits when ``compensate``, on ``device``."""
    if mask.is_bitmap:
        mask = decode_walk(mask.to(device))
    mask = mask.grouped() if group > 1 else mask.ungrouped()
    if compensate:
        mask = mask.with_kept_bits()
    return mask.to(device)


def _in_kernel_form(x: Optional[torch.Tensor], dtypes: tuple, device: torch.device) -> bool:
    return x is not None and x.dtype in dtypes and x.device == device and x.is_contiguous()


def _make_launch_plan(q, k, v, perm, mask: BlockMask, key_bias, qk_bits, pv_dtype, compensate, exp2_mode, config,
                      variant) -> _LaunchPlan:
    knobs = kernel_variant(variant)
    if exp2_mode is None:
        exp2_mode = default_exp2_mode()
    if exp2_mode not in EXP2_MODES:
        raise ValueError(f"exp2_mode must be one of {EXP2_MODES}, got {exp2_mode}")
    if qk_bits not in QK_BITS:
        raise ValueError(f"qk_bits must be one of {QK_BITS}, got {qk_bits}")
    if pv_dtype not in PV_DTYPES:
        raise ValueError(f"pv_dtype must be one of {PV_DTYPES}, got {pv_dtype!r}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {q.dtype}")
    bsz, heads, n, d = q.shape
    n_kv = k.shape[2]
    check_attention_inputs(q, k, v, perm, key_bias, compensate and not mask.is_dense)
    block_m, block_n = mask.block_m, mask.block_n
    nqb, nkb = num_blocks(n, block_m), num_blocks(n_kv, block_n)
    if (mask.num_q_blocks, mask.num_kv_blocks) != (nqb, nkb):
        raise ValueError(f"mask has {mask.num_q_blocks}x{mask.num_kv_blocks} blocks, N={n}, Nk={n_kv} needs "
                         f"{nqb}x{nkb} (block_m={block_m}, block_n={block_n})")
    device = q.device
    dense = mask.is_dense
    compensate = bool(compensate) and not dense  # a dense row skips nothing
    mask_ready = True
    group = 1
    if not dense:
        group = walk_group(block_m) if knobs["group_query_blocks"] else 1
        if mask.is_bitmap:  # ready when its bits are: each call decodes them into the kernel's walk, one launch
            mask_ready = mask.group == group and _in_kernel_form(mask.kept_bits, (torch.int32,), device)
        else:
            mask_ready = (mask.group == group and _in_kernel_form(mask.counts, (torch.int16, torch.int32), device)
                          and _in_kernel_form(mask.indices, (torch.int16, torch.int32), device)
                          and (not compensate or _in_kernel_form(mask.kept_bits, (torch.int32,), device))
                          and (group == 1 or _in_kernel_form(mask.slot_bits, (mask.slot_bits.dtype,), device)))
    perm_ready = perm is None or _in_kernel_form(perm, (torch.int32, torch.int64), device)
    kernel_perm = perm if perm_ready else perm_tensor(perm, device)
    prologue = _prologue_plan(q, k, v, kernel_perm, qk_bits, pv_dtype, block_m, block_n, compensate, key_bias)
    interp = device.type == "cpu"
    # The interpreter multiplies bf16 bit patterns in tl.dot (DESIGN_NOTES.md): upcast bf16 operands to fp32 there.
    dot_f32 = interp and q.dtype == torch.bfloat16
    meta = dict(
        BLOCK_M=block_m, BLOCK_N=block_n, D=d, QK_BITS=qk_bits, PV_MODE=V_MODES[pv_dtype],
        HAS_PERM=perm is not None, DENSE=dense,
        DOT_F32=dot_f32, IEEE=(q.dtype == torch.float32 and not interp), EMULATE=interp,
        EXP2_MODE=int(exp2_mode),
        FUSED_SOFTMAX=bool(knobs["fused_softmax"]), P_ROUND_INT=bool(knobs["p_round_int"]),
        WARP_SPEC=bool(knobs["warp_specialize"]) and not interp,
        PREFETCH_QK=(dense if knobs["prefetch_qk"] is None else bool(knobs["prefetch_qk"]))
        and qk_bits == 8 and bool(knobs["fused_softmax"]),
        COMPENSATE=compensate,
        TMA_KV=bool(knobs["tma_kv"]) and qk_bits == 8,
        # INT8 QKᵀ only: with INT4 the one-FFMA form disagreed with the reference on the H100 (a 67-token sparse
        # case, not diagnosed), so INT4 keeps the two-step form.
        FMA_EXP_ARG=bool(knobs["fma_exp_arg"]) and qk_bits == 8 and bool(knobs["fused_softmax"]),
        GROUP=group, HAS_BIAS=key_bias is not None, LAZY_RESCALE=bool(knobs["lazy_rescale"]),
    )
    if meta["TMA_KV"] and not interp:
        _ensure_tma_allocator()
    buckets = (tuning.n_bucket(n), 100 if dense else tuning.density_bucket(mask.density))
    tuned_key = None
    if config is not None:
        cfg = _explicit_config(config, block_m, group, dense, interp)
    elif not tuning.autotune_enabled():
        cfg = tuning.fixed_config(meta)
    else:
        cfg = None
        tuned_key = (*buckets, q.dtype, pv_dtype, *(meta[name] for name in AUTOTUNE_KEY if name in meta))
    return _LaunchPlan(
        prologue=prologue, bh=bsz * heads, heads=heads, n=n, n_kv=n_kv, d=d, nqb=nqb, nkb=nkb, block_m=block_m,
        dense=dense, compensate=compensate, group=group, mask_ready=mask_ready, has_perm=perm is not None,
        perm_ready=perm_ready, interp=interp, p_log2=P_LOG2[pv_dtype], n_bucket=buckets[0],
        density_bucket=buckets[1], meta=meta, tuned_key=tuned_key, config=cfg,
        launch={} if cfg is None else _launch_kwargs(cfg, interp))


def _launch_kwargs(cfg: triton.Config, interp: bool) -> dict:
    launch = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.maxnreg and not interp:
        launch["maxnreg"] = cfg.maxnreg
    return launch


def _explicit_config(config: dict, block_m: int, group: int, dense: bool, interp: bool) -> triton.Config:
    tile_m = int(config.get("TILE_M", block_m * group))
    legal = (block_m, 2 * block_m) if dense else (block_m * group,)
    if tile_m not in legal:
        raise ValueError(f"config TILE_M={tile_m} is not legal (block_m={block_m}, dense={dense}, "
                         f"query blocks per tile {group}): use one of {legal}")
    maxnreg = config.get("maxnreg")
    return triton.Config({"TILE_M": tile_m}, num_warps=int(config.get("num_warps", 4)),
                         num_stages=int(config.get("num_stages", 1 if interp else 2)),
                         maxnreg=int(maxnreg) if maxnreg and not interp else None)


_LAST: dict = {}
_TUNED: dict = {}
"""Configs the autotuner chose in this process, by the autotuner's key (cleared with its cache by `tune(force=True)`)."""


def clear_launch_cache() -> None:
    """Forget the launch plans and configs of this process (the next call of each key is checked and planned again,
    and asks the autotuner again)."""
    _TUNED.clear()
    _LAUNCH_PLANS.clear()
    _PROLOGUE_PLANS.clear()
_TMA_ALLOCATOR_SET = False


def _index_tensor(indices: torch.Tensor) -> torch.Tensor:
    """CSR counts or indices for the kernel: int16 (compact masks, `block_mask.trim_csr`) or int32 as given (no copy),
    else int32."""
    return indices.to(indices.dtype if indices.dtype in (torch.int16, torch.int32) else torch.int32).contiguous()


def _ensure_tma_allocator() -> None:
    """Device-side TMA descriptors (`tl.make_tensor_descriptor`) need Triton's global scratch allocator."""
    global _TMA_ALLOCATOR_SET
    if not _TMA_ALLOCATOR_SET:
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _TMA_ALLOCATOR_SET = True


# Code-generation switches of `_attn_fwd` (the defaults are what the H100 measured fastest; see
# benchmarks/NOTES_attention.md and benchmarks/RESULTS.md): fused_softmax = dequantize, max and exp2 argument on the
# raw magic-number scores (one FFMA per element; INT8/INT4 QKᵀ only); p_round_int = bf16 P (pv "fp16" with bf16 V)
# rounded with integer ops instead of cvt; warp_specialize = Triton's warp specialization of the KV loop (ignored
# under the interpreter); prefetch_qk = issue the next block's INT8 QKᵀ before the current softmax (qk_bits 8 with
# fused_softmax only; None = for dense masks only: it slowed sparse masks, where the next block index is a dependent
# load); tma_kv = K (INT8 QKᵀ only) and Vᵀ tiles through TMA descriptors instead of pointer tensors; fma_exp_arg =
# the exp2 argument of the fused softmax in one FFMA (row max folded into the addend; INT8 QKᵀ on the GPU only: the
# interpreter keeps the exact two-step form); group_query_blocks = query blocks under 64 rows share 64-row tiles;
# lazy_rescale = skip the accumulator's rescale in KV blocks where no row's max rose (the same bits, but 1.1-1.3x the
# time on the H200: the tile-wide test costs more than the multiply it skips; benchmarks/RESULTS.md, so off).
KERNEL_VARIANT_DEFAULTS = {"fused_softmax": True, "p_round_int": False, "warp_specialize": False,
                           "prefetch_qk": None, "tma_kv": False, "fma_exp_arg": True,
                           "group_query_blocks": True, "lazy_rescale": False}


def kernel_variant(variant: Optional[dict] = None) -> dict:
    """`KERNEL_VARIANT_DEFAULTS` updated with ``variant`` (default: ``$PARO_KERNEL_VARIANT``, read per call)."""
    switches = dict(KERNEL_VARIANT_DEFAULTS)
    chosen = envs.PARO_KERNEL_VARIANT if variant is None else variant
    unknown = set(chosen) - set(switches)
    if unknown:
        raise ValueError(f"unknown kernel variant switch(es) {sorted(unknown)}; known: {sorted(switches)}")
    switches.update(chosen)
    return switches


def last_launch_info() -> dict:
    """Config of the most recent attention launch and whether it was tuned by that launch (for `tune`)."""
    if not _LAST:
        return {}
    cfg = _LAST["cfg"]
    return {"kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
            "maxnreg": cfg.maxnreg, "tuned_now": _LAST["tuned_now"]}


def tune(shapes: Sequence[Sequence[int]], densities: Iterable[float] = (1.0, 0.5, 0.3, 0.2),
         dtypes: Iterable[torch.dtype] = (torch.bfloat16,), *, qk_bits: int = 8, pv_dtype: str = "fp8",
         perm: bool = False, block: int = 64, force: bool = False, device: str = "cuda") -> list[dict]:
    """Warm the autotune cache for every (shape [B, H, N, D], density, dtype); return the winners.

    Each winner is ``{"shape", "density", "dtype", "kwargs", "num_warps", "num_stages", "maxnreg", "tuned_now"}``;
    it is stored in Triton's autotune cache under `tuning.cache_dir()`. ``force`` re-benchmarks cached keys."""
    if envs.TRITON_INTERPRET or not torch.cuda.is_available():
        raise RuntimeError("tune() needs a CUDA GPU (and TRITON_INTERPRET unset)")
    if not tuning.autotune_enabled():
        raise RuntimeError("PARO_AUTOTUNE=0: autotuning is disabled")
    results = []
    gen = torch.Generator().manual_seed(0)
    _attn_fwd_tuned.force = force
    try:
        for shape in shapes:
            bsz, heads, n, d = (int(x) for x in shape)
            for dtype in dtypes:
                q, k, v = (torch.randn(bsz, heads, n, d, device=device, dtype=dtype) for _ in range(3))
                pm = torch.stack([torch.randperm(n, generator=gen) for _ in range(heads)]).to(device) if perm else None
                for dens in densities:
                    mq = nk = num_blocks(n, block)
                    mask = BlockMask.from_dense(tuning.random_block_mask(heads, mq, nk, dens, generator=gen), block, block)
                    if force:
                        _attn_fwd_tuned.cache.clear()
                        clear_launch_cache()
                    paro_attention_triton(q, k, v, perm=pm, mask=mask.to(device), qk_bits=qk_bits, pv_dtype=pv_dtype)
                    torch.cuda.synchronize()
                    results.append({"shape": [bsz, heads, n, d], "density": dens,
                                    "dtype": str(dtype).replace("torch.", ""), **last_launch_info()})
    finally:
        _attn_fwd_tuned.force = False
    return results
