"""Folding under Ulysses context parallelism (diffusers' own, 2 processes over gloo): the common order is chosen from
the global plan, folded into the whole sequence before the token sharding (patch embed, RoPE tables before their
chunk), the inverse placed after the final all-gather; every rank's output is bitwise the one-process output
(reference numerics in fp32). A graph the fold cannot follow keeps the kernel permutation, with the reason."""
import logging
from collections import Counter

import pytest
import torch

import paro_compile
from tests.parallel import cp_workers as cw

pytest.importorskip("diffusers")

SITE = "blocks.0.attn1#0"
SECOND = "blocks.1.attn1#0"
WAN_PLANS = {
    # rank 0 holds [HWF, HWF], rank 1 [WFH, HFW]: alone, rank 1 would fold WFH; the global plan folds HWF
    "global-order": {SITE: ["HWF", "HWF", "WFH", "HFW"]},
    "all-one": {SITE: ["HWF"] * 4},
    "per-rank-uniform": {SITE: ["HWF", "HWF", "FWH", "FWH"]},
    # a tie with the model's order: nothing to fold, on every rank
    "tie-with-natural": {SITE: ["FHW", "HWF", "WFH", "HFW"]},
}
FOLDED = {"global-order": "HWF", "all-one": "HWF", "per-rank-uniform": "HWF", "tie-with-natural": None}
# two blocks: rank 0's rows at the first site are all the model's order, yet the region reaches it in order HWF
TWO_BLOCKS = {SITE: ["FHW", "FHW", "HWF", "HWF"], SECOND: ["HWF"] * 4}
TOY_ORDERS = ["WH", "WH", "WH", "HW"]
TOY_SITE = "<root>#0"


def _record(report, site_id):
    return next(s for s in report.sites if s.site_id == site_id)


def recording_passes(options: dict, shapes: list) -> object:
    """`cw.paro_passes`, also keeping what `backend.graph_site_shapes` reads from the (context-parallel) graph."""
    from paro_compile.backend import graph_site_shapes, load_plan
    from paro_compile.config import ParoConfig
    from paro_compile.passes.discover import find_attention_sites

    config = ParoConfig.from_options(options)
    passes = cw.paro_passes(options)

    def backend(gm, example_inputs):
        shapes.append(graph_site_shapes(gm, find_attention_sites(gm, config), load_plan(config.plan)))
        return passes(gm, example_inputs)

    return backend


def wan_run(orders: dict, world: int, layers: int = 1, batch: int = 1) -> dict:
    """tiny Wan (under Ulysses when world > 1) compiled with the plan of ``orders`` on ``batch`` copies of its
    sample (2: a CFG batch): output, report, grids read."""
    from torch._dynamo.utils import counters

    model, inputs = cw.tiny_wan(layers=layers)
    for name in ("hidden_states", "timestep", "encoder_hidden_states"):
        inputs[name] = inputs[name].expand(batch, *inputs[name].shape[1:]).contiguous()
    if world > 1:
        cw.enable_ulysses(model, world)
    shapes: list = []
    # the harness's stand-in for diffusers' `warning_once` (cp_workers.cpu_workarounds) is a logging call, which
    # Dynamo breaks the graph on unless told to drop it
    quiet = torch._dynamo.config.patch(
        ignore_logging_functions={*torch._dynamo.config.ignore_logging_functions, logging.Logger.warning})
    with torch.no_grad(), quiet:
        if world > 1:
            model(**inputs)  # diffusers' hooks need one eager call before Dynamo traces them in one graph
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend=recording_passes({**cw.EXACT, "plan": cw.wan_plan(orders)}, shapes))
        out = compiled(**inputs)[0]
        report = paro_compile.last_report()
        again = compiled(**inputs)[0]
    return {"out": out, "again": again, "report": report, "cp": [report.context_parallel_fold],
            "shapes": shapes, "graph_breaks": sum(counters["graph_break"].values()),
            "graphs": counters["stats"]["unique_graphs"]}


class SwappedGatherAttention(cw.ExchangedAttention):
    """`cw.ExchangedAttention` whose final all-gather concatenates the ranks' pieces in reverse rank order and then
    rolls the sequence by one rank's chunk: on 2 ranks the same function, in a pattern the fold does not follow."""

    def gather_tokens(self, out: torch.Tensor, world: int) -> torch.Tensor:
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol

        pieces = funcol.all_gather_tensor(out, 0, dist.group.WORLD).chunk(world, dim=0)
        return torch.cat(pieces[::-1], dim=1).roll(out.shape[1], dims=1)


def toy_run(batch: int, toy_class: type = cw.ExchangedAttention) -> dict:
    """The hand-written Ulysses attention (``toy_class``, a `cw.ExchangedAttention`) on a batch of ``batch``: its
    tokens are a flat input whose grid comes from the plan."""
    from torch._dynamo.utils import counters

    x = cw.exchanged_inputs().expand(batch, -1, -1).contiguous()
    toy = toy_class(layout="contiguous").eval()
    torch._dynamo.reset()
    counters.clear()
    shapes: list = []
    with torch.no_grad():
        out = torch.compile(toy, backend=recording_passes({**cw.EXACT, "plan": cw.image_plan(TOY_ORDERS)}, shapes))(x)
    report = paro_compile.last_report()
    return {"out": out, "report": report, "cp": [report.context_parallel_fold], "shapes": shapes,
            "graph_breaks": sum(counters["graph_break"].values()), "graphs": counters["stats"]["unique_graphs"]}


def fold_worker(rank: int, world: int) -> dict:
    from paro_compile.parallel import make_context_parallel_traceable

    if world > 1:  # a spawned rank: the Dynamo switches stay in its process (torch < 2.13 skips funcol's chunk-cat)
        make_context_parallel_traceable()
    results = {name: wan_run(orders, world) for name, orders in WAN_PLANS.items()}
    results["two-blocks"] = wan_run(TWO_BLOCKS, world, layers=2)
    results["cfg-batch"] = wan_run(WAN_PLANS["global-order"], world, batch=2)
    results["toy"] = toy_run(1)
    results["toy-batch"] = toy_run(2)
    if world == 2:
        results["toy-batch-swapped"] = toy_run(2, SwappedGatherAttention)
    for result in results.values():  # reports do not pickle (weak references): keep their records and notes
        report = result.pop("report")
        result["records"] = {s.site_id: s for s in report.sites}
    return results


@pytest.fixture(scope="module")
def ranks():
    return cw.run_ranks(fold_worker, 2)


@pytest.fixture(scope="module")
def one_process():
    return fold_worker(0, 1)


@pytest.mark.slow
@pytest.mark.parametrize("plan", list(WAN_PLANS))
def test_ranks_fold_the_global_order_bitwise(ranks, one_process, plan):
    folded = FOLDED[plan]
    assert one_process[plan]["records"][SITE].folded_order == folded
    for rank, results in enumerate(ranks):
        result = results[plan]
        record = result["records"][SITE]
        assert record.lowered and record.shape[1] == 2 and record.density < 1.0, record
        assert record.orders == WAN_PLANS[plan][SITE][2 * rank: 2 * rank + 2]
        assert record.folded_order == folded, (rank, record, result["cp"])
        local = record.orders
        if folded is None:
            assert record.permutation == "kernel" and record.kernel_permutation == "full"
            assert "fold: nothing folded (most heads use the natural order FHW" in result["cp"][-1]
        else:
            # the heads of the folded order need no kernel permutation; the other heads get their residual
            expected = "none" if all(o == folded for o in local) else "residual"
            assert record.kernel_permutation == expected, (rank, record)
            assert record.permutation.startswith("kernel" if expected == "residual" else "folded:conv3d input(")
            assert result["cp"][-1].startswith(f"fold: order {folded} folded into the whole sequence before the token "
                                               "sharding over 2 ranks"), result["cp"]
            assert "inverse at res_1->" in result["cp"][-1]  # after the all-gather, on the whole sequence
        assert torch.equal(result["out"], one_process[plan]["out"]), \
            f"rank {rank}: max diff {(result['out'] - one_process[plan]['out']).abs().max()}"
        assert torch.equal(result["again"], result["out"])
        assert result["graph_breaks"] == 0 and result["graphs"] == 1, result


@pytest.mark.slow
def test_a_cfg_batch_folds_bitwise(ranks, one_process):
    """A batch of 2 samples (classifier-free guidance) through diffusers' Ulysses: its final all-gather rebuilds the
    token axis with funcol's chunk + cat, after which the inverse goes; every rank matches one process bitwise."""
    assert one_process["cfg-batch"]["records"][SITE].folded_order == "HWF"
    for rank, results in enumerate(ranks):
        result = results["cfg-batch"]
        record = result["records"][SITE]
        assert record.lowered and record.shape[0] == 2 and record.folded_order == "HWF", (rank, record, result["cp"])
        assert record.kernel_permutation == ("none" if rank == 0 else "residual")
        assert result["cp"][-1].startswith("fold: order HWF folded into the whole sequence before the token sharding "
                                           "over 2 ranks"), result["cp"]
        assert torch.equal(result["out"], one_process["cfg-batch"]["out"]), \
            f"rank {rank}: max diff {(result['out'] - one_process['cfg-batch']['out']).abs().max()}"
        assert torch.equal(result["again"], result["out"])
        assert result["graph_breaks"] == 0 and result["graphs"] == 1, result


@pytest.mark.slow
def test_the_order_comes_from_the_global_plan_not_the_rank_slice(ranks):
    from paro_compile.passes.fold import _most_used_order

    orders = WAN_PLANS["global-order"][SITE]
    chosen_alone = [_most_used_order(Counter(orders[2 * r: 2 * r + 2]), "FHW") for r in range(2)]
    assert chosen_alone == ["HWF", "WFH"]  # each rank's slice alone prefers another order
    assert [results["global-order"]["records"][SITE].folded_order for results in ranks] == ["HWF", "HWF"]


@pytest.mark.slow
def test_rows_in_model_order_get_the_inverse_of_the_folded_order(ranks, one_process):
    """Rank 0 holds only model-order rows at the first site, but its tokens arrive in the folded order: its kernel
    takes the residual (the inverse of the common order), or its block masks would hit the wrong tokens."""
    first = [results["two-blocks"]["records"][SITE] for results in ranks]
    assert first[0].orders == ["FHW", "FHW"] and first[0].folded_order == "HWF"
    assert first[0].kernel_permutation == "residual"
    for results in ranks:
        assert results["two-blocks"]["records"][SECOND].kernel_permutation == "none"
        assert torch.equal(results["two-blocks"]["out"], one_process["two-blocks"]["out"])


@pytest.mark.slow
def test_context_parallel_graph_grid_is_right_or_absent(ranks, one_process):
    """The layout pass follows the tokens through the all-to-all and the sharding chunk: the grid it reads on each
    rank is the one-process grid (never the exchange's (U, N/U) reshape); a flat input gives none."""
    grid = cw.wan_grid()
    assert one_process["all-one"]["shapes"][0][SITE] == (256, grid)
    for results in ranks:
        assert results["all-one"]["shapes"][0][SITE] == (256, grid)
        assert results["toy"]["shapes"][0][TOY_SITE] == (256, None)


@pytest.mark.slow
def test_flat_input_folds_with_the_inverse_after_the_gather(ranks, one_process):
    for rank, results in enumerate(ranks):
        record = results["toy"]["records"][TOY_SITE]
        assert record.folded_order == "WH" and record.orders == TOY_ORDERS[2 * rank: 2 * rank + 2]
        assert record.kernel_permutation == ("none" if rank == 0 else "residual")
        assert torch.equal(results["toy"]["out"], one_process["toy"]["out"])


@pytest.mark.slow
def test_a_batch_gathered_with_chunk_and_cat_folds_bitwise(ranks, one_process):
    """A batch of 2 is all-gathered with funcol's cat(chunk(U, dim=0), dim=token): the cat's output is the whole
    sequence in the common order, the inverse goes after it, and the output is the one-process output."""
    assert one_process["toy-batch"]["records"][TOY_SITE].folded_order == "WH"
    for rank, results in enumerate(ranks):
        result = results["toy-batch"]
        record = result["records"][TOY_SITE]
        assert record.lowered and record.folded_order == "WH", (rank, record, result["cp"])
        assert record.orders == TOY_ORDERS[2 * rank: 2 * rank + 2]
        assert record.kernel_permutation == ("none" if rank == 0 else "residual")
        assert result["cp"][-1].startswith("fold: order WH folded into the whole sequence before the token sharding "
                                           "over 2 ranks"), result["cp"]
        assert "inverse at res_1->" in result["cp"][-1], result["cp"]  # res_1 is funcol's cat
        assert torch.equal(result["out"], one_process["toy-batch"]["out"]), \
            f"rank {rank}: max diff {(result['out'] - one_process['toy-batch']['out']).abs().max()}"
        assert result["graph_breaks"] == 0 and result["graphs"] == 1, result


@pytest.mark.slow
def test_a_graph_the_fold_cannot_follow_keeps_the_kernel_permutation(ranks, one_process):
    """The gathered pieces concatenated in another order than the ranks' (then rolled back): the fold does not
    follow it, nothing is folded, the reason is in the report, and the output is still the one-process output."""
    for results in ranks:
        result = results["toy-batch-swapped"]
        record = result["records"][TOY_SITE]
        assert record.lowered and record.folded_order is None and record.kernel_permutation == "full"
        assert "fold: nothing folded" in result["cp"][-1] and "in rank order" in result["cp"][-1], result["cp"]
        assert torch.equal(result["out"], one_process["toy-batch"]["out"])
