"""The walk of a bitmap-form `BlockMask` rebuilt with PyTorch ops: the definition `mask_decode`'s Triton kernel is
checked against, and what the reference implementation and CPU callers decode with.

A bitmap-form mask stores one bit per (query block, KV block) (``kept_bits``) and the walk's row width
(``walk_width``). Its walk is the CSR `BlockMask.from_dense` builds for the same boolean mask: per walk row (one query
block, or ``group`` of them sharing a 64-row tile) the kept KV blocks of the row (the union over the group) in
ascending order, then block 0 in every slot up to ``walk_width``; counts and indices in `csr_dtype` (Nk); for
``group > 1`` the int8 slot bits of each slot (bit g: query block group·r + g keeps it), the unused slots holding
block 0's bits.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from paro_compile.kernels.block_mask import (BlockMask, _slot_weights, bits_to_block_mask, block_mask_to_csr,
                                             csr_dtype, walk_unions)


def decode_walk_reference(mask: BlockMask) -> BlockMask:
    """The CSR form of a bitmap-form ``mask`` (tensors with or without a leading step-bucket dimension), on its
    device; ``kept_bits`` stays (skipped-block compensation reads it). Other forms are returned unchanged."""
    if not mask.is_bitmap:
        return mask
    counts, indices, slot_bits = decode_walk_tensors(mask.kept_bits, mask.group, mask.num_q_blocks,
                                                     mask.num_kv_blocks, mask.walk_width)
    return replace(mask, counts=counts, indices=indices, slot_bits=slot_bits, walk_width=0)


def decode_walk_tensors(kept_bits: torch.Tensor, group: int, num_q_blocks: int, num_kv_blocks: int,
                        width: int) -> tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]:
    """(counts [..., R], indices [..., R, width], slot bits [..., R, width] int8 or None when ``group == 1``) of the
    walk of ``kept_bits`` [..., Mq, ⌈Nk/32⌉], R = ⌈Mq/group⌉. Raises ValueError when a row keeps more than
    ``width`` blocks."""
    mask = bits_to_block_mask(kept_bits, num_kv_blocks)
    if mask.shape[-2] != num_q_blocks:
        raise ValueError(f"kept_bits has {mask.shape[-2]} query-block rows, expected {num_q_blocks}")
    dtype = csr_dtype(num_kv_blocks)
    union = walk_unions(mask, group) if group > 1 else mask
    counts, indices = block_mask_to_csr(union, width)
    slot_bits = None
    if group > 1:
        *lead, mq, nk = mask.shape
        rows = union.shape[-2]
        padded = torch.nn.functional.pad(mask, (0, 0, 0, rows * group - mq)).view(*lead, rows, group, nk)
        bits = (padded.to(torch.int32) * _slot_weights(group, mask.device)).sum(-2, dtype=torch.int32)
        slot_bits = bits.gather(-1, indices.long()).to(torch.int8).contiguous()
    return counts.to(dtype).contiguous(), indices.to(dtype).contiguous(), slot_bits
