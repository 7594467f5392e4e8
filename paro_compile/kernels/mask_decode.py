"""Decode a bitmap-form `BlockMask` into the CSR walk the attention kernels read, on the device, in one launch.

A bitmap-form mask (`BlockMask.from_dense(..., encoding="bitmap")`) keeps one bit per block resident instead of the
CSR, whose rows are as wide as the widest one (`docs/video_720p.md`, "What the plan costs in GPU memory"). Each call rebuilds the CSR
into fresh tensors: one program per (head, walk row) loads the row's words (the OR over its ``group`` query blocks
when query blocks share a 64-row tile), expands them to bits, places every kept block at its prefix count
(``tl.cumsum``), stores the row's count, and fills the slots past the count with block 0 (and block 0's slot bits),
exactly as `BlockMask.from_dense` does, so the attention result does not depend on the encoding.

Nothing is read back to the host: the row width is the mask's ``walk_width`` size and the outputs are allocated
through torch, so a call can be captured in a CUDA graph. `mask_decode_reference` is the same decode in PyTorch ops.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from paro_compile.kernels.block_mask import BlockMask, csr_dtype
from paro_compile.kernels.device_guard import first_tensor_device, runs_on_device_of
from paro_compile.kernels.launch import launch
from paro_compile.kernels.mask_decode_reference import decode_walk_reference
from paro_compile.ops import triton_available_for

CHUNK_WORDS = 32
"""Words (32 KV blocks each) one program expands per step of its walk row."""
FILL_SLOTS = 1024
"""Slots per step of the fill past a row's count."""


@triton.jit
def _decode_walk_kernel(KEPT, COUNTS, IDX, SLOT, MQ, NK, WORDS, ROWS, WIDTH,
                        GROUP: tl.constexpr, CHUNK: tl.constexpr, FILL: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    offs_w = tl.arange(0, CHUNK)
    bit = tl.arange(0, 32)
    out_base = (head * ROWS + row) * WIDTH
    total = tl.zeros([], dtype=tl.int32)
    for w0 in range(0, WORDS, CHUNK):
        in_row = (w0 + offs_w) < WORDS
        union = tl.zeros([CHUNK], dtype=tl.int32)
        group_bits = tl.zeros([CHUNK, 32], dtype=tl.int32)
        for g in tl.static_range(GROUP):
            q_block = row * GROUP + g
            # Masks are built as full vectors: the interpreter rejects a vector mask combined with a scalar one.
            load = in_row & ((offs_w * 0 + q_block) < MQ)
            words = tl.load(KEPT + (head * MQ + q_block) * WORDS + w0 + offs_w, mask=load, other=0)
            union = union | words
            if GROUP > 1:
                group_bits = group_bits | (((words[:, None] >> bit[None, :]) & 1) << g)
        cols = w0 * 32 + tl.arange(0, CHUNK * 32)
        kept = tl.reshape((union[:, None] >> bit[None, :]) & 1, [CHUNK * 32])
        kept = tl.where(cols < NK, kept, 0)
        slot = total + tl.cumsum(kept, 0) - 1
        store = (kept != 0) & (slot < WIDTH)
        tl.store(IDX + out_base + slot, cols.to(IDX.dtype.element_ty), mask=store)
        if GROUP > 1:
            tl.store(SLOT + out_base + slot, tl.reshape(group_bits, [CHUNK * 32]).to(tl.int8), mask=store)
        total += tl.sum(kept, 0)
    tl.store(COUNTS + head * ROWS + row, tl.minimum(total, WIDTH).to(COUNTS.dtype.element_ty))
    # Slots past the count hold block 0 (and, grouped, the group's bits of block 0), as the CSR form stores them.
    first_bits = tl.zeros([], dtype=tl.int32)
    if GROUP > 1:
        for g in tl.static_range(GROUP):
            q_block = row * GROUP + g
            first_word = tl.sum(tl.load(KEPT + (head * MQ + q_block) * WORDS + offs_w,
                                        mask=(offs_w == 0) & ((offs_w * 0 + q_block) < MQ), other=0), 0)
            first_bits = first_bits | ((first_word & 1) << g)
    for s0 in range(0, WIDTH, FILL):
        slot = s0 + tl.arange(0, FILL)
        unused = (slot >= total) & (slot < WIDTH)
        tl.store(IDX + out_base + slot, tl.zeros([FILL], dtype=IDX.dtype.element_ty), mask=unused)
        if GROUP > 1:
            tl.store(SLOT + out_base + slot, tl.zeros([FILL], dtype=tl.int32).to(tl.int8) + first_bits.to(tl.int8),
                     mask=unused)


@runs_on_device_of(first_tensor_device)
def decode_walk(mask: BlockMask) -> BlockMask:
    """The CSR form of a bitmap-form ``mask`` (single-bucket or stacked tensors), decoded on its tensors' device by
    one Triton launch (CUDA, or the CPU under ``TRITON_INTERPRET=1``); ``kept_bits`` stays. Other forms are returned
    unchanged. ``kept_bits`` must be contiguous int32 words (`BlockMask.validate` checks the dtype); nothing is read
    back to the host. On a device Triton cannot launch on (the CPU without the interpreter) the PyTorch decode
    (`mask_decode_reference`) gives the same tensors."""
    if not mask.is_bitmap:
        return mask
    kept = mask.kept_bits
    if not triton_available_for(kept.device):
        return decode_walk_reference(mask)
    if kept.dtype != torch.int32 or not kept.is_contiguous():
        kept = kept.to(torch.int32).contiguous()
    *lead, mq, words = kept.shape
    heads = 1
    for size in lead:
        heads *= int(size)
    group, width = int(mask.group), int(mask.walk_width)
    rows = -(-int(mq) // group)
    dtype = csr_dtype(mask.num_kv_blocks)
    counts = torch.empty((*lead, rows), dtype=dtype, device=kept.device)
    indices = torch.empty((*lead, rows, width), dtype=dtype, device=kept.device)
    slot_bits = torch.empty((*lead, rows, width), dtype=torch.int8, device=kept.device) if group > 1 else None
    if heads and rows and width:
        launch(_decode_walk_kernel, (rows, heads),
               (kept, counts, indices, slot_bits if slot_bits is not None else indices,
                int(mq), int(mask.num_kv_blocks), int(words), rows, width),
               (("GROUP", group), ("CHUNK", CHUNK_WORDS), ("FILL", FILL_SLOTS), ("num_warps", 4)), kept.device)
    return replace(mask, counts=counts, indices=indices, slot_bits=slot_bits, kept_bits=kept, walk_width=0)
