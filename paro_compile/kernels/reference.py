"""Pure-PyTorch oracle of the paro attention numerics.

Every Triton kernel in this package computes the same function as `paro_attention_reference`
and is tested against it. The function, for q, k, v of shape [B, H, N, D] in model token order:

1. Gather tokens per head by ``perm[h]`` (PARO order). The output is scattered back through the
   inverse, so the caller never sees the permuted order.
2. Smooth K: subtract its per-(b, h, channel) mean over tokens. Softmax is invariant to adding a
   per-row constant to the scores, so this changes nothing mathematically but removes the channel
   outliers that make K hard to quantize.
3. Quantize Q per block of ``block_m`` tokens and K per block of ``block_n`` tokens, symmetric,
   ``scale = amax / qmax`` with qmax 127 (INT8) or 7 (INT4); values = x · (1 / scale) rounded half
   away from zero. The softmax
   scale and log2(e) are folded into Q's dequantization factor so scores come out in the log2 domain.
4. For every (b, h, query block) walk the kept KV blocks of the mask (`BlockMask`) in CSR order
   with an online softmax in base 2. P = exp2(s - running max) lies in [0, 1]; it is computed already
   scaled, as exp2(s - (running max - log2 factor)), so the scaling rounds exactly as in the kernel:
   - ``pv_dtype="fp8"``: P·448 is rounded to float8 e4m3 (no computed scale needed); V is quantized per
     (b, h, channel) to e4m3 with scale amax/448.
   - ``pv_dtype="int8"``: P·127 rounded (to nearest even) to INT8; V per channel INT8 with scale amax/127.
   - ``pv_dtype="fp16"``: no PV quantization; P is rounded to V's dtype (a no-op for fp32 inputs).
   PV accumulates in fp32; the row sum uses the unquantized fp32 P·factor (the factor cancels).
5. A query row that has no kept block (only possible with a hand-made mask: plans always keep the
   diagonal) returns zeros. Key tokens past N (the tail block) are masked out.
6. ``compensate=True`` (skipped-block compensation): after the kept blocks, every KV block the row's
   mask skips takes part in the same online softmax as **one pooled key**: score
   ``q·k̄_j · q_scale + log2(n_j)`` and value ``v̄_j``, where k̄_j / v̄_j are the means of the block's
   n_j tokens (K smoothed as in step 2, V divided by its per-channel scale). This is the first-order
   estimate Σ_t exp(q·k_t) v_t ≈ n_j · exp(q·k̄_j) · v̄_j (it underestimates the mass by Jensen's
   inequality, exactly when the block's scores spread). q (the quantized integers, or the raw values for
   qk_bits=16), k̄, the pooled P and v̄ are rounded to fp16 (the kernel's fp16 dots); the pooled P is not
   quantized to FP8/INT8. A query row with no kept block then gets the pooled estimate instead of zeros.

7. ``key_bias`` (key-padding masks, as diffusers passes text padding): a value per (batch, head or all heads, key)
   added to every query row's scores after dequantization, in log2 units (bias · log2 e), permuted like the keys;
   -inf removes a key. A row whose keys are all removed returns zeros, as SDPA does. Cross-attention (k, v with
   their own length Nk, no permutation) runs the same walk over ceil(Nk / block_n) key blocks.

8. Non-finite inputs (NaN or ±inf), as SDPA's rows see them: a query row holding one returns NaN; a key token holding
   one makes its key block's scale NaN, so every query row that attends to that block returns NaN (SDPA: NaN where
   the token's score is NaN or +inf, a dropped key where it is -inf; here always NaN, never a finite wrong value);
   a V channel holding one is NaN in every row (as in SDPA). They stay out of the smoothing mean (over the finite
   values of each channel) and of their block's quantization scale, so one bad value never spreads to other rows.
   With qk_bits=16 and pv_dtype="fp16" the values propagate as in plain attention.

``qk_bits=16`` skips steps 2-3 (plain fp32 scores). With qk_bits=16, pv_dtype="fp16", identity perm and
a full mask the result equals SDPA to float rounding.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from paro_compile.kernels.block_mask import BlockMask, csr_to_block_mask, dense_csr, num_blocks

LOG2E = 1.4426950408889634
FP8_MAX = 448.0
PV_DTYPES = ("fp8", "int8", "fp16")
ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
QK_BITS = (4, 8, 16)


def qmax_for_bits(bits: int) -> float:
    """Largest magnitude of the symmetric integer grid for ``bits`` (127 for INT8, 7 for INT4)."""
    return float(2 ** (bits - 1) - 1)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero: the rounding the Triton kernels implement with floor/ceil."""
    return torch.where(x >= 0, torch.floor(x + 0.5), torch.ceil(x - 0.5))


def permute_tokens(x: torch.Tensor, perm: Optional[torch.Tensor]) -> torch.Tensor:
    """x[b, h, perm[h, i]] for x of shape [B, H, N, D] and perm of shape [H, N] (None = identity)."""
    if perm is None:
        return x
    index = perm.to(device=x.device, dtype=torch.long)[None, :, :, None].expand(x.shape[0], -1, -1, x.shape[-1])
    return torch.gather(x, 2, index)


def unpermute_tokens(x: torch.Tensor, perm: Optional[torch.Tensor]) -> torch.Tensor:
    """Inverse of `permute_tokens`: out[b, h, perm[h, i]] = x[b, h, i]."""
    if perm is None:
        return x
    index = perm.to(device=x.device, dtype=torch.long)[None, :, :, None].expand(x.shape[0], -1, -1, x.shape[-1])
    return torch.empty_like(x).scatter_(2, index, x)


def quantize_blockwise(x: torch.Tensor, block: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-token-block quantization of x [B, H, N, D] (float32).

    Returns the integer values (as float32, exactly representable) and the per-block scale
    [B, H, ceil(N / block)] such that ``x ≈ values * scale``. An all-zero block gets scale 1 (values 0).
    """
    b, h, n, d = x.shape
    nb = num_blocks(n, block)
    padded = torch.nn.functional.pad(x, (0, 0, 0, nb * block - n))
    blocks = padded.view(b, h, nb, block, d)
    amax = blocks.abs().amax(dim=(-1, -2))
    qmax = qmax_for_bits(bits)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    values = round_half_away(blocks * (1.0 / scale)[..., None, None]).clamp_(-qmax, qmax)
    return values.view(b, h, nb * block, d)[:, :, :n], scale


def quantize_v_per_channel(v: torch.Tensor, pv_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """V [B, H, N, D] float32 → (quantized values as float32, scale [B, H, D])."""
    amax = v.abs().amax(dim=2)
    # Step 8: a channel holding a NaN or an infinity gets a NaN scale (NaN in every row, as in SDPA).
    amax = torch.where(torch.isfinite(v).all(dim=2), amax, math.nan)
    if pv_dtype == "fp8":
        scale = torch.where(amax == 0, torch.ones_like(amax), amax / FP8_MAX)
        values = (v * (1.0 / scale)[:, :, None, :]).to(torch.float8_e4m3fn).float()
    elif pv_dtype == "int8":
        scale = torch.where(amax == 0, torch.ones_like(amax), amax / 127.0)
        values = round_half_away(v * (1.0 / scale)[:, :, None, :]).clamp_(-127, 127)
    else:
        raise ValueError(f"pv_dtype {pv_dtype!r} has no V quantization")
    return values, scale


P_LOG2 = {"fp8": math.log2(FP8_MAX), "int8": math.log2(127.0), "fp16": 0.0}


def quantize_scaled_p(p_scaled: torch.Tensor, pv_dtype: str, v_dtype: torch.dtype) -> torch.Tensor:
    """P·factor (factor 448 / 127 / 1, see `P_LOG2`) → its quantized values as float32."""
    if pv_dtype == "fp8":
        return p_scaled.to(torch.float8_e4m3fn).float()
    if pv_dtype == "int8":
        # Round to nearest even: the kernel rounds P·127 ≥ 0 with a 1.5·2^23 magic-number add.
        return torch.round(p_scaled)
    return p_scaled.to(v_dtype).float()


def round_scale_22bits(c: torch.Tensor) -> torch.Tensor:
    """Positive fp32 scale with its 2 low mantissa bits cleared (relative change < 2^-21). The kernel
    needs 1.5·2^23·c exact in fp32 to fuse the integer-to-float magic number into the dequantizing FFMA."""
    return (c.float().contiguous().view(torch.int32) & ~3).view(torch.float32)


def combined_scale(c: torch.Tensor, qk_bits: int) -> torch.Tensor:
    """The q·k dequantization factor as the kernel uses it (22-bit for integer QKᵀ, see `round_scale_22bits`)."""
    return c if qk_bits == 16 else round_scale_22bits(c)


def pooled_blocks(kf: torch.Tensor, vf: torch.Tensor, block_n: int, v_scale: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per KV block of the (permuted, smoothed) fp32 K and V [B, H, N, D]: the mean K row and the mean V row
    in V's quantized units (mean / v_scale), each [B, H, ceil(N/block_n), D] fp32, averaged over the
    block's tokens < N."""
    bsz, heads, n, d = kf.shape
    nk = num_blocks(n, block_n)
    pad = nk * block_n - n
    cnt = (torch.arange(nk * block_n, device=kf.device) < n).view(nk, block_n).sum(-1).float()[:, None]
    k_sum = torch.nn.functional.pad(kf, (0, 0, 0, pad)).view(bsz, heads, nk, block_n, d).sum(3)
    v_sum = torch.nn.functional.pad(vf, (0, 0, 0, pad)).view(bsz, heads, nk, block_n, d).sum(3)
    return k_sum / cnt, (v_sum / cnt) * (1.0 / v_scale)[:, :, None, :]


def _online_softmax_step(m_i: torch.Tensor, s: torch.Tensor, p_log2: float
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One base-2 online-softmax step over scores ``s`` [..., rows, cols]: (new running max, rescale factor of
    the old row sum / accumulator, P·2^p_log2). Rows still at -inf keep max -inf and get P = 0."""
    m_new = torch.maximum(m_i, s.amax(-1))
    m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
    return m_new, torch.exp2(m_i - m_safe), torch.exp2(s - (m_safe - p_log2)[..., None])


def paro_attention_reference(
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
) -> torch.Tensor:
    """Block-sparse, quantized attention; see the module docstring for the exact numerics.

    q: [B, H, N, D]; k, v: [B, H, Nk, D] (Nk = N for self-attention); perm: [H, N] (None = identity; self-attention
    only); mask: the kept blocks and the block sizes of the walk and of Q/K quantization (None = `BlockMask.dense`:
    every block, 64-token blocks); key_bias: [B or 1, H or 1, Nk] added to every query row's scores (natural log
    units, as SDPA adds a float ``attn_mask``; -inf masks a key), in model key order (module docstring, step 7).
    Returns [B, H, N, D] in q's dtype. ``compensate``: skipped KV blocks enter as pooled keys (step 6).
    """
    if qk_bits not in QK_BITS:
        raise ValueError(f"qk_bits must be one of {QK_BITS}, got {qk_bits}")
    if pv_dtype not in PV_DTYPES:
        raise ValueError(f"pv_dtype must be one of {PV_DTYPES}, got {pv_dtype!r}")
    check_attention_inputs(q, k, v, perm, key_bias, compensate, ATTENTION_DTYPES + (torch.float64,))
    bsz, heads, n, d = q.shape
    n_kv = k.shape[2]
    mask = mask if mask is not None else BlockMask.dense(n, kv_len=n_kv)
    block_m, block_n = mask.block_m, mask.block_n
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(d)
    mq, nk = num_blocks(n, block_m), num_blocks(n_kv, block_n)
    if (mask.num_q_blocks, mask.num_kv_blocks) != (mq, nk):
        raise ValueError(f"mask has {mask.num_q_blocks}x{mask.num_kv_blocks} blocks, N={n}, Nk={n_kv} needs "
                         f"{mq}x{nk}")
    if mask.is_dense:
        kv_counts, kv_indices = dense_csr(heads, mq, nk, q.device)
    else:
        kv_counts, kv_indices = mask.block_csr()
    if tuple(kv_counts.shape) != (heads, mq) or tuple(kv_indices.shape[:2]) != (heads, mq):
        raise ValueError(f"block mask has shape counts={tuple(kv_counts.shape)} indices={tuple(kv_indices.shape)}, "
                         f"expected ({heads}, {mq}) and ({heads}, {mq}, W) for N={n}, block_m={block_m}")

    qf = permute_tokens(q, perm).float()
    kf = permute_tokens(k, perm).float()
    vf = permute_tokens(v, perm).float()

    q_bad = None
    if qk_bits == 16:
        q_vals, k_vals = qf * (sm_scale * LOG2E), kf
        q_scale = torch.ones(bsz, heads, mq, device=q.device)
        k_scale = torch.ones(bsz, heads, nk, device=q.device)
    else:
        # Step 8: rows holding a NaN or an infinity stay out of the smoothing mean and of their block's scale.
        finite = torch.isfinite(kf)
        kf = kf - torch.where(finite, kf, 0.0).sum(2, keepdim=True) / finite.sum(2, keepdim=True).clamp(min=1)
        q_bad, k_bad = non_finite_rows(qf), non_finite_rows(kf)
        q_vals, q_scale = quantize_blockwise(torch.where(q_bad[..., None], 0.0, qf), block_m, qk_bits)
        k_vals, k_scale = quantize_blockwise(torch.where(k_bad[..., None], 0.0, kf), block_n, qk_bits)
        k_scale = torch.where(blocks_with(k_bad, block_n), math.nan, k_scale)
        q_scale = q_scale * (sm_scale * LOG2E)
    # Scores are dequantized with one combined factor q_scale·k_scale per block pair, as in the kernel.

    if pv_dtype == "fp16":
        v_vals, v_scale = vf, torch.ones(bsz, heads, d, device=q.device)
    else:
        v_vals, v_scale = quantize_v_per_channel(vf, pv_dtype)

    # Pad the token axis to whole blocks so blocks can be gathered by index.
    def pad_to(x: torch.Tensor, block: int) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, 0, 0, num_blocks(x.shape[2], block) * block - x.shape[2]))

    q_blk = pad_to(q_vals, block_m).view(bsz, heads, mq, block_m, d)
    k_blk = pad_to(k_vals, block_n).view(bsz, heads, nk, block_n, d)
    v_blk = pad_to(v_vals, block_n).view(bsz, heads, nk, block_n, d)
    key_valid = (torch.arange(nk * block_n, device=q.device) < n_kv).view(nk, block_n)
    bias_blk = None
    if key_bias is not None:  # in log2 units, permuted like the keys, blocked like them
        bias2 = permute_keys(key_bias.float().to(q.device).expand(bsz, heads, n_kv), perm) * LOG2E
        bias_blk = torch.nn.functional.pad(bias2, (0, nk * block_n - n_kv)).view(bsz, heads, nk, block_n)

    m_i = torch.full((bsz, heads, mq, block_m), -math.inf, device=q.device)
    l_i = torch.zeros(bsz, heads, mq, block_m, device=q.device)
    acc = torch.zeros(bsz, heads, mq, block_m, d, device=q.device)
    width = kv_indices.shape[-1]
    # Counts past the row width and slots naming a block outside [0, Nk) are skipped, as the kernel skips them
    # (`BlockMask.validate` rejects such masks before they get here).
    counts = kv_counts.to(q.device).long().clamp(0, width)
    indices = kv_indices.to(q.device).long()
    head_index = torch.arange(heads, device=q.device)[:, None]
    # P is produced already multiplied by its quantization factor (448 for FP8, 127 for INT8) by folding
    # log2(factor) into the exponent, as the kernel does; the factor cancels between acc and l.
    p_log2 = P_LOG2[pv_dtype]
    for slot in range(int(counts.max()) if counts.numel() else 0):
        in_range = (indices[:, :, slot] >= 0) & (indices[:, :, slot] < nk)
        active = (slot < counts) & in_range  # [H, Mq]
        j = torch.where(in_range, indices[:, :, slot], 0)  # [H, Mq]
        k_j = k_blk[:, head_index, j]  # [B, H, Mq, block_n, D]
        v_j = v_blk[:, head_index, j]
        s = torch.einsum("bhmid,bhmjd->bhmij", q_blk, k_j)
        s = s * combined_scale(q_scale[..., None, None] * k_scale[:, head_index, j][..., None, None], qk_bits)
        if bias_blk is not None:
            s = s + bias_blk[:, head_index, j][:, :, :, None, :]
        s = s.masked_fill(~key_valid[j][None, :, :, None, :], -math.inf)
        s = s.masked_fill(~active[None, :, :, None, None], -math.inf)
        m_i, alpha, p = _online_softmax_step(m_i, s, p_log2)
        l_i = l_i * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + torch.einsum("bhmij,bhmjd->bhmid", quantize_scaled_p(p, pv_dtype, v.dtype), v_j)
    if compensate and not mask.is_dense:
        # Every skipped block enters the softmax as one pooled key: its mean (smoothed) K with weight
        # log2(token count) and its mean V. Operands are rounded to fp16 as the kernel's fp16 dots see them.
        cnt = key_valid.sum(-1).float()  # [nk]
        k_mean, v_mean = pooled_blocks(kf, vf, block_n, v_scale)
        q_half = q_blk.to(torch.float16).float()
        s_bar = torch.einsum("bhmid,bhjd->bhmij", q_half, k_mean.to(torch.float16).float())
        s_bar = s_bar * q_scale[..., None, None] + torch.log2(cnt)
        s_bar = s_bar.masked_fill(kept_blocks(counts, indices, nk)[None, :, :, None, :], -math.inf)
        m_i, alpha, p = _online_softmax_step(m_i, s_bar, p_log2)
        l_i = l_i * alpha + p.sum(-1)
        pv = torch.einsum("bhmij,bhjd->bhmid", p.to(torch.float16).float(), v_mean.to(torch.float16).float())
        acc = acc * alpha[..., None] + pv
    out = acc * v_scale[:, :, None, None, :] / torch.where(l_i == 0, torch.ones_like(l_i), l_i)[..., None]
    out = out.view(bsz, heads, mq * block_m, d)[:, :, :n]
    if q_bad is not None:
        out = torch.where(q_bad[..., None], math.nan, out)
    return unpermute_tokens(out, perm).to(q.dtype)


def non_finite_rows(x: torch.Tensor) -> torch.Tensor:
    """[..., N] flag of the rows of x [..., N, D] that hold a NaN or an infinity."""
    return ~torch.isfinite(x).all(-1)


def blocks_with(rows: torch.Tensor, block: int) -> torch.Tensor:
    """[..., ceil(N / block)] flag of the blocks of ``block`` rows that hold a flagged row."""
    pad = num_blocks(rows.shape[-1], block) * block - rows.shape[-1]
    return torch.nn.functional.pad(rows, (0, pad)).view(*rows.shape[:-1], -1, block).any(-1)


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, perm: Optional[torch.Tensor],
                           key_bias: Optional[torch.Tensor], compensate: bool,
                           dtypes: tuple = ATTENTION_DTYPES) -> None:
    """The shape, dtype and device rules every implementation of the op shares (ValueError naming what does not
    fit and how to fix it). ``dtypes``: the floating dtypes the caller computes in (the reference also takes
    float64, the definition the kernels are checked against)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, N, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in dtypes:
        raise ValueError(f"q, k, v must share one dtype of {dtypes}, got q {q.dtype}, k {k.dtype}, "
                         f"v {v.dtype}; cast them (e.g. k.to(q.dtype)) before the call")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    for name, x in (("perm", perm), ("key_bias", key_bias)):
        if x is not None and x.device not in (q.device, torch.device("cpu")):
            raise ValueError(f"{name} is on {x.device}, q on {q.device}: pass it on q's device (or the CPU)")
    bsz, heads, n, d = q.shape
    if tuple(k.shape) != tuple(v.shape) or k.shape[:2] != q.shape[:2] or k.shape[-1] != d:
        raise ValueError(f"k and v must be [B, H, Nk, D] with q's B, H and D, got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if perm is not None and k.shape[2] != n:
        raise ValueError(f"a token permutation needs self-attention (Nk == N), got N={n}, Nk={k.shape[2]}")
    if key_bias is not None:
        if (key_bias.dim() != 3 or key_bias.shape[0] not in (1, bsz) or key_bias.shape[1] not in (1, heads)
                or key_bias.shape[2] != k.shape[2]):
            raise ValueError(f"key_bias must be [B or 1, H or 1, Nk] = [{bsz}|1, {heads}|1, {k.shape[2]}], "
                             f"got {tuple(key_bias.shape)}")
        if not key_bias.is_floating_point():
            raise ValueError(f"key_bias must be an additive float tensor (0 keeps a key, -inf removes it), got "
                             f"{key_bias.dtype}; for a boolean keep-mask pass "
                             "torch.zeros(mask.shape).masked_fill(~mask, float('-inf')) (paro_attention converts one)")
        if compensate:
            raise ValueError("skipped-block compensation does not take a key bias: pooled keys would mix masked and "
                             "unmasked tokens; call with compensate=False")


def permute_keys(bias: torch.Tensor, perm: Optional[torch.Tensor]) -> torch.Tensor:
    """bias[b, h, perm[h, i]] for bias [B, H, N] (None = identity)."""
    if perm is None:
        return bias
    return torch.gather(bias, 2, perm.to(device=bias.device, dtype=torch.long)[None].expand(bias.shape[0], -1, -1))


def kept_blocks(counts: torch.Tensor, indices: torch.Tensor, num_kv_blocks: int) -> torch.Tensor:
    """Boolean [H, Mq, Nk] of the blocks a CSR keeps, ignoring slots outside [0, Nk) as the walk does."""
    valid = (indices >= 0) & (indices < num_kv_blocks)
    return csr_to_block_mask(counts, torch.where(valid, indices, num_kv_blocks), num_kv_blocks + 1)[..., :num_kv_blocks]
