"""Budget solving: blocks allocated over several maps, step-bucket boundaries, the density an average needs."""
import math

import pytest
import torch

from paro_compile.calibration import CalibrationError
from paro_compile.calibration.budget import allocate_blocks, derive_step_boundaries, solve_sparse_density, timestep_value
from paro_compile.calibration.masks import row_normalized_mass


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
    assert allocate_blocks([], 0.3, []) == []


def test_step_boundaries():
    ts = [999, 800, 600, 400, 200, 0]
    assert derive_step_boundaries(ts, 2) == ([500.0], [])
    assert derive_step_boundaries(ts, 2, dense_steps=2) == ([700.0, 300.0], [0])
    with pytest.raises(CalibrationError, match="distinct timesteps"):
        derive_step_boundaries([999, 999], 2)


def test_timestep_value():
    assert timestep_value(torch.tensor([500.0, 500.0])) == 500.0
    assert timestep_value(7) == 7.0
    assert timestep_value(None) is None and timestep_value(torch.tensor([])) is None and timestep_value("t") is None


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
