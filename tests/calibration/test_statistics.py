"""Block statistics: pooled maps equal the dense reference, chunking never materialises N×N, output scores."""
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from paro_compile.calibration import CalibrationError, CalibrationOptions, calibrate_site
from paro_compile.calibration.statistics import SiteStatistics, chunk_rows_for
from paro_compile.grid import TokenGrid, order_permutation
from tests.calibration.calibration_helpers import BLOCK, GRID, HEADS


def test_kept_mass_matches_dense_reference(qk):
    """The mask's kept mass, measured on the full dense attention in the chosen order."""
    q, k = qk
    site = calibrate_site(q, k, GRID, density=0.2, block_size=BLOCK)
    p = torch.softmax(q[0] @ k[0].transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)  # [H, N, N] small here
    nb = site.num_blocks
    for h in range(len(HEADS)):
        perm = site.perm[h]
        ph = p[h][perm][:, perm]
        padded = F.pad(ph, (0, nb * BLOCK - GRID.num_tokens, 0, nb * BLOCK - GRID.num_tokens))
        blocks = padded.view(nb, BLOCK, nb, BLOCK).sum((1, 3))
        kept = (blocks * site.block_masks[0, h]).sum() / blocks.sum()
        assert kept.item() == pytest.approx(site.stats["kept_mass_per_head"][0][h], abs=1e-4)


def test_statistics_equal_brute_force_with_odd_chunks():
    grid = TokenGrid(frames=3, height=4, width=5, text_tokens=5)  # 65 tokens, tail block of 1
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, grid.num_tokens, 16, generator=gen) * 2
    k = torch.randn(2, 3, grid.num_tokens, 16, generator=gen) * 2
    opts = CalibrationOptions(density=0.3, block_size=8, chunk_rows=7, eps=1e-2)
    stats = SiteStatistics(grid, 3, opts)
    stats.update(q, k)
    p = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1)  # [B, H, N, N]
    n, nb, bs = grid.num_tokens, stats.nb, 8
    rows = torch.tensor([min(bs, n - i * bs) for i in range(nb)], dtype=torch.float32)
    for o, order in enumerate(stats.orders):
        perm = order_permutation(grid, order)
        po = F.pad(p[:, :, perm][:, :, :, perm], (0, nb * bs - n, 0, nb * bs - n))
        blocks = po.view(2, 3, nb, bs, nb, bs)
        mass = blocks.sum((0, 3, 5))
        torch.testing.assert_close(stats.mass[0][o], mass, atol=1e-5, rtol=1e-5)
        valid_entry = F.pad(torch.ones(n, n), (0, nb * bs - n, 0, nb * bs - n)).view(nb, bs, nb, bs).bool()
        small = ((blocks < 1e-2) & valid_entry).sum((0, 3, 5)).float()
        count = 2 * rows[:, None] * rows[None, :]
        sparse_share = (small >= 0.9 * count - 0.5).float().mean((-1, -2))
        psi = (blocks.amax((0, 3, 5)) * count / mass).mean((-1, -2))
        torch.testing.assert_close(stats.scores()["block_sparsity"][o].float(), sparse_share)
        torch.testing.assert_close(stats.scores()["incoherence"][o].float(), psi, rtol=1e-4, atol=1e-4)


class CountingMode(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_statistics_never_allocate_n_by_n():
    grid = TokenGrid(frames=4, height=32, width=32)  # N = 4096
    n, heads, budget = grid.num_tokens, 2, 2**21
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, n, 64, generator=gen)
    k = torch.randn(1, heads, n, 64, generator=gen)
    stats = SiteStatistics(grid, heads, CalibrationOptions(block_size=64, max_chunk_elements=budget))
    stats.tables(q.device)
    rows = chunk_rows_for(1, heads, n, budget)
    assert heads * rows * (n + 1) <= budget
    mode = CountingMode()
    with mode:
        stats.update(q, k)
    assert mode.max_numel <= budget + heads * rows * 64  # one chunk (+ block padding), never N x N
    assert mode.max_numel < n * n // 4


def test_statistics_refuse_an_unsolved_average_density_target(qk):
    """average_density is solved over a whole run by calibrate(); a site alone cannot build masks from it."""
    with pytest.raises(CalibrationError, match="average_density"):
        SiteStatistics(GRID, 4, CalibrationOptions(average_density=0.3, block_size=BLOCK))
    stats = SiteStatistics(GRID, 4, CalibrationOptions(block_size=BLOCK))  # no budget given: density 0.3
    assert stats.options.mask_density == 0.3
    with pytest.raises(CalibrationError, match="no attention call"):
        stats.scores()


def test_block_score_output():
    with pytest.raises(ValueError, match="block_score"):
        CalibrationOptions(block_score="error")
    with pytest.raises(ValueError, match="block_score"):
        CalibrationOptions(block_score="output", allocation="global")
    # Uniform attention (q = 0) over 4 key blocks of 8 tokens: every block has the same mass 1/4 for every row.
    # Values: blocks 0 and 2 are 0 = the output (mean of all values), blocks 1 and 3 are +1 / -1. Dropping
    # block 0 or 2 leaves the output unchanged, dropping 1 or 3 moves it: the output score ranks them apart.
    grid = TokenGrid(frames=1, height=4, width=8)
    n, bs, d = 32, 8, 4
    q = torch.zeros(1, 1, n, d)
    k = torch.randn(1, 1, n, d)
    v = torch.zeros(1, 1, n, d)
    v[:, :, 8:16] = 1.0
    v[:, :, 24:32] = -1.0
    opts = dict(block_size=bs, orders=[grid.natural_order], empty_head_tol=None)
    stats = SiteStatistics(grid, 1, CalibrationOptions(density=0.5, block_score="output", **opts))
    stats.update(q, k, v)
    mass, score = stats.bucket_mass(0)[0, 0], stats.bucket_block_score(0)[0, 0]
    torch.testing.assert_close(mass, torch.full((4, 4), 8 / 4))  # equal mass everywhere
    torch.testing.assert_close(score[:, [0, 2]], torch.zeros(4, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(score[:, [1, 3]], torch.full((4, 2), 8 * 0.25 * math.sqrt(d)))
    mask = stats.build_site_plan().block_masks[0, 0]
    assert int(mask.sum()) == 8 and bool(mask.diagonal().all())
    off = mask & ~torch.eye(4, dtype=torch.bool)
    assert not bool(off[:, [0, 2]].any())  # the free blocks are never kept off the diagonal
    # The default ("mass") is unchanged and collects no output statistics.
    plain = SiteStatistics(grid, 1, CalibrationOptions(density=0.5, **opts))
    plain.update(q, k, v)
    assert plain.output_score == [None] and torch.equal(plain.bucket_block_score(0), plain.bucket_mass(0))
    # Random q, k, v, odd chunks, a partial tail block, several orders: equal to the dense formula
    # sum_r || P_r(j) o_r - sum_{c in j} P_rc v_c || per (query block, key block).
    grid = TokenGrid(frames=3, height=4, width=5, text_tokens=5)  # 65 tokens
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 65, 8, generator=gen) for _ in range(3))
    stats = SiteStatistics(grid, 2, CalibrationOptions(block_size=16, block_score="output", chunk_rows=7))
    stats.update(q, k, v)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1)
    o = p @ v
    for oi, order in enumerate(stats.orders):
        perm = order_permutation(grid, order)
        pp, vp, op = p[:, :, perm][:, :, :, perm], v[:, :, perm], o[:, :, perm]
        ref = torch.zeros(2, 5, 5)
        for j in range(5):
            cols = slice(16 * j, 16 * (j + 1))
            part = pp[..., cols] @ vp[:, :, cols]
            err = (pp[..., cols].sum(-1, keepdim=True) * op - part).norm(dim=-1).sum(0)  # [H, N]
            for i in range(5):
                ref[:, i, j] = err[:, 16 * i: 16 * (i + 1)].sum(-1)
        torch.testing.assert_close(stats.output_score[0][oi], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("block", [16, 64])
def test_the_triton_statistics_equal_the_pytorch_pass(block, device):
    """stats_kernel='triton' (`kernels.block_stats`; the interpreter on the CPU) against the chunked PyTorch pass: the
    same maps, scores, empty heads and plan, with a batch of two, a key-padding bias and a ragged last block."""
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)")
    grid = TokenGrid(frames=3, height=6, width=10, text_tokens=7)  # 187 tokens
    n, heads = grid.num_tokens, 3
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, heads, n, 64, generator=gen) * 1.5 for _ in range(3))
    v[:, 2] *= 1e-4  # an empty head
    bias = torch.zeros(2, 1, n)
    bias[1, :, -4:] = -math.inf  # the second sample's last text tokens are padding
    q, k, v, bias = (t.to(device) for t in (q, k, v, bias))
    results = {}
    for kernel in ("torch", "triton"):
        stats = SiteStatistics(grid, heads, CalibrationOptions(density=0.3, block_size=block, stats_kernel=kernel,
                                                                empty_head_tol=1e-2, eps=1e-3))
        assert stats.uses_kernel(q) == (kernel == "triton")
        for bucket_call in range(2):
            stats.update(q * (1 + bucket_call), k, v, key_bias=bias)
        results[kernel] = stats
    torch_stats, triton_stats = results["torch"], results["triton"]
    torch.testing.assert_close(triton_stats.mass[0], torch_stats.mass[0], rtol=1e-4, atol=1e-6)
    for name, value in torch_stats.scores().items():
        torch.testing.assert_close(triton_stats.scores()[name], value, rtol=1e-4, atol=2e-3, msg=name)
    assert triton_stats.empty_heads() == torch_stats.empty_heads() == [2]
    assert triton_stats.choose_orders() == torch_stats.choose_orders()
    a, b = triton_stats.build_site_plan("s"), torch_stats.build_site_plan("s")
    assert a.orders == b.orders and torch.equal(a.block_masks, b.block_masks)


def test_stats_kernel_choice_and_refusals():
    q = torch.zeros(1, 4, GRID.num_tokens, 64)
    auto = SiteStatistics(GRID, 4, CalibrationOptions(block_size=BLOCK))
    assert auto.uses_kernel(q) is False  # CPU tensors: the PyTorch pass
    output = SiteStatistics(GRID, 4, CalibrationOptions(block_size=BLOCK, block_score="output", stats_kernel="triton"))
    with pytest.raises(CalibrationError, match="block_score='output'.*stats_kernel='torch'"):
        output.uses_kernel(q)
    odd = SiteStatistics(GRID, 4, CalibrationOptions(block_size=24, stats_kernel="triton"))
    with pytest.raises(CalibrationError, match="power of two"):
        odd.uses_kernel(q)
    with pytest.raises(Exception, match="stats_kernel"):
        CalibrationOptions(stats_kernel="cuda")
