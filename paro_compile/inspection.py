"""Inspection: what the paro passes did to a model's graphs, as terminal text, HTML and JSON.

``paro_compile.inspect(model, *example_inputs, **options)`` compiles ``model`` with ``backend="paro"`` and
``options`` (after ``torch._dynamo.reset()``, under ``torch.no_grad()``), runs it on the example inputs (a second,
warm call under `watch_attention`) and returns an `InspectionReport` built from every `CompileReport` the backend
produced; ``paro_compile.model_report(model)`` builds the same report from the graphs already compiled for a model:

- per graph and pass: the readable graph code before and after, a unified diff and the changed nodes
  (removed / added / modified, by FX node name);
- per attention site: site id, shape, heads, chosen order per head ("FHW×20, HWF×28"), density, bits, how
  the permutation was applied and, for sites left on SDPA or lowered with less than the plan asked for, the reasons;
- per model: the graphs without attention, graphs that failed to compile, options without effect, and attention
  that ran outside every compiled graph (`uncovered_attention_modules` from the graphs, `watch_attention` on a run),
  with Dynamo's graph-break reasons and known fixes (`fix_hints`).

``report.render()`` prints it with rich (tables + syntax-highlighted diff), ``report.to_html(path)`` writes one
self-contained HTML file (inline CSS, no external assets), ``report.to_json(path)`` / ``report.to_dict()`` give
the JSON documented in docs/report_schema.md (``schema_version`` = `SCHEMA_VERSION`).

The backend also calls `emit_report_artifacts` for every compiled graph, so the diffs show up
- in ``TORCH_TRACE=<dir>`` structured traces (tlparse) as artifacts ``paro_graph_diff`` (string) and
  ``paro_report`` (json);
- in the terminal with ``TORCH_LOGS="+paro_compile"`` (``TORCH_LOGS="paro_compile"`` prints only the
  per-graph summary), or in-process with ``torch._logging.set_logs(modules={"paro_compile": logging.DEBUG})``
  or `enable_graph_diff_logs()`. ``TORCH_LOGS="+paro_graph_diff"`` cannot work: torch parses TORCH_LOGS
  when it is imported, before any third-party artifact can be registered, and rejects the unknown name.

``paro_compile.inspect`` is defined below (exported lazily by the package); ``paro_compile.model_report``,
``paro_compile.watch_attention`` and the checks for attention outside the compiled graphs live in
`paro_compile.model_inspection` and are importable from here too.
"""
from __future__ import annotations

import difflib
import html
import io
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

from paro_compile.model_inspection import (  # noqa: F401 - the model-wide names are re-exported from here
    COMPILE_EVENT_SUFFIX,
    COMPILED_GRAPH_EVENTS,
    PARO_EVENT,
    SDPA_EVENTS,
    AttentionWatch,
    attention_module_names,
    build_model_report,
    covered_module_paths,
    dynamo_graph_breaks,
    fix_hints,
    is_linear_attention,
    linear_attention_modules,
    model_report,
    short_break_reason,
    uncovered_attention_modules,
    watch_attention,
)
from paro_compile.report import HISTORY_LIMIT, CompileReport, SiteFilters, SiteRecord

SCHEMA_VERSION = 2
ARTIFACT_NAME = "paro_graph_diff"
JSON_ARTIFACT_NAME = "paro_report"

log = logging.getLogger("paro_compile")


def _register_artifact() -> Optional[logging.Logger]:
    """Register the ``paro_graph_diff`` logging artifact (idempotent); None if torch's API is missing."""
    try:
        import torch._logging
        from torch._logging._internal import log_registry, register_artifact

        if ARTIFACT_NAME not in log_registry.artifact_names:
            register_artifact(ARTIFACT_NAME, "paro_compile: before/after graph diff of every paro pass",
                              off_by_default=False)
        return torch._logging.getArtifactLogger(__name__, ARTIFACT_NAME)
    except Exception:  # pragma: no cover - older/newer torch without these internals
        return None


artifact_log = _register_artifact()


def enable_graph_diff_logs(level: int = logging.DEBUG) -> None:
    """Print the per-graph summary and graph diffs to stderr from now on (like ``TORCH_LOGS="+paro_compile"``)."""
    import torch._logging

    torch._logging.set_logs(modules={"paro_compile": level})


# ------------------------------------------------------------------------------------------------------
# Diffs
# ------------------------------------------------------------------------------------------------------
_NODE_LINE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?::\s*\"[^\"]*\"\s*)?=(?!=)")


def _node_lines(code: str) -> dict[str, str]:
    lines: dict[str, str] = {}
    for line in code.splitlines():
        match = _NODE_LINE.match(line)
        if match and not line.lstrip().startswith(("#", "def ", "class ")):
            lines.setdefault(match.group(1), line.strip())
    return lines


def changed_nodes(before: str, after: str) -> dict[str, list[str]]:
    """FX node names (from readable graph code) that the pass removed, added, or whose line changed."""
    old, new = _node_lines(before), _node_lines(after)
    return {
        "removed": [name for name in old if name not in new],
        "added": [name for name in new if name not in old],
        "modified": [name for name in old if name in new and old[name] != new[name]],
    }


def unified_diff(before: str, after: str, name: str = "graph", context: int = 3) -> str:
    return "".join(difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                        fromfile=f"{name} (before)", tofile=f"{name} (after)", n=context))


@dataclass
class PassDiff:
    """One pass of one compiled graph."""

    graph_index: int
    name: str
    before: str
    after: str
    diff: str
    changed_nodes: dict[str, list[str]]

    @classmethod
    def from_record(cls, graph_index: int, record: Mapping[str, Any]) -> "PassDiff":
        before, after = str(record.get("before", "")), str(record.get("after", ""))
        name = str(record.get("name", "pass"))
        return cls(graph_index, name, before, after, unified_diff(before, after, f"graph {graph_index} {name}"),
                   changed_nodes(before, after))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "before": self.before, "after": self.after, "diff": self.diff,
                "changed_nodes": {k: list(v) for k, v in self.changed_nodes.items()}}


# ------------------------------------------------------------------------------------------------------
# Sites
# ------------------------------------------------------------------------------------------------------
def order_summary(orders: Iterable[str]) -> str:
    """["FHW", "FHW", "HWF"] → "FHW×2, HWF×1" (first-seen order); [] → "model order"."""
    counts = Counter(orders)
    if not counts:
        return "model order"
    return ", ".join(f"{order}×{count}" for order, count in counts.items())


def site_heads(site: SiteRecord) -> Any:
    shape = tuple(site.shape or ())
    return shape[1] if len(shape) >= 2 else None


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return repr(value) if not hasattr(value, "summary") else f"<{type(value).__name__}>"


def site_dict(site: SiteRecord, graph_index: int) -> dict[str, Any]:
    return {
        "site_id": site.site_id,
        "graph_index": graph_index,
        "shape": _jsonable(list(site.shape or ())),
        "heads": _jsonable(site_heads(site)),
        "dtype": site.dtype,
        "lowered": bool(site.lowered),
        "reasons": list(site.reasons),
        "density": float(site.density),
        "qk_bits": site.qk_bits,
        "pv_dtype": site.pv_dtype,
        "orders": list(site.orders),
        "order_summary": order_summary(site.orders),
        "permutation": site.permutation,
        "folded_order": site.folded_order,
        "kernel_permutation": site.kernel_permutation,
        "step_buckets": int(site.step_buckets),
        "compensated": bool(site.compensated),
        "plan_bytes": int(site.plan_bytes),
        "mask_encoding": site.mask_encoding,
    }


def graph_dict(report: CompileReport) -> dict[str, Any]:
    return {
        "graph_index": report.graph_index,
        "compile_id": report.compile_id,
        "frame": report.frame,
        "error": report.error,
        "notes": list(report.notes),
        "context_parallel": list(report.context_parallel),
        "context_parallel_fold": report.context_parallel_fold,
        "gathers_left": int(report.gathers_left),
        "passes": [PassDiff.from_record(report.graph_index, p).to_dict() for p in report.passes],
        "sites": [site_dict(s, report.graph_index) for s in report.sites],
    }


# ------------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------------
def linear_attention_note(names: list[str]) -> str:
    """The report's note on attention modules that compute linear attention (`linear_attention_modules`)."""
    more = f", … ({len(names) - 8} more)" if len(names) > 8 else ""
    return (f"{len(names)} attention module(s) compute linear attention (no softmax, no SDPA): nothing to lower, they "
            "run as the model wrote them: " + ", ".join(names[:8]) + more)


@dataclass
class InspectionReport(SiteFilters):
    """Everything the paro backend did while compiling one model (one `CompileReport` per graph), and what ran
    outside the compiled graphs."""

    reports: list[CompileReport]
    options: dict[str, Any] = field(default_factory=dict)
    model_name: str = "model"
    uncovered_attention_modules: list[str] = field(default_factory=list)
    """Attention modules of the model without a site in any compiled graph (see `uncovered_attention_modules`)."""
    linear_attention_modules: list[str] = field(default_factory=list)
    """Attention modules computing linear attention (no softmax, no SDPA): the backend has nothing to lower there."""
    eager_attention: Optional[AttentionWatch] = None
    """SDPA calls counted outside every compiled graph on a run (`watch_attention`); None: not measured."""
    graph_breaks: dict[str, int] = field(default_factory=dict)
    """Dynamo's graph-break reasons, shortened (`inspect`: those of its compile; `model_report`: the process's)."""
    hints: list[str] = field(default_factory=list)
    """Known causes of attention outside the compiled graphs and how to fix them."""
    history_limit_reached: bool = False
    """The model compiled more graphs than are kept (`paro_compile.report.HISTORY_LIMIT`): the oldest are gone."""

    # ---- views ---------------------------------------------------------------------------------
    @property
    def passes(self) -> list[PassDiff]:
        return [PassDiff.from_record(r.graph_index, p) for r in self.reports for p in r.passes]

    @property
    def sites(self) -> list[SiteRecord]:
        return [s for r in self.reports for s in r.sites]

    @property
    def degraded(self) -> list[SiteRecord]:
        """Lowered sites that run with less than the plan asked for, each with its reasons."""
        return [s for r in self.reports for s in r.degraded]

    @property
    def graphs_without_attention(self) -> list[CompileReport]:
        return [r for r in self.reports if not r.sites and r.error is None]

    @property
    def diff(self) -> str:
        """All unified diffs, one after the other."""
        return "".join(p.diff for p in self.passes)

    @property
    def warnings(self) -> list[str]:
        """What the user should know: attention outside the compiled graphs, failed graphs, options without effect."""
        found = []
        if self.uncovered_attention_modules:
            names = self.uncovered_attention_modules
            found.append(f"{len(names)} attention module(s) have no site in any compiled graph: their attention ran "
                         f"outside the compiled graphs (graph breaks), or they were not called: "
                         + ", ".join(names[:8]) + (f", … ({len(names) - 8} more)" if len(names) > 8 else ""))
        watch = self.eager_attention
        if watch is not None and (watch.eager_calls or watch.compiled_while_watching):
            found.append(watch.summary())
        found += [f"graph {r.graph_index} failed to compile: {r.error}" for r in self.reports if r.error is not None]
        found += list(dict.fromkeys(note for r in self.reports for note in r.notes))
        if self.history_limit_reached:
            found.append(f"only the last {HISTORY_LIMIT} compiled graphs are kept per model and for the process: older "
                         "ones are not in this report")
        return found

    def summary(self) -> str:
        """One line for the model, one block per graph with attention (or a failure), the graphs without attention on
        one line, then warnings, Dynamo's graph-break reasons and fixes."""
        if not self.reports and not self.warnings:
            return f"paro: {self.model_name}: no graph was compiled"
        sites = self.sites
        lines = [f"paro: {self.model_name}: {len(self.reports)} graph(s), {len(self.lowered)}/{len(sites)} attention "
                 f"site(s) lowered, {len(self.fallbacks)} on SDPA, {len(self.degraded)} degraded, "
                 f"{sum(int(r.gathers_left) for r in self.reports)} runtime gather(s)"]
        lines += [r.summary(notes=False) for r in self.reports if r.sites or r.error is not None]
        empty = self.graphs_without_attention
        if empty:
            lines.append("graphs without attention: " + ", ".join(
                f"{r.graph_index}" + (f" ({r.frame})" if r.frame else "") for r in empty))
        if self.linear_attention_modules:
            lines.append(f"note: {linear_attention_note(self.linear_attention_modules)}")
        lines += [f"warning: {w}" for w in self.warnings]
        if self.graph_breaks and (self.uncovered_attention_modules or (self.eager_attention and self.eager_attention.eager_calls)):
            lines.append("Dynamo graph breaks: " + "; ".join(f"{reason} (×{n})" for reason, n in self.graph_breaks.items()))
        lines += [f"fix: {hint}" for hint in self.hints]
        return "\n".join(lines)

    # ---- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON document of docs/report_schema.md."""
        import torch

        import paro_compile

        sites = self.sites
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": "paro_compile",
            "paro_compile_version": paro_compile.__version__,
            "torch_version": torch.__version__,
            "model": self.model_name,
            "options": _jsonable(self.options),
            "summary": {
                "graphs": len(self.reports),
                "graphs_without_attention": len(self.graphs_without_attention),
                "sites": len(sites),
                "lowered": sum(1 for s in sites if s.lowered),
                "fallbacks": sum(1 for s in sites if not s.lowered),
                "degraded": len(self.degraded),
                "gathers_left": sum(int(r.gathers_left) for r in self.reports),
            },
            "warnings": self.warnings,
            "uncovered_attention_modules": list(self.uncovered_attention_modules),
            "linear_attention_modules": list(self.linear_attention_modules),
            "eager_sdpa_calls": self.eager_attention.eager_calls if self.eager_attention is not None else None,
            "eager_sdpa_call_sites": (dict(self.eager_attention.call_sites.most_common())
                                      if self.eager_attention is not None else {}),
            "paro_attention_calls": self.eager_attention.paro_calls if self.eager_attention is not None else None,
            "graph_breaks": dict(self.graph_breaks),
            "hints": list(self.hints),
            "graphs": [graph_dict(r) for r in self.reports],
        }

    def to_json(self, path: Union[str, Path, None] = None, indent: int = 2) -> str:
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    # ---- HTML ----------------------------------------------------------------------------------
    def to_html(self, path: Union[str, Path, None] = None) -> str:
        text = render_html(self.to_dict())
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    # ---- terminal ------------------------------------------------------------------------------
    def render(self, console: Any = None, *, code: bool = False) -> None:
        """Print with rich: per pass the syntax-highlighted diff and changed nodes, then the site table and the
        warnings. ``code=True`` also prints the full after-code of each pass. Names and reasons from the model are
        printed as text, never as rich markup."""
        from rich.console import Console
        from rich.markup import escape
        from rich.rule import Rule
        from rich.syntax import Syntax
        from rich.table import Table
        from rich.text import Text

        console = console or Console()
        data = self.to_dict()
        s = data["summary"]
        console.print(Rule(Text(f"paro inspect: {self.model_name}")))
        console.print(Text(f"{s['graphs']} graph(s), {s['lowered']}/{s['sites']} attention site(s) lowered, "
                           f"{s['fallbacks']} on SDPA, {s['degraded']} degraded, {s['gathers_left']} runtime gather(s) left"))
        for graph in data["graphs"]:
            if graph["error"] is not None:
                console.print(Text(f"graph {graph['graph_index']}: compile failed: {graph['error']}", style="bold red"))
            if not graph["sites"] and not any(p["diff"] for p in graph["passes"]):
                continue  # listed once below, with the other graphs without attention
            for p in graph["passes"]:
                console.print(Rule(Text(f"graph {graph['graph_index']} · pass {p['name']}"), style="cyan"))
                ch = p["changed_nodes"]
                line = Text("changed nodes:")
                for kind, style in (("removed", "bold red"), ("added", "bold green"), ("modified", "bold yellow")):
                    line.append(f" {kind} ")
                    line.append(", ".join(ch[kind]) or "-", style=style)
                    line.append(";" if kind != "modified" else "")
                console.print(line)
                if p["diff"]:
                    console.print(Syntax(p["diff"], "diff", theme="ansi_dark", word_wrap=True, background_color="default"))
                else:
                    console.print("(no change)")
                if code:
                    console.print(Syntax(p["after"], "python", theme="ansi_dark", background_color="default"))
        empty = self.graphs_without_attention
        if empty:
            console.print(Text("graphs without attention: " + ", ".join(
                f"{r.graph_index}" + (f" ({r.frame})" if r.frame else "") for r in empty)))
        table = Table(title="attention sites", show_lines=False)
        for column in SITE_COLUMNS:
            table.add_column(column, overflow="fold", no_wrap=column in ("site", "shape", "orders", "density", "bits"))
        for graph in data["graphs"]:
            for site in graph["sites"]:
                table.add_row(*(escape(cell) for cell in _site_cells(site)))
        console.print(table)
        for site in self.degraded:
            console.print(Text(f"degraded: {site.site_id}: {'; '.join(site.reasons)}", style="yellow"))
        if self.linear_attention_modules:
            console.print(Text(f"note: {linear_attention_note(self.linear_attention_modules)}"))
        for warning in data["warnings"]:
            console.print(Text(f"warning: {warning}", style="bold yellow"))
        if data["graph_breaks"] and data["warnings"]:
            console.print(Text("Dynamo graph breaks: " + "; ".join(f"{r} (×{n})" for r, n in data["graph_breaks"].items())))
        for hint in data["hints"]:
            console.print(Text(f"fix: {hint}", style="green"))

    def to_text(self, width: int = 160, color: bool = False, **kwargs: Any) -> str:
        from rich.console import Console

        buffer = io.StringIO()
        console = Console(file=buffer, width=width, force_terminal=color, color_system="standard" if color else None,
                          no_color=not color, highlight=False)
        self.render(console, **kwargs)
        return buffer.getvalue()

    def __str__(self) -> str:
        return self.to_text()


SITE_COLUMNS = ("graph", "site", "shape", "heads", "orders", "density", "bits", "permutation", "folded order",
                "kernel perm", "plan memory", "status")
"""The site table's columns (rich and HTML): "folded order" is the order absorbed by layout ops upstream of the
site, "kernel perm" what the kernel still applies ("none", "residual" per head on top of it, "full")."""


def _site_cells(site: Mapping[str, Any]) -> list[str]:
    lowered = site["lowered"]
    bits = f"qk {site['qk_bits']}b / pv {site['pv_dtype']}" if lowered else "-"
    status = "paro" if lowered else "SDPA: " + "; ".join(site["reasons"])
    return [str(site["graph_index"]), site["site_id"], "×".join(str(x) for x in site["shape"]), str(site["heads"]),
            site["order_summary"] if lowered else "-", f"{site['density']:.3f}" if lowered else "-",
            bits, site["permutation"] if lowered else "-", (site["folded_order"] or "-") if lowered else "-",
            site["kernel_permutation"] if lowered else "-", _plan_memory_cell(site) if lowered else "-", status]


def _plan_memory_cell(site: Mapping[str, Any]) -> str:
    """Device bytes of the site's plan constants and how its masks are stored (``mask_encoding``)."""
    encoding = site.get("mask_encoding", "dense")
    size = f"{site['plan_bytes'] / 2**20:.2f} MiB" if site["plan_bytes"] else "0"
    return size if encoding == "dense" else f"{size} ({encoding} masks)"


# ------------------------------------------------------------------------------------------------------
# HTML
# ------------------------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em;color:#1d1d1f;background:#fff}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}h3{font-size:1.05em}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3}tr.fallback td{background:#fff6e5}tr.lowered td{background:#f0fff0}
pre{background:#f8f8f8;border:1px solid #e3e3e3;padding:.6em;overflow-x:auto;font-size:.82em;line-height:1.35}
.add{background:#e6ffec;color:#116329;display:block}.del{background:#ffebe9;color:#82071e;display:block}
.hunk{color:#6639ba;display:block}.hdr{color:#57606a;font-weight:bold;display:block}.ctx{display:block}
.node{font-family:monospace;background:#fff3b0;padding:0 .2em;border-radius:3px}
.muted{color:#57606a}details{margin:.5em 0}summary{cursor:pointer}.warning{color:#9a6700}
"""


def _diff_html(diff: str) -> str:
    out = []
    for line in diff.splitlines():
        cls = ("hdr" if line.startswith(("---", "+++")) else "hunk" if line.startswith("@@")
               else "add" if line.startswith("+") else "del" if line.startswith("-") else "ctx")
        out.append(f'<span class="{cls}">{html.escape(line) or "&#160;"}</span>')
    return "".join(out)


def render_html(data: Mapping[str, Any]) -> str:
    e = html.escape
    s = data["summary"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>paro inspect: {e(str(data['model']))}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>paro inspect: {e(str(data['model']))}</h1>",
        f"<p>{s['graphs']} graph(s), {s['lowered']}/{s['sites']} attention site(s) lowered, {s['fallbacks']} on SDPA, "
        f"{s['gathers_left']} runtime gather(s) left. <span class=\"muted\">paro_compile {e(data['paro_compile_version'])}, "
        f"torch {e(data['torch_version'])}, schema {data['schema_version']}</span></p>",
        f"<p>options: <code>{e(json.dumps(data['options']))}</code></p>",
    ]
    linear = data.get("linear_attention_modules") or []
    notices = ([("note", linear_attention_note(linear))] if linear else []) + (
        [("warning", w) for w in data["warnings"]]
        + ([("graph breaks", "; ".join(f"{r} (×{n})" for r, n in data["graph_breaks"].items()))]
           if data["graph_breaks"] and data["warnings"] else [])
        + [("fix", h) for h in data["hints"]])
    if notices:
        parts.append("<ul>" + "".join(f'<li class="warning"><b>{e(kind)}:</b> {e(text)}</li>' for kind, text in notices)
                     + "</ul>")
    parts += [
        "<h2>Attention sites</h2>",
        "<table>",
        "<thead><tr>" + "".join(f"<th>{c}</th>" for c in SITE_COLUMNS) + "</tr></thead>",
        "<tbody>",
    ]
    for graph in data["graphs"]:
        for site in graph["sites"]:
            row_class = "lowered" if site["lowered"] else "fallback"
            parts.append(f'<tr class="{row_class}">' + "".join(f"<td>{e(c)}</td>" for c in _site_cells(site)) + "</tr>")
    parts += ["</tbody>", "</table>"]
    for graph in data["graphs"]:
        origin = ", ".join(x for x in (graph["frame"], f"compile {graph['compile_id']}" if graph["compile_id"] else "") if x)
        parts.append(f"<h2>Graph {graph['graph_index']}" + (f' <span class="muted">({e(origin)})</span>' if origin else "")
                     + "</h2>")
        if graph["error"] is not None:
            parts.append(f'<p class="warning">compile failed: {e(graph["error"])}</p>')
        if not graph["sites"]:
            parts.append('<p class="muted">no attention in this graph</p>')
        for p in graph["passes"]:
            ch = p["changed_nodes"]
            parts.append(f"<h3>Pass <code>{e(p['name'])}</code></h3>")
            nodes = []
            for kind in ("removed", "added", "modified"):
                names = " ".join(f'<span class="node">{e(n)}</span>' for n in ch[kind]) or '<span class="muted">none</span>'
                nodes.append(f"<li>{kind}: {names}</li>")
            parts.append("<ul>" + "".join(nodes) + "</ul>")
            parts.append(f"<pre>{_diff_html(p['diff'])}</pre>" if p["diff"] else '<p class="muted">no change</p>')
            parts.append(f"<details><summary>graph code before</summary><pre>{e(p['before'])}</pre></details>")
            parts.append(f"<details><summary>graph code after</summary><pre>{e(p['after'])}</pre></details>")
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------------
def inspect(model: Any, *example_inputs: Any, example_kwargs: Optional[Mapping[str, Any]] = None,
            count_eager_attention: bool = True, **options: Any) -> InspectionReport:
    """Compile ``model`` with ``backend="paro"`` and ``options``, run it, return what the passes did.

    Positional ``example_inputs`` are the model's positional arguments; keyword arguments go in
    ``example_kwargs`` (or pass one dict as the only example input). Every other keyword is a paro
    option (see README "Options"). Dynamo is reset first, so earlier compilations do not hide graphs.
    The first call compiles; with ``count_eager_attention`` (the default) a second, warm call runs under
    `watch_attention` and the report counts the SDPA calls that ran outside every compiled graph.
    """
    import torch

    from paro_compile.report import compile_reports, next_graph_index

    if example_kwargs is None and len(example_inputs) == 1 and isinstance(example_inputs[0], Mapping):
        example_kwargs, example_inputs = example_inputs[0], ()
    kwargs = dict(example_kwargs or {})
    torch._dynamo.reset()
    first = next_graph_index()
    breaks_before = dynamo_graph_breaks()
    compiled = torch.compile(model, backend="paro", options=dict(options) if options else None)
    watch = None
    with torch.no_grad():
        compiled(*example_inputs, **kwargs)
        if count_eager_attention:
            with watch_attention() as watch:
                compiled(*example_inputs, **kwargs)
    reports = [r for r in compile_reports if r.graph_index >= first]
    return build_model_report(getattr(model, "_orig_mod", model), reports, options=dict(options), eager_attention=watch,
                              graph_breaks=dynamo_graph_breaks() - breaks_before,
                              history_limit_reached=bool(reports) and reports[0].graph_index > first)


def graph_diff_text(report: CompileReport) -> str:
    """The summary and the unified diff of every pass of one compiled graph (the artifact payload)."""
    parts = [report.summary(), ""]
    for p in report.passes:
        d = PassDiff.from_record(report.graph_index, p)
        ch = d.changed_nodes
        parts.append(f"=== pass {d.name}: removed {ch['removed']}, added {ch['added']}, modified {ch['modified']}")
        parts.append(d.diff or "(no change)\n")
    return "\n".join(parts)


def emit_report_artifacts(report: CompileReport) -> None:
    """Publish one compiled graph's diff: TORCH_TRACE artifacts and the ``paro_graph_diff`` log artifact.

    Cheap when nothing listens (payloads are built lazily); never raises into the compilation.
    """
    try:
        import torch._logging

        torch._logging.trace_structured(
            "artifact",
            metadata_fn=lambda: {"name": ARTIFACT_NAME, "encoding": "string"},
            payload_fn=lambda: graph_diff_text(report),
        )
        torch._logging.trace_structured(
            "artifact",
            metadata_fn=lambda: {"name": JSON_ARTIFACT_NAME, "encoding": "json"},
            payload_fn=lambda: json.dumps({"schema_version": SCHEMA_VERSION, "graph": graph_dict(report)}),
        )
        if artifact_log is not None and artifact_log.isEnabledFor(logging.DEBUG):
            artifact_log.debug("%s", graph_diff_text(report))
    except Exception as error:  # pragma: no cover - reporting must never break a compile
        log.warning("paro: could not emit the graph diff artifacts: %s", error)
