"""paro_compile.model_report: every graph of a model, attention outside the compiled graphs, bounded history, notes."""
import gc
import weakref
from typing import Optional

import pytest
import torch
import torch.nn as nn

import paro_compile
from paro_compile import report as report_module
from paro_compile.backend import ignored_option_notes
from paro_compile.config import ParoConfig
from paro_compile.report import CompileOrigin, CompileReport, SiteRecord, new_report, reports_for
from paro_compile.toy.dit import ToyVideoDiT, toy_inputs
from tests.report_helpers import check_schema, documented_keys

EXACT = {"allow_fp32": True, "qk_bits": 16, "pv_dtype": "fp16"}


def toy(**kwargs) -> ToyVideoDiT:
    torch.manual_seed(0)
    return ToyVideoDiT(**kwargs).eval()


@torch.compiler.disable
def run_eagerly(module: nn.Module, *args):
    return module(*args)


class UnrolledDiT(nn.Module):
    """The toy DiT with its two blocks unrolled: optionally a graph break between them, or one block run outside every
    compiled graph (as when Dynamo skips a frame)."""

    def __init__(self, break_between: bool = False, eager_block: Optional[int] = None) -> None:
        super().__init__()
        self.dit = toy()
        self.break_between, self.eager_block = break_between, eager_block

    def block(self, index: int, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        block = self.dit.blocks[index]
        return run_eagerly(block, x, temb) if index == self.eager_block else block(x, temb)

    def forward(self, latent, text, timestep):
        dit = self.dit
        tokens = dit.patch_embed(latent).flatten(2).transpose(1, 2)
        text_tokens = dit.text_proj(text)
        x = torch.cat([text_tokens, tokens], dim=1)
        temb = dit.time_embed(dit.timestep_embedding(timestep, x.shape[-1]).to(x.dtype))
        x = self.block(0, x, temb)
        if self.break_between:
            torch._dynamo.graph_break()
        x = self.block(1, x, temb)
        return dit.proj_out(dit.norm_out(x))


@torch.no_grad()
def test_model_report_gathers_every_graph_of_the_model():
    model = UnrolledDiT(break_between=True)
    compiled = torch.compile(model, backend="paro", options=EXACT)
    compiled(**toy_inputs())
    other = toy()
    torch.compile(other, backend="paro", options=EXACT)(**toy_inputs())

    last = paro_compile.last_report()
    assert [s.site_id for s in last.sites] == ["blocks.0.attn#0", "blocks.1.attn#0"]  # the other model's graph only

    report = paro_compile.model_report(compiled)
    assert len(report.reports) == 2
    assert [s.site_id for s in report.sites] == ["dit.blocks.0.attn#0", "dit.blocks.1.attn#0"]
    assert all(s.lowered for s in report.sites)
    assert [[(ref(), path) for ref, path in r.attention_sources] for r in report.reports] == [
        [(model, "dit.blocks.0.attn")], [(model, "dit.blocks.1.attn")]]
    assert paro_compile.model_report(model).to_dict()["graphs"] == report.to_dict()["graphs"]  # module or wrapper
    assert all(r.frame and r.compile_id for r in report.reports)
    assert not report.uncovered_attention_modules and not report.warnings
    text = report.summary()
    assert text.startswith("paro: UnrolledDiT: 2 graph(s), 2/2 attention site(s) lowered")
    assert "dit.blocks.0.attn#0" in text and "dit.blocks.1.attn#0" in text

    everything = paro_compile.model_report()
    assert len(everything.reports) == 3
    assert {"UnrolledDiT", "ToyVideoDiT"} == set(everything.model_name.split(", "))
    check_schema(report.to_dict())


@torch.no_grad()
def test_in_place_compile_and_submodules_compiled_on_their_own():
    model = toy()
    model.compile(backend="paro", options=EXACT)
    model(**toy_inputs())
    assert [s.site_id for s in paro_compile.model_report(model).sites] == ["blocks.0.attn#0", "blocks.1.attn#0"]

    torch._dynamo.reset()
    regional = toy()
    for block in regional.blocks:
        block.compile(backend="paro", options=EXACT)
    regional(**toy_inputs())
    report = paro_compile.model_report(regional)
    # One graph of ToyBlock.forward serves both blocks: its attention runs compiled in each.
    assert [s.site_id for s in report.sites] == ["attn#0"]
    assert not report.uncovered_attention_modules and not report.warnings


@torch.no_grad()
def test_attention_outside_every_compiled_graph_is_warned(device):
    model = UnrolledDiT(eager_block=1).to(device)
    compiled = torch.compile(model, backend="paro", options=EXACT)
    inputs = toy_inputs(device=device)
    compiled(**inputs)

    report = paro_compile.model_report(model)
    assert [s.site_id for s in report.sites] == ["dit.blocks.0.attn#0"]
    assert report.uncovered_attention_modules == ["dit.blocks.1.attn"]
    assert any("torch.compiler.disable" in reason for reason in report.graph_breaks)
    assert any("dit.blocks.1.attn" in w and "outside the compiled graphs" in w for w in report.warnings)
    assert "warning: 1 attention module(s) have no site in any compiled graph" in report.summary()

    with paro_compile.watch_attention() as watch:
        compiled(**inputs)
    assert watch.eager_calls == 1 and watch.paro_calls == 1 and not watch.compiled_while_watching
    [(site, calls)] = watch.call_sites.items()
    assert calls == 1 and site.startswith("ToyAttention: ") and "dit.py(" in site and site.endswith(": forward")


@torch.no_grad()
def test_watch_names_the_call_site_from_the_event_stack_when_no_frame_is_an_ancestor():
    """Where the profiler gives an SDPA call's Python frames only as its stack (not as parent events), the watch
    still names the module and the frame: the first frame outside torch."""
    from types import SimpleNamespace

    from paro_compile.model_inspection import AttentionWatch

    outer = SimpleNamespace(name="<built-in method scaled_dot_product_attention>", cpu_parent=None)
    stack = ["torch/nn/functional.py(5000): scaled_dot_product_attention", "/src/pkg/dit.py(45): forward",
             "torch/nn/modules/module.py(1782): _call_impl", "nn.Module: ToyAttention_0", "/src/run.py(3): main"]
    sdpa = SimpleNamespace(name="aten::scaled_dot_product_attention", cpu_parent=outer, stack=stack)
    kernel = SimpleNamespace(name="aten::_scaled_dot_product_flash_attention", cpu_parent=sdpa, stack=[])
    bare = SimpleNamespace(name="aten::scaled_dot_product_attention", cpu_parent=None)  # no stack attribute
    watch = AttentionWatch()
    watch.count([outer, sdpa, kernel, bare])
    assert watch.eager_calls == 2
    assert watch.call_sites == {"ToyAttention: /src/pkg/dit.py(45): forward": 1, "unknown caller": 1}


def test_inspect_counts_eager_attention_and_puts_it_in_the_json():
    report = paro_compile.inspect(UnrolledDiT(eager_block=0), toy_inputs(), **EXACT)
    data = report.to_dict()
    assert set(data) == documented_keys()["<root>"]  # graphs without sites here: check_schema wants sites everywhere
    assert data["eager_sdpa_calls"] == 1 and data["paro_attention_calls"] == 1
    assert list(data["eager_sdpa_call_sites"]) == [next(iter(report.eager_attention.call_sites))]
    assert data["uncovered_attention_modules"] == ["dit.blocks.0.attn"]
    assert any("1 SDPA call(s) ran outside every compiled graph" in w for w in data["warnings"])
    text = report.to_text(width=200)
    assert "1 SDPA call(s) ran outside every compiled graph" in text and "dit.blocks.0.attn" in text

    clean = paro_compile.inspect(toy(), toy_inputs(), **EXACT)
    assert clean.to_dict()["eager_sdpa_calls"] == 0 and not clean.warnings


@torch.no_grad()
def test_graphs_without_attention_are_listed():
    class TwoParts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(4, 4)
            self.dit = toy()

        def forward(self, latent, text, timestep):
            scale = self.embed(torch.ones(1, 4)).sum()
            torch._dynamo.graph_break()
            return self.dit(latent * scale, text, timestep)

    model = TwoParts()
    torch.compile(model, backend="paro", options=EXACT)(**toy_inputs())
    report = paro_compile.model_report(model)
    empty = report.graphs_without_attention
    assert len(empty) == 1 and len(report.reports) == 2
    assert report.to_dict()["summary"]["graphs_without_attention"] == 1
    assert f"graphs without attention: {empty[0].graph_index} (" in report.summary()
    assert "(no attention in this graph)" in empty[0].summary()


@torch.no_grad()
def test_failed_compile_is_in_the_model_report():
    model = toy()
    with pytest.raises(Exception, match="cannot use paro attention"):
        torch.compile(model, backend="paro", options={"fallback": "error"})(**toy_inputs())  # fp32 sites
    report = paro_compile.model_report(model)
    [graph] = report.reports
    assert graph.error.startswith("UnsupportedAttentionError: 2 attention site(s) cannot use paro attention")
    assert "compile failed: UnsupportedAttentionError" in report.summary()
    assert any(w.startswith(f"graph {graph.graph_index} failed to compile") for w in report.warnings)
    assert report.to_dict()["graphs"][0]["error"] == graph.error


@torch.no_grad()
def test_density_without_plan_warns_and_is_noted():
    with pytest.warns(UserWarning, match=r"density=0.3 has no effect: no plan is given and auto_calibrate is off"):
        torch.compile(toy(), backend="paro", options={**EXACT, "density": 0.3})(**toy_inputs())
    graph = paro_compile.last_report()
    assert graph.notes and "density=0.3 has no effect" in graph.notes[0]
    assert "note: density=0.3 has no effect" in graph.summary()
    assert ignored_option_notes(ParoConfig(density=0.3, auto_calibrate=True)) == []
    assert ignored_option_notes(ParoConfig(density=0.3, plan="p.safetensors")) == []
    assert ignored_option_notes(ParoConfig()) == []


def site(site_id: str, lowered: bool, reasons=()) -> SiteRecord:
    return SiteRecord(site_id, (1, 2, 128, 64), "bfloat16", lowered, reasons=list(reasons), qk_bits=8 if lowered else None,
                      pv_dtype="fp8" if lowered else None)


def test_degraded_sites_print_their_reasons():
    from paro_compile.inspection import build_model_report

    graph = CompileReport(graph_index=0, sites=[site("a#0", True, ["block masks need static shapes; dense at this site"]),
                                                site("b#0", True), site("c#0", False, ["head_dim 32"])])
    assert [s.site_id for s in graph.degraded] == ["a#0"]
    assert "degraded: block masks need static shapes; dense at this site" in graph.summary()
    report = build_model_report(None, [graph])
    assert report.to_dict()["summary"]["degraded"] == 1
    assert "1 degraded" in report.summary()
    assert "degraded: a#0: block masks need static shapes" in report.to_text(width=200)


class Holder(nn.Module):
    pass


def test_history_is_bounded_per_model_and_for_the_process():
    limit = report_module.HISTORY_LIMIT
    model = Holder()
    for _ in range(limit):
        new_report(CompileOrigin(model=weakref.ref(model)))
    assert not paro_compile.model_report(model).history_limit_reached
    for _ in range(5):
        new_report(CompileOrigin(model=weakref.ref(model)))
    assert len(report_module.compile_reports) == limit
    assert report_module.compile_reports[0].graph_index == 5  # indices keep counting
    assert len(reports_for(model)) == limit
    report = paro_compile.model_report(model)
    assert report.history_limit_reached and any(f"only the last {limit}" in w for w in report.warnings)
    assert report_module.dropped_reports(model) == 5 == report_module.dropped_reports()
    for _ in range(limit):
        new_report()  # another model's (or no model's) graphs push this model's out of the process history...
    assert len(reports_for(model)) == limit  # ...but not out of its own
    held = weakref.ref(model)
    del model, report
    gc.collect()
    assert held() is None and len(report_module._reports_by_model) == 0
    paro_compile.clear_reports()
    assert report_module.next_graph_index() == 0 and not report_module.compile_reports
