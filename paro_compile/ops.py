"""The `paro::attention` custom op (what the lowering pass puts in place of SDPA) and `paro_attention`, its
Python entry point.

A `torch.library.custom_op` with a fake impl (not `triton_op`: under TRITON_INTERPRET=1 a triton_op
fails in every torch.compile backend on torch 2.13, see docs/DESIGN_NOTES.md). Inductor treats it as an opaque
extern call, so everything around it keeps Inductor's codegen. The block mask travels as `BlockMask.as_op_args`
(its tensors and sizes), the way FlexAttention's higher-order op carries its ``BlockMask``.

Dispatch of ``impl``:
- ``"reference"``: `paro_compile.kernels.reference` (pure PyTorch; any device).
- ``"triton"``: the portable Triton kernels (CUDA, or the CPU under TRITON_INTERPRET=1).
- ``"hopper"``: the Gluon kernel for sm_90 (`kernels.attention_hopper`; an error where it does not run the call).
- ``"auto"``: on CUDA the Hopper kernel where `attention_hopper.available` and `.supports` say it runs the call,
  else the Triton kernels; the reference elsewhere.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from paro_compile import envs
from paro_compile.kernels.block_mask import BlockMask
from paro_compile.kernels.reference import paro_attention_reference

IMPLS = ("auto", "reference", "triton", "hopper")


def triton_available_for(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return device.type == "cpu" and bool(envs.TRITON_INTERPRET)


def check_permutation(perm: torch.Tensor, heads: int, seq_len: int) -> None:
    """Raise ValueError unless ``perm`` [heads, seq_len] holds a permutation of range(seq_len) in every row."""
    if tuple(perm.shape) != (heads, seq_len):
        raise ValueError(f"perm has shape {tuple(perm.shape)}, expected ({heads}, {seq_len})")
    if perm.dtype not in (torch.int16, torch.int32, torch.int64):
        raise ValueError(f"perm must be an integer tensor, got {perm.dtype}")
    rows = perm.long().cpu()
    if bool(((rows < 0) | (rows >= seq_len)).any()):
        raise ValueError(f"perm holds values outside [0, {seq_len}): every row must be a permutation of the tokens")
    if not torch.equal(rows.sort(-1).values, torch.arange(seq_len).expand(heads, -1)):
        bad = int((rows.sort(-1).values != torch.arange(seq_len)).any(-1).nonzero()[0][0])
        raise ValueError(f"perm row {bad} repeats a token: every row must be a permutation of range({seq_len})")


@torch.library.custom_op("paro::attention", mutates_args=())
def paro_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    perm: Optional[torch.Tensor],
    key_bias: Optional[torch.Tensor],
    mask_tensors: list[Optional[torch.Tensor]],
    mask_sizes: list[int],
    scale: float,
    qk_bits: int,
    pv_dtype: str,
    compensate: bool,
    density: float,
    impl: str,
) -> torch.Tensor:
    """Block-sparse low-bit attention of q [B, H, N, D] over k, v [B, H, Nk, D]; returns [B, H, N, D] in model order.

    ``key_bias`` [B or 1, H or 1, Nk] (fp32, added to the scores; -inf masks a key): a key-padding mask
    (`kernels.reference`, step 7). ``mask_tensors`` / ``mask_sizes`` / ``density``: a `BlockMask` as
    `BlockMask.as_op_args` gives it. Compiled graphs pass masks and permutations the lowering has validated once; a
    mask or permutation on the CPU is validated here on every call (cheap, no device sync), and on the GPU the kernels
    never read or write outside their tensors whatever the indices hold. Head dims the kernels do not tile (e.g. 96)
    run zero-padded to the next power of two, which leaves every score and output channel unchanged."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    mask = BlockMask.from_op_args(mask_tensors, mask_sizes, density)
    bsz, heads, n, head_dim = q.shape
    n_kv = k.shape[2]
    if mask.is_dense:  # a dense mask's block counts follow N (they may be symbolic in the graph: passed as 0)
        mask = BlockMask.dense(n, mask.block_m, mask.block_n, kv_len=n_kv)
    if mask.counts is not None and mask.counts.device.type == "cpu":
        mask.validate(heads, n, kv_len=n_kv)
    if perm is not None and perm.device.type == "cpu":
        check_permutation(perm, heads, n)
    kwargs = dict(perm=perm, mask=mask, key_bias=key_bias, scale=scale, qk_bits=qk_bits, pv_dtype=pv_dtype,
                  compensate=compensate)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if scale <= 0:
        # The kernels fold a positive scale into Q's quantization scale; q·k·s = (-q)·k·|s| and s = 0 is uniform
        # attention (every score 0), so both run exactly as a positive scale on a transformed q.
        q, scale = (-q, -scale) if scale < 0 else (torch.zeros_like(q), 1.0)
        kwargs["scale"] = scale
    use_kernel = impl in ("triton", "hopper") or (impl == "auto" and q.device.type == "cuda")
    if use_kernel and kernel_head_dim(head_dim) != head_dim:
        pad = (0, kernel_head_dim(head_dim) - head_dim)
        q, k, v = (torch.nn.functional.pad(x, pad) for x in (q, k, v))
    if impl in ("hopper", "auto") and q.device.type == "cuda":
        from paro_compile.kernels import attention_hopper

        runs_here = attention_hopper.available(q.device) and key_bias is None and n_kv == n and \
            attention_hopper.supports(qk_bits, pv_dtype, mask.block_m, mask.block_n, q.shape[-1],
                                      compensate and not mask.is_dense, dtype=q.dtype)
        if impl == "hopper" and not runs_here:
            raise ValueError(f"impl='hopper' cannot run this call (device {q.device}, qk_bits={qk_bits}, "
                             f"pv_dtype={pv_dtype!r}, blocks {mask.block_m}x{mask.block_n}, head_dim {head_dim}, "
                             f"compensate={compensate}, key bias={key_bias is not None}, Nk={n_kv} for N={n}, "
                             f"dtype {q.dtype}); use impl='auto' or 'triton'")
        if runs_here and (impl == "hopper" or attention_hopper.SELECTED_BY_AUTO):
            out = attention_hopper.paro_attention_hopper_qkv(q, k, v, perm=perm, mask=mask, scale=scale,
                                                             pv_dtype=pv_dtype)
            return out[..., :head_dim].contiguous()
    if use_kernel:
        if not triton_available_for(q.device):
            raise RuntimeError(
                f"impl='triton' needs CUDA tensors (got {q.device}); on the CPU set TRITON_INTERPRET=1 "
                "before importing paro_compile, or use impl='reference'"
            )
        from paro_compile.kernels.attention import paro_attention_triton

        out = paro_attention_triton(q, k, v, **kwargs)
    else:
        out = paro_attention_reference(q, k, v, **kwargs)
    # The fake impl promises a contiguous result; Inductor asserts the strides.
    return out[..., :head_dim].contiguous()


@paro_attention_op.register_fake
def _paro_attention_fake(q, k, v, perm, key_bias, mask_tensors, mask_sizes, scale, qk_bits, pv_dtype, compensate,
                         density, impl):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


KERNEL_HEAD_DIMS = (16, 32, 64, 128, 256)


def kernel_head_dim(head_dim: int) -> int:
    """The head dim the kernels run a call of ``head_dim`` at: the next power of two they tile (zero padding)."""
    for size in KERNEL_HEAD_DIMS:
        if head_dim <= size:
            return size
    raise ValueError(f"head_dim {head_dim} is larger than the kernels' {KERNEL_HEAD_DIMS[-1]}")


def paro_attention(
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
    impl: str = "auto",
) -> torch.Tensor:
    """`paro::attention` on q [B, H, N, D] and k, v [B, H, Nk, D] (model token order) with a per-head token order
    ``perm`` [H, N], a `BlockMask` (None: dense, 64-token blocks) and a key-padding ``key_bias`` [B|1, H|1, Nk].
    Same numerics as `kernels.reference` (its docstring)."""
    mask = mask if mask is not None else BlockMask.dense(q.shape[2], kv_len=k.shape[2])
    tensors, sizes = mask.as_op_args()
    return paro_attention_op(q, k, v, perm, key_bias, tensors, sizes,
                             float(scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])),
                             qk_bits, pv_dtype, compensate, float(mask.density), impl)
