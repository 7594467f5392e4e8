"""Calibration under Ulysses (2 processes, gloo): every rank observes its heads, the statistics are gathered over
the group, and the plan equals the plan one process calibrates from the same inputs."""
import pytest
import torch

import paro_compile
from tests.parallel import cp_workers as cw

pytest.importorskip("diffusers")

OPTIONS = [
    dict(density=0.3, block_size=cw.BLOCK, step_buckets=2, allocation="site"),
    dict(density=0.3, block_size=cw.BLOCK, allocation="global", empty_heads="minimal", empty_head_tol=0.9),
]


def calibration_inputs(inputs: dict) -> list[dict]:
    generator = torch.Generator().manual_seed(3)
    return [{**inputs, "hidden_states": torch.randn(inputs["hidden_states"].shape, generator=generator),
             "timestep": torch.tensor([t])} for t in (900, 700, 300, 100)]


def calibrate_worker(rank: int, world: int) -> list:
    model, inputs = cw.tiny_wan(layers=2)
    if world > 1:
        cw.enable_ulysses(model, world)
    with torch.no_grad():
        model(**inputs)
    return [paro_compile.calibrate(model, calibration_inputs(inputs), progress=False, **options) for options in OPTIONS]


@pytest.mark.slow
def test_gathered_plan_equals_the_one_process_plan():
    ranks = cw.run_ranks(calibrate_worker, 2)
    single = calibrate_worker(0, 1)
    for index, plan in enumerate(single):
        assert set(plan.sites) == {"blocks.0.attn1#0", "blocks.1.attn1#0"}
        # heads keep different block counts: the allocation ranks the heads of both ranks together
        assert len({int(m.sum()) for m in plan.sites["blocks.0.attn1#0"].block_masks[-1]}) > 1
        for rank_plans in ranks:
            gathered = rank_plans[index]
            assert gathered.sites.keys() == plan.sites.keys()
            for sid, site in plan.sites.items():
                other = gathered.sites[sid]
                assert other.heads == site.heads == cw.WAN_HEADS
                assert other.orders == site.orders
                assert torch.equal(other.block_masks, site.block_masks)
                assert other.empty_heads == site.empty_heads
                assert other.stats == site.stats
            assert gathered.step_boundaries == plan.step_boundaries and gathered.fingerprint == plan.fingerprint
            # the rank's graph skips the same sites; its cross-attention reasons speak of its local query tokens
            assert gathered.meta["skipped_sites"].keys() == plan.meta["skipped_sites"].keys()
            assert {k: v for k, v in gathered.meta.items() if k != "skipped_sites"} == \
                {k: v for k, v in plan.meta.items() if k != "skipped_sites"}
