"""Ulysses with symbolic token counts (``torch.compile(..., dynamic=True)``, 2 gloo processes, diffusers' tiny Wan):
the context-parallel pass cannot read the exchange from symbolic shapes, so the self-attention site stays on SDPA with
the reason (and how to state the heads), and every rank's output is the one-process output."""
import pytest
import torch

from tests.parallel import cp_workers as cw

pytest.importorskip("diffusers")

SITE = "blocks.0.attn1#0"
ORDERS = {SITE: ["HWF", "HWF", "WFH", "HFW"]}


def dynamic_run(rank: int, world: int) -> dict:
    from paro_compile.parallel import make_context_parallel_traceable

    if world > 1:  # a spawned rank: the Dynamo switches stay in its process
        make_context_parallel_traceable()
    reports: list = []
    _, out = cw.compile_tiny_wan(world, ORDERS, reports, dynamic=True)
    records = {s.site_id: s for r in reports for s in r.sites}
    return {"out": out, "record": records.get(SITE)}


@pytest.fixture(scope="module")
def ranks():
    return cw.run_ranks(dynamic_run, 2)


@pytest.mark.slow
def test_symbolic_token_counts_keep_the_site_on_sdpa_with_the_reason(ranks):
    for result in ranks:
        record = result["record"]
        assert record is not None and not record.lowered, record
        reasons = " ".join(record.reasons)
        assert "context parallel layout not understood" in reasons and "options={'heads'" in reasons, reasons


@pytest.mark.slow
def test_symbolic_token_counts_give_the_one_process_output(ranks):
    one = dynamic_run(0, 1)
    assert one["record"] is not None and one["record"].lowered  # one process: the site lowers (dense, see its reason)
    for result in ranks:
        torch.testing.assert_close(result["out"], one["out"], rtol=1e-5, atol=1e-5)
