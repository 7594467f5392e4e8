"""Ulysses on 2 GPUs over NCCL with the Triton kernels and Inductor (``backend="paro"``): each rank's output is the
one-GPU output, with no graph break (`make_context_parallel_traceable` first). Run on the nvidia-h200-x2 machine:
``python benchmarks/run.py parallel-gpu-tests --out $OUT``."""
import os

import pytest
import torch

from tests.parallel import cp_workers as cw

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (the nvidia-h200-x2 machine)"),
]
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
SITE = "blocks.0.attn1#0"
ORDERS = {SITE: ["FHW", "HWF", "WFH", "HFW"]}
ONE_ORDER = {SITE: ["HWF"] * 4}
"""Every head in one order: folded into the patch embed and the RoPE tables before the token sharding, the inverse
after the final all-gather (docs/context_parallel.md, "Folding under context parallelism")."""
OPTIONS = {"impl": "triton"}


def _run(rank: int, world: int, balanced: bool, orders: dict = ORDERS) -> torch.Tensor:
    from paro_compile.backend import registered_backend
    from paro_compile.parallel import balance_heads, make_context_parallel_traceable

    # torch before 2.13 and transformers' Logger.warning_once break the graph before the final all-gather (one run on
    # 2 H200s with torch 2.11: the fold declined there); docs/context_parallel.md
    make_context_parallel_traceable()

    device = f"cuda:{rank}"
    model, inputs = cw.tiny_wan(device=device, dtype=torch.bfloat16)
    plan = cw.wan_plan(orders, density=[0.9, 0.73, 0.22, 0.44])
    if balanced:
        plan = balance_heads(model, plan, 2)
    if world > 1:
        cw.enable_ulysses(model, world)
    with torch.no_grad():
        model(**inputs)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = torch.compile(model, backend=registered_backend(), options={**OPTIONS, "plan": plan})
        out = compiled(**inputs)[0]
    breaks = {str(reason)[:300]: count for reason, count in torch._dynamo.utils.counters["graph_break"].items()}
    assert not breaks, f"rank {rank}: graph breaks under context parallelism: {breaks}"
    import paro_compile

    report = paro_compile.model_report(compiled)  # every graph of the model: the site's graph need not be the last
    records = {s.site_id: s for s in report.sites}
    assert SITE in records, report.summary()
    record = records[SITE]
    assert record.lowered and record.shape[1] == 4 // world and record.density < 1.0, report.summary()
    if orders is ONE_ORDER:
        assert record.folded_order == "HWF" and record.kernel_permutation == "none", report.summary()
    return out.float().cpu()


def ulysses_worker(rank: int, world: int) -> dict:
    """Each variant's output, or the text of what failed in it (so one variant's failure does not hide the others')."""
    import traceback

    runs = {"plain": (False, ORDERS), "balanced": (True, ORDERS), "folded": (False, ONE_ORDER)}
    results = {}
    for variant, (balanced, orders) in runs.items():
        try:
            results[variant] = _run(rank, world, balanced, orders)
        except Exception:  # reported by the variant's test, with the rank
            results[variant] = f"rank {rank} of {world}: " + traceback.format_exc()
    return results


@pytest.fixture(scope="module")
def outputs():
    os.environ.update(NO_MULTICAST)
    ranks = cw.run_ranks(ulysses_worker, 2, backend="nccl")
    one = ulysses_worker(0, 1)
    return ranks, one


@pytest.mark.parametrize("variant", ["plain", "balanced", "folded"])
def test_ulysses_on_nccl_matches_one_gpu(outputs, variant):
    ranks, one = outputs
    for result in (*ranks, one):
        assert not isinstance(result[variant], str), result[variant]
    for result in ranks:
        # bf16 projections over N/U tokens may pick other GEMM kernels than over N: close, not bitwise
        torch.testing.assert_close(result[variant], one[variant], rtol=2e-2, atol=2e-2)
        assert torch.equal(result[variant], ranks[0][variant])
