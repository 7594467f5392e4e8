"""A model without diffusers' `_cp_plan` (CogVideoX) under ParaAttention's Ulysses (2 processes, gloo): site ids as on
one process, heads read from the all-to-all ParaAttention leaves in the graph, and the joint text + video sequence
(each rank exchanges its own text and video chunks) kept on SDPA with that reason."""
import pytest
import torch

import paro_compile
from tests.parallel import cp_workers as cw

pytest.importorskip("diffusers")
pytest.importorskip("para_attn")

SITES = ["transformer_blocks.0.attn1#0", "transformer_blocks.1.attn1#0"]


def cogvideox_plan():
    from paro_compile.grid import TokenGrid
    from paro_compile.plan import Plan, SitePlan

    grid = TokenGrid(frames=3, height=4, width=4, text_tokens=8)  # tiny_cogvideox: 8 text + 3·4·4 video tokens
    return Plan(sites={sid: SitePlan.from_orders(sid, ["HWF", "FHW"], grid, block_size=cw.BLOCK) for sid in SITES})


def para_worker(rank: int, world: int) -> dict:
    from para_attn.context_parallel.diffusers_adapters import parallelize_transformer

    from paro_compile.calibration import CalibrationError
    from tests.test_diffusers_models import tiny_cogvideox

    model, inputs = tiny_cogvideox("cpu")
    if world > 1:
        parallelize_transformer(model)
    with torch.no_grad():
        torch._dynamo.reset()
        out = torch.compile(model, backend=cw.paro_passes({**cw.EXACT, "plan": cogvideox_plan()}))(**inputs)[0]
    report = paro_compile.last_report()
    result = {"out": out, "sites": {s.site_id: s for s in report.sites}, "notes": list(report.context_parallel)}
    try:
        result["calibrated"] = paro_compile.calibrate(model, [inputs], density=0.5, block_size=cw.BLOCK, progress=False)
    except CalibrationError as error:
        result["calibrated"] = str(error)
    return result


@pytest.mark.slow
def test_cogvideox_under_para_attention():
    ranks = cw.run_ranks(para_worker, 2)
    single = para_worker(0, 1)
    assert all(single["sites"][sid].lowered for sid in SITES)
    from tests.test_diffusers_models import tiny_cogvideox

    model, inputs = tiny_cogvideox("cpu")
    with torch.no_grad():
        eager = model(**inputs)[0]
    for rank, result in enumerate(ranks):
        assert set(SITES) <= set(result["sites"]), sorted(result["sites"])
        for sid in SITES:
            record = result["sites"][sid]
            assert not record.lowered and "joint sequence" in " ".join(record.reasons), record
        assert [n.split(": ", 1)[1] for n in result["notes"]] == [f"ulysses 2 ranks, rank {rank}: heads [{rank}, "
                                                                  f"{rank + 1}) of 2 (graph)"] * 2
        torch.testing.assert_close(result["out"], eager, rtol=1e-5, atol=1e-5)
        # calibration skips what attention cannot use: the exchanged joint sequence is not in the model's order
        assert isinstance(result["calibrated"], str) and "joint sequence" in result["calibrated"], result["calibrated"]
    assert set(single["calibrated"].sites) == set(SITES)
