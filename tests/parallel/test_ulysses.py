"""Ulysses context parallelism (diffusers' own, 2 processes over gloo): every rank applies its heads of one global
plan, and the gathered output is bitwise the one-process paro output (reference numerics in fp32)."""
import pytest
import torch

import paro_compile
from tests.parallel import cp_workers as cw

pytest.importorskip("diffusers")

WAN_SITE = "blocks.0.attn1#0"
PLANS = {
    "mixed": {WAN_SITE: ["FHW", "HWF", "WFH", "HFW"]},
    "per-rank-uniform": {WAN_SITE: ["HWF", "HWF", "FWH", "FWH"]},
    "all-one": {WAN_SITE: ["HWF"] * 4},
}
TOY_ORDERS = ["HW", "WH", "WH", "HW"]
SKEWED = dict(orders_by_site=PLANS["mixed"], density=[0.9, 0.73, 0.22, 0.44])
"""Heads 0 and 1 (rank 0 in the model's order) keep most blocks: rank 0 would do most of the work."""


def _site(report, site_id):
    return next(s for s in report.sites if s.site_id == site_id)


def ulysses_worker(rank: int, world: int) -> dict:
    from paro_compile.parallel import make_context_parallel_traceable

    make_context_parallel_traceable()  # torch < 2.13: Dynamo skips funcol's chunk-cat, the graph ends before the gather
    results = {}
    model, inputs = cw.tiny_wan()
    cw.enable_ulysses(model, world)
    with torch.no_grad():
        model(**inputs)  # diffusers' hooks need one eager call before Dynamo traces them in one graph
        for name, orders in PLANS.items():
            torch._dynamo.reset()
            out = torch.compile(model, backend=cw.paro_passes({**cw.EXACT, "plan": cw.wan_plan(orders)}))(**inputs)[0]
            report = paro_compile.last_report()
            results[name] = (out, _site(report, WAN_SITE), list(report.context_parallel))
        torch._dynamo.reset()
        stated = {**cw.EXACT, "plan": cw.wan_plan(PLANS["mixed"]), "heads": (2 * rank, 2 * rank + 2)}
        results["stated"] = torch.compile(model, backend=cw.paro_passes(stated))(**inputs)[0]
        torch._dynamo.reset()
        wrong = {**cw.EXACT, "plan": cw.wan_plan(PLANS["mixed"]), "heads": [1 - rank, 3 - rank]}
        try:
            torch.compile(model, backend=cw.paro_passes(wrong))(**inputs)
            results["wrong"] = None
        except Exception as error:  # noqa: BLE001 - the message is what the test checks
            results["wrong"] = str(error)
        torch._dynamo.reset()
        results["balanced"] = balanced_output(world)
        torch._dynamo.reset()
        results["cfg"] = cfg_output(rank, world)
        x = cw.exchanged_inputs()
        for layout in ("contiguous", "strided", "ring"):
            torch._dynamo.reset()
            toy = cw.ExchangedAttention(layout=layout).eval()
            out = torch.compile(toy, backend=cw.paro_passes({**cw.EXACT, "plan": cw.image_plan(TOY_ORDERS)}))(x)
            report = paro_compile.last_report()
            results[layout] = (out, _site(report, "<root>#0"), list(report.context_parallel))
        torch._dynamo.reset()
        toy = cw.ExchangedAttention(layout="contiguous").eval()
        joint = {**cw.EXACT, "plan": cw.image_plan(TOY_ORDERS, text_tokens=16)}
        out = torch.compile(toy, backend=cw.paro_passes(joint))(x)
        results["joint"] = (out, _site(paro_compile.last_report(), "<root>#0"))
    return results


def balanced_output(world: int) -> torch.Tensor:
    """tiny Wan with its heads reordered for ``world`` ranks (`balance_heads`), under Ulysses when world > 1."""
    from paro_compile.parallel import balance_heads

    model, inputs = cw.tiny_wan()
    plan = balance_heads(model, cw.wan_plan(**SKEWED), 2)
    if world > 1:
        cw.enable_ulysses(model, world)
        model(**inputs)
    return torch.compile(model, backend=cw.paro_passes({**cw.EXACT, "plan": plan}))(**inputs)[0]


def cfg_batch(inputs: dict) -> dict:
    """A classifier-free-guidance batch: the prompt and the empty prompt (zeros), one model call."""
    text = inputs["encoder_hidden_states"]
    return {**inputs, "hidden_states": inputs["hidden_states"].expand(2, -1, -1, -1, -1).contiguous(),
            "encoder_hidden_states": torch.cat([text, torch.zeros_like(text)])}


def cfg_output(rank: int, world: int) -> torch.Tensor:
    """CFG parallel (and data parallel, the same split): rank r runs batch row r with the unchanged global plan, the
    rows are all-gathered; one process runs the whole batch."""
    import torch.distributed as dist

    model, inputs = cw.tiny_wan()
    batch = cfg_batch(inputs)
    compiled = torch.compile(model, backend=cw.paro_passes({**cw.EXACT, "plan": cw.wan_plan(PLANS["mixed"])}))
    def row(r):
        return {**batch, "hidden_states": batch["hidden_states"][r:r + 1],
                "encoder_hidden_states": batch["encoder_hidden_states"][r:r + 1]}

    if world == 1:  # the whole batch in one call, and its rows one call each
        return compiled(**batch)[0], torch.cat([compiled(**row(r))[0] for r in range(2)])
    out = compiled(**row(rank))[0]
    rows = [torch.empty_like(out) for _ in range(world)]
    dist.all_gather(rows, out)
    return torch.cat(rows)


@pytest.fixture(scope="module")
def ranks():
    return cw.run_ranks(ulysses_worker, 2)


@pytest.fixture(scope="module")
def one_process():
    out = {}
    with torch.no_grad():
        for name, orders in PLANS.items():
            torch._dynamo.reset()
            model, inputs = cw.tiny_wan()
            out[name] = torch.compile(model, backend=cw.paro_passes({**cw.EXACT, "plan": cw.wan_plan(orders)}))(**inputs)[0]
            out[name + "/record"] = _site(paro_compile.last_report(), WAN_SITE)
        x = cw.exchanged_inputs()
        for layout in ("contiguous", "strided"):
            torch._dynamo.reset()
            toy = cw.ExchangedAttention(layout=layout).eval()
            out[layout] = torch.compile(toy, backend=cw.paro_passes({**cw.EXACT, "plan": cw.image_plan(TOY_ORDERS)}))(x)
        out["sdpa"] = cw.ExchangedAttention(layout="ring").eval()(x)
        torch._dynamo.reset()
        out["balanced"] = balanced_output(1)
        torch._dynamo.reset()
        out["cfg"] = cfg_output(0, 1)
        torch._dynamo.reset()
        model, inputs = cw.tiny_wan()
        out["skewed"] = torch.compile(model, backend=cw.paro_passes({**cw.EXACT, "plan": cw.wan_plan(**SKEWED)}))(**inputs)[0]
    torch._dynamo.reset()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("plan", list(PLANS))
def test_ulysses_ranks_apply_their_heads_bitwise(ranks, one_process, plan):
    for rank, result in enumerate(ranks):
        out, record, notes = result[plan]
        assert record.lowered and record.shape[1] == 2 and record.density < 1.0, record  # the plan's masks, not dense
        assert notes == [f"{WAN_SITE}: ulysses 2 ranks, rank {rank}: heads [{2 * rank}, {2 * rank + 2}) of 4 (graph)"]
        assert record.orders == PLANS[plan][WAN_SITE][2 * rank: 2 * rank + 2]
        # every rank folds the order one process folds (chosen from the global plan; test_ulysses_fold.py)
        assert record.folded_order == one_process[plan + "/record"].folded_order, record
        assert record.permutation == "kernel" or record.permutation.startswith("folded:"), record
        assert torch.equal(out, one_process[plan]), f"rank {rank}: max diff {(out - one_process[plan]).abs().max()}"


@pytest.mark.slow
def test_heads_option_agrees_with_the_graph_or_fails(ranks, one_process):
    for rank, result in enumerate(ranks):
        assert torch.equal(result["stated"], one_process["mixed"])
        assert result["wrong"] is not None and "all-to-all gives this rank heads" in result["wrong"], result["wrong"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_head_layouts_read_from_the_exchange(ranks, one_process, layout):
    expected = {"contiguous": [[0, 1], [2, 3]], "strided": [[0, 2], [1, 3]]}[layout]
    for rank, result in enumerate(ranks):
        out, record, notes = result[layout]
        assert record.lowered and record.orders == [TOY_ORDERS[h] for h in expected[rank]]
        span = (f"heads [{expected[rank][0]}, {expected[rank][-1] + 1})" if layout == "contiguous"
                else f"heads {expected[rank]}")
        assert notes == [f"<root>#0: ulysses 2 ranks, rank {rank}: {span} of 4 (graph)"]
        assert torch.equal(out, one_process[layout])


@pytest.mark.slow
def test_ring_sites_stay_on_sdpa_with_the_reason(ranks, one_process):
    for result in ranks:
        out, record, notes = result["ring"]
        assert not record.lowered and "ring attention" in " ".join(record.reasons)
        torch.testing.assert_close(out, one_process["sdpa"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_balanced_heads_same_output_and_bitwise_under_ulysses(ranks, one_process):
    # reordering heads changes only the output projection's summation order
    torch.testing.assert_close(one_process["balanced"], one_process["skewed"], rtol=1e-5, atol=1e-6)
    for result in ranks:
        assert torch.equal(result["balanced"], one_process["balanced"])


@pytest.mark.slow
def test_cfg_split_applies_the_plan_unchanged(ranks, one_process):
    batched, rows = one_process["cfg"]
    for result in ranks:
        assert result["cfg"].shape[0] == 2
        assert torch.equal(result["cfg"], rows)
        # a batch of 2 runs the projections as other GEMMs than 2 batches of 1: equal to float rounding
        torch.testing.assert_close(result["cfg"], batched, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_joint_text_visual_sequences_stay_on_sdpa(ranks, one_process):
    """The plan of a text + visual sequence does not fit the exchanged token order of per-stream sharding."""
    for result in ranks:
        out, record = result["joint"]
        assert not record.lowered and "joint sequence" in " ".join(record.reasons)
        torch.testing.assert_close(out, one_process["sdpa"], rtol=1e-5, atol=1e-5)
