"""Bit-level helpers of the kernels (exp2 polynomial, INT4 pack/unpack) checked exhaustively.

They run through tiny Triton kernels, so on the GPU they test the real code generation and on the
CPU the interpreter's; both must agree with torch bit for bit (INT4) or within the documented
polynomial error (exp2)."""
import torch
import triton
import triton.language as tl

from paro_compile.kernels.attention import _bf16_round_bits, _exp2, _round_scale_22bits, unpack_int4_pair
from paro_compile.kernels.reference import round_scale_22bits
from paro_compile.kernels.prologue import pack_int4_pair, unpack_int4

from paro_kernel_helpers import kernel_device


@triton.jit
def _unpack_kernel(X, LO, HI, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs)
    lo, hi = unpack_int4_pair(x[:, None] + tl.zeros([BLOCK, 2], dtype=tl.int8))
    tl.store(LO + offs, tl.sum(lo.to(tl.int32), axis=1) // 2)
    tl.store(HI + offs, tl.sum(hi.to(tl.int32), axis=1) // 2)


@triton.jit
def _pack_kernel(LO, HI, OUT, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    lo = tl.load(LO + offs)
    hi = tl.load(HI + offs)
    tl.store(OUT + offs, pack_int4_pair(lo, hi))


@triton.jit
def _exp2_kernel(X, Y, M: tl.constexpr, N: tl.constexpr, MODE: tl.constexpr, EMULATE: tl.constexpr):
    offs = tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :]
    tl.store(Y + offs, _exp2(tl.load(X + offs), MODE, EMULATE))


@triton.jit
def _round_kernel(X, BF, SC, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs)
    tl.store(BF + offs, _bf16_round_bits(x))
    tl.store(SC + offs, _round_scale_22bits(x))


def test_integer_roundings_match_torch():
    """bf16 P through integer ops == torch's round-to-nearest-even except on exact ties (rounded up);
    the 22-bit scale == the reference's, and 1.5·2^23 times it is exact in fp32."""
    dev = kernel_device()
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(4000, generator=gen) * 448.0, torch.rand(4000, generator=gen) * 1e-6,
                   torch.tensor([0.0, 1.0, 448.0, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, 3.0e38])])
    x = torch.cat([x, torch.zeros(8192 - x.numel())])
    bf = torch.empty(8192, dtype=torch.bfloat16, device=dev)
    sc = torch.empty(8192, device=dev)
    _round_kernel[(1,)](x.to(dev), bf, sc, BLOCK=8192)
    bf, sc = bf.cpu(), sc.cpu()
    ties = (x.view(torch.int32) & 0xFFFF) == 0x8000
    assert torch.equal(bf[~ties], x[~ties].to(torch.bfloat16))
    assert (bf[ties].float() > x[ties]).all() and ties.sum() == 2
    assert torch.equal(sc, round_scale_22bits(x))
    pos = x > 0
    assert ((x[pos] - sc[pos]) / x[pos]).max() < 2.0 ** -21
    big = sc.double() * 12582912.0
    assert torch.equal((sc * 12582912.0).double()[big < 3e38], big[big < 3e38])


def test_int4_unpack_all_bytes():
    """Every byte value through the kernel's unpack helper == torch's sign-extending unpack."""
    dev = kernel_device()
    x = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8).to(dev)
    lo = torch.empty(256, dtype=torch.int32, device=dev)
    hi = torch.empty(256, dtype=torch.int32, device=dev)
    _unpack_kernel[(1,)](x, lo, hi, BLOCK=256)
    ref = unpack_int4(x.cpu()[:, None]).int()  # [256, 2]: low nibble, high nibble
    assert torch.equal(lo.cpu(), ref[:, 0]) and torch.equal(hi.cpu(), ref[:, 1])
    xi = x.cpu().int()
    assert torch.equal(ref[:, 0], ((xi & 15) ^ 8) - 8) and torch.equal(ref[:, 1], xi >> 4)


def test_int4_pack_all_pairs():
    """Every (lo, hi) in [-8, 7]² through the prologue's pack helper, then back through both unpacks."""
    dev = kernel_device()
    vals = torch.arange(-8, 8)
    lo, hi = (t.reshape(-1).float() for t in torch.meshgrid(vals, vals, indexing="ij"))
    out = torch.empty(256, dtype=torch.int8, device=dev)
    _pack_kernel[(1,)](lo.to(dev), hi.to(dev), out, BLOCK=256)
    expect = ((lo.int() & 15) | (hi.int() << 4)).to(torch.int8)
    assert torch.equal(out.cpu(), expect)
    assert torch.equal(unpack_int4(out.cpu()[:, None]).float(), torch.stack([lo, hi], 1))


def test_exp2_modes_accuracy():
    dev = kernel_device()
    gen = torch.Generator().manual_seed(0)
    m, n = 64, 64
    x = torch.empty(m, n).uniform_(-40.0, 9.0, generator=gen)
    x[0, :8] = torch.tensor([float("-inf"), -200.0, -126.0, -125.0, -124.5, -0.5, 0.5, 8.807])
    x[1] = torch.linspace(-3.0, 3.0, n)  # ties of the rounding to the nearest integer included
    ref = torch.exp2(x.double())
    for mode in (0, 1, 2, 3):
        y = torch.empty(m, n, device=dev)
        _exp2_kernel[(1,)](x.to(dev), y, M=m, N=n, MODE=mode, EMULATE=dev == "cpu")
        y = y.cpu().double()
        big = x > -124.0
        rel = ((y - ref).abs() / ref)[big].max().item()
        assert rel <= (2e-6 if mode in (0, 3) else 8e-5), f"mode {mode}: max rel error {rel:.3e}"
        assert y[0, 0] == 0.0 and y[0, 1] == 0.0, f"mode {mode}: -inf / -200 must give 0, got {y[0, :2]}"
        assert (y[~big] <= 2.0 ** -123).all() and (y >= 0).all()
        if mode == 2:  # even columns MUFU (exact-ish), odd columns polynomial
            assert ((y[:, 0::2] - ref[:, 0::2]).abs() / ref[:, 0::2])[big[:, 0::2]].max() <= 2e-6
