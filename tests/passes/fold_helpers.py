"""Shared helpers of the layout/fold tests: capture Dynamo graphs and build plans without calibration."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn as nn
from torch._inductor.utils import run_and_get_code
from torch.testing import FileCheck

import paro_compile
from paro_compile.config import ParoConfig
from paro_compile.grid import TokenGrid, orders_permutation
from paro_compile.passes.discover import find_attention_sites, sdpa_arguments
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


class AttentionRecorder(torch.fx.Interpreter):
    """Runs a graph and keeps, per attention site, what reaches it: SDPA's query (model graph) or the paro op's
    query and kernel permutation (rewritten graph), keyed by site id."""

    def __init__(self, gm, site_ids: dict[str, str]):
        super().__init__(gm, garbage_collect_values=True)
        self.site_ids = site_ids
        self.seen: dict[str, tuple] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.op == "call_function" and n.target is torch.ops.paro.attention.default:
            q, perm = self.env[n.args[0]], self.env[n.args[3]] if n.args[3] is not None else None
            self.seen[n.meta["paro_site_id"]] = (q, perm)
        elif n.name in self.site_ids:
            self.seen[self.site_ids[n.name]] = (self.env[sdpa_arguments(n)["query"]], None)
        return out


def orders_reach_the_kernel(model, inputs_at, grid_at, orders: list[str], sizes: list[tuple], **options):
    """Compile ``model`` once with ``dynamic=True`` through the paro passes (no Inductor: the rewritten graph runs
    eagerly, so each call is cheap) with an order plan of per-head ``orders``, call it at every size in ``sizes``
    and check, per call and site, that the query tokens reaching the kernel (after the folded layout ops and the
    kernel's permutation) are the model's query in each head's plan order on that call's grid, and that the
    output equals eager. Returns (graphs compiled, reports, guards the passes added to the ShapeEnv)."""
    from paro_compile.backend import rewrite_graph
    from paro_compile.passes.fx_utils import fake_value
    from paro_compile.report import new_report

    grids, compiled, added_guards = [], [], []

    def backend(gm, example_inputs, **kwargs):
        config = ParoConfig(**{**EXACT, **options})
        sites = find_attention_sites(gm, config)
        grid = grid_at(*sizes[0])
        plan = Plan({s.site_id: SitePlan.from_orders(s.site_id, (orders * int(s.heads))[:int(s.heads)], grid)
                     for s in sites if s.supported and not s.is_cross})
        shape_env = next(v.fake_mode.shape_env for v in map(fake_value, gm.graph.find_nodes(op="placeholder"))
                         if v is not None and v.fake_mode.shape_env is not None)
        guards = len(shape_env.guards)
        report = new_report()
        lowered = rewrite_graph(gm, ParoConfig(**{**EXACT, **options, "plan": plan}), plan, report)
        added_guards.append(len(shape_env.guards) - guards)
        compiled.append(report)
        site_ids = {s.node.name: s.site_id for s in sites}

        def run(*args):
            reference = AttentionRecorder(gm, site_ids)
            reference.run(*args)
            rewritten = AttentionRecorder(lowered, {})
            out = rewritten.run(*args)
            grid = grids[-1]
            for site in report.lowered:
                q_model = reference.seen[site.site_id][0]
                q_kernel, perm = rewritten.seen[site.site_id]
                if site.cross_attention:  # no order of its own (its query may carry a folded order through)
                    assert perm is None, site.site_id
                    continue
                heads, n = q_kernel.shape[1], q_kernel.shape[2]
                want = orders_permutation(grid, site.orders)
                got = perm.long() if perm is not None else torch.arange(n).expand(heads, n)
                for h in range(heads):
                    torch.testing.assert_close(q_kernel[:, h, got[h]], q_model[:, h, want[h]], rtol=1e-5, atol=1e-5,
                                               msg=lambda m: f"{site.site_id} head {h} on {grid}: {m}")
            return out

        return run

    compiled_model = torch.compile(model, backend=backend, dynamic=True)
    for size in sizes:
        grids.append(grid_at(*size))
        inputs = inputs_at(*size)
        with torch.no_grad():
            out, ref = first(compiled_model(**inputs)), first(model(**inputs))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    return len(compiled), compiled, added_guards



class EditedTokensDiT(nn.Module):
    """The toy DiT with an edit of its visual tokens between the patch embedding and the blocks (`edit_tokens`)."""

    def __init__(self):
        super().__init__()
        from paro_compile.toy.dit import ToyVideoDiT

        torch.manual_seed(0)
        self.dit = ToyVideoDiT()

    def edit_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def blocks_output(self, latent, text, timestep) -> torch.Tensor:
        d = self.dit
        tokens = self.edit_tokens(d.patch_embed(latent).flatten(2).transpose(1, 2))
        x = torch.cat([d.text_proj(text), tokens], dim=1)
        temb = d.time_embed(d.timestep_embedding(timestep, x.shape[-1]))
        for block in d.blocks:
            x = block(x, temb)
        return x

    def forward(self, latent, text, timestep):
        return self.blocks_output(latent, text, timestep)


class PartialStore(EditedTokensDiT):
    """The toy DiT with a store into a few visual tokens: no layout op can express it in the common order."""

    def edit_tokens(self, tokens):
        tokens[:, 2:5] = 0.0
        return tokens
