"""`kernels/block_stats.py` (calibration's block statistics without the N×N map) against its float64 reference: odd
lengths, head dims that are not powers of two, sub-64 blocks sharing a tile, batches, key-padding biases, every order
of a grid. Under the Triton interpreter on the CPU, on the GPU with 16-bit inputs."""
import math

import pytest
import torch

from paro_compile.grid import TokenGrid, candidate_orders, order_permutation
from paro_compile.kernels import block_stats as bs_kernel
from paro_compile.kernels.block_stats_reference import block_stats_reference
from paro_kernel_helpers import kernel_device as _kernel_device

EPS = 1e-3


@pytest.fixture
def kernel_device() -> str:
    """CUDA where there is a GPU (fp32 inputs: IEEE dots), else the Triton interpreter on the CPU."""
    return _kernel_device()


def _inputs(bsz, heads, n, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(bsz, heads, n, d, generator=g) * 1.5 for _ in range(2))
    return q.to(device, dtype), k.to(device, dtype)


def _compare(q, k, perm, block, bias=None, small_slack=2):
    scale = 1 / math.sqrt(q.shape[-1])
    rows = bs_kernel.row_stats(q, k, scale, bias)
    got = bs_kernel.block_stats(q, k, rows, perm, block, EPS, scale, key_bias=bias)
    want = block_stats_reference(q.float(), k.float(), perm, block, EPS, scale, bias)
    exact_inputs = q.dtype == torch.float32
    for name, a, b in zip(("mass", "peak"), got[:2], want[:2]):
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-4 if exact_inputs else 2e-2, atol=1e-6 if exact_inputs
                                   else 1e-4, msg=lambda m: f"{name}: {m}")
    # entries within rounding of eps may land on either side
    assert (got[2].cpu() - want[2].cpu()).abs().max() <= small_slack, (got[2] - want[2]).abs().max()
    assert float(want[2].sum()) > 0  # the count is exercised


@pytest.mark.parametrize("block,n,d", [(16, 200, 64), (64, 200, 40), (32, 130, 64), (128, 300, 32)])
def test_matches_reference_in_a_permuted_order(block, n, d, kernel_device):
    q, k = _inputs(2, 3, n, d, torch.float32, kernel_device)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    _compare(q, k, perm, block)


def test_every_order_of_a_grid_with_a_key_padding_bias(kernel_device):
    grid = TokenGrid(frames=3, height=6, width=10)
    n = grid.num_tokens
    q, k = _inputs(2, 2, n, 64, torch.float32, kernel_device, seed=3)
    bias = torch.zeros(2, 1, n)
    bias[0, :, -17:] = -math.inf  # the first sample's last tokens are padding
    bias[1, :, :5] = -0.5
    for order in candidate_orders(grid):
        _compare(q, k, order_permutation(grid, order), 16, bias.to(kernel_device))


def test_out_tensors_are_filled_in_place_and_bad_arguments_refused(kernel_device):
    q, k = _inputs(1, 2, 100, 64, torch.float32, kernel_device)
    scale = 0.125
    rows = bs_kernel.row_stats(q, k, scale)
    out = tuple(torch.full((2, 4, 4), 7.0, device=kernel_device) for _ in range(3))
    got = bs_kernel.block_stats(q, k, rows, torch.arange(100), 32, EPS, scale, out=out)
    assert all(a is b for a, b in zip(got, out))
    torch.testing.assert_close(out[0].sum((1, 2)).cpu(), torch.full((2,), 100.0), rtol=1e-5, atol=1e-4)  # rows sum to 1
    with pytest.raises(ValueError, match="power of two"):
        bs_kernel.block_stats(q, k, rows, torch.arange(100), 48, EPS, scale)
    with pytest.raises(ValueError, match="perm"):
        bs_kernel.block_stats(q, k, rows, torch.arange(99), 32, EPS, scale)
    with pytest.raises(ValueError, match="out tensors"):
        bs_kernel.block_stats(q, k, rows, torch.arange(100), 32, EPS, scale, out=(out[0][:1],) * 3)
    with pytest.raises(ValueError, match="key_bias"):
        bs_kernel.row_stats(q, k, scale, torch.zeros(1, 1, 99))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", [16, 64])
def test_cuda_16bit_inputs(dtype, block):
    q, k = _inputs(2, 4, 1000, 128, dtype, "cuda", seed=5)
    perm = torch.randperm(1000, generator=torch.Generator().manual_seed(2))
    _compare(q, k, perm, block, small_slack=40)
