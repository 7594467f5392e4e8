"""Calibration on synthetic heads whose best orders and hot blocks are known (`calibration_helpers.known_qk`).

Order rule checked: the attention map of the chosen order, pooled into blocks by an independent dense computation,
has all its mass in the blocks the mask keeps when a block-diagonal order exists (diagonal and text blocks only); with
16-token blocks on 8-token axes only orders whose innermost axis is the local axis do that, so the innermost axis is
checked directly there. Where the model's own order already has that block structure, it is kept (ties and
``min_order_gain``). With 64-token blocks one block spans the innermost two axes (a whole 8×8 frame without text),
so orders sharing them tie and any of them is accepted.
"""
import math
import os

import pytest
import torch

import paro_compile
from paro_compile.calibration import calibrate, calibrate_site
from paro_compile.calibration.masks import mandatory_blocks
from paro_compile.grid import TokenGrid
from tests.calibration.calibration_helpers import KNOWN_GRID, KnownHeadsModel, dense_probabilities, known_qk

EXACT = {"allow_fp32": True, "qk_bits": 16, "pv_dtype": "fp16", "impl": "reference"}
KINDS = ["local-F", "local-H", "local-W", "uniform", "sink", "self"]
NO_TEXT = TokenGrid(frames=4, height=8, width=8)


def pooled_mass(q: torch.Tensor, k: torch.Tensor, perm: torch.Tensor, block: int) -> torch.Tensor:
    """[H, nb, nb] dense attention mass of q, k [1, H, N, D] pooled into blocks after each head's permutation."""
    p = dense_probabilities(q[0], k[0])
    heads, n = p.shape[0], p.shape[-1]
    nb = math.ceil(n / block)
    pooled = torch.zeros(heads, nb * block, nb * block)
    for h in range(heads):
        pooled[h, :n, :n] = p[h][perm[h]][:, perm[h]]
    return pooled.view(heads, nb, block, nb, block).sum((2, 4))


def block_diagonal(mass: torch.Tensor, grid: TokenGrid, block: int) -> torch.Tensor:
    """[H] share of each head's mass in its diagonal and text blocks."""
    return (mass * mandatory_blocks(grid, block)).sum((-1, -2)) / mass.sum((-1, -2))


# Densities that cover the sink's key blocks in every query row besides the mandatory blocks (with 64-token blocks
# and 16 text tokens the sink straddles two key blocks of 5).
@pytest.mark.parametrize("grid,block,density", [(KNOWN_GRID, 16, 0.35), (NO_TEXT, 16, 0.2), (KNOWN_GRID, 64, 0.8),
                                                (NO_TEXT, 64, 0.5)], ids=["text-16", "no-text-16", "text-64", "no-text-64"])
@pytest.mark.parametrize("stats_kernel", ["torch", "triton"])
def test_each_head_gets_the_order_and_blocks_its_pattern_calls_for(grid, block, density, stats_kernel):
    """Both statistics paths (the chunked PyTorch pass, the Triton kernels: the interpreter on the CPU)."""
    if stats_kernel == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton statistics on CPU tensors need TRITON_INTERPRET=1")
    q, k = known_qk(grid, KINDS, block_size=block)
    site = calibrate_site(q, k, grid, density=density, block_size=block, scale=1.0, stats_kernel=stats_kernel)
    orders = dict(zip(KINDS, site.orders))
    mass = pooled_mass(q, k, site.perm, block)
    natural_mass = pooled_mass(q, k, torch.arange(grid.num_tokens).expand(len(KINDS), -1), block)
    structured = [KINDS.index(kind) for kind in ("local-F", "local-H", "local-W", "self")]
    diagonal = block_diagonal(mass, grid, block)
    assert bool((diagonal[structured] > 1 - 1e-6).all()), (site.orders, diagonal.tolist())
    if block == 16:
        for axis in "FHW":
            assert orders[f"local-{axis}"][-1] == axis, orders
    # The model's order is kept wherever it already is block-diagonal, and by the heads no order helps.
    for h in structured:
        if block_diagonal(natural_mass[h:h + 1], grid, block).item() > 1 - 1e-6:
            assert site.orders[h] == "FHW", (KINDS[h], site.orders[h])
    assert orders["uniform"] == orders["self"] == orders["sink"] == "FHW"
    mask = site.block_masks[0]
    # Every head keeps all its mass where the density covers the hot blocks; the uniform head keeps its share.
    kept = (mass * mask).sum((-1, -2)) / mass.sum((-1, -2))
    assert bool((kept[[h for h in range(len(KINDS)) if KINDS[h] != "uniform"]] > 1 - 1e-6).all()), kept.tolist()
    # The uniform head keeps the share of entries its blocks hold (the last block is partial): the fullest blocks.
    sizes = torch.tensor([min(block, grid.num_tokens - i * block) for i in range(mask.shape[-1])], dtype=torch.float32)
    entries = sizes[:, None] * sizes[None, :]
    uniform_mask = mask[KINDS.index("uniform")]
    assert kept[KINDS.index("uniform")].item() == pytest.approx(float((entries * uniform_mask).sum()) / grid.num_tokens**2)
    chosen = entries[uniform_mask & ~mandatory_blocks(grid, block)].tolist()
    dropped = entries[~uniform_mask].tolist()
    assert min(chosen, default=math.inf) >= max(dropped, default=0.0)
    # The sink's key block is kept in every query row; text rows and columns are kept by every head.
    sink_columns = natural_mass[KINDS.index("sink")].sum(0) > 0.05 * natural_mass[KINDS.index("sink")].sum()
    assert sink_columns.any() and bool(mask[KINDS.index("sink")][:, sink_columns].all())
    assert bool((mask | ~mandatory_blocks(grid, block)).all())
    assert site.stats["kept_mass_per_head"][0] == pytest.approx(kept.tolist(), abs=1e-4)


@pytest.mark.parametrize("density", [0.2, 0.35, 0.5])
def test_uniform_allocation_meets_the_density_within_one_block(density):
    q, k = known_qk(KNOWN_GRID, KINDS)
    site = calibrate_site(q, k, KNOWN_GRID, density=density, block_size=16, scale=1.0)
    nb = site.block_masks.shape[-1]
    per_head = site.block_masks[0].sum((-1, -2))
    assert bool((per_head == math.ceil(density * nb * nb)).all()), per_head.tolist()  # 49 mandatory blocks < budget
    assert density <= site.density(0) < density + 1 / nb**2


@pytest.mark.parametrize("allocation", ["site", "global"])
def test_shared_budgets_give_concentrated_heads_fewer_blocks(allocation):
    first, second = ["local-F", "uniform", "sink", "self"], ["local-W", "local-H", "uniform", "uniform"]
    sites = [known_qk(KNOWN_GRID, first), known_qk(KNOWN_GRID, second)]
    model = KnownHeadsModel(sites)
    x = torch.randn(1, KNOWN_GRID.num_tokens, 4 * 64, generator=torch.Generator().manual_seed(0))
    plan = calibrate(model, [((x,), {})], density=0.35, grid=KNOWN_GRID, block_size=16, allocation=allocation,
                     progress=False)
    masks = [plan.sites[sid].block_masks[0] for sid in sorted(plan.sites)]
    total = sum(m.numel() for m in masks)
    kept = sum(int(m.sum()) for m in masks)
    assert kept == math.ceil(0.35 * total) if allocation == "global" else \
        all(int(m.sum()) == math.ceil(0.35 * m.numel()) for m in masks), [m.float().mean().item() for m in masks]
    for kinds, mask in zip((first, second), masks):
        counts = mask.sum((-1, -2)).tolist()
        uniform = [c for kind, c in zip(kinds, counts) if kind == "uniform"]
        assert max(c for kind, c in zip(kinds, counts) if kind != "uniform") < min(uniform), (kinds, counts)
        # Identical heads share the budget evenly (ties go round-robin over heads and query rows).
        assert max(uniform) - min(uniform) <= mask.shape[-1], (kinds, counts)
        rows = mask[kinds.index("uniform"), 1:].sum(-1)  # query block rows below the text
        assert int(rows.max() - rows.min()) <= 1, rows.tolist()
        assert bool((mask | ~mandatory_blocks(KNOWN_GRID, 16)).all())
    if allocation == "global":  # the site with two uniform heads gets the larger share
        assert masks[1].float().mean() > masks[0].float().mean()


@torch.no_grad()
def test_compiled_plan_matches_dense_attention_on_the_hot_blocks():
    first, second = ["local-F", "sink", "self", "uniform"], ["local-H", "local-W", "sink", "local-F"]
    model = KnownHeadsModel([known_qk(KNOWN_GRID, first), known_qk(KNOWN_GRID, second)])
    gen = torch.Generator().manual_seed(0)
    calls = [((torch.randn(1, KNOWN_GRID.num_tokens, 4 * 64, generator=gen),), {}) for _ in range(2)]
    plan = calibrate(model, calls, density=0.35, grid=KNOWN_GRID, block_size=16, progress=False)
    orders = [plan.sites[s].orders for s in sorted(plan.sites)]
    # Innermost axis = the local axis; local-F may take HWF or WHF (same block structure with 16-token blocks).
    assert orders[0][1:] == ["FHW"] * 3 and orders[0][0][-1] == "F", orders
    assert [o[-1] for o in orders[1]] == ["H", "W", "W", "F"] and orders[1][1:3] == ["FHW", "FHW"], orders
    x = torch.randn(2, KNOWN_GRID.num_tokens, 4 * 64, generator=gen)
    dense = model(x)
    torch._dynamo.reset()
    sparse = torch.compile(model, backend="paro", options={**EXACT, "plan": plan})(x)
    assert all(s.lowered for s in paro_compile.last_report().sites)
    for kinds, ref, out in zip((first, second), dense, sparse):
        for h, kind in enumerate(kinds):
            ref_h, out_h = ref[..., h * 64:(h + 1) * 64], out[..., h * 64:(h + 1) * 64]
            error = float((out_h - ref_h).norm() / ref_h.norm())
            if kind == "uniform":  # 35 % of its blocks: the output is the mean of the kept values, not of all
                assert error > 0.05, f"uniform head error {error:.2e}"
            else:
                assert error < 1e-3, f"{kind} head: rel. L2 error {error:.2e} against dense attention"
