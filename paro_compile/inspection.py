"""Inspection: what the paro passes did to a model's graphs, as terminal text, HTML and JSON.

``paro_compile.inspect(model, *example_inputs, **options)`` compiles ``model`` with ``backend="paro"`` and
``options`` (after ``torch._dynamo.reset()``, under ``torch.no_grad()``), runs it once on the example inputs
and returns an `InspectionReport` built from every `CompileReport` the backend produced:

- per graph and pass: the readable graph code before and after, a unified diff and the changed nodes
  (removed / added / modified, by FX node name);
- per attention site: site id, shape, heads, chosen order per head ("FHW×20, HWF×28"), density, bits, how
  the permutation was applied and, for sites left on SDPA, the reasons.

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

``paro_compile.inspect`` is `inspect` below (exported lazily by the package).
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

from paro_compile.report import CompileReport, SiteFilters, SiteRecord

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
    }


def graph_dict(report: CompileReport) -> dict[str, Any]:
    return {
        "graph_index": report.graph_index,
        "gathers_left": int(report.gathers_left),
        "passes": [PassDiff.from_record(report.graph_index, p).to_dict() for p in report.passes],
        "sites": [site_dict(s, report.graph_index) for s in report.sites],
    }


# ------------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------------
@dataclass
class InspectionReport(SiteFilters):
    """Everything the paro backend did while compiling one model (one `CompileReport` per graph)."""

    reports: list[CompileReport]
    options: dict[str, Any] = field(default_factory=dict)
    model_name: str = "model"

    # ---- views ---------------------------------------------------------------------------------
    @property
    def passes(self) -> list[PassDiff]:
        return [PassDiff.from_record(r.graph_index, p) for r in self.reports for p in r.passes]

    @property
    def sites(self) -> list[SiteRecord]:
        return [s for r in self.reports for s in r.sites]

    @property
    def diff(self) -> str:
        """All unified diffs, one after the other."""
        return "".join(p.diff for p in self.passes)

    def summary(self) -> str:
        return "\n".join(r.summary() for r in self.reports) or "paro: no graph was compiled"

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
                "sites": len(sites),
                "lowered": sum(1 for s in sites if s.lowered),
                "fallbacks": sum(1 for s in sites if not s.lowered),
                "gathers_left": sum(int(r.gathers_left) for r in self.reports),
            },
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
        """Print with rich: per pass the syntax-highlighted diff and changed nodes, then the site table.
        ``code=True`` also prints the full after-code of each pass."""
        from rich.console import Console
        from rich.rule import Rule
        from rich.syntax import Syntax
        from rich.table import Table
        from rich.text import Text

        console = console or Console()
        data = self.to_dict()
        s = data["summary"]
        console.print(Rule(f"paro inspect: {self.model_name}"))
        console.print(f"{s['graphs']} graph(s), {s['lowered']}/{s['sites']} attention site(s) lowered, "
                      f"{s['fallbacks']} on SDPA, {s['gathers_left']} runtime gather(s) left")
        for graph in data["graphs"]:
            for p in graph["passes"]:
                console.print(Rule(f"graph {graph['graph_index']} · pass {p['name']}", style="cyan"))
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
        table = Table(title="attention sites", show_lines=False)
        for column in SITE_COLUMNS:
            table.add_column(column, overflow="fold", no_wrap=column in ("site", "shape", "orders", "density", "bits"))
        for graph in data["graphs"]:
            for site in graph["sites"]:
                table.add_row(*_site_cells(site))
        console.print(table)

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
                "kernel perm", "status")
"""The site table's columns (rich and HTML): "folded order" is the order absorbed by layout ops upstream of the
site, "kernel perm" what the kernel still applies ("none", "residual" per head on top of it, "full")."""


def _site_cells(site: Mapping[str, Any]) -> list[str]:
    lowered = site["lowered"]
    bits = f"qk {site['qk_bits']}b / pv {site['pv_dtype']}" if lowered else "-"
    status = "paro" if lowered else "SDPA: " + "; ".join(site["reasons"])
    return [str(site["graph_index"]), site["site_id"], "×".join(str(x) for x in site["shape"]), str(site["heads"]),
            site["order_summary"] if lowered else "-", f"{site['density']:.3f}" if lowered else "-",
            bits, site["permutation"] if lowered else "-", (site["folded_order"] or "-") if lowered else "-",
            site["kernel_permutation"] if lowered else "-", status]


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
.muted{color:#57606a}details{margin:.5em 0}summary{cursor:pointer}
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
        parts.append(f"<h2>Graph {graph['graph_index']}</h2>")
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
            **options: Any) -> InspectionReport:
    """Compile ``model`` with ``backend="paro"`` and ``options``, run it once, return what the passes did.

    Positional ``example_inputs`` are the model's positional arguments; keyword arguments go in
    ``example_kwargs`` (or pass one dict as the only example input). Every other keyword is a paro
    option (see README "Options"). Dynamo is reset first, so earlier compilations do not hide graphs.
    """
    import torch

    from paro_compile import report as report_module

    if example_kwargs is None and len(example_inputs) == 1 and isinstance(example_inputs[0], Mapping):
        example_kwargs, example_inputs = example_inputs[0], ()
    torch._dynamo.reset()
    start = len(report_module.compile_reports)
    compiled = torch.compile(model, backend="paro", options=dict(options) if options else None)
    with torch.no_grad():
        compiled(*example_inputs, **dict(example_kwargs or {}))
    reports = list(report_module.compile_reports[start:])
    name = type(getattr(model, "_orig_mod", model)).__name__
    return InspectionReport(reports=reports, options=dict(options), model_name=name)


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
