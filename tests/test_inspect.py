"""paro_compile.inspection: graph diffs, site table, text / HTML / JSON outputs, logging artifacts."""
import json
import logging
import os
import subprocess
import sys

import pytest
import torch

import paro_compile
from paro_compile.toy.dit import toy_inputs, toy_model
from paro_compile.report import CompileReport, SiteRecord
from tests.report_helpers import check_html, check_schema, documented_keys

EXACT = {"allow_fp32": True, "qk_bits": 16, "pv_dtype": "fp16"}


@pytest.fixture(scope="module")
def lowered_report():
    torch._dynamo.reset()
    return paro_compile.inspect(toy_model(), toy_inputs(), allow_fp32=True)


def test_lazy_exports():
    import paro_compile.calibration
    import paro_compile.inspection

    assert paro_compile.inspect is paro_compile.inspection.inspect
    assert paro_compile.calibrate is paro_compile.calibration.calibrate
    assert paro_compile.Plan.__name__ == "Plan" and paro_compile.SitePlan.__name__ == "SitePlan"
    assert paro_compile.TokenGrid.__name__ == "TokenGrid"


def test_import_does_not_import_triton_kernels():
    code = ("import sys, paro_compile; assert 'paro_compile.calibration' not in sys.modules, 'eager calibrate import'; "
            "paro_compile.inspect; paro_compile.calibrate; paro_compile.Plan; paro_compile.TokenGrid; "
            "bad = [m for m in sys.modules if m.startswith(('paro_compile.kernels.attention', 'paro_compile.kernels.prologue', "
            "'paro_compile.kernels.tuning'))]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_diff_shows_sdpa_replaced_by_paro_attention(lowered_report):
    report = lowered_report
    assert [s.site_id for s in report.sites] == ["blocks.0.attn#0", "blocks.1.attn#0"]
    assert all(s.lowered for s in report.sites)
    lower = [p for p in report.passes if p.name == "lower_attention"]
    assert len(lower) == 1
    diff = lower[0].diff
    removed = [l for l in diff.splitlines() if l.startswith("-") and not l.startswith("---")]
    added = [l for l in diff.splitlines() if l.startswith("+") and not l.startswith("+++")]
    assert any("scaled_dot_product_attention" in l for l in removed)
    assert any("torch.ops.paro.attention.default" in l for l in added)
    assert not any("scaled_dot_product_attention(" in l for l in lower[0].after.splitlines() if "=" in l and "#" not in l)
    changed = lower[0].changed_nodes
    assert len(changed["removed"]) == 2 and len(changed["added"]) == 2
    assert all(name.startswith("attention") for name in changed["added"])
    text = report.to_text()
    assert "torch.ops.paro.attention.default" in text and "blocks.0.attn#0" in text
    assert "model order" in text and "qk 8b / pv fp8" in text


def test_fallback_reasons_appear():
    report = paro_compile.inspect(toy_model(), toy_inputs())  # fp32 without allow_fp32 stays SDPA
    assert report.sites and not report.lowered
    assert all(any("dtype torch.float32" in r for r in s.reasons) for s in report.sites)
    assert "allow_fp32=True" in report.to_text(width=200)
    assert report.passes[-1].diff == ""
    data = report.to_dict()
    assert data["summary"]["fallbacks"] == 2 and data["summary"]["lowered"] == 0
    assert "dtype torch.float32" in report.to_html()


def test_example_kwargs_and_positional_inputs():
    model = toy_model()
    inputs = toy_inputs()
    a = paro_compile.inspect(model, example_kwargs=inputs, **EXACT)
    b = paro_compile.inspect(model, inputs["latent"], inputs["text"], inputs["timestep"], **EXACT)
    assert [s.site_id for s in a.sites] == [s.site_id for s in b.sites]
    assert all(s.lowered and s.qk_bits == 16 for s in a.sites + b.sites)
    assert len(a.reports) == 1 and len(b.reports) == 1  # dynamo was reset between the two


def test_json_matches_documented_schema(lowered_report, tmp_path):
    path = tmp_path / "r.json"
    text = lowered_report.to_json(path)
    data = json.loads(path.read_text())
    assert data == json.loads(text)
    check_schema(data)
    site = data["graphs"][0]["sites"][0]
    assert site["heads"] == 2 and site["shape"] == [1, 2, 40, 64] and site["order_summary"] == "model order"
    assert data["options"] == {"allow_fp32": True}


def test_schema_doc_lists_every_section():
    assert set(documented_keys()) == {"<root>", "summary", "graphs[]", "graphs[].passes[]",
                                      "graphs[].passes[].changed_nodes", "graphs[].sites[]"}


def test_html_is_self_contained_and_well_formed(lowered_report, tmp_path):
    path = tmp_path / "r.html"
    text = lowered_report.to_html(path)
    assert path.read_text() == text
    parser = check_html(text)
    assert "style" in parser.tags and "table" in parser.tags
    assert "torch.ops.paro.attention.default" in text and 'class="add"' in text and 'class="del"' in text
    assert "blocks.1.attn#0" in text


def test_order_summary_and_changed_nodes():
    from paro_compile.inspection import changed_nodes, order_summary

    assert order_summary(["FHW"] * 20 + ["HWF"] * 28) == "FHW×20, HWF×28"
    assert order_summary(["HWF", "FHW", "HWF"]) == "HWF×2, FHW×1"
    assert order_summary([]) == "model order"
    before = 'a: "f32[2]" = x + 1\nb: "f32[2]" = a * 2\nc = b.sum()\n'
    after = 'a: "f32[2]" = x + 1\nd: "f32[2]" = a * 3\nc = d.sum()\n'
    assert changed_nodes(before, after) == {"removed": ["b"], "added": ["d"], "modified": ["c"]}


def fake_report() -> CompileReport:
    report = CompileReport(graph_index=7)
    report.sites = [SiteRecord("blocks.0.attn#0", (1, 4, 128, 64), "bfloat16", True, density=0.25, qk_bits=8,
                               pv_dtype="fp8", orders=["FHW", "HWF", "HWF", "FHW"], permutation="kernel"),
                    SiteRecord("blocks.1.attn#0", (1, 4, 128, 32), "bfloat16", False, reasons=["head_dim 32 (v: 32) not in (64, 128)"])]
    report.passes = [{"name": "lower_attention", "before": "x = sdpa(q, k, v)\ny = x + 1\n",
                      "after": "attention_default = paro(q, k, v)\ny = attention_default + 1\n"}]
    return report


def test_emit_report_artifacts_trace_and_logger(monkeypatch):
    import paro_compile.inspection as module

    calls = []

    def fake_trace_structured(name, metadata_fn=dict, *, payload_fn=lambda: None, **kwargs):
        calls.append((name, metadata_fn(), payload_fn()))

    monkeypatch.setattr(torch._logging, "trace_structured", fake_trace_structured)
    records = []

    class Capture(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Capture()
    log = module.artifact_log
    assert log is not None, "torch._logging artifact registration failed"
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        module.emit_report_artifacts(fake_report())
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    by_name = {meta["name"]: (name, meta, payload) for name, meta, payload in calls}
    assert by_name["paro_graph_diff"][0] == "artifact" and by_name["paro_graph_diff"][1]["encoding"] == "string"
    assert "+attention_default = paro(q, k, v)" in by_name["paro_graph_diff"][2]
    payload = json.loads(by_name["paro_report"][2])
    assert payload["schema_version"] == 2 and payload["graph"]["sites"][0]["order_summary"] == "FHW×2, HWF×2"
    assert records and "-x = sdpa(q, k, v)" in records[0] and "head_dim 32" in records[0]


def test_torch_trace_and_torch_logs_show_the_diff(tmp_path):
    code = ("import paro_compile\nfrom paro_compile.toy.dit import toy_model, toy_inputs\n"
            "paro_compile.inspect(toy_model(), toy_inputs(), allow_fp32=True, qk_bits=16, pv_dtype='fp16')\n")
    env = dict(os.environ, TORCH_TRACE=str(tmp_path / "trace"), TORCH_LOGS="+paro_compile")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[__paro_graph_diff]" in done.stderr and "+        attention_default" in done.stderr
    trace = "".join(p.read_text() for p in (tmp_path / "trace").iterdir())
    assert '"name": "paro_graph_diff"' in trace and '"name": "paro_report"' in trace


def test_render_prints_names_and_reasons_as_text_not_markup():
    """Module names with brackets and reasons that look like rich markup are printed as they are."""
    from paro_compile.inspection import InspectionReport

    graph = CompileReport(graph_index=0)
    graph.sites = [SiteRecord("blocks[attn].proj#0", (1, 4, 128, 64), "bfloat16", False,
                              reasons=["[bold]masked[/bold] input"]),
                   SiteRecord("layers[b]#0", (1, 4, 128, 64), "bfloat16", True, reasons=["[red]dense here[/red]"],
                              qk_bits=8, pv_dtype="fp8")]
    graph.passes = [{"name": "lower_attention", "before": "x = sdpa(q, k, v)\n", "after": "x = paro(q, k, v)\n"}]
    report = InspectionReport([graph], model_name="Model[v2]")
    text = report.to_text(width=250)
    for literal in ("blocks[attn].proj#0", "SDPA: [bold]masked[/bold] input", "Model[v2]", "layers[b]#0",
                    "degraded: layers[b]#0: [red]dense here[/red]"):
        assert literal in text, literal
    assert "[red]dense here[/red]" in report.summary()
