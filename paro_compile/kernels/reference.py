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
4. For every (b, h, query block) walk the kept KV blocks in CSR order (``kv_indices[h, i, :kv_counts[h, i]]``)
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

``qk_bits=16`` skips steps 2-3 (plain fp32 scores). With qk_bits=16, pv_dtype="fp16", identity perm and
a full mask the result equals SDPA to float rounding.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

LOG2E = 1.4426950408889634
FP8_MAX = 448.0
PV_DTYPES = ("fp8", "int8", "fp16")
QK_BITS = (4, 8, 16)


def qmax_for_bits(bits: int) -> float:
    """Largest magnitude of the symmetric integer grid for ``bits`` (127 for INT8, 7 for INT4)."""
    return float(2 ** (bits - 1) - 1)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero: the rounding the Triton kernels implement with floor/ceil."""
    return torch.where(x >= 0, torch.floor(x + 0.5), torch.ceil(x - 0.5))


def num_blocks(n: int, block: int) -> int:
    return (n + block - 1) // block


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
    if pv_dtype == "fp8":
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
        values = (v * (1.0 / scale)[:, :, None, :]).to(torch.float8_e4m3fn).float()
    elif pv_dtype == "int8":
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
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


def dense_csr(num_heads: int, num_q_blocks: int, num_kv_blocks: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of a full mask: every query block keeps every KV block, in order."""
    counts = torch.full((num_heads, num_q_blocks), num_kv_blocks, dtype=torch.int32, device=device)
    indices = torch.arange(num_kv_blocks, dtype=torch.int32, device=device).expand(num_heads, num_q_blocks, -1).contiguous()
    return counts, indices


def block_mask_to_csr(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense boolean block mask [..., Mq, Nk] → (counts [..., Mq] int32, indices [..., Mq, Nk] int32).

    Kept KV blocks come first in ascending order, then the skipped blocks in ascending order (each row
    is a permutation of range(Nk)), so a kernel that prefetches past the count still reads a valid block.
    """
    mask = mask.bool()
    counts = mask.sum(-1, dtype=torch.int32)
    nk = mask.shape[-1]
    key = torch.where(mask, torch.arange(nk, device=mask.device), nk + torch.arange(nk, device=mask.device))
    return counts, key.argsort(dim=-1, stable=True).to(torch.int32).contiguous()


def kept_block_bits(mask: torch.Tensor) -> torch.Tensor:
    """Boolean block mask [..., Mq, Nk] → int32 [..., Mq, ceil(Nk/32)]: bit j % 32 of word j // 32 is set when KV
    block j is kept (what the kernel's skipped-block compensation reads to tell kept from skipped blocks)."""
    nk = mask.shape[-1]
    words = -(-nk // 32)
    padded = torch.nn.functional.pad(mask.bool(), (0, words * 32 - nk)).view(*mask.shape[:-1], words, 32)
    value = (padded.long() << torch.arange(32, device=mask.device)).sum(-1)
    return torch.where(value >= 2**31, value - 2**32, value).to(torch.int32).contiguous()


def _slot_weights(group: int, device) -> torch.Tensor:
    """int32 [group, 1]: the bit of each query block of a group in a grouped CSR's slot bits."""
    return (1 << torch.arange(group, device=device, dtype=torch.int32)).view(group, 1)


def grouped_block_csr(mask: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boolean block mask [..., Mq, Nk] → the CSR that 64-row kernel tiles walk when ``group`` query blocks share a
    tile: (counts [..., ⌈Mq/group⌉] int32, indices [..., ⌈Mq/group⌉, Nk] int32: the union of the group's kept blocks,
    ascending, then the rest, as `block_mask_to_csr`; slot_bits, indices' shape, int8: bit g set when query block
    group·t + g keeps the block in that slot). Each row still sees exactly its own blocks, in ascending order."""
    mask = mask.bool()
    *lead, mq, nk = mask.shape
    mqt = -(-mq // group)
    mask = torch.nn.functional.pad(mask, (0, 0, 0, mqt * group - mq)).view(*lead, mqt, group, nk)
    counts, indices = block_mask_to_csr(mask.any(-2))
    bits = (mask.to(torch.int32) * _slot_weights(group, mask.device)).sum(-2, dtype=torch.int32)
    return counts, indices, bits.gather(-1, indices.long()).to(torch.int8).contiguous()


def ungrouped_block_mask(counts: torch.Tensor, indices: torch.Tensor, slot_bits: torch.Tensor, group: int,
                         mq: int, num_kv_blocks: Optional[int] = None) -> torch.Tensor:
    """Inverse of `grouped_block_csr` (also of its `trim_csr` form: pass ``num_kv_blocks``, the mask's Nk, when the
    rows were trimmed): the boolean block mask [..., mq, Nk] of the query blocks."""
    *lead, mqt, width = indices.shape
    nk = width if num_kv_blocks is None else int(num_kv_blocks)
    slot = torch.arange(width, device=indices.device)
    valid = slot < counts.unsqueeze(-1).long()
    # Unused slots scatter into a spare column that is cut off (trimmed rows may repeat fill indices).
    target = torch.where(valid, indices.long(), torch.full_like(indices, nk, dtype=torch.long))
    bits = torch.zeros((*lead, mqt, nk + 1), dtype=torch.int32, device=indices.device)
    bits.scatter_(-1, target, torch.where(valid, slot_bits.to(torch.int32), 0))
    bits = bits[..., :nk]
    mask = (bits.unsqueeze(-2) & _slot_weights(group, indices.device)) != 0  # [..., mqt, group, nk]
    return mask.reshape(*lead, mqt * group, nk)[..., :mq, :]


def csr_to_block_mask(counts: torch.Tensor, indices: torch.Tensor, num_kv_blocks: Optional[int] = None) -> torch.Tensor:
    """Inverse of `block_mask_to_csr` (also of its `trim_csr` form: pass ``num_kv_blocks``, the mask's Nk, when the
    rows were trimmed): boolean [..., Mq, Nk]."""
    nk = indices.shape[-1] if num_kv_blocks is None else int(num_kv_blocks)
    slot = torch.arange(indices.shape[-1], device=indices.device)
    valid = slot < counts.unsqueeze(-1).long()
    # Unused slots write into a spare column that is cut off, so repeated fill indices never clear a kept block.
    target = torch.where(valid, indices.long(), torch.full_like(indices, nk, dtype=torch.long))
    mask = torch.zeros((*indices.shape[:-1], nk + 1), dtype=torch.bool, device=indices.device)
    return mask.scatter_(-1, target, True)[..., :nk]


INDEX_SLOT_MULTIPLE = 16


def largest_count(counts: torch.Tensor, indices: torch.Tensor, name: str = "kv_indices") -> int:
    """The largest kept count of a CSR (a host read), checked against its row width: a trimmed CSR (`trim_csr`) must
    hold every row's count."""
    largest = int(counts.max()) if counts.numel() else 0
    if largest > indices.shape[-1]:
        raise ValueError(f"{name} has {indices.shape[-1]} slots per row but a row keeps {largest} blocks; a trimmed CSR "
                         "(reference.trim_csr) must keep at least the largest count")
    return largest


def trim_csr(counts: torch.Tensor, indices: torch.Tensor, *slot_tensors: torch.Tensor,
             multiple: int = INDEX_SLOT_MULTIPLE) -> tuple[torch.Tensor, ...]:
    """A CSR (`block_mask_to_csr`, `grouped_block_csr`) in its compact form for plan constants: every row cut to the
    largest kept count (rounded up to a multiple of ``multiple``, at most Nk) and the indices stored as int16 when Nk
    allows. ``slot_tensors`` (e.g. grouped slot bits) share the indices' slots and are cut alike, keeping their dtype.

    A sparse row keeps a fraction of its Nk blocks, so this is several times smaller than the padded int32 CSR
    (measured sizes in docs/quality_tuning.md). The kernel and the reference read only slots below each row's count;
    readers that rebuild the mask (`csr_to_block_mask`, `ungrouped_block_mask`) need Nk passed explicitly."""
    nk = indices.shape[-1]
    largest = int(counts.max()) if counts.numel() else 0
    width = min(nk, max(1, -(-largest // multiple) * multiple))
    index_dtype = torch.int16 if nk <= torch.iinfo(torch.int16).max else torch.int32
    trimmed = [indices[..., :width].to(index_dtype).contiguous()]
    trimmed += [t[..., :width].contiguous() for t in slot_tensors]
    return (counts.to(torch.int32).contiguous(), *trimmed)


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
    kv_counts: Optional[torch.Tensor] = None,
    kv_indices: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    qk_bits: int = 8,
    pv_dtype: str = "fp8",
    block_m: int = 64,
    block_n: int = 64,
    compensate: bool = False,
) -> torch.Tensor:
    """Block-sparse, quantized attention; see the module docstring for the exact numerics.

    q, k, v: [B, H, N, D]; perm: [H, N] (None = identity); kv_counts: [H, ceil(N/block_m)];
    kv_indices: [H, ceil(N/block_m), W] with W = ceil(N/block_n), or fewer slots per row as long as every row's
    count fits (`trim_csr`), int16 or int32 (both None = dense). Returns [B, H, N, D] in q's dtype.
    ``compensate``: skipped KV blocks enter as pooled keys (module docstring, step 6).
    """
    if qk_bits not in QK_BITS:
        raise ValueError(f"qk_bits must be one of {QK_BITS}, got {qk_bits}")
    if pv_dtype not in PV_DTYPES:
        raise ValueError(f"pv_dtype must be one of {PV_DTYPES}, got {pv_dtype!r}")
    bsz, heads, n, d = q.shape
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(d)
    mq, nk = num_blocks(n, block_m), num_blocks(n, block_n)
    if kv_counts is None or kv_indices is None:
        kv_counts, kv_indices = dense_csr(heads, mq, nk, q.device)
    if (tuple(kv_counts.shape) != (heads, mq) or tuple(kv_indices.shape[:2]) != (heads, mq)
            or not 1 <= kv_indices.shape[-1] <= nk):
        raise ValueError(
            f"block mask has shape counts={tuple(kv_counts.shape)} indices={tuple(kv_indices.shape)}, "
            f"expected ({heads}, {mq}) and ({heads}, {mq}, {nk}) (or a trimmed last dim of at least the largest count) "
            f"for N={n}, block_m={block_m}, block_n={block_n}"
        )

    qf = permute_tokens(q, perm).float()
    kf = permute_tokens(k, perm).float()
    vf = permute_tokens(v, perm).float()

    if qk_bits == 16:
        q_vals, k_vals = qf * (sm_scale * LOG2E), kf
        q_scale = torch.ones(bsz, heads, mq, device=q.device)
        k_scale = torch.ones(bsz, heads, nk, device=q.device)
    else:
        kf = kf - kf.mean(dim=2, keepdim=True)
        q_vals, q_scale = quantize_blockwise(qf, block_m, qk_bits)
        k_vals, k_scale = quantize_blockwise(kf, block_n, qk_bits)
        q_scale = q_scale * (sm_scale * LOG2E)
    # Scores are dequantized with one combined factor q_scale·k_scale per block pair, as in the kernel.

    if pv_dtype == "fp16":
        v_vals, v_scale = vf, torch.ones(bsz, heads, d, device=q.device)
    else:
        v_vals, v_scale = quantize_v_per_channel(vf, pv_dtype)

    # Pad the token axis to whole blocks so blocks can be gathered by index.
    def pad_to(x: torch.Tensor, block: int) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, 0, 0, num_blocks(n, block) * block - n))

    q_blk = pad_to(q_vals, block_m).view(bsz, heads, mq, block_m, d)
    k_blk = pad_to(k_vals, block_n).view(bsz, heads, nk, block_n, d)
    v_blk = pad_to(v_vals, block_n).view(bsz, heads, nk, block_n, d)
    key_valid = (torch.arange(nk * block_n, device=q.device) < n).view(nk, block_n)

    m_i = torch.full((bsz, heads, mq, block_m), -math.inf, device=q.device)
    l_i = torch.zeros(bsz, heads, mq, block_m, device=q.device)
    acc = torch.zeros(bsz, heads, mq, block_m, d, device=q.device)
    counts = kv_counts.to(q.device).long()
    indices = kv_indices.to(q.device).long()
    head_index = torch.arange(heads, device=q.device)[:, None]
    # P is produced already multiplied by its quantization factor (448 for FP8, 127 for INT8) by folding
    # log2(factor) into the exponent, as the kernel does; the factor cancels between acc and l.
    p_log2 = P_LOG2[pv_dtype]
    for slot in range(largest_count(counts, indices)):
        active = (slot < counts)  # [H, Mq]
        j = indices[:, :, slot].clamp(0, nk - 1)  # [H, Mq]
        k_j = k_blk[:, head_index, j]  # [B, H, Mq, block_n, D]
        v_j = v_blk[:, head_index, j]
        s = torch.einsum("bhmid,bhmjd->bhmij", q_blk, k_j)
        s = s * combined_scale(q_scale[..., None, None] * k_scale[:, head_index, j][..., None, None], qk_bits)
        s = s.masked_fill(~key_valid[j][None, :, :, None, :], -math.inf)
        s = s.masked_fill(~active[None, :, :, None, None], -math.inf)
        m_i, alpha, p = _online_softmax_step(m_i, s, p_log2)
        l_i = l_i * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + torch.einsum("bhmij,bhmjd->bhmid", quantize_scaled_p(p, pv_dtype, v.dtype), v_j)
    if compensate and not bool((counts >= nk).all()):
        # Every skipped block enters the softmax as one pooled key: its mean (smoothed) K with weight
        # log2(token count) and its mean V. Operands are rounded to fp16 as the kernel's fp16 dots see them.
        cnt = key_valid.sum(-1).float()  # [nk]
        k_mean, v_mean = pooled_blocks(kf, vf, block_n, v_scale)
        q_half = q_blk.to(torch.float16).float()
        s_bar = torch.einsum("bhmid,bhjd->bhmij", q_half, k_mean.to(torch.float16).float())
        s_bar = s_bar * q_scale[..., None, None] + torch.log2(cnt)
        s_bar = s_bar.masked_fill(csr_to_block_mask(counts, indices, nk)[None, :, :, None, :], -math.inf)
        m_i, alpha, p = _online_softmax_step(m_i, s_bar, p_log2)
        l_i = l_i * alpha + p.sum(-1)
        pv = torch.einsum("bhmij,bhjd->bhmid", p.to(torch.float16).float(), v_mean.to(torch.float16).float())
        acc = acc * alpha[..., None] + pv
    out = acc * v_scale[:, :, None, None, :] / torch.where(l_i > 0, l_i, torch.ones_like(l_i))[..., None]
    out = out.view(bsz, heads, mq * block_m, d)[:, :, :n]
    return unpermute_tokens(out, perm).to(q.dtype)
