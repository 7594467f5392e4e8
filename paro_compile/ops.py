"""The `paro::attention` custom op: what the lowering pass puts in place of SDPA.

A `torch.library.custom_op` with a fake impl (not `triton_op`: under TRITON_INTERPRET=1 a triton_op
fails in every torch.compile backend on torch 2.13, see DESIGN.md). Inductor treats it as an opaque
extern call, so everything around it keeps Inductor's codegen.

Dispatch of ``impl``:
- ``"reference"``: `paro_compile.kernels.reference` (pure PyTorch; any device).
- ``"triton"``: the Triton kernels (CUDA, or the CPU under TRITON_INTERPRET=1).
- ``"auto"``: Triton on CUDA, the reference elsewhere.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from paro_compile.kernels.reference import block_mask_to_csr, paro_attention_reference, ungrouped_block_mask

IMPLS = ("auto", "reference", "triton")


def triton_available_for(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


@torch.library.custom_op("paro::attention", mutates_args=())
def paro_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    perm: Optional[torch.Tensor],
    kv_counts: Optional[torch.Tensor],
    kv_indices: Optional[torch.Tensor],
    scale: float,
    qk_bits: int,
    pv_dtype: str,
    block_m: int,
    block_n: int,
    impl: str,
    density: float = -1.0,
    compensate: bool = False,
    kv_kept_bits: Optional[torch.Tensor] = None,
    group_counts: Optional[torch.Tensor] = None,
    group_indices: Optional[torch.Tensor] = None,
    group_bits: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Block-sparse low-bit attention over q, k, v [B, H, N, D]; returns [B, H, N, D] in model order.

    ``density`` (kept blocks / all blocks, known when the plan is lowered) picks the kernel's autotune
    bucket without reading ``kv_counts`` back from the device; -1 = measure it (one host sync per new
    mask tensor). ``compensate``: skipped KV blocks take part as one pooled key each (block-mean K/V;
    `paro_compile.kernels.reference`, step 6); no effect on dense masks. ``kv_kept_bits`` (optional): the
    mask's kept blocks as `reference.kept_block_bits` words, for the Triton kernel (derived when absent).
    ``group_counts`` / ``group_indices`` / ``group_bits`` (optional, block_m < 64): `reference.grouped_block_csr`
    of the mask with group 64 // block_m, the walk of the Triton kernel's shared 64-row tiles (derived per call when
    absent). They may stand for the mask alone (``kv_counts`` / ``kv_indices`` None): the lowering stores only them
    for blocks under 64 rows, which the kernel needs, and the reference then rebuilds the per-block CSR.
    Index tensors may be compact (`reference.trim_csr`: rows cut to the largest count, int16), as plans store them."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    use_triton = impl == "triton" or (impl == "auto" and q.device.type == "cuda")
    grouped_only = (kv_counts is None or kv_indices is None) and group_counts is not None
    if grouped_only and (group_indices is None or group_bits is None or block_m >= 64):
        raise ValueError("a mask given by its grouped CSR alone needs group_counts, group_indices and group_bits "
                         f"(reference.grouped_block_csr) and block_m < 64 (got block_m={block_m}); otherwise pass "
                         "kv_counts / kv_indices")
    if grouped_only and not use_triton:  # the reference walks per query block: rebuild that CSR
        mask = ungrouped_block_mask(group_counts, group_indices, group_bits, 64 // block_m,
                                    -(-q.shape[2] // block_m), -(-q.shape[2] // block_n))
        kv_counts, kv_indices = block_mask_to_csr(mask)
    kwargs = dict(
        perm=perm, kv_counts=kv_counts, kv_indices=kv_indices, scale=scale, qk_bits=qk_bits,
        pv_dtype=pv_dtype, block_m=block_m, block_n=block_n, compensate=compensate,
    )
    if use_triton:
        if not triton_available_for(q.device):
            raise RuntimeError(
                f"impl='triton' needs CUDA tensors (got {q.device}); on the CPU set TRITON_INTERPRET=1 "
                "before importing paro_compile, or use impl='reference'"
            )
        from paro_compile.kernels.attention import paro_attention_triton

        grouped = None
        if group_counts is not None and group_indices is not None and group_bits is not None:
            grouped = (group_counts, group_indices, group_bits)
        out = paro_attention_triton(q, k, v, density=density if density >= 0 else None, kv_kept_bits=kv_kept_bits,
                                    grouped=grouped, **kwargs)
    else:
        out = paro_attention_reference(q, k, v, **kwargs)
    # The fake impl promises a contiguous result; Inductor asserts the strides.
    return out.contiguous()


@paro_attention.register_fake
def _paro_attention_fake(q, k, v, perm, kv_counts, kv_indices, scale, qk_bits, pv_dtype, block_m, block_n, impl,
                         density=-1.0, compensate=False, kv_kept_bits=None, group_counts=None, group_indices=None,
                         group_bits=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
