"""From statistics to SitePlans: per-site and global allocation, dense buckets, empty heads."""
import pytest
import torch

from paro_compile.calibration import CalibrationError, CalibrationOptions, calibrate, calibrate_site
from paro_compile.calibration.masks import mandatory_blocks, row_normalized_mass
from paro_compile.calibration.site_plans import build_site_plans
from paro_compile.calibration.statistics import SiteStatistics
from tests.calibration.calibration_helpers import BLOCK, GRID, TinyModel, model_inputs


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


def test_global_allocation_needs_the_same_buckets_everywhere(qk):
    q, k = qk
    options = CalibrationOptions(density=0.2, block_size=BLOCK, allocation="global")
    one, two = SiteStatistics(GRID, 4, options), SiteStatistics(GRID, 4, options, num_buckets=2)
    one.update(q, k)
    two.update(q, k)
    with pytest.raises(CalibrationError, match="same step buckets"):
        build_site_plans({"a": one, "b": two})
    assert build_site_plans({}) == {}


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
