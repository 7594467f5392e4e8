"""Bitmap-form `BlockMask`s: the decode of their walk (`mask_decode.decode_walk`, Triton, and its PyTorch reference)
gives exactly the CSR `BlockMask.from_dense` builds, and `validate` rejects malformed bitmap masks by field."""
import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st

from paro_compile.kernels.block_mask import AUTO_BITMAP_MIN_SAVING, BlockMask, encoded_nbytes, kept_block_bits
from paro_compile.kernels.mask_decode import decode_walk
from paro_compile.kernels.mask_decode_reference import decode_walk_reference
from paro_kernel_helpers import kernel_device

WALK_FIELDS = ("counts", "indices", "slot_bits")


def assert_same_walk(decoded: BlockMask, built: BlockMask) -> None:
    """The decoded walk is the CSR form's, tensor for tensor: same dtypes, shapes and every slot (unused ones too)."""
    assert decoded.is_bitmap is False and decoded.group == built.group
    for name in WALK_FIELDS:
        a, b = getattr(decoded, name), getattr(built, name)
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(a, b), (name, a, b)


def decode_on_kernel_device(bitmap: BlockMask) -> BlockMask:
    """The Triton decode where it runs in this process (CUDA, else the CPU interpreter), brought back to the CPU."""
    return decode_walk(bitmap.to(kernel_device())).to("cpu")


def check_decodes(mask: torch.Tensor, block: int) -> BlockMask:
    built = BlockMask.from_dense(mask, block, block, kept_bits=True)
    bitmap = BlockMask.from_dense(mask, block, block, encoding="bitmap")
    assert bitmap.is_bitmap and not bitmap.is_dense and bitmap.encoding == "bitmap"
    assert bitmap.counts is None and bitmap.indices is None and bitmap.slot_bits is None
    assert torch.equal(bitmap.kept_bits, built.kept_bits) and bitmap.walk_width == built.row_width
    assert bitmap.density == built.density and torch.equal(bitmap.to_dense(), mask)
    for decoded in (decode_on_kernel_device(bitmap), decode_walk_reference(bitmap), bitmap.decoded()):
        assert_same_walk(decoded, built)
        assert decoded.kept_bits is bitmap.kept_bits or torch.equal(decoded.kept_bits, bitmap.kept_bits)
    return bitmap


@pytest.mark.parametrize("block", [16, 32, 64, 128])
@pytest.mark.parametrize("heads,mq,nk", [(1, 5, 33), (2, 9, 70), (3, 6, 100)])
def test_decode_equals_the_csr_form(gen, block, heads, mq, nk):
    """Odd Nk (not a multiple of 32, several words), grouped (blocks under 64) and not, one head; an empty row and a
    full row in every mask."""
    mask = torch.rand(heads, mq, nk, generator=gen) < 0.3
    mask[0, 0] = False
    mask[-1, -1] = True
    bitmap = check_decodes(mask, block)
    assert bitmap.group == max(1, 64 // block)


@pytest.mark.parametrize("block", [16, 64])
def test_decode_of_stacked_step_buckets(gen, block):
    """[S, H, Mq, Nk] masks (the lowering's step buckets): one walk width for every bucket, each bucket decodes to the
    CSR form's bucket."""
    mask = torch.rand(3, 2, 7, 45, generator=gen) < torch.tensor([0.1, 0.5, 0.9]).view(3, 1, 1, 1)
    built = BlockMask.from_dense(mask, block, block)
    bitmap = BlockMask.from_dense(mask, block, block, encoding="bitmap")
    assert_same_walk(decode_on_kernel_device(bitmap), built)
    for s in range(3):
        assert_same_walk(decode_on_kernel_device(bitmap.bucket(s)), built.bucket(s))


def test_decode_of_rows_wider_than_one_chunk(gen):
    """Rows of more KV blocks than one program step expands (`mask_decode.CHUNK_WORDS` words), and rows whose count
    lands past a fill step: the running offset carries over from chunk to chunk."""
    from paro_compile.kernels import mask_decode

    nk = mask_decode.CHUNK_WORDS * 32 + 37
    mask = torch.rand(1, 3, nk, generator=gen) < torch.tensor([0.02, 0.6, 1.0]).view(1, 3, 1)
    check_decodes(mask, 64)
    check_decodes(mask, 32)


def test_decode_on_a_device_triton_cannot_launch_on_uses_the_pytorch_decode(gen, monkeypatch):
    """CPU tensors without the interpreter (a GPU machine's CPU copy of a plan): `decode_walk` gives the PyTorch
    decode's tensors instead of handing CPU pointers to a CUDA launch."""
    from paro_compile.kernels import mask_decode

    mask = torch.rand(2, 6, 40, generator=gen) < 0.3
    bitmap = BlockMask.from_dense(mask, 32, 32, encoding="bitmap")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(mask_decode, "_decode_walk_kernel", None)  # any launch would fail
    assert_same_walk(decode_walk(bitmap), BlockMask.from_dense(mask, 32, 32))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 9), st.integers(1, 70), st.floats(0.0, 1.0), st.sampled_from([16, 32, 64, 128]),
       st.integers(0, 2**31 - 1))
def test_decode_property(heads, mq, nk, p, block, seed):
    mask = torch.rand(heads, mq, nk, generator=torch.Generator().manual_seed(seed)) < p
    if bool(mask.all()):
        assert BlockMask.from_dense(mask, block, block, encoding="bitmap").is_dense
        return
    check_decodes(mask, block)


def test_auto_encoding_takes_the_bitmap_where_it_saves_memory(gen):
    """"auto" keeps the CSR unless the bitmap saves at least `AUTO_BITMAP_MIN_SAVING` bytes (small sites keep one
    launch per call); `encoded_nbytes` gives the bytes each form would take, exactly."""
    sparse = torch.zeros(2, 40, 400, dtype=torch.bool)
    sparse[..., :3] = True  # rows of 3 kept blocks: a 16-slot CSR row (34 bytes) beats 13 words (52 bytes)
    wide = torch.rand(2, 40, 400, generator=gen) < 0.3
    for mask in (sparse, wide):
        for block, kept in ((64, False), (16, False), (64, True)):
            sizes = encoded_nbytes(mask, block, kept_bits=kept)
            csr = BlockMask.from_dense(mask, block, block, kept_bits=kept, encoding="csr")
            bitmap = BlockMask.from_dense(mask, block, block, kept_bits=kept, encoding="bitmap")
            assert (sizes["csr"], sizes["bitmap"]) == (csr.nbytes, bitmap.nbytes)
            auto = BlockMask.from_dense(mask, block, block, kept_bits=kept, encoding="auto")
            expected = "bitmap" if csr.nbytes - bitmap.nbytes >= AUTO_BITMAP_MIN_SAVING else "csr"
            assert auto.encoding == expected and auto.nbytes == (bitmap if expected == "bitmap" else csr).nbytes
        # these masks are small: the bitmap saves under a MiB, the CSR stays
        assert BlockMask.from_dense(mask, 64, 64, encoding="auto").encoding == "csr"
    # a video-sized site (24 heads, 1,200 x 1,200 blocks, every row wide): the bitmap saves tens of MiB
    video = torch.rand(24, 1200, 1200, generator=gen) < 0.3
    sizes = encoded_nbytes(video, 64)
    assert sizes["csr"] - sizes["bitmap"] >= AUTO_BITMAP_MIN_SAVING
    assert BlockMask.from_dense(video, 64, 64, encoding="auto").encoding == "bitmap"
    with pytest.raises(ValueError, match="encoding must be one of"):
        BlockMask.from_dense(wide, encoding="bits")
    with pytest.raises(ValueError, match="compact=True"):
        BlockMask.from_dense(wide, encoding="bitmap", compact=False)


def test_bitmap_mask_through_the_op_args_and_views(gen):
    mask = torch.rand(2, 2, 5, 9, generator=gen) < 0.4
    bitmap = BlockMask.from_dense(mask, 32, 32, encoding="bitmap")
    tensors, sizes = bitmap.bucket(1).as_op_args()
    assert tensors[:3] == [None, None, None] and sizes[-1] == bitmap.walk_width
    again = BlockMask.from_op_args(tensors, sizes, bitmap.density)
    assert again.is_bitmap and not BlockMask.op_args_are_dense(tensors) and again.walk_width == bitmap.walk_width
    assert torch.equal(again.to_dense(), mask[1])
    csr = BlockMask.from_dense(mask[1], 32, 32)
    assert torch.equal(again.block_csr()[0], csr.block_csr()[0]) and torch.equal(again.block_csr()[1], csr.block_csr()[1])
    assert torch.equal(again.ungrouped().to_dense(), mask[1]) and again.grouped().group == 2
    assert again.with_kept_bits() is again and again.row_width == bitmap.walk_width
    assert BlockMask.op_args_are_dense(BlockMask.dense(64).as_op_args()[0])


def _bitmap(gen, block=64, heads=2, mq=3, nk=40):
    mask = torch.rand(heads, mq, nk, generator=gen) < 0.5
    mask[:, :, 0] = True
    return BlockMask.from_dense(mask, block, block, encoding="bitmap")


@pytest.mark.parametrize("edit,match", [
    (lambda m: dict(kept_bits=m.kept_bits[:, :2]), "kept_bits has shape"),
    (lambda m: dict(kept_bits=m.kept_bits.long()), "kept_bits must be int32"),
    (lambda m: dict(kept_bits=m.kept_bits | (1 << 20)), "bits past the last KV block"),
    (lambda m: dict(walk_width=0), "walk_width must lie in"),
    (lambda m: dict(walk_width=41), "walk_width must lie in"),
    (lambda m: dict(walk_width=1), "narrower than the widest walk row"),
    (lambda m: dict(slot_bits=torch.zeros(2, 3, 16, dtype=torch.int8)), "carries no indices or slot_bits"),
    (lambda m: dict(group=2), "group must be 1"),
])
def test_validate_rejects_malformed_bitmap_masks(gen, edit, match):
    bitmap = _bitmap(gen)
    assert bitmap.validate(2, 3 * 64, kv_len=40 * 64) is bitmap
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(bitmap, **edit(bitmap)).validate(2, 3 * 64, kv_len=40 * 64)


def test_validate_rejects_walk_width_on_a_csr_mask(gen):
    csr = BlockMask.from_dense(torch.rand(2, 3, 40, generator=gen) < 0.5)
    with pytest.raises(ValueError, match="walk_width=16 is set but the mask carries its CSR"):
        dataclasses.replace(csr, walk_width=16).validate(2, 3 * 64, kv_len=40 * 64)


def test_kept_bits_past_nk_are_rejected_for_the_csr_form_too(gen):
    mask = torch.rand(1, 2, 33, generator=gen) < 0.5
    csr = BlockMask.from_dense(mask, kept_bits=True)
    bad = csr.kept_bits.clone()
    bad[0, 0, 1] |= 1 << 5
    assert torch.equal(kept_block_bits(mask), csr.kept_bits)
    with pytest.raises(ValueError, match="bits past the last KV block"):
        dataclasses.replace(csr, kept_bits=bad).validate(1, 128, kv_len=33 * 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
@pytest.mark.parametrize("block", [16, 32, 64, 128])
def test_cuda_decode_equals_the_reference(gen, block):
    """The compiled Triton decode on the GPU gives the reference decode's tensors, at a shape with rows spanning
    several chunks and step buckets (the lowering's stacked constants)."""
    mask = torch.rand(2, 3, 150, 1400, generator=gen) < torch.rand(2, 3, 150, 1, generator=gen)
    mask[:, :, :2] = True  # full rows, as text rows are
    bitmap = BlockMask.from_dense(mask, block, block, encoding="bitmap")
    assert_same_walk(decode_walk(bitmap.to("cuda")).to("cpu"), decode_walk_reference(bitmap))
    assert_same_walk(decode_walk(bitmap.bucket(1).to("cuda")).to("cpu"), BlockMask.from_dense(mask, block, block).bucket(1))
