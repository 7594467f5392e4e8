"""Model-wide inspection: attention that ran outside every compiled graph, and the report of every graph compiled for
a model.

- `watch_attention` counts, on a run, the SDPA calls outside the compiled graphs (`AttentionWatch`);
- `uncovered_attention_modules` finds, from the graphs alone, the attention modules of a model without a site in any
  compiled graph; `dynamo_graph_breaks` gives Dynamo's graph-break reasons and `fix_hints` the known fixes;
- `build_model_report` puts them together with the `CompileReport`s into a `paro_compile.inspection.InspectionReport`,
  `model_report` does it for the graphs already compiled for a model (``paro_compile.model_report``).

``paro_compile.model_report`` and ``paro_compile.watch_attention`` are defined here (exported lazily by the package);
every name is importable from `paro_compile.inspection` too.
"""
from __future__ import annotations

import contextlib
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Optional

from paro_compile.report import CompileReport

if TYPE_CHECKING:
    from paro_compile.inspection import InspectionReport

# ------------------------------------------------------------------------------------------------------
# Attention that ran outside the compiled graphs
# ------------------------------------------------------------------------------------------------------
SDPA_EVENTS = ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_flash_attention",
               "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_efficient_attention",
               "aten::_scaled_dot_product_cudnn_attention")
PARO_EVENT = "paro::attention"
COMPILED_GRAPH_EVENTS = ("## Call CompiledFxGraph", "CompiledFunction")
"""Profiler scopes of a compiled graph's execution: Inductor's compiled FX graph, AOT autograd's function."""
COMPILE_EVENT_SUFFIX = "(dynamo_timed)"
"""Profiler scopes of compilation (tracing runs ops on fake tensors: they are not calls of the model)."""
_PYTHON_FRAME_EVENT = re.compile(r"^(?P<file>.+\.py)\((?P<line>\d+)\): (?P<function>.+)$")


@dataclass
class AttentionWatch:
    """Attention calls counted by `watch_attention` while its block ran."""

    eager_calls: int = 0
    """SDPA calls that ran outside every compiled graph."""
    call_sites: Counter = field(default_factory=Counter)
    """Where they ran: "<module class>: <file>(<line of the function>): <function>" → calls."""
    paro_calls: int = 0
    """Calls of the ``paro::attention`` op (inside compiled graphs)."""
    compiled_while_watching: bool = False
    """A graph was compiled inside the block; its tracing is not counted."""

    def count(self, events: Iterable[Any]) -> None:
        """Classify profiler events (`torch.profiler.profile(...).events()`, built with ``with_stack=True``)."""
        for event in events:
            if event.name == PARO_EVENT:
                self.paro_calls += 1
                continue
            if event.name not in SDPA_EVENTS:
                continue
            ancestors = []
            parent = event.cpu_parent
            while parent is not None:
                ancestors.append(parent.name)
                parent = parent.cpu_parent
            if ancestors and ancestors[0] in SDPA_EVENTS:  # the kernel an SDPA call dispatched to
                continue
            if any(name.endswith(COMPILE_EVENT_SUFFIX) for name in ancestors):
                self.compiled_while_watching = True
                continue
            if any(name.startswith(COMPILED_GRAPH_EVENTS) for name in ancestors):
                continue
            self.eager_calls += 1
            # Python frames are the op's profiler ancestors in recent torch; torch 2.11 keeps them out of the events
            # and gives them only as the event's stack (innermost first), and only when the profiler is verbose.
            self.call_sites[_call_site(ancestors + list(getattr(event, "stack", None) or ()))] += 1

    def summary(self) -> str:
        text = (f"{self.eager_calls} SDPA call(s) ran outside every compiled graph"
                + (": " + "; ".join(f"{site} ×{n}" for site, n in self.call_sites.most_common()) if self.call_sites else "")
                + f" ({self.paro_calls} paro attention call(s) inside compiled graphs)")
        if self.compiled_while_watching:
            text += "; a graph was compiled during the watched call (watch a warm call: compilation is not counted)"
        return text


def _call_site(ancestors: list[str]) -> str:
    """The innermost Python frame outside torch and the innermost module around an eager SDPA call."""
    module = next((name[len("nn.Module: "):] for name in ancestors if name.startswith("nn.Module: ")), None)
    frame = None
    for name in ancestors:
        match = _PYTHON_FRAME_EVENT.match(name)
        if match and not re.search(r"(^|/)torch/", match["file"]):
            frame = name
            break
    module = re.sub(r"_\d+$", "", module) if module else None
    return ": ".join(part for part in (module, frame) if part) or "unknown caller"


@contextlib.contextmanager
def watch_attention() -> Iterator[AttentionWatch]:
    """Count, while the block runs, the SDPA calls that run outside every compiled graph (graph breaks, skipped
    frames): ``with paro_compile.watch_attention() as watch: compiled(**inputs)``, then ``watch.eager_calls`` /
    ``watch.summary()``.

    It runs the block under ``torch.profiler`` (CPU activity, Python stacks) and counts SDPA operator calls that are
    not inside a compiled graph's scope; nothing is installed outside the block, so compiled graphs are never
    slowed. Watch a warm call: compiling under the profiler is slow, and ops traced during compilation are not
    counted. An SDPA that Inductor keeps inside a compiled graph is not counted: the report lists those sites."""
    from torch.profiler import ProfilerActivity, _ExperimentalConfig, profile

    watch = AttentionWatch()
    # verbose: torch 2.11 fills an op's Python stack only then (and has no Python-frame events to look up instead)
    with profile(activities=[ProfilerActivity.CPU], with_stack=True,
                 experimental_config=_ExperimentalConfig(verbose=True)) as profiler:
        yield watch
    watch.count(profiler.events())


LINEAR_ATTENTION_PROCESSOR = re.compile(r"LinearAttnProcessor")
"""diffusers processors whose attention has no softmax (Sana's ReLU linear attention, its PAG variants): they call no
SDPA, so their modules never hold a site and there is nothing for the backend to lower."""


def is_linear_attention(module: Any) -> bool:
    """Whether ``module``'s diffusers processor computes linear attention (`LINEAR_ATTENTION_PROCESSOR`)."""
    processor = getattr(module, "processor", None)
    return processor is not None and bool(LINEAR_ATTENTION_PROCESSOR.search(type(processor).__name__))


def linear_attention_modules(model: Any) -> list[str]:
    """Names (``named_modules``) of ``model``'s attention modules that compute linear attention (no SDPA to lower)."""
    return [name for name, module in model.named_modules() if name and is_linear_attention(module)]


def attention_module_names(model: Any, covered: set[str]) -> list[str]:
    """Names (``named_modules``) of ``model``'s attention modules: diffusers attention modules (they have a callable
    ``processor``) and modules of any class that holds a site in ``covered`` (site module paths). Modules computing
    linear attention are not among them: they call no SDPA (`linear_attention_modules`)."""
    modules = dict(model.named_modules())
    site_classes = {type(modules[path]) for path in covered if path in modules}
    return [name for name, module in modules.items()
            if name and (callable(getattr(module, "processor", None)) or type(module) in site_classes)
            and not is_linear_attention(module)]


def covered_module_paths(model: Any, reports: Iterable[CompileReport]) -> set[str]:
    """Names (``named_modules``) of ``model``'s modules whose attention a graph of ``reports`` runs.

    Dynamo compiles a method once and runs the graph for every module its guards accept, e.g. one graph for all the
    identical blocks of a model whose blocks are compiled on their own: a graph reached from a module of class C
    through the path P covers P under every C of the model. Graphs without that record fall back to their site ids,
    taken relative to the compiled model."""
    modules = dict(model.named_modules())
    by_class: dict[type, list[str]] = {}
    for name, module in modules.items():
        by_class.setdefault(type(module), []).append(name)
    covered = set()
    for report in reports:
        sources = [(ref(), path) for ref, path in (s for s in report.attention_sources if s is not None)]
        sources = [(root, path) for root, path in sources if root is not None]
        if sources:
            for root, path in sources:
                for base in by_class.get(type(root), []):
                    name = ".".join(part for part in (base, path) if part)
                    if name in modules:
                        covered.add(name)
            continue
        owner = report.model() if report.model is not None else None
        prefix = next((name for name, module in modules.items() if module is owner), "") if owner is not None else ""
        for site in report.sites:
            path = site.site_id.rsplit("#", 1)[0]
            covered.add(".".join(part for part in (prefix, "" if path == "<root>" else path) if part))
    return covered


def uncovered_attention_modules(model: Any, reports: Iterable[CompileReport]) -> list[str]:
    """``model``'s attention modules without a site in any of ``reports``: their attention ran outside the compiled
    graphs, or they were not called."""
    reports = list(reports)
    covered = covered_module_paths(model, reports)
    return [name for name in attention_module_names(model, covered) if name not in covered]


def dynamo_graph_breaks() -> Counter:
    """Dynamo's graph-break reasons of this process (``torch._dynamo.utils.counters["graph_break"]``), each shortened
    to its first line and explanation."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - a torch without Dynamo
        return Counter()
    breaks: Counter = Counter()
    for reason, count in counters["graph_break"].items():
        breaks[short_break_reason(reason)] += count
    return breaks


def short_break_reason(reason: str) -> str:
    lines = [line.strip() for line in str(reason).strip().splitlines() if line.strip()]
    if not lines:
        return "unknown"
    explanation = next((line[len("Explanation:"):].strip() for line in lines if line.startswith("Explanation:")), None)
    text = f"{lines[0]}: {explanation}" if explanation else lines[0]
    return text if len(text) <= 240 else text[:239] + "…"


def fix_hints(model: Any, graph_breaks: Mapping[str, int]) -> list[str]:
    """Known causes of attention outside the compiled graphs, and their fixes."""
    hints = []
    processors = {type(getattr(m, "processor", None)).__name__ for m in model.modules()} if model is not None else set()
    if "MochiAttnProcessor2_0" in processors:
        hints.append("diffusers' MochiAttnProcessor2_0 selects each prompt's valid text tokens with torch.nonzero, which "
                     "Dynamo cannot trace inside its per-sample loop, so it skips the processor and Mochi's joint "
                     "attention runs eagerly. Swap the processor before compiling: "
                     "paro_compile.diffusers_attention.use_key_padding_attention(model) (the same outputs, the text padding "
                     "as a key-padding mask), or set torch._dynamo.config.capture_dynamic_output_shape_ops = True "
                     "(the sites then have a data-dependent length and run dense)")
    elif any(reason.startswith("Dynamic shape operator") for reason in graph_breaks):
        hints.append("a data-dependent operator (e.g. torch.nonzero) broke the graph: "
                     "torch._dynamo.config.capture_dynamic_output_shape_ops = True lets Dynamo trace it")
    if any("_maybe_view_chunk_cat" in reason or reason.startswith("logging.Logger method") for reason in graph_breaks):
        hints.append("Dynamo broke the graph on diffusers' context-parallel path (funcol's all-gather re-concatenation, "
                     "skipped before torch 2.13, or a logger call such as transformers' Logger.warning_once): the "
                     "token order cannot fold across the sharding. paro_compile.parallel.make_context_parallel_traceable() "
                     "before the first call lets Dynamo trace through both")
    return hints


# ------------------------------------------------------------------------------------------------------
# A model's report
# ------------------------------------------------------------------------------------------------------
def build_model_report(model: Any, reports: list[CompileReport], *, options: Optional[dict[str, Any]] = None,
                       eager_attention: Optional[AttentionWatch] = None, graph_breaks: Optional[Mapping[str, int]] = None,
                       history_limit_reached: bool = False, model_name: Optional[str] = None) -> InspectionReport:
    """An `InspectionReport` of ``reports`` (graphs of ``model``; None: of any model) with the checks for attention
    that ran outside the compiled graphs."""
    import torch

    from paro_compile.inspection import InspectionReport  # the report module imports this one

    breaks = dict(graph_breaks or {})
    if model is not None:
        models = [model]
    else:  # every live compiled model among the reports, without those that are submodules of another
        owners = list({id(m): m for m in (r.model() for r in reports if r.model is not None) if m is not None}.values())
        inside = {id(sub) for owner in owners for sub in owner.modules() if sub is not owner}
        models = [owner for owner in owners if id(owner) not in inside]
    uncovered: list[str] = []
    linear: list[str] = []
    hints: list[str] = []
    for each in models:
        if not isinstance(each, torch.nn.Module):
            continue
        own = reports
        if model is None:  # this model's graphs only
            inside = {id(sub) for sub in each.modules()}
            own = [r for r in reports if r.model is not None and id(r.model()) in inside]
        if own:
            prefix = f"{type(each).__name__}: " if model is None and len(models) > 1 else ""
            uncovered += [prefix + name for name in uncovered_attention_modules(each, own)]
            linear += [prefix + name for name in linear_attention_modules(each)]
        hints += [hint for hint in fix_hints(each, breaks) if hint not in hints]
    if model_name is None:
        model_name = (type(model).__name__ if model is not None
                      else ", ".join(type(m).__name__ for m in models) or "every compiled graph")
    return InspectionReport(reports=list(reports), options=dict(options or {}), model_name=model_name,
                            uncovered_attention_modules=uncovered, linear_attention_modules=linear,
                            eager_attention=eager_attention, graph_breaks=breaks,
                            hints=hints, history_limit_reached=history_limit_reached)


def model_report(model: Any = None) -> InspectionReport:
    """What the paro backend did to every graph it compiled for ``model`` (the module given to ``torch.compile``, or the
    `OptimizedModule` it returned; submodules compiled on their own count as the model's), as an `InspectionReport`
    (``.summary()``, ``.render()``, ``.to_json()``). ``model=None``: every kept graph of the process.

    Besides the sites of each graph it lists the graphs without attention and warns when attention ran outside
    every compiled graph: attention modules of the model without a site in any compiled graph (checked from the
    graphs, costs nothing at run time), with Dynamo's graph-break reasons (process-wide since
    ``torch._dynamo.utils.counters`` was last cleared) and known fixes. To count the eager SDPA calls of a run, use
    `watch_attention` or `inspect`. Keeps the last `paro_compile.report.HISTORY_LIMIT` graphs per model."""
    from paro_compile.report import dropped_reports, reports_for, unwrap_model

    reports = reports_for(model)
    module = unwrap_model(model) if model is not None else None
    return build_model_report(module, reports, graph_breaks=dynamo_graph_breaks(),
                              history_limit_reached=dropped_reports(model) > 0)
