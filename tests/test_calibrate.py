import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from paro_compile.calibration import (
    CalibrationError,
    CalibrationOptions,
    SiteStatistics,
    allocate_blocks,
    build_site_plans,
    calibrate,
    calibrate_site,
    chunk_rows_for,
    derive_step_boundaries,
    infer_grid,
    mandatory_blocks,
    row_normalized_mass,
    select_blocks,
    synthetic_qk, solve_sparse_density)
from paro_compile.config import ParoConfig
from paro_compile.grid import TokenGrid, order_permutation
from paro_compile.passes.discover import find_attention_sites
from paro_compile.plan import Plan

# 32 frames of 4x8 tokens + 16 text tokens; 16-token blocks -> 65 blocks per side.
GRID = TokenGrid(frames=32, height=4, width=8, text_tokens=16)
BLOCK = 16
HEADS = [
    {"F": 30.0, "H": 2.0, "W": 2.0},  # local in (H, W) within a frame
    {"F": 0.0, "H": 30.0, "W": 30.0},  # all frames at a fixed (h, w)
    {"F": 30.0, "W": 30.0, "H": 1.0},  # local in H at fixed (f, w)
    {"F": 30.0, "H": 30.0, "W": 1.0},  # local in W at fixed (f, h)
]
GOOD_ORDERS = [{"FHW", "FWH"}, {"HWF", "WHF"}, {"FWH", "WFH"}, {"FHW", "HFW"}]


@pytest.fixture(scope="module")
def qk():
    return synthetic_qk(GRID, HEADS)


def test_orders_and_masks_on_structured_heads(qk):
    q, k = qk
    site = calibrate_site(q, k, GRID, density=0.2, block_size=BLOCK)
    for h, order in enumerate(site.orders):
        assert order in GOOD_ORDERS[h], (h, order)
    kept = site.stats["kept_mass_per_head"][0]
    natural = site.stats["natural_kept_mass_per_head"][0]
    assert min(kept) >= 0.9, kept
    assert natural[1] < 0.5, natural  # the model's order scatters head 1 over every frame's block
    assert site.density() == pytest.approx(0.2, abs=0.01)
    assert torch.equal(site.perm[1], order_permutation(GRID, site.orders[1]))
    # Diagonal and text blocks are always kept.
    mandatory = mandatory_blocks(GRID, BLOCK)
    assert bool(site.block_masks[0][:, mandatory].all())


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


def test_select_blocks_density_threshold_and_mandatory():
    gen = torch.Generator().manual_seed(0)
    mass = torch.rand(3, 10, 10, generator=gen)
    mandatory = torch.eye(10, dtype=torch.bool)
    mask = select_blocks(mass, 0.3, mandatory)
    assert mask.sum((-1, -2)).tolist() == [30, 30, 30] and bool(mask[:, mandatory].all())
    assert select_blocks(mass, 0.01, mandatory).sum((-1, -2)).tolist() == [10, 10, 10]  # mandatory wins
    thr = select_blocks(mass, 0.3, mandatory, mass_threshold=0.5)
    for h in range(3):
        share = (mass[h] * thr[h]).sum() / mass[h].sum()
        assert share >= 0.5
        # Minimal: dropping the lightest kept non-mandatory block falls below the threshold.
        kept = mass[h].masked_fill(~thr[h] | mandatory, math.inf)
        assert (share - kept.min() / mass[h].sum()) < 0.5
    text_grid = TokenGrid(frames=None, height=4, width=8, text_tokens=20)  # text in blocks 0, 1 (block 16)
    mand = mandatory_blocks(text_grid, 16)
    assert bool(mand[:2].all() and mand[:, :2].all()) and not bool(mand[2, 3])


def test_row_normalized_mass_and_allocate_blocks():
    gen = torch.Generator().manual_seed(0)
    mass = torch.rand(2, 5, 5, generator=gen) * 7.0
    score = row_normalized_mass(mass, seq_len=4 * 8 + 3, block_size=8)  # last query block: 3 of 8 rows
    torch.testing.assert_close(score.sum(-1), torch.tensor([1, 1, 1, 1, 3 / 8]).expand(2, 5))
    # Two maps: a concentrated one (mass on few blocks) and a diffuse one; the budget goes to the heaviest blocks
    # of both together, so the diffuse map gets more of it.
    conc = torch.full((2, 10, 10), 1e-3)
    conc[:, :, 0] = 1.0
    diffuse = torch.rand(3, 10, 10, generator=gen) + 0.5
    maps = [row_normalized_mass(m, 80, 8) for m in (conc, diffuse)]
    mand = [torch.eye(10, dtype=torch.bool)] * 2
    a, b = allocate_blocks(maps, 0.3, mand)
    assert int(a.sum() + b.sum()) == math.ceil(0.3 * 500) and bool(a[:, mand[0]].all() and b[:, mand[1]].all())
    assert int(a.sum()) == 2 * 19  # diagonal + column 0: nothing else is worth a block
    kept_min = min(maps[0][a & ~mand[0]].min(), maps[1][b & ~mand[1]].min())
    dropped_max = max(maps[0][~a].max(), maps[1][~b].max())
    assert kept_min >= dropped_max  # one threshold over both maps
    # One map = per-site allocation; mandatory blocks win over a tiny density; mass_threshold keeps a share.
    only, = allocate_blocks([maps[1]], 0.01, [mand[1]])
    assert torch.equal(only, mand[1].expand(3, 10, 10))
    a, b = allocate_blocks(maps, 0.3, mand, mass_threshold=0.6)
    kept = (maps[0] * a).sum() + (maps[1] * b).sum()
    assert kept / (maps[0].sum() + maps[1].sum()) >= 0.6


def test_allocation_site_and_global(qk):
    q, k = qk
    with pytest.raises(ValueError, match="allocation"):
        CalibrationOptions(allocation="heads")
    base = calibrate_site(q, k, GRID, density=0.2, block_size=BLOCK)
    site = calibrate_site(q, k, GRID, density=0.2, block_size=BLOCK, allocation="site")
    assert site.orders == base.orders
    assert site.density() == pytest.approx(base.density(), abs=1e-3)  # same budget, spread over heads
    per_head = site.block_masks[0].float().mean((-1, -2))
    assert float(per_head.max() - per_head.min()) > 0.01  # heads no longer all at 0.2
    assert bool(site.block_masks[0][:, mandatory_blocks(GRID, BLOCK)].all())
    # Same budget, more of the (row-normalised) attention kept than uniform per-head selection.
    stats = SiteStatistics(GRID, 4, CalibrationOptions(density=0.2, block_size=BLOCK))
    stats.update(q, k)
    score = row_normalized_mass(stats.chosen_mass(0, base.orders), GRID.num_tokens, BLOCK)
    assert (score * site.block_masks[0]).sum() >= (score * base.block_masks[0]).sum()
    # Global: two sites (sharp and blurred attention), the average density is the target, the diffuse site gets more.
    def stats_for(scale, allocation):
        st = SiteStatistics(GRID, 4, CalibrationOptions(density=0.2, block_size=BLOCK, allocation=allocation), num_buckets=2)
        st.update(q * scale, k, bucket=0)
        st.update(q * scale, k, bucket=1)
        return st
    for allocation in ("uniform", "site", "global"):
        plans = build_site_plans({"sharp": stats_for(1.0, allocation), "blurred": stats_for(0.05, allocation)}, dense_buckets=[0])
        assert bool(plans["sharp"].block_masks[0].all())  # dense bucket untouched
        dens = {sid: p.density(1) for sid, p in plans.items()}
        assert (dens["sharp"] + dens["blurred"]) / 2 == pytest.approx(0.2, abs=1e-3), (allocation, dens)
        if allocation == "global":
            assert dens["blurred"] > dens["sharp"] + 0.05, dens
        else:
            assert dens["blurred"] == pytest.approx(dens["sharp"], abs=1e-3), (allocation, dens)
    # Through calibrate(): the default is unchanged, "global" is recorded in the plan's meta.
    model = TinyModel()
    inputs = model_inputs(qk)
    default = calibrate(model, inputs, density=0.2, grid=GRID, block_size=BLOCK, progress=False)
    for sid in default.sites:
        assert torch.equal(default.sites[sid].block_masks[0], base.block_masks[0])
    glob = calibrate(model, inputs, density=0.2, grid=GRID, block_size=BLOCK, allocation="global", progress=False)
    assert glob.meta["allocation"] == "global" and "allocation" not in default.meta
    assert glob.overall_density() == pytest.approx(default.overall_density(), abs=1e-3)


def test_empty_heads_and_errors(qk):
    q, k = qk
    v = torch.randn(1, 4, GRID.num_tokens, 64)
    v[:, 2] = 1e-7
    site = calibrate_site(q, k, GRID, v=v, density=0.2, block_size=BLOCK, empty_heads="minimal")
    assert site.empty_heads == [2]
    assert torch.equal(site.block_masks[0, 2], mandatory_blocks(GRID, BLOCK))
    with pytest.raises(CalibrationError, match="does not match the grid"):
        calibrate_site(q[:, :, :-1], k[:, :, :-1], GRID)
    with pytest.raises(ValueError, match="density"):
        CalibrationOptions(density=0.0)


def test_step_boundaries():
    ts = [999, 800, 600, 400, 200, 0]
    assert derive_step_boundaries(ts, 2) == ([500.0], [])
    assert derive_step_boundaries(ts, 2, dense_steps=2) == ([700.0, 300.0], [0])
    with pytest.raises(CalibrationError, match="distinct timesteps"):
        derive_step_boundaries([999, 999], 2)


def test_infer_grid():
    meta = dict(device="meta")
    cog = {"hidden_states": torch.empty(1, 13, 16, 60, 90, **meta), "encoder_hidden_states": torch.empty(1, 226, 4096, **meta)}
    assert infer_grid(17776, cog, patch_sizes=[2], temporal_patch_sizes=[1]) == TokenGrid(13, 30, 45, 226)
    wan = {"hidden_states": torch.empty(1, 16, 21, 60, 104, **meta), "encoder_hidden_states": torch.empty(1, 512, 4096, **meta)}
    assert infer_grid(21 * 30 * 52, wan) == TokenGrid(21, 30, 52, 0)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(6.0), indexing="ij"), -1).reshape(-1, 3)
    flux = {"hidden_states": torch.empty(1, 24, 64), "img_ids": ids, "txt_ids": torch.zeros(7, 3)}
    assert infer_grid(31, flux) == TokenGrid(None, 4, 6, 7)
    assert infer_grid(1000, cog) is None


# ---- end to end through calibrate(model, ...) -------------------------------------------------------
class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.out = nn.Linear(64, 64)

    def forward(self, q, k, v):
        return self.out(F.scaled_dot_product_attention(q, k, v))


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Attention(), Attention()])

    def forward(self, q, k, v, timestep=None):
        x = v
        for block in self.blocks:
            x = block(q, k, x)
        return x


def model_inputs(qk, timesteps=(999.0,)):
    q, k = qk
    gen = torch.Generator().manual_seed(1)
    return [((q, k, torch.randn(q.shape, generator=gen)), {"timestep": torch.tensor([t])}) for t in timesteps]


def test_calibrate_model_end_to_end(qk, tmp_path):
    model = TinyModel()
    plan = calibrate(model, model_inputs(qk, (999.0, 500.0, 10.0)), density=0.2, grid=GRID, block_size=BLOCK,
                     step_buckets=2, dense_steps=1, progress=False)
    assert set(plan.sites) == {"blocks.0#0", "blocks.1#0"}
    assert plan.step_boundaries == [749.5, 255.0] and plan.num_buckets == 3
    for site in plan.sites.values():
        assert site.dense_buckets == [0] and bool(site.block_masks[0].all())
        assert site.density(1) == pytest.approx(0.2, abs=0.01)
        for h, order in enumerate(site.orders):
            assert order in GOOD_ORDERS[h]
        assert min(site.stats["kept_mass_per_head"][1]) >= 0.9
        assert site.stats["bucket_calls"] == [1, 1, 1]
    # The plan fits the graph the backend will see (sites discovered in a Dynamo graph).
    seen = []

    def grab(gm, example_inputs):
        seen.extend(find_attention_sites(gm, ParoConfig(allow_fp32=True)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(TinyModel(), backend=grab, dynamic=False)(*model_inputs(qk)[0][0])
    plan.check_sites(seen, block_size=BLOCK)
    loaded = Plan.load(plan.save(tmp_path / "plan.safetensors"), model=model)
    assert loaded.sites["blocks.0#0"].orders == plan.sites["blocks.0#0"].orders


def test_calibrate_output_unchanged_and_grid_sources(qk):
    model = TinyModel()
    (args, kwargs), = model_inputs(qk)
    expected = model(*args, **kwargs)
    calls = []

    def hook(site):
        calls.append(site.site_id)
        return GRID if site.site_id == "blocks.1#0" else None

    plan = calibrate(model, [(args, kwargs)], density=0.3, grid={"blocks.0#0": GRID}, grid_for_site=hook,
                     block_size=BLOCK, progress=False)
    assert calls == ["blocks.1#0"] and set(plan.sites) == {"blocks.0#0", "blocks.1#0"}
    torch.testing.assert_close(model(*args, **kwargs), expected)


def test_calibrate_unknown_layout_is_a_clear_error(qk):
    with pytest.raises(CalibrationError, match=r"pass grid=TokenGrid"):
        calibrate(TinyModel(), model_inputs(qk), progress=False)
    wrong = TokenGrid(frames=2, height=2, width=2)
    with pytest.raises(CalibrationError, match="has 1040 tokens but the grid"):
        calibrate(TinyModel(), model_inputs(qk), grid=wrong, progress=False)
    with pytest.raises(CalibrationError, match="timestep"):
        calibrate(TinyModel(), [((qk[0], qk[1], qk[1]), {})], grid=GRID, step_buckets=2, progress=False)


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


def test_solve_sparse_density():
    ts = [1000.0 - 100 * i for i in range(10)]  # 1000 ... 100
    boundaries, dense = derive_step_boundaries(ts, 1, dense_steps=2)  # dense: 1000, 900
    sparse, share = solve_sparse_density(0.3, boundaries, dense, ts)
    assert share == pytest.approx(0.2) and sparse == pytest.approx(0.125)
    # weighted by another sampling schedule: 20 steps 1000 ... 50 with a 950 boundary (dense: 1000 and 950,
    # a timestep equal to a boundary stays in the bucket above it) -> 2 of 20
    b2, d2 = derive_step_boundaries([1000.0, 900.0, 800.0], 1, dense_steps=1)
    assert b2 == [950.0]
    sparse20, share20 = solve_sparse_density(0.3, b2, d2, [1000.0 - 50 * i for i in range(20)])
    assert share20 == pytest.approx(0.1) and sparse20 == pytest.approx(0.2 / 0.9)
    with pytest.raises(CalibrationError, match="not reachable"):
        solve_sparse_density(0.15, boundaries, dense, ts)
    with pytest.raises(CalibrationError, match="no sparse step"):
        solve_sparse_density(0.5, boundaries, dense, [1000.0, 950.0])


def test_calibrate_average_density(qk):
    model = TinyModel()
    inputs = model_inputs(qk, (999.0, 750.0, 500.0, 250.0))
    plan = calibrate(model, inputs, average_density=0.5, grid=GRID, block_size=BLOCK, dense_steps=1, progress=False)
    meta = plan.meta
    assert meta["dense_step_share"] == pytest.approx(0.25)
    assert meta["sparse_density"] == pytest.approx((0.5 - 0.25) / 0.75)
    for site in plan.sites.values():
        assert site.dense_buckets == [0] and site.density(1) == pytest.approx(meta["sparse_density"], abs=0.02)
    expected = sum(plan.overall_density(plan.bucket_for_timestep(t)) for t in (999.0, 750.0, 500.0, 250.0)) / 4
    assert meta["average_density_achieved"] == pytest.approx(expected)
    assert meta["average_density_achieved"] == pytest.approx(0.5, abs=0.02)
    # Without dense steps the average is the density of every bucket.
    flat = calibrate(model, inputs, average_density=0.4, grid=GRID, block_size=BLOCK, progress=False)
    assert flat.meta["sparse_density"] == 0.4 and flat.meta["dense_step_share"] == 0.0
    with pytest.raises(ValueError, match="not both"):
        calibrate(model, inputs, density=0.3, average_density=0.3, grid=GRID, block_size=BLOCK, progress=False)
    with pytest.raises(CalibrationError, match="not reachable"):
        calibrate(model, inputs, average_density=0.2, grid=GRID, block_size=BLOCK, dense_steps=1, progress=False)
    # sampling_timesteps as a one-shot generator: weights the solve and the achieved average alike
    schedule = calibrate(model, inputs, average_density=0.5, sampling_timesteps=(t for t in (999.0, 500.0, 400.0, 300.0)),
                         grid=GRID, block_size=BLOCK, dense_steps=1, progress=False)
    assert schedule.meta["dense_step_share"] == pytest.approx(0.25)
    expected = sum(schedule.overall_density(schedule.bucket_for_timestep(t)) for t in (999.0, 500.0, 400.0, 300.0)) / 4
    assert schedule.meta["average_density_achieved"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="mass_threshold"):
        calibrate(model, inputs, average_density=0.3, mass_threshold=0.8, grid=GRID, block_size=BLOCK, progress=False)
    # Explicit boundaries: the calibration timesteps are read for the weights; without a timestep input it says so.
    explicit = calibrate(model, inputs, average_density=0.75, step_boundaries=[600.0], dense_steps=1, grid=GRID,
                         block_size=BLOCK, progress=False)
    assert explicit.meta["dense_step_share"] == pytest.approx(0.5)  # 999 and 750 above 600
    assert explicit.meta["sparse_density"] == pytest.approx(0.5)
    no_t = [(args, {}) for args, _ in inputs]
    with pytest.raises(CalibrationError, match="average_density with dense buckets needs the timestep"):
        calibrate(model, no_t, average_density=0.75, step_boundaries=[600.0], dense_steps=1, grid=GRID,
                  block_size=BLOCK, progress=False)
