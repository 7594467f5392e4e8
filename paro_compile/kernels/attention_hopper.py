"""Hopper (sm_90a) attention kernel in Gluon: the same function as `attention._attn_fwd`, warp-specialized.

Input is the fused prologue's output (`prologue.Prologue`, unchanged): INT8 Q and smoothed INT8 K with per-block
scales (softmax scale·log2 e folded into Q's), Vᵀ (token axis contiguous) in FP8 e4m3 or in the input dtype, V's
per-channel scale. The numerics are those of `_attn_fwd` with its default switches (fused INT8 softmax, the exp2
argument in one FFMA); `reference.paro_attention_reference` is the oracle.

One CTA computes ``CONSUMERS`` (1 or 2) 64-row query blocks of one (batch, head), in three kinds of warps:

- **producer** (the default partition, 4 warps, few registers): TMA loads of each consumer's Q tile once, then of
  the K tile [64, D] and Vᵀ tile [D, 64] of every kept KV block into a ring of ``STAGES`` shared-memory slots, in CSR
  order (dense: every block). Slot ``s % STAGES`` has a *ready* mbarrier (armed with the byte count, completed by
  the TMA engine) and an *empty* mbarrier (one arrival per consumer reading that slot). A dense mask walks one
  KV list for both query blocks, so both consumers read the same ring (each K/V tile crosses L2 once per 128 query
  rows); a sparse mask gives each consumer its own ring and list, and the producer interleaves the two lists.
- **consumers** (one 4-warp warpgroup per query block, most registers): per kept block, S = Q·Kᵀ as an async INT8
  wgmma (int32), the fused softmax on registers, P·448 → e4m3 (or P in V's dtype), O += P·V as an async FP8 (or
  16-bit) wgmma with P in registers, then release the slot. The QKᵀ of block s+1 and the PV of block s are in
  flight together while the softmax of block s+1 runs (FlashAttention-3's intra-warpgroup overlap); the two
  consumers of a CTA interleave on the SM's schedulers so one's softmax overlaps the other's MMAs.
- **epilogue** (in each consumer): O·v_scale / l, stored through the inverse permutation (row i of the permuted
  order → token perm[h, i]); rows ≥ N are not written, query blocks without a kept block store zeros.

Fused softmax, as `_attn_fwd`: raw = bitcast(s + bits(1.5·2^23)) is the exact fp32 1.5·2^23 + s; the row max is
taken on raw; with c = q_scale·k_scale rounded to 22 bits (`reference.round_scale_22bits`), the exp2 argument is
one FFMA fma(raw, c, −1.5·2^23·c − (m − log2 448)), so P·448 comes straight out of exp2 and the factor cancels
between the accumulator and the row sum (the row sum adds the unquantized fp32 P). Key columns ≥ N (only in the
tail block) are −inf. V's per-channel scale is applied once at the end.

Scope: qk_bits 8, pv_dtype "fp8" or "fp16" (with bf16/fp16 V), 64-token blocks, head_dim 64/128, dense or CSR
(`kv_counts` [H, NQB] int32, `kv_indices` [H, NQB, W] int16/int32, W ≤ NKB, counts clamped to W), without
skipped-block compensation. `supports` says which calls qualify; everything else goes to the Triton kernel.
`available` is False on a CPU, on GPUs other than sm_90, and where Triton's Gluon Hopper module is missing.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

from paro_compile.kernels.block_mask import BlockMask
from paro_compile.kernels.device_guard import first_tensor_device, runs_on_device_of
from paro_compile.kernels.prologue import Prologue
from paro_compile.kernels.reference import FP8_MAX

BLOCK = 64
HEAD_DIMS = (64, 128)
PV_DTYPES = ("fp8", "fp16")
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

try:  # Gluon is experimental: an older Triton, or none, must leave this module importable.
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    _GLUON_ERROR: Optional[BaseException] = None
    if not hasattr(tma, "async_copy_global_to_shared"):
        _GLUON_ERROR = ImportError("this Triton's Gluon Hopper TMA module has no async_copy_global_to_shared")
except Exception as exc:  # noqa: BLE001  (ImportError, or an API mismatch raised while importing)
    _GLUON_ERROR = exc


def selected_by_auto(head_dim: int, pv_dtype: str) -> bool:
    """Whether impl="auto" runs a call this kernel `supports` here rather than on the portable Triton kernel: where
    it measured faster in the same run (benchmarks/RESULTS.md, "Gluon Hopper kernel"): head_dim 64 with FP8 P, whose
    consumers fit two CTAs per SM. At head_dim 128 and with 16-bit P it is not faster, and "auto" keeps Triton."""
    return head_dim == 64 and pv_dtype == "fp8"


def available(device=None) -> bool:
    """True when this kernel can run on ``device`` (default: the current CUDA device): an sm_90 GPU and a Triton
    whose Gluon has the Hopper TMA / wgmma / mbarrier API used here."""
    if _GLUON_ERROR is not None or not torch.cuda.is_available():
        return False
    device = torch.device("cuda") if device is None else torch.device(device)
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) == (9, 0)


def supports(qk_bits: int, pv_dtype: str, block_m: int, block_n: int, head_dim: int, compensate: bool = False,
             group: int = 1, dtype: Optional[torch.dtype] = None) -> bool:
    """Whether a call with these settings runs here (else the dispatcher uses the Triton kernel). ``group`` is the
    number of query blocks sharing a 64-row tile (block_m < 64); ``dtype`` the input dtype when known (fp32 inputs
    keep fp32 V for pv_dtype "fp16", which the 16-bit wgmma cannot take)."""
    if qk_bits != 8 or pv_dtype not in PV_DTYPES or compensate or group != 1:
        return False
    if block_m != BLOCK or block_n != BLOCK or head_dim not in HEAD_DIMS:
        return False
    if dtype is not None and (dtype not in OUT_DTYPES or (pv_dtype == "fp16" and dtype == torch.float32)):
        return False
    return True


if _GLUON_ERROR is None:
    # Score → fp32 through the 1.5·2^23 magic number (|QKᵀ| ≤ 127²·D < 2^22, so the integer add is exact).
    MAGIC_BITS = gl.constexpr(0x4B400000)
    MAGIC = gl.constexpr(12582912.0)

    @gluon.jit
    def _round_scale_22bits(c):
        """Clear the 2 low mantissa bits of a positive fp32 (as `reference.round_scale_22bits`)."""
        return (c.to(gl.uint32, bitcast=True) & 0xFFFFFFFC).to(gl.float32, bitcast=True)

    @gluon.jit
    def _kv_count(COUNTS, h, qb, NQB, NKB, IDX_STRIDE, DENSE: gl.constexpr):
        """Kept KV blocks of query block ``qb`` (sparse: 0 past the last query block; clamped to the CSR row width)."""
        if DENSE:
            # Every consumer walks the whole list, also one past the last query block (odd NQB): both read each ring
            # slot, and its result is not stored (its rows are past N).
            count = NKB
        else:
            count = gl.load(COUNTS + h * NQB + gl.minimum(qb, NQB - 1))
            count = gl.where(qb < NQB, gl.minimum(count, IDX_STRIDE), 0)
        return count

    @gluon.jit
    def _in_bounds(j, NKB):
        """A CSR slot naming a block outside [0, NKB) (a malformed mask, which BlockMask.validate rejects) reads block 0;
        the consumer masks all of its keys (`_keys_of`), so it adds nothing, as in the reference."""
        return gl.where((j >= 0) & (j < NKB), j, 0)

    @gluon.jit
    def _keys_of(j, N, NKB):
        """Key tokens of slot block ``j`` that take part: N for a real block, 0 for an out-of-range slot."""
        return gl.where((j >= 0) & (j < NKB), N, 0)

    @gluon.jit
    def _issue_kv(k_desc, v_desc, k_smem, v_smem, ready_bars, empty_bars, slot, phase, k_row, v_row, j,
                  BLOCK_N: gl.constexpr, PERMUTED_K: gl.constexpr):
        """Wait until ring slot ``slot`` is free, then TMA-load K rows [k_row + j·64, +64) and Vᵀ columns
        [j·64, +64) into it; the slot's ready barrier completes when both tiles have landed. A 5-D K descriptor
        (`_permuted_k_descriptor`) addresses groups of 16 rows."""
        mbarrier.wait(empty_bars.index(slot), phase ^ 1)
        bar = ready_bars.index(slot)
        mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        if PERMUTED_K:
            tma.async_copy_global_to_shared(k_desc, [(k_row + j * BLOCK_N) // 16, 0, 0, 0, 0], bar,
                                            k_smem.index(slot))
        else:
            tma.async_copy_global_to_shared(k_desc, [k_row + j * BLOCK_N, 0], bar, k_smem.index(slot))
        tma.async_copy_global_to_shared(v_desc, [v_row, j * BLOCK_N], bar, v_smem.index(slot))

    @gluon.jit
    def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bars, ready_bars, empty_bars,
                  COUNTS, IDX, NQB, NKB, IDX_STRIDE, H,
                  D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                  CONSUMERS: gl.constexpr, DENSE: gl.constexpr, PERMUTED_K: gl.constexpr):
        pid_m = gl.program_id(0)
        pid_bh = gl.program_id(1)
        h = pid_bh % H
        q_row = pid_bh * (NQB * BLOCK_M) + pid_m * (CONSUMERS * BLOCK_M)
        for c in gl.static_range(CONSUMERS):
            bar = q_bars.index(c)
            mbarrier.expect(bar, q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [q_row + c * BLOCK_M, 0], bar, q_smem.index(c))
        k_row = pid_bh * (NKB * BLOCK_N)
        v_row = pid_bh * D
        if DENSE:
            # One list for every query block: both consumers read each slot (its empty barrier counts both).
            for s in range(NKB):
                _issue_kv(k_desc, v_desc, k_smem, v_smem, ready_bars, empty_bars, s % STAGES, (s // STAGES) & 1,
                          k_row, v_row, s, BLOCK_N, PERMUTED_K)
        else:
            qb0 = pid_m * CONSUMERS
            count0 = _kv_count(COUNTS, h, qb0, NQB, NKB, IDX_STRIDE, DENSE)
            idx0 = IDX + (h * NQB + gl.minimum(qb0, NQB - 1)) * IDX_STRIDE
            if CONSUMERS == 1:
                for s in range(count0):
                    j0 = _in_bounds(gl.load(idx0 + s).to(gl.int32), NKB)
                    _issue_kv(k_desc, v_desc, k_smem, v_smem, ready_bars, empty_bars, s % STAGES,
                              (s // STAGES) & 1, k_row, v_row, j0, BLOCK_N, PERMUTED_K)
            else:
                # Each consumer has its own ring (slots [c·STAGES, (c+1)·STAGES)); the two lists are interleaved so
                # neither consumer waits for the other's blocks.
                qb1 = qb0 + 1
                count1 = _kv_count(COUNTS, h, qb1, NQB, NKB, IDX_STRIDE, DENSE)
                idx1 = IDX + (h * NQB + gl.minimum(qb1, NQB - 1)) * IDX_STRIDE
                for s in range(gl.maximum(count0, count1)):
                    slot = s % STAGES
                    phase = (s // STAGES) & 1
                    if s < count0:
                        j0 = _in_bounds(gl.load(idx0 + s).to(gl.int32), NKB)
                        _issue_kv(k_desc, v_desc, k_smem, v_smem, ready_bars, empty_bars, slot, phase,
                                  k_row, v_row, j0, BLOCK_N, PERMUTED_K)
                    if s < count1:
                        j1 = _in_bounds(gl.load(idx1 + s).to(gl.int32), NKB)
                        _issue_kv(k_desc, v_desc, k_smem, v_smem, ready_bars, empty_bars, STAGES + slot, phase,
                                  k_row, v_row, j1, BLOCK_N, PERMUTED_K)

    @gluon.jit
    def _fp8x4(x):
        """fp32 → e4m3 (round to nearest even, saturating: the conversion `tensor.to(float8e4nv)` emits), four
        elements into one 32-bit register in element order, so an operand layout with 4 elements per register needs
        no byte shuffling afterwards."""
        return gl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1; cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3; "
            "mov.b32 $0, {lo, hi}; }", "=r,r,r,r,r", [x], dtype=gl.float8e4nv, is_pure=True, pack=4)

    @gluon.jit
    def _k_tile(k_smem, slot, PERMUTED_K: gl.constexpr):
        """K tile of ring slot ``slot`` as [64 tokens, D] (the 5-D permuted-row box merged back to rows)."""
        tile = k_smem.index(slot)
        if PERMUTED_K:
            tile = tile.reshape([tile.shape[0] * tile.shape[1] * tile.shape[2] * tile.shape[3], tile.shape[4]])
        return tile

    @gluon.jit
    def _softmax_step(s_i32, m_i, l_i, c, j, N, P_LOG2,
                      BLOCK_N: gl.constexpr, s_layout: gl.constexpr, p_layout: gl.constexpr, PERMUTED_K: gl.constexpr):
        """Fused INT8 softmax of one 64×64 score tile: (new max, rescale factor, new row sum, fp32 P·448 — in the PV
        operand layout for permuted K rows, else in the score layout). See the module docstring."""
        raw = (s_i32 + MAGIC_BITS).to(gl.float32, bitcast=True)
        if j * BLOCK_N + BLOCK_N > N:  # N: the slot's key count; only the tail block (or a skipped slot) masks keys
            c_idx = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            if PERMUTED_K:  # column 16g + 8a + 2t + b holds token 16g + 4t + 2a + b
                c_idx = (c_idx & ~15) + ((c_idx >> 1) & 3) * 4 + ((c_idx >> 3) & 1) * 2 + (c_idx & 1)
            raw = gl.where(gl.expand_dims(j * BLOCK_N + c_idx < N, 0), raw, float("-inf"))
        m_new = gl.maximum(m_i, (gl.max(raw, axis=1) - MAGIC) * c)
        m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_safe)
        # exp2 argument raw·c − (1.5·2^23·c + m − log2 448) in one FFMA.
        addend = -MAGIC * c - (m_safe - P_LOG2)
        p = gl.exp2(gl.fma(raw, c, gl.expand_dims(addend, 1)))
        l_new = l_i * alpha + gl.sum(p, axis=1)
        if PERMUTED_K:
            # Column σ(k) = 32kb + 16x + 8e₁ + 2t + e₀ of P holds token k = 32kb + 16x + 4t + 2e₁ + e₀, so P with its
            # columns put back in token order is the wgmma A operand *as the registers already hold it*: the
            # reshape / permute / reshape is a relabelling (no shuffle; asserted at compile time).
            p = gl.reshape(p, [p.shape[0], 2, 2, 2, 4, 2])
            p = gl.reshape(gl.permute(p, (0, 1, 2, 4, 3, 5)), [p.shape[0], BLOCK_N])
            p = gl.convert_layout(p, p_layout, assert_trivial=True)
        return m_new, alpha, l_new, p

    @gluon.jit
    def _p_operand(p, p_layout: gl.constexpr, P_DTYPE: gl.constexpr, PERMUTED_K: gl.constexpr):
        """P (fp32) as the A operand of the P·V wgmma: e4m3 or V's 16-bit dtype, in the operand layout."""
        if PERMUTED_K:
            # Each run of 4 register elements is one 32-bit A register (k_width 4): `_fp8x4` fills it directly.
            return _fp8x4(p)
        else:
            return gl.convert_layout(p.to(P_DTYPE), p_layout)

    @gluon.jit
    def _consumer(q_smem, k_smem, v_smem, q_bars, ready_bars, empty_bars,
                  QS, KS, VS, OUT, PERM, COUNTS, IDX, Q_BAD,
                  N, H, NQB, NKB, IDX_STRIDE, P_LOG2, sob, soh, son, sod,
                  CONSUMER: gl.constexpr, D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  STAGES: gl.constexpr, CONSUMERS: gl.constexpr, DENSE: gl.constexpr, HAS_PERM: gl.constexpr,
                  PV_FP8: gl.constexpr, PERMUTED_K: gl.constexpr, DEFER_PV_WAIT: gl.constexpr):
        pid_m = gl.program_id(0)
        pid_bh = gl.program_id(1)
        h = pid_bh % H
        b = pid_bh // H
        qb = pid_m * CONSUMERS + CONSUMER
        # Slots of this consumer's ring: dense masks share ring 0.
        ring: gl.constexpr = 0 if DENSE else CONSUMER * STAGES

        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 32])
        PV_K: gl.constexpr = 32 if PV_FP8 else 16
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, D, PV_K])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout,
                                                    k_width=32 // v_smem.dtype.primitive_bitwidth)
        P_DTYPE: gl.constexpr = v_smem.dtype
        row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        o_row_layout: gl.constexpr = gl.SliceLayout(1, o_layout)

        count = _kv_count(COUNTS, h, qb, NQB, NKB, IDX_STRIDE, DENSE)
        idx_base = IDX + (h * NQB + gl.minimum(qb, NQB - 1)) * IDX_STRIDE
        qs = gl.load(QS + pid_bh * NQB + gl.minimum(qb, NQB - 1))
        ks_base = KS + pid_bh * NKB

        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_layout)
        l_i = gl.zeros([BLOCK_M], gl.float32, row_layout)
        acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
        s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, s_layout)

        mbarrier.wait(q_bars.index(CONSUMER), 0)
        q_tile = q_smem.index(CONSUMER)

        if count > 0:
            # Block 0's scores and P; then per block s: issue Q·Kᵀ of block s and P·V of block s−1, wait for the
            # scores only (wgmma groups retire in issue order), run the softmax of block s while P·V of s−1 is in
            # flight (FlashAttention-3's intra-warpgroup overlap), wait for it, release its slot, rescale O (with
            # DEFER_PV_WAIT those last three open step s+1 instead, see DEFAULT_CONFIG). P crosses the loop edge in
            # fp32 and is converted right before its wgmma, in the same basic block, so the four e4m3 bytes of each A
            # register are packed once (carried as bytes they were unpacked and repacked).
            if DENSE:
                j_nxt = gl.minimum(1, count - 1)
                keys_nxt = N
                j0 = 0
                keys0 = N
            else:
                j_nxt = gl.load(idx_base + gl.minimum(1, count - 1)).to(gl.int32)
                keys_nxt = _keys_of(j_nxt, N, NKB)
                j_nxt = _in_bounds(j_nxt, NKB)
                j0 = gl.load(idx_base).to(gl.int32)
                keys0 = _keys_of(j0, N, NKB)
                j0 = _in_bounds(j0, NKB)
            ks_nxt = gl.load(ks_base + j_nxt)
            mbarrier.wait(ready_bars.index(ring), 0)
            s_tok = warpgroup_mma(q_tile, _k_tile(k_smem, ring, PERMUTED_K).permute((1, 0)), s_zero, use_acc=False,
                                  is_async=True)
            s_i32 = warpgroup_mma_wait(0, deps=(s_tok, ))
            m_i, alpha, l_i, p_f32 = _softmax_step(s_i32, m_i, l_i, _round_scale_22bits(qs * gl.load(ks_base + j0)),
                                                   j0, keys0, P_LOG2, BLOCK_N, s_layout, p_layout, PERMUTED_K)
            if DEFER_PV_WAIT:
                # P·V with P = 0 puts an accumulator in flight, as the loop carries one from step to step.
                acc = warpgroup_mma(gl.zeros([BLOCK_M, BLOCK_N], P_DTYPE, p_layout),
                                    v_smem.index(ring).permute((1, 0)), acc, use_acc=False, is_async=True)
            for s in range(1, count):
                slot = s % STAGES
                prev = (s - 1) % STAGES
                if DEFER_PV_WAIT:
                    # P·V of block s−2, issued one iteration ago, ran under the softmax of block s−1.
                    acc = warpgroup_mma_wait(0, deps=(acc, ))
                    mbarrier.arrive(empty_bars.index(ring + (s + STAGES - 2) % STAGES), pred=s > 1)
                    acc = acc * gl.expand_dims(gl.convert_layout(alpha, o_row_layout), 1)
                j = j_nxt
                keys = keys_nxt
                c = _round_scale_22bits(qs * ks_nxt)
                # Loads for the next step, consumed one iteration later (their latency hides behind this one).
                if DENSE:
                    j_nxt = gl.minimum(s + 1, count - 1)
                else:
                    j_nxt = gl.load(idx_base + gl.minimum(s + 1, count - 1)).to(gl.int32)
                    keys_nxt = _keys_of(j_nxt, N, NKB)
                    j_nxt = _in_bounds(j_nxt, NKB)
                ks_nxt = gl.load(ks_base + j_nxt)
                mbarrier.wait(ready_bars.index(ring + slot), (s // STAGES) & 1)
                s_tok = warpgroup_mma(q_tile, _k_tile(k_smem, ring + slot, PERMUTED_K).permute((1, 0)), s_zero,
                                      use_acc=False, is_async=True)
                acc_tok = warpgroup_mma(_p_operand(p_f32, p_layout, P_DTYPE, PERMUTED_K),
                                        v_smem.index(ring + prev).permute((1, 0)), acc, is_async=True)
                s_i32 = warpgroup_mma_wait(1, deps=(s_tok, ))
                m_i, alpha, l_i, p_f32 = _softmax_step(s_i32, m_i, l_i, c, j, keys, P_LOG2, BLOCK_N, s_layout,
                                                       p_layout, PERMUTED_K)
                if DEFER_PV_WAIT:
                    acc = acc_tok
                else:
                    acc = warpgroup_mma_wait(0, deps=(acc_tok, ))
                    mbarrier.arrive(empty_bars.index(ring + prev))
                    acc = acc * gl.expand_dims(gl.convert_layout(alpha, o_row_layout), 1)
            if DEFER_PV_WAIT:
                acc = warpgroup_mma_wait(0, deps=(acc, ))
                mbarrier.arrive(empty_bars.index(ring + (count + STAGES - 2) % STAGES), pred=count > 1)
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, o_row_layout), 1)
            last = (count - 1) % STAGES
            acc_tok = warpgroup_mma(_p_operand(p_f32, p_layout, P_DTYPE, PERMUTED_K),
                                    v_smem.index(ring + last).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(0, deps=(acc_tok, ))
            mbarrier.arrive(empty_bars.index(ring + last))

        # Epilogue: O · v_scale / l, scattered to the tokens' model order.
        out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // D, D // 8], [4, 1], [1, 0])
        offs_d_o = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
        vs = gl.load(VS + pid_bh * D + offs_d_o)
        l_o = gl.convert_layout(l_i, o_row_layout)
        l_safe = gl.where(l_o == 0.0, 1.0, l_o)  # no kept block: zeros; a NaN row stays NaN
        o = acc * gl.expand_dims(vs, 0) / gl.expand_dims(l_safe, 1)
        o = gl.convert_layout(o.to(OUT.dtype.element_ty), out_layout)
        rows = qb * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, out_layout))
        valid = rows < N
        # Query rows holding a NaN or an infinity come out NaN, as SDPA's do (reference step 8).
        q_bad = gl.load(Q_BAD + pid_bh.to(gl.int64) * (NQB * BLOCK_M) + rows, mask=valid, other=0)
        o = gl.where(gl.expand_dims(q_bad != 0, 1), float("nan"), o)
        if HAS_PERM:
            dst = gl.load(PERM + h * N + rows, mask=valid, other=0)
            valid = valid & (dst >= 0) & (dst < N)  # a malformed permutation never writes past the output
        else:
            dst = rows
        offs_d = gl.arange(0, D, layout=gl.SliceLayout(0, out_layout))
        base = OUT + b.to(gl.int64) * sob + h.to(gl.int64) * soh
        ptrs = base + gl.expand_dims(dst.to(gl.int64) * son, 1) + gl.expand_dims(offs_d * sod, 0)
        gl.store(ptrs, o, mask=gl.expand_dims(valid, 1))

    @gluon.jit
    def _paro_fwd_hopper(q_desc, k_desc, v_desc, QS, KS, VS, OUT, PERM, COUNTS, IDX, Q_BAD,
                         N, H, NQB, NKB, IDX_STRIDE, P_LOG2, sob, soh, son, sod,
                         D: gl.constexpr, STAGES: gl.constexpr, CONSUMERS: gl.constexpr, DENSE: gl.constexpr,
                         HAS_PERM: gl.constexpr, CONSUMER_REGS: gl.constexpr, DEFER_PV_WAIT: gl.constexpr):
        BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
        BLOCK_N: gl.constexpr = q_desc.block_type.shape[0]
        PERMUTED_K: gl.constexpr = len(k_desc.block_type.shape) == 5
        PV_FP8: gl.constexpr = v_desc.dtype == gl.float8e4nv
        RINGS: gl.constexpr = 1 if DENSE else CONSUMERS
        q_smem = gl.allocate_shared_memory(q_desc.dtype, [CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
        k_smem = gl.allocate_shared_memory(k_desc.dtype, [RINGS * STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_smem = gl.allocate_shared_memory(v_desc.dtype, [RINGS * STAGES] + v_desc.block_type.shape, v_desc.layout)
        q_bars = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
        ready_bars = gl.allocate_shared_memory(gl.int64, [RINGS * STAGES, 1], mbarrier.MBarrierLayout())
        empty_bars = gl.allocate_shared_memory(gl.int64, [RINGS * STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(CONSUMERS):
            mbarrier.init(q_bars.index(i), count=1)
        for i in gl.static_range(RINGS * STAGES):
            mbarrier.init(ready_bars.index(i), count=1)
            # A dense slot is read by every consumer; a sparse slot by its ring's consumer only.
            mbarrier.init(empty_bars.index(i), count=CONSUMERS if DENSE else 1)

        # (The argument tuples are written out in the call: a tuple held in a variable loses its constexprs.)
        if CONSUMERS == 1:
            gl.warp_specialize([
                (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bars, ready_bars, empty_bars,
                             COUNTS, IDX, NQB, NKB, IDX_STRIDE, H, D, BLOCK_M, BLOCK_N, STAGES, CONSUMERS, DENSE,
                             PERMUTED_K)),
                (_consumer, (q_smem, k_smem, v_smem, q_bars, ready_bars, empty_bars, QS, KS, VS, OUT, PERM, COUNTS,
                             IDX, Q_BAD, N, H, NQB, NKB, IDX_STRIDE, P_LOG2, sob, soh, son, sod,
                             0, D, BLOCK_M, BLOCK_N, STAGES, CONSUMERS, DENSE, HAS_PERM, PV_FP8,
                             PERMUTED_K, DEFER_PV_WAIT)),
            ], [4], [CONSUMER_REGS])
        else:
            gl.warp_specialize([
                (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bars, ready_bars, empty_bars,
                             COUNTS, IDX, NQB, NKB, IDX_STRIDE, H, D, BLOCK_M, BLOCK_N, STAGES, CONSUMERS, DENSE,
                             PERMUTED_K)),
                (_consumer, (q_smem, k_smem, v_smem, q_bars, ready_bars, empty_bars, QS, KS, VS, OUT, PERM, COUNTS,
                             IDX, Q_BAD, N, H, NQB, NKB, IDX_STRIDE, P_LOG2, sob, soh, son, sod,
                             0, D, BLOCK_M, BLOCK_N, STAGES, CONSUMERS, DENSE, HAS_PERM, PV_FP8,
                             PERMUTED_K, DEFER_PV_WAIT)),
                (_consumer, (q_smem, k_smem, v_smem, q_bars, ready_bars, empty_bars, QS, KS, VS, OUT, PERM, COUNTS,
                             IDX, Q_BAD, N, H, NQB, NKB, IDX_STRIDE, P_LOG2, sob, soh, son, sod,
                             1, D, BLOCK_M, BLOCK_N, STAGES, CONSUMERS, DENSE, HAS_PERM, PV_FP8,
                             PERMUTED_K, DEFER_PV_WAIT)),
            ], [4, 4], [CONSUMER_REGS, CONSUMER_REGS])


# Launch settings: CONSUMERS query blocks per CTA (2: 8 consumer warps + the producer warpgroup), STAGES ring slots,
# the consumer warpgroups' register budget (setmaxnreg) and the kernel's maxnreg (the producer warpgroup gets what is
# left of 3 warpgroups × maxnreg; at 168 one CTA fits an SM, at 80 two do); permuted_k (FP8 PV only): K tiles loaded
# with permuted rows so P needs no layout conversion (`_permuted_k_descriptor`); defer_pv_wait: wait for the P·V
# wgmma of block s at the top of step s+1 instead of right after the softmax of s+1.
#
# Why defer_pv_wait exists and is off: waited right after the softmax, ptxas hoists the wait to the start of the
# softmax's basic block (above the exp2s), so P·V never runs under the softmax; deferred, the exp2s do run under it
# (`benchmarks/hopper_kernel.py --sass`: kv_loop_exp2_under_pv), but the kernel measured slower at head_dim 64, and at
# head_dim 128, with 16-bit P or below 168 registers ptxas serializes every wgmma (its C7512 notice).
DEFAULT_CONFIG = {"consumers": 2, "stages": 3, "consumer_regs": 232, "maxnreg": 168, "permuted_k": True,
                  "defer_pv_wait": False}
# head_dim 64 with FP8 P fits the consumer in 104 registers without spilling, so two CTAs share an SM (16 consumer
# warps instead of 8); 16-bit P (twice its registers) and head_dim 128 spill there.
TWO_CTAS_PER_SM = {"consumer_regs": 104, "maxnreg": 80, "stages": 4}
CONFIG_KEYS = frozenset(DEFAULT_CONFIG)


def default_config(head_dim: int, pv_dtype: str) -> dict:
    """The launch settings used where a call passes none (measured: benchmarks/RESULTS.md, "Gluon Hopper kernel")."""
    if head_dim == 64 and pv_dtype == "fp8":
        return dict(DEFAULT_CONFIG, **TWO_CTAS_PER_SM)
    return dict(DEFAULT_CONFIG)


def _gl_dtype(dtype: torch.dtype):
    return {torch.int8: gl.int8, torch.float8_e4m3fn: gl.float8e4nv, torch.bfloat16: gl.bfloat16,
            torch.float16: gl.float16}[dtype]


def _descriptor(t2d: torch.Tensor, block: list[int]):
    layout = gl.NVMMASharedLayout.get_default_for(block, _gl_dtype(t2d.dtype))
    return TensorDescriptor.from_tensor(t2d, block, layout)


def _permuted_k_descriptor(k2d: torch.Tensor):
    """TMA descriptor that loads a 64-row K tile with its rows permuted within each group of 16: shared-memory row
    16g + 8a + 2t + b receives token 16g + 4t + 2a + b. K [rows, D] is viewed as 5-D [rows / 16, a, t, b, D] with
    strides (16D, 2D, 4D, D, 1) (the a and t axes swapped against memory order); the box [4, 2, 4, 2, D] is written
    to shared memory densely in that order, so the tile has exactly the layout (and swizzle) of a plain [64, D] box.
    With S = Q·Kᵀ computed on these rows, the FP8 P the softmax leaves in the wgmma accumulator layout *is* the A
    operand of P·V in token order (`_softmax_step`)."""
    rows, d = k2d.shape
    block = [4, 2, 4, 2, d]
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.int8)
    return TensorDescriptor(k2d, [rows // 16, 2, 4, 2, d], [16 * d, 2 * d, 4 * d, d, 1], block, layout)


@runs_on_device_of(first_tensor_device)
def paro_attention_hopper(pro: Prologue, out: torch.Tensor, perm: Optional[torch.Tensor],
                          kv_counts: Optional[torch.Tensor], kv_indices: Optional[torch.Tensor], n: int, heads: int,
                          *, config: Optional[dict] = None) -> torch.Tensor:
    """The attention of `attention._attn_fwd` on a prologue's output (`prologue.paro_prologue`), into ``out``.

    ``out``: contiguous or strided [B, H, N, D] in fp16/bf16/fp32; only rows < N of computed query blocks are written.
    ``perm``: int64 [H, N] (None = identity), the permutation the prologue gathered by. ``kv_counts`` [H, NQB] int32
    and ``kv_indices`` [H, NQB, W] int16/int32 (both None = dense), as `attention.paro_attention_triton` takes them.
    ``config``: launch settings overriding `default_config` (benchmarks). Raises ValueError for what `supports`
    rejects and RuntimeError where `available` is False."""
    if not available(out.device):
        raise RuntimeError("the Gluon Hopper attention kernel needs an sm_90 GPU and Triton's Gluon Hopper API"
                           + (f" ({_GLUON_ERROR!r})" if _GLUON_ERROR is not None else ""))
    bh, _, d = pro.q.shape
    if not supports(pro.qk_bits, pro.pv_dtype, pro.block_m, pro.block_n, d, dtype=out.dtype):
        raise ValueError(f"unsupported by the Hopper kernel: qk_bits={pro.qk_bits} pv_dtype={pro.pv_dtype} "
                         f"block=({pro.block_m},{pro.block_n}) head_dim={d} out dtype={out.dtype}")
    if pro.vt.dtype not in (torch.float8_e4m3fn, torch.bfloat16, torch.float16):
        raise ValueError(f"the Hopper kernel takes FP8 or 16-bit Vᵀ, got {pro.vt.dtype}")
    nqb, nkb = pro.q_scale.shape[1], pro.k_scale.shape[1]
    if out.dim() != 4 or out.shape[1] != heads or out.shape[2] != n or out.shape[3] != d or out.shape[0] * heads != bh:
        raise ValueError(f"out must be [B, {heads}, {n}, {d}] with B·H = {bh}, got {tuple(out.shape)}")
    if pro.n != n or nqb * BLOCK < n or nkb * BLOCK < n:
        raise ValueError(f"prologue for N={pro.n} ({nqb} / {nkb} blocks) used with N={n}")
    cfg = default_config(d, pro.pv_dtype)
    unknown = set(config or {}) - CONFIG_KEYS
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)}; known: {sorted(CONFIG_KEYS)}")
    cfg.update(config or {})
    if d > 64 and int(cfg["maxnreg"]) < 128:
        # ptxas fails on (or spills heavily in) the head_dim-128 consumer below that budget.
        raise ValueError(f"config maxnreg={cfg['maxnreg']} is too few registers for head_dim {d}; use ≥ 128")
    dense = kv_counts is None or kv_indices is None
    dev = out.device
    int_dummy = torch.empty(0, device=dev, dtype=torch.int32)
    if dense:
        counts, indices, idx_stride = int_dummy, int_dummy, nkb
    else:
        if tuple(kv_counts.shape) != (heads, nqb) or tuple(kv_indices.shape[:2]) != (heads, nqb) \
                or not 1 <= kv_indices.shape[-1] <= nkb:
            raise ValueError(f"CSR has shapes counts={tuple(kv_counts.shape)} indices={tuple(kv_indices.shape)}, "
                             f"expected ({heads}, {nqb}) and ({heads}, {nqb}, W ≤ {nkb})")
        # The Gluon kernel was last checked on the GPU with int32 counts and int64 permutations: compact plans'
        # int16 counts and int32 permutations are widened here (a copy per call on this opt-in path).
        counts = kv_counts.to(device=dev, dtype=torch.int32).contiguous()
        index_dtype = kv_indices.dtype if kv_indices.dtype in (torch.int16, torch.int32) else torch.int32
        indices = kv_indices.to(device=dev, dtype=index_dtype).contiguous()
        idx_stride = indices.shape[-1]
    perm_arg = perm.to(device=dev, dtype=torch.int64).contiguous() if perm is not None else \
        torch.empty(0, device=dev, dtype=torch.int64)
    q_desc = _descriptor(pro.q.view(bh * nqb * BLOCK, d), [BLOCK, d])
    k2d = pro.k.view(bh * nkb * BLOCK, d)
    permuted_k = bool(cfg["permuted_k"]) and pro.pv_dtype == "fp8" and not _PERMUTED_K_REFUSED
    v_desc = _descriptor(pro.vt.view(bh * d, nkb * BLOCK), [d, BLOCK])
    consumers = int(cfg["consumers"])
    if consumers not in (1, 2):
        raise ValueError(f"config consumers must be 1 or 2, got {consumers}")
    grid = (triton.cdiv(nqb, consumers), bh)
    p_log2 = math.log2(FP8_MAX) if pro.pv_dtype == "fp8" else 0.0

    def launch(k_desc):
        _paro_fwd_hopper[grid](
            q_desc, k_desc, v_desc, pro.q_scale, pro.k_scale, pro.v_scale, out, perm_arg, counts, indices, pro.q_bad,
            n, heads, nqb, nkb, idx_stride, p_log2, *out.stride(),
            D=d, STAGES=int(cfg["stages"]), CONSUMERS=consumers, DENSE=dense, HAS_PERM=perm is not None,
            CONSUMER_REGS=int(cfg["consumer_regs"]), DEFER_PV_WAIT=bool(cfg["defer_pv_wait"]),
            num_warps=4, maxnreg=int(cfg["maxnreg"]))

    if permuted_k:
        try:
            launch(_permuted_k_descriptor(k2d))
            return out
        except RuntimeError as exc:
            # The 5-D box swaps two axes against memory order; a driver that refuses to encode that tensor map
            # fails here, on the host, before anything runs: fall back to plain K tiles from then on.
            if "tensor map" not in str(exc):
                raise
            _refuse_permuted_k(exc)
    launch(_descriptor(k2d, [BLOCK, d]))
    return out


_PERMUTED_K_REFUSED: Optional[str] = None


def _refuse_permuted_k(exc: BaseException) -> None:
    global _PERMUTED_K_REFUSED
    _PERMUTED_K_REFUSED = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    warnings.warn(f"permuted-K TMA descriptor refused ({_PERMUTED_K_REFUSED}); using plain K tiles", RuntimeWarning)


def permuted_k_refused() -> Optional[str]:
    """Why the permuted-K descriptor was refused in this process (None: not refused, or not tried yet)."""
    return _PERMUTED_K_REFUSED


@runs_on_device_of(first_tensor_device)
def paro_attention_hopper_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                              perm: Optional[torch.Tensor] = None, mask: Optional[BlockMask] = None,
                              scale: Optional[float] = None, pv_dtype: str = "fp8", out: Optional[torch.Tensor] = None,
                              config: Optional[dict] = None) -> torch.Tensor:
    """`attention.paro_attention_triton`'s call (q, k, v [B, H, N, D], INT8 QKᵀ, 64-token blocks: a `BlockMask` with
    ``group == 1``, None = dense; a bitmap-form one is decoded first, `mask_decode.decode_walk`) on this kernel: the
    fused prologue, then `paro_attention_hopper`."""
    from paro_compile.kernels.mask_decode import decode_walk
    from paro_compile.kernels.prologue import paro_prologue

    bsz, heads, n, d = q.shape
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    pro = paro_prologue(q, k, v, perm=perm, scale=scale if scale is not None else 1.0 / math.sqrt(d), qk_bits=8,
                        pv_dtype=pv_dtype, block_m=BLOCK, block_n=BLOCK)
    if mask is not None and not mask.is_dense:
        if mask.group != 1 or mask.block_m != BLOCK or mask.block_n != BLOCK:
            raise ValueError(f"the Hopper kernel walks 64-token blocks one query block per row, got block "
                             f"({mask.block_m}, {mask.block_n}) with group {mask.group}")
        mask = decode_walk(mask.to(q.device))
        return paro_attention_hopper(pro, out, perm, mask.counts, mask.indices, n, heads, config=config)
    return paro_attention_hopper(pro, out, perm, None, None, n, heads, config=config)
