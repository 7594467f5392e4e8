"""Block masks: which KV blocks each query block of each head keeps, in the forms the kernels walk.

`BlockMask` is the value type (in the spirit of FlexAttention's ``BlockMask``): built once, when a plan is lowered
(`BlockMask.from_dense`), checked once (`BlockMask.validate`), and only unpacked by the op, the reference and the
Triton wrapper. Its tensors are what the kernels read:

- ``counts`` [H, R] and ``indices`` [H, R, W], int16 or int32 (`csr_dtype`): a CSR of kept KV blocks per row, ascending. A row
  is one query block (``group == 1``), or ``group`` consecutive query blocks that share one 64-row tensor-core tile
  (query blocks under 64 tokens: ``group = 64 // block_m``); then the row lists the union of their kept blocks and
  ``slot_bits`` [H, R, W] int8 says, per slot, which of the group's query blocks keep it (bit g = query block
  group·r + g). Rows may be *compact* (`trim_csr`): cut to the largest count (W ≥ every count), int16 counts and
  indices while Nk allows.
- ``kept_bits`` [H, Mq, ceil(Nk/32)] int32 (optional): bit j % 32 of word j // 32 set when query block i keeps KV
  block j; the kernel's skipped-block compensation reads them to tell kept from skipped blocks.

Two encodings hold a sparse mask (``encoding``, `MASK_ENCODINGS`): the CSR form above, and the *bitmap* form, which
stores only ``kept_bits`` (one bit per block, whatever the density) plus ``walk_width``, the slots per row of the
walk. The kernels still walk the CSR: `paro_compile.kernels.mask_decode` rebuilds it from the bits on the tensors'
device, one kernel launch per call, exactly as `BlockMask.from_dense` builds it (same counts, indices and slot bits,
so the attention result is the same bit for bit). The bitmap form is the smaller one unless the widest row keeps only
a small share of the KV blocks (`encoded_nbytes`); "auto" takes it where it saves at least `AUTO_BITMAP_MIN_SAVING`.

A dense mask is ``BlockMask.dense(...)`` (no tensors: the kernels walk every block). Tensors built from stacked
step-bucket masks [S, H, Mq, Nk] carry a leading S dimension; the lowering selects one bucket per call on the
device and the op receives single-bucket tensors. Only slots below a row's count are ever read, and the kernels
skip slots whose index lies outside [0, Nk), so a malformed CSR can never read out of bounds; `validate` rejects
such masks up front.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch


def num_blocks(n: int, block: int) -> int:
    return (n + block - 1) // block


def dense_csr(num_heads: int, num_q_blocks: int, num_kv_blocks: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of a full mask: every query block keeps every KV block, in order."""
    counts = torch.full((num_heads, num_q_blocks), num_kv_blocks, dtype=torch.int32, device=device)
    indices = torch.arange(num_kv_blocks, dtype=torch.int32, device=device).expand(num_heads, num_q_blocks, -1).contiguous()
    return counts, indices


def block_mask_to_csr(mask: torch.Tensor, width: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense boolean block mask [..., Mq, Nk] → (counts [..., Mq] int32, indices [..., Mq, W] int32).

    Each row lists its kept KV blocks in ascending order. With ``width`` None (W = Nk) the skipped blocks follow,
    ascending, so a full row is a permutation of range(Nk); with a ``width`` (the compact form, at least the largest
    count: `compact_width`) the slots past a row's count hold block 0 — any valid block, since only slots below the
    count are walked (kernels that prefetch clamp to the last kept slot). Linear in the mask's size.
    """
    mask = mask.bool()
    nk = mask.shape[-1]
    counts = mask.sum(-1, dtype=torch.int32)
    flat = mask.reshape(-1, nk)
    rows_per_chunk = max(1, (1 << 22) // max(nk, 1))  # bounds the int64 temporaries to a few tens of MB
    if width is None:
        out = torch.empty(flat.shape[0], nk, dtype=torch.int32, device=mask.device)
        blocks = torch.arange(nk, dtype=torch.int32, device=mask.device)
        flat_counts = counts.reshape(-1, 1)
        for start in range(0, flat.shape[0], rows_per_chunk):
            rows = flat[start:start + rows_per_chunk]
            kept_at = rows.cumsum(-1, dtype=torch.int32) - 1
            skipped_at = flat_counts[start:start + rows_per_chunk] + (~rows).cumsum(-1, dtype=torch.int32) - 1
            slot = torch.where(rows, kept_at, skipped_at).long()
            out[start:start + rows_per_chunk].scatter_(-1, slot, blocks.expand(rows.shape[0], -1))
        return counts, out.view(*mask.shape[:-1], nk)
    width = int(width)
    out = torch.zeros(flat.shape[0], width, dtype=torch.int32, device=mask.device)
    for start in range(0, flat.shape[0], rows_per_chunk):
        rows = flat[start:start + rows_per_chunk]
        row, col = rows.nonzero(as_tuple=True)  # row-major: each row's kept blocks ascending, rows one after another
        row_counts = rows.sum(-1)
        first = row_counts.cumsum(0) - row_counts
        slot = torch.arange(col.numel(), device=mask.device) - first[row]
        if slot.numel() and int(slot.max()) >= width:
            raise ValueError(f"a row keeps {int(slot.max()) + 1} blocks, more than the CSR width {width}")
        out[start + row, slot] = col.to(torch.int32)
    return counts, out.view(*mask.shape[:-1], width)


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


def compact_width(counts: torch.Tensor, num_kv_blocks: int, multiple: int = 16) -> int:
    """Slots per row of a compact CSR (`trim_csr`): the largest count rounded up to ``multiple``, at most Nk."""
    largest = int(counts.max()) if counts.numel() else 0
    return min(num_kv_blocks, max(1, -(-largest // multiple) * multiple))


def grouped_block_csr(mask: torch.Tensor, group: int, compact_multiple: Optional[int] = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boolean block mask [..., Mq, Nk] → the CSR that 64-row kernel tiles walk when ``group`` query blocks share a
    tile: (counts [..., ⌈Mq/group⌉] int32, indices [..., ⌈Mq/group⌉, Nk] int32: the union of the group's kept blocks,
    ascending, then the rest, as `block_mask_to_csr`; slot_bits, indices' shape, int8: bit g set when query block
    group·t + g keeps the block in that slot). Each row still sees exactly its own blocks, in ascending order."""
    mask = mask.bool()
    *lead, mq, nk = mask.shape
    mqt = -(-mq // group)
    mask = torch.nn.functional.pad(mask, (0, 0, 0, mqt * group - mq)).view(*lead, mqt, group, nk)
    union = mask.any(-2)
    width = None if compact_multiple is None else compact_width(union.sum(-1), nk, compact_multiple)
    counts, indices = block_mask_to_csr(union, width)
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


def csr_dtype(num_kv_blocks: int) -> torch.dtype:
    """dtype of a compact CSR's counts and indices: int16 while every block index and count fits (Nk ≤ 32,767), else
    int32. The kernels widen what they load to int32 before any arithmetic."""
    return torch.int16 if int(num_kv_blocks) <= torch.iinfo(torch.int16).max else torch.int32


def trim_csr(counts: torch.Tensor, indices: torch.Tensor, *slot_tensors: torch.Tensor,
             multiple: int = INDEX_SLOT_MULTIPLE, num_kv_blocks: Optional[int] = None) -> tuple[torch.Tensor, ...]:
    """A CSR (`block_mask_to_csr`, `grouped_block_csr`) in its compact form for plan constants: every row cut to the
    largest kept count (rounded up to a multiple of ``multiple``, at most Nk) and the indices stored as int16 when Nk
    allows, and so the counts (`csr_dtype`). ``slot_tensors`` (e.g. grouped slot bits) share the indices' slots and are
    cut alike, keeping their dtype.

    A sparse row keeps a fraction of its Nk blocks, so this is several times smaller than the padded int32 CSR
    (measured sizes in docs/quality_tuning.md). The kernel and the reference read only slots below each row's count;
    readers that rebuild the mask (`csr_to_block_mask`, `ungrouped_block_mask`) need Nk passed explicitly.
    ``num_kv_blocks`` (Nk; default the indices' width) must be given for rows already cut narrower than Nk: the dtype
    follows Nk, not the width."""
    nk = indices.shape[-1] if num_kv_blocks is None else int(num_kv_blocks)
    width = compact_width(counts, nk, multiple)
    index_dtype = csr_dtype(nk)
    trimmed = [indices[..., :width].to(index_dtype).contiguous()]
    trimmed += [t[..., :width].contiguous() for t in slot_tensors]
    return (counts.to(index_dtype).contiguous(), *trimmed)


# The bitmap form costs one more launch per call (the walk's decode). Where a site's CSR is small that host cost is
# what the call is bound by (image-size calls) and the memory saved is negligible, so "auto" keeps the CSR there and
# takes the bitmap where the saving is worth the device memory (video sites: megabytes per site and step bucket).
AUTO_BITMAP_MIN_SAVING = 1 << 20

BLOCK_SIZES = (16, 32, 64, 128)
TENSOR_FIELDS = ("counts", "indices", "slot_bits", "kept_bits")
SIZE_FIELDS = ("block_m", "block_n", "group", "num_q_blocks", "num_kv_blocks", "walk_width")
MASK_ENCODINGS = ("auto", "csr", "bitmap")
"""How `BlockMask.from_dense` stores a sparse mask: "csr" (counts, indices, slot bits), "bitmap" (kept bits only; the
walk is decoded per call) or "auto" (the one with fewer bytes, `encoded_nbytes`)."""


def bits_to_block_mask(kept_bits: torch.Tensor, num_kv_blocks: int) -> torch.Tensor:
    """Inverse of `kept_block_bits`: int32 words [..., Mq, ceil(Nk/32)] → boolean [..., Mq, Nk]."""
    shifts = torch.arange(32, device=kept_bits.device, dtype=torch.int32)
    bits = (kept_bits.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2)[..., :int(num_kv_blocks)].bool()


def walk_unions(mask: torch.Tensor, group: int) -> torch.Tensor:
    """Boolean [..., ⌈Mq/group⌉, Nk]: the blocks any query block of each walk row's group keeps."""
    *lead, mq, nk = mask.shape
    rows = -(-mq // group)
    padded = torch.nn.functional.pad(mask.bool(), (0, 0, 0, rows * group - mq))
    return padded.view(*lead, rows, group, nk).any(-2)


def encoded_nbytes(mask: torch.Tensor, block_m: int, *, kept_bits: bool = False,
                   slot_multiple: int = INDEX_SLOT_MULTIPLE) -> dict[str, int]:
    """Bytes of a sparse boolean mask [(S,) H, Mq, Nk] in each stored encoding, without building either:
    ``{"csr": compact CSR of the kernel's walk (+ kept bits when ``kept_bits``), "bitmap": the kept bits}``."""
    *lead, mq, nk = (int(x) for x in mask.shape)
    group = walk_group(block_m)
    unions = walk_unions(mask, group)
    width = compact_width(unions.sum(-1), nk, slot_multiple)
    heads_total = 1
    for size in lead:
        heads_total *= size
    rows = unions.shape[-2]
    index_bytes = torch.empty((), dtype=csr_dtype(nk)).element_size()
    bits = heads_total * mq * -(-nk // 32) * 4
    csr = heads_total * rows * index_bytes * (1 + width) + (heads_total * rows * width if group > 1 else 0)
    return {"csr": csr + (bits if kept_bits else 0), "bitmap": bits}


def walk_group(block_m: int) -> int:
    """Query blocks that share one 64-row kernel tile (Hopper's wgmma M): 64 // block_m for blocks under 64."""
    return max(1, 64 // block_m)


@dataclass(frozen=True)
class BlockMask:
    """A static block-sparse attention mask (see the module docstring for the tensor layouts)."""

    block_m: int
    block_n: int
    num_q_blocks: int
    num_kv_blocks: int
    counts: Optional[torch.Tensor] = None
    indices: Optional[torch.Tensor] = None
    group: int = 1
    slot_bits: Optional[torch.Tensor] = None
    kept_bits: Optional[torch.Tensor] = None
    density: float = 1.0
    """Kept blocks / all blocks (known when built from a dense mask; picks the kernel's autotune bucket)."""
    walk_width: int = 0
    """Bitmap form only: slots per row of the CSR walk decoded from ``kept_bits`` (`compact_width` of the walk rows'
    kept counts over every head and step bucket, so no call reads the bits to size it); 0 in the other forms."""

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def dense(cls, seq_len: int, block_m: int = 64, block_n: int = 64, *, kv_len: Optional[int] = None) -> "BlockMask":
        """Every block kept, for ``seq_len`` queries and ``kv_len`` keys (default: self-attention)."""
        return cls(block_m, block_n, num_blocks(seq_len, block_m),
                   num_blocks(seq_len if kv_len is None else kv_len, block_n))

    @classmethod
    def from_dense(cls, mask: torch.Tensor, block_m: int = 64, block_n: int = 64, *, kept_bits: bool = False,
                   compact: bool = True, slot_multiple: int = INDEX_SLOT_MULTIPLE,
                   encoding: str = "csr") -> "BlockMask":
        """From a boolean mask [(S,) H, Mq, Nk]: the walk the Triton kernel takes (grouped for blocks under 64),
        compact (`trim_csr`, rows rounded up to ``slot_multiple`` slots) unless ``compact=False``, with the kept-block
        words when ``kept_bits``. An all-ones mask gives `BlockMask.dense` (kept bits are never needed there: a dense
        row skips nothing).

        ``encoding`` (`MASK_ENCODINGS`): "csr" stores that walk; "bitmap" stores only the kept-block words and the
        walk's row width (``walk_width``), and the walk is decoded from them per call (`mask_decode`), the same
        tensors as the "csr" form of this ``mask``; "auto" stores the bitmap when it saves at least `AUTO_BITMAP_MIN_SAVING` bytes over the CSR (`encoded_nbytes`),
        else the CSR."""
        if encoding not in MASK_ENCODINGS:
            raise ValueError(f"encoding must be one of {MASK_ENCODINGS}, got {encoding!r}")
        mask = mask.bool()
        mq, nk = int(mask.shape[-2]), int(mask.shape[-1])
        if bool(mask.all()):
            return cls(block_m, block_n, mq, nk)
        group = walk_group(block_m)
        density = float(mask.float().mean())
        if encoding == "auto":
            sizes = encoded_nbytes(mask, block_m, kept_bits=kept_bits, slot_multiple=slot_multiple)
            saving = sizes["csr"] - sizes["bitmap"]
            encoding = "bitmap" if compact and saving >= AUTO_BITMAP_MIN_SAVING else "csr"
        if encoding == "bitmap":
            if not compact:
                raise ValueError("the bitmap encoding decodes to the compact walk; pass compact=True")
            width = compact_width(walk_unions(mask, group).sum(-1), nk, slot_multiple)
            return cls(block_m, block_n, mq, nk, group=group, kept_bits=kept_block_bits(mask), density=density,
                       walk_width=width)
        slot_bits = None
        if group > 1:
            counts, indices, slot_bits = grouped_block_csr(mask, group, compact_multiple=slot_multiple if compact else None)
        else:
            width = compact_width(mask.sum(-1), nk, slot_multiple) if compact else None
            counts, indices = block_mask_to_csr(mask, width)
        if compact:
            counts, indices, *rest = trim_csr(counts, indices, *([slot_bits] if slot_bits is not None else []),
                                              multiple=slot_multiple, num_kv_blocks=nk)
            slot_bits = rest[0] if rest else None
        return cls(block_m, block_n, mq, nk, counts, indices, group, slot_bits,
                   kept_block_bits(mask) if kept_bits else None, density)

    @classmethod
    def from_csr(cls, counts: torch.Tensor, indices: torch.Tensor, seq_len: int, block_m: int = 64,
                 block_n: int = 64, *, density: Optional[float] = None) -> "BlockMask":
        """From a per-query-block CSR (`block_mask_to_csr`, or its `trim_csr` form): what direct callers of the
        kernels pass. ``density`` defaults to the CSR's kept share (one host read)."""
        mq, nk = num_blocks(seq_len, block_m), num_blocks(seq_len, block_n)
        if density is None:
            density = float(counts.float().mean()) / max(nk, 1) if counts.numel() else 0.0
        return cls(block_m, block_n, mq, nk, counts, indices, 1, None, None, float(density))

    # ---- the op's arguments -------------------------------------------------------------------------------
    def as_op_args(self) -> tuple[list[Optional[torch.Tensor]], list[int]]:
        """(tensors in `TENSOR_FIELDS` order, sizes in `SIZE_FIELDS` order): how `paro::attention` carries a mask.
        A dense mask may carry 0 block counts: the op takes them from the sequence length."""
        return ([getattr(self, name) for name in TENSOR_FIELDS], [int(getattr(self, name)) for name in SIZE_FIELDS])

    @staticmethod
    def op_args_are_dense(tensors: Sequence[Optional[torch.Tensor]]) -> bool:
        """Whether `as_op_args` tensors stand for a dense mask (neither counts nor kept bits)."""
        fields = dict(zip(TENSOR_FIELDS, tensors))
        return fields.get("counts") is None and fields.get("kept_bits") is None

    @classmethod
    def from_op_args(cls, tensors: Sequence[Optional[torch.Tensor]], sizes: Sequence[int],
                     density: float = 1.0) -> "BlockMask":
        if len(tensors) != len(TENSOR_FIELDS) or len(sizes) != len(SIZE_FIELDS):
            raise ValueError(f"a block mask is carried as {len(TENSOR_FIELDS)} tensors {TENSOR_FIELDS} and "
                             f"{len(SIZE_FIELDS)} sizes {SIZE_FIELDS}; got {len(tensors)} and {len(sizes)}")
        return cls(**dict(zip(SIZE_FIELDS, (int(s) for s in sizes))), **dict(zip(TENSOR_FIELDS, tensors)),
                   density=float(density))

    # ---- views --------------------------------------------------------------------------------------------
    @property
    def is_dense(self) -> bool:
        return self.counts is None and self.kept_bits is None

    @property
    def is_bitmap(self) -> bool:
        """Only the kept bits are stored; the walk is decoded per call (`decoded`, `mask_decode.decode_walk`)."""
        return self.counts is None and self.kept_bits is not None

    @property
    def encoding(self) -> str:
        return "dense" if self.is_dense else ("bitmap" if self.is_bitmap else "csr")

    @property
    def row_width(self) -> int:
        if self.indices is not None:
            return int(self.indices.shape[-1])
        return self.walk_width if self.is_bitmap else self.num_kv_blocks

    def decoded(self) -> "BlockMask":
        """The CSR form of a bitmap-form mask (the same walk `from_dense` builds; kept bits kept), decoded with
        PyTorch ops (`mask_decode_reference`); other forms unchanged. The kernels use `mask_decode.decode_walk`."""
        if not self.is_bitmap:
            return self
        from paro_compile.kernels.mask_decode_reference import decode_walk_reference

        return decode_walk_reference(self)

    def to(self, device: torch.device) -> "BlockMask":
        moved = {name: getattr(self, name).to(device) for name in TENSOR_FIELDS if getattr(self, name) is not None}
        return replace(self, **moved)

    def bucket(self, index: int) -> "BlockMask":
        """One step bucket of a mask built from stacked [S, H, Mq, Nk] masks."""
        picked = {name: getattr(self, name)[index] for name in TENSOR_FIELDS if getattr(self, name) is not None}
        return replace(self, **picked)

    def to_dense(self) -> torch.Tensor:
        """Boolean [(S,) H, Mq, Nk] (a dense mask has no tensors: it keeps every block)."""
        if self.is_dense:
            raise ValueError("a dense BlockMask has no tensors to expand; use torch.ones(H, Mq, Nk)")
        if self.is_bitmap:
            return bits_to_block_mask(self.kept_bits, self.num_kv_blocks)
        if self.group > 1:
            return ungrouped_block_mask(self.counts, self.indices, self.slot_bits, self.group, self.num_q_blocks,
                                        self.num_kv_blocks)
        return csr_to_block_mask(self.counts, self.indices, self.num_kv_blocks)

    def block_csr(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-query-block CSR (what the reference walks); rebuilt from the grouped walk when ``group > 1``."""
        if self.is_dense:
            raise ValueError("a dense BlockMask has no CSR")
        if self.is_bitmap:
            return self.decoded().block_csr()
        if self.group == 1:
            return self.counts, self.indices
        return block_mask_to_csr(self.to_dense())

    def ungrouped(self) -> "BlockMask":
        """The same mask walked one query block per row (``group == 1``)."""
        if self.is_bitmap:
            return self.decoded().ungrouped()
        if self.is_dense or self.group == 1:
            return self
        counts, indices = self.block_csr()
        return replace(self, counts=counts, indices=indices, group=1, slot_bits=None)

    def grouped(self) -> "BlockMask":
        """The same mask walked in shared 64-row tiles (``group = 64 // block_m``) when its blocks are under 64."""
        group = walk_group(self.block_m)
        if self.is_bitmap:
            return self.decoded().grouped()
        if self.is_dense or self.group == group:
            return self
        counts, indices, slot_bits = grouped_block_csr(self.to_dense(), group)
        return replace(self, counts=counts, indices=indices, group=group, slot_bits=slot_bits)

    def with_kept_bits(self) -> "BlockMask":
        if self.is_dense or self.kept_bits is not None:
            return self
        return replace(self, kept_bits=kept_block_bits(self.to_dense()))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (getattr(self, n) for n in TENSOR_FIELDS) if t is not None)

    # ---- checks -------------------------------------------------------------------------------------------
    def validate(self, num_heads: int, seq_len: int, *, kv_len: Optional[int] = None) -> "BlockMask":
        """Raise ValueError naming the field when the mask does not fit ``num_heads`` heads of ``seq_len`` queries
        (and ``kv_len`` keys, default ``seq_len``) or its CSR is malformed (counts outside [0, W], an index outside
        [0, Nk) or repeated within a row's kept slots, slot bits naming query blocks past the end). The checks run on
        the tensors' device and read a few flags back: run it once per mask (the lowering does), not per call."""
        if self.block_m not in BLOCK_SIZES or self.block_n not in BLOCK_SIZES:
            raise ValueError(f"block sizes must be in {BLOCK_SIZES}, got block_m={self.block_m}, block_n={self.block_n}")
        kv_len = seq_len if kv_len is None else kv_len
        mq, nk = num_blocks(seq_len, self.block_m), num_blocks(kv_len, self.block_n)
        if (self.num_q_blocks, self.num_kv_blocks) != (mq, nk):
            raise ValueError(f"mask has {self.num_q_blocks}x{self.num_kv_blocks} blocks, N={seq_len} needs {mq}x{nk} "
                             f"(block_m={self.block_m}, block_n={self.block_n})")
        if self.is_dense:
            return self
        if self.group not in (1, walk_group(self.block_m)):
            raise ValueError(f"group must be 1 or {walk_group(self.block_m)} for block_m={self.block_m}, got {self.group}")
        self._validate_kept_bits(num_heads, mq, nk)
        if self.is_bitmap:
            return self._validate_bitmap(nk)
        if self.walk_width:
            raise ValueError(f"walk_width={self.walk_width} is set but the mask carries its CSR (counts, indices): "
                             "walk_width belongs to the bitmap form only; pass 0")
        if self.indices is None:
            raise ValueError("mask has counts but no indices")
        rows = -(-mq // self.group)
        width = self.row_width
        if tuple(self.counts.shape) != (num_heads, rows) or tuple(self.indices.shape[:2]) != (num_heads, rows):
            raise ValueError(f"mask counts {tuple(self.counts.shape)} / indices {tuple(self.indices.shape)} do not fit "
                             f"{num_heads} heads x {rows} rows (N={seq_len}, block_m={self.block_m}, group={self.group})")
        if not 1 <= width <= nk:
            raise ValueError(f"mask rows have {width} slots; expected 1..{nk} (Nk)")
        if self.counts.dtype not in (torch.int16, torch.int32) or self.indices.dtype not in (torch.int16, torch.int32):
            raise ValueError(f"mask counts must be int16/int32 and indices int16/int32, got {self.counts.dtype} / "
                             f"{self.indices.dtype}")
        if self.indices.dtype == torch.int16 and nk > torch.iinfo(torch.int16).max:
            raise ValueError(f"int16 mask indices cannot name {nk} KV blocks; build the mask with int32 indices "
                             "(BlockMask.from_dense picks the dtype)")
        counts = self.counts.long()
        if bool((counts < 0).any()) or bool((counts > width).any()):
            raise ValueError(f"mask counts must lie in [0, {width}] (the row width), got "
                             f"[{int(counts.min())}, {int(counts.max())}]")
        indices = self.indices.long()
        used = torch.arange(width, device=indices.device) < counts.unsqueeze(-1)
        bad = used & ((indices < 0) | (indices >= nk))
        if bool(bad.any()):
            raise ValueError(f"mask indices of kept slots must lie in [0, {nk}); found "
                             f"{int(indices[bad][0])} (head {int(bad.nonzero()[0][0])})")
        ordered = torch.where(used, indices, torch.full_like(indices, nk)).sort(-1).values
        if bool(((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] < nk)).any()):
            raise ValueError("mask lists a KV block twice in one row")
        if self.group > 1:
            if self.slot_bits is None or tuple(self.slot_bits.shape) != tuple(self.indices.shape):
                raise ValueError(f"a grouped mask needs slot_bits of the indices' shape {tuple(self.indices.shape)}")
            limit = torch.clamp(mq - torch.arange(rows, device=indices.device) * self.group, max=self.group)
            bits = self.slot_bits.to(torch.int32) & 0xFF
            if bool((used & (bits >= (1 << limit)[None, :, None])).any()):
                raise ValueError("mask slot_bits name query blocks past the last one")
        return self

    def _validate_kept_bits(self, num_heads: int, mq: int, nk: int) -> None:
        if self.kept_bits is None:
            return
        words = -(-nk // 32)
        if tuple(self.kept_bits.shape) != (num_heads, mq, words):
            raise ValueError(f"kept_bits has shape {tuple(self.kept_bits.shape)}, expected ({num_heads}, {mq}, {words})")
        if self.kept_bits.dtype != torch.int32:
            raise ValueError(f"kept_bits must be int32 words, got {self.kept_bits.dtype}")
        if nk % 32 and bool((self.kept_bits[..., -1] >> (nk % 32)).any()):
            raise ValueError(f"kept_bits sets bits past the last KV block ({nk}): bits {nk % 32}..31 of each row's "
                             "last word must be 0")

    def _validate_bitmap(self, nk: int) -> "BlockMask":
        """The bitmap form's own checks: the slot bits / indices it decodes to must fit ``walk_width`` slots."""
        if self.indices is not None or self.slot_bits is not None:
            raise ValueError("a bitmap-form mask (kept_bits without counts) carries no indices or slot_bits; "
                             "pass counts and indices together, or kept_bits alone")
        if not 1 <= self.walk_width <= nk:
            raise ValueError(f"walk_width must lie in [1, {nk}] (Nk) for a bitmap-form mask, got {self.walk_width}")
        widest = int(walk_unions(self.to_dense(), self.group).sum(-1).max())
        if widest > self.walk_width:
            raise ValueError(f"walk_width={self.walk_width} is narrower than the widest walk row ({widest} kept "
                             "blocks); build the mask with BlockMask.from_dense, which sizes it")
        return self
