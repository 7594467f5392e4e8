"""Shared helpers of the layout/fold tests: capture Dynamo graphs and build plans without calibration."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch._inductor.utils import run_and_get_code
from torch.testing import FileCheck

import paro_compile
from paro_compile.config import ParoConfig
from paro_compile.grid import TokenGrid, orders_permutation
from paro_compile.passes.discover import find_attention_sites
from paro_compile.plan import Plan, SitePlan

EXACT = {"allow_fp32": True, "qk_bits": 16, "pv_dtype": "fp16"}
GRIDS = {
    "toy": TokenGrid(2, 4, 4, 8),
    "cogvideox": TokenGrid(3, 4, 4, 8),
    "wan": TokenGrid(2, 4, 4, 0),
    "flux": TokenGrid(None, 4, 4, 8),
}


def make(name: str, device: str = "cpu"):
    if name == "toy":
        from paro_compile.toy.dit import ToyVideoDiT, toy_inputs

        torch.manual_seed(0)
        return ToyVideoDiT().eval().to(device), toy_inputs(device=device)
    from tests.test_diffusers_models import MODELS

    return MODELS[name](device)


def capture(model, inputs, dynamic=False):
    """(graph module, sites) of the single Dynamo graph of ``model``."""
    seen = {}

    def backend(gm, example_inputs, **kwargs):
        seen["gm"] = gm
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=dynamic)(**inputs)
    torch._dynamo.reset()
    gm = seen["gm"]
    return gm, find_attention_sites(gm, ParoConfig(allow_fp32=True))


def make_plan(sites, grid: TokenGrid, orders: list[str], with_grid: bool = True) -> Plan:
    plan_sites = {}
    for site in sites:
        if not site.supported:
            continue
        heads = int(site.heads)
        per_head = (orders * heads)[:heads]
        nb = (grid.num_tokens + 63) // 64
        plan_sites[site.site_id] = SitePlan(
            site.site_id, heads, grid.num_tokens, 64, orders_permutation(grid, per_head),
            torch.ones(1, heads, nb, nb, dtype=torch.bool), orders=per_head, grid=grid if with_grid else None,
        )
    return Plan(plan_sites)


def first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def token_gathers(code: str) -> None:
    """Inductor code with no indirect load on the token axis (aten.index/gather/index_select lower to
    bounds-checked indirect loads) and no permutation buffer handed to the attention op."""
    FileCheck().check_not("index out of bounds").check_not("aten.index").check_not("gather").check_not("index_select").run(code)


def compile_and_run(model, inputs, plan):
    """(output, Inductor code, report) of ``model`` compiled with the paro backend and ``plan``, exact numerics."""
    compiled = torch.compile(model, backend="paro", options={**EXACT, "plan": plan})
    with torch.no_grad():
        out, codes = run_and_get_code(compiled, **inputs)
    return first(out), "\n".join(codes), paro_compile.last_report()


def bench_fold_stack():
    """benchmarks/bench_fold.py's `Stack`: CogVideoX-style Conv2d patch embed per frame → view/flatten/transpose/
    flatten → text prefix → attention blocks → unpatchify."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_fold.py"
    spec = importlib.util.spec_from_file_location("bench_fold", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Stack
