"""What the backend did to each graph: one `CompileReport` per compiled graph, kept for inspection.

Reports are kept per compiled model and for the whole process, each store bounded to the `HISTORY_LIMIT` most
recent graphs, so a long-running process that compiles many graphs keeps a fixed amount of them. A graph's model is
the ``torch.compile``d module whose call was running when Dynamo compiled the graph (`compile_origin`): the
`OptimizedModule` ``torch.compile(model)`` returns, or a module compiled in place with ``model.compile()``. The
store holds the model weakly: a model that is freed takes its reports with it.
"""
from __future__ import annotations

import logging
import re
import sys
import weakref
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Optional

log = logging.getLogger("paro_compile")

HISTORY_LIMIT = 64
"""Graphs kept per compiled model and for the whole process (each report holds the graph code of every pass)."""


@dataclass
class SiteRecord:
    site_id: str
    shape: tuple
    dtype: str
    lowered: bool
    reasons: list[str] = field(default_factory=list)
    density: float = 1.0
    qk_bits: Optional[int] = None
    pv_dtype: Optional[str] = None
    orders: list[str] = field(default_factory=list)
    permutation: str = "identity"
    """How the token order is applied: "identity", "kernel" (gather in the prologue, scatter in the
    epilogue), "folded:<op>" (absorbed by a layout op), or "gather" (an explicit runtime gather)."""
    folded_order: Optional[str] = None
    """The order folded into the layout ops upstream of this site (e.g. "HWF"), None when its tokens arrive in model
    order. With ``kernel_permutation="residual"`` the kernel applies the rest of each head's order on top of it."""
    kernel_permutation: str = "none"
    """What the kernel still permutes: "none", "residual" (the per-head rest after ``folded_order``: partial folding)
    or "full" (the whole plan permutation, nothing folded for this site)."""
    step_buckets: int = 1
    compensated: bool = False
    """Skipped blocks enter as pooled keys (``compensate_skipped`` and a sparse mask at this site)."""
    plan_bytes: int = 0
    """Device memory of the plan constants lowered for this site (permutation, masks of every step bucket)."""
    mask_encoding: str = "dense"
    """How the site's block masks are stored on the device: "dense" (none), "csr" or "bitmap" (the walk decoded per
    call; `ParoConfig.mask_encoding`)."""
    key_padding: bool = False
    """The site's SDPA mask is padding and runs as the op's key bias (exactly, as SDPA applies it)."""
    query_padding: bool = False
    """The mask also pads query rows (``m_i ∧ m_j``): their output rows are zeroed after the op, as SDPA returns rows
    whose keys are all masked."""
    cross_attention: bool = False
    """Keys from another sequence (e.g. text): lowered dense, no token order or block mask."""


class SiteFilters:
    """`lowered` / `fallbacks` over ``self.sites`` (one graph's sites or a whole model's)."""

    sites: list[SiteRecord]

    @property
    def lowered(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.lowered]

    @property
    def fallbacks(self) -> list[SiteRecord]:
        return [s for s in self.sites if not s.lowered]


@dataclass
class CompileOrigin:
    """Where Dynamo compiled a graph from: the compiled model (weakly), the frame's code, Dynamo's compile id."""

    model: Optional[weakref.ref] = None
    frame: str = ""
    compile_id: str = ""
    attention_sources: list[Optional[tuple[weakref.ref, str]]] = field(default_factory=list)
    """Per SDPA call of the graph, in graph order: (the compiled frame's local module it is reached from, weakly; the
    path from that module to the one the call runs in); None where unknown."""


@dataclass
class CompileReport(SiteFilters):
    graph_index: int
    sites: list[SiteRecord] = field(default_factory=list)
    gathers_left: int = 0
    passes: list[dict[str, Any]] = field(default_factory=list)
    """Per pass: {"name", "before", "after"} (readable graph code), for the diff report."""
    compile_id: str = ""
    """Dynamo's compile id, "<frame>/<recompile>" (as in TORCH_LOGS and the profiler's "Torch-Compiled Region")."""
    frame: str = ""
    """The code Dynamo compiled this graph from, e.g. "forward (transformer_mochi.py:202)"."""
    error: Optional[str] = None
    """Set when rewriting or compiling this graph raised: the exception's type and message."""
    notes: list[str] = field(default_factory=list)
    """Options that had no effect on this graph, and why."""
    context_parallel: list[str] = field(default_factory=list)
    """Context-parallel sites of this graph, one line each: the heads this rank holds and how they were found, or why
    the site runs unsharded or on SDPA (empty on one process; `docs/context_parallel.md`)."""
    context_parallel_fold: str = ""
    """Under Ulysses: the shared order folded across the token sharding, or why none was ("" without Ulysses)."""
    model: Optional[weakref.ref] = field(default=None, repr=False, compare=False)
    """Weak reference to the compiled model this graph belongs to (None: compiled outside a model call)."""
    attention_sources: list[Optional[tuple[weakref.ref, str]]] = field(default_factory=list, repr=False, compare=False)
    """Per SDPA call of the graph, in graph order: the compiled frame's local module it is reached from (weakly) and
    the path from there (`CompileOrigin.attention_sources`). Site ids are relative to the compiled frame, which may be
    a submodule's method; these say which modules of the model the graph runs attention in."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(replace(self, model=None, attention_sources=[]))
        del data["model"], data["attention_sources"]
        return data

    @property
    def degraded(self) -> list[SiteRecord]:
        """Lowered sites that run with less than the plan asked for (e.g. dense where the plan has masks)."""
        return [s for s in self.sites if s.lowered and s.reasons]

    def title(self) -> str:
        origin = ", ".join(part for part in (self.frame, f"compile {self.compile_id}" if self.compile_id else "") if part)
        return f"paro graph {self.graph_index}" + (f" ({origin})" if origin else "")

    def summary(self, notes: bool = True) -> str:
        """This graph's sites, one line each; ``notes=False`` leaves out the option notes (a model's summary prints
        them once)."""
        if self.error is not None:
            return f"{self.title()}: compile failed: {self.error}"
        lines = [f"{self.title()}: {len(self.lowered)}/{len(self.sites)} attention sites lowered, "
                 f"{self.gathers_left} runtime gathers" + ("" if self.sites else " (no attention in this graph)")]
        lines += [f"  note: {note}" for note in self.notes] if notes else []
        lines += [f"  context parallel: {line}" for line in self.context_parallel]
        lines += [f"  context parallel {self.context_parallel_fold}"] if self.context_parallel_fold else []
        for s in self.sites:
            if s.lowered:
                lines.append(f"  {s.site_id:40s} {str(s.shape):28s} density={s.density:.2f} qk={s.qk_bits}b "
                             f"pv={s.pv_dtype} perm={s.permutation}"
                             + (f" folded={s.folded_order}" if s.folded_order else "")
                             + (f" kernel_perm={s.kernel_permutation}" if s.kernel_permutation != "none" else "")
                             + (" compensated" if s.compensated else "")
                             + (" cross-attention" if s.cross_attention else "") + (" key-padding" if s.key_padding else "")
                             + (" query-padding" if s.query_padding else "")
                             + (f" mask={s.mask_encoding}" if s.mask_encoding != "dense" else "")
                             + (f" plan={s.plan_bytes / 2**20:.1f}MiB" if s.plan_bytes else "")
                             + (f" degraded: {'; '.join(s.reasons)}" if s.reasons else ""))
            else:
                lines.append(f"  {s.site_id:40s} {str(s.shape):28s} SDPA: {'; '.join(s.reasons)}")
        return "\n".join(lines)


compile_reports: deque[CompileReport] = deque(maxlen=HISTORY_LIMIT)
"""The most recent compiled graphs of the process, oldest first."""
_reports_by_model: "weakref.WeakKeyDictionary[Any, deque[CompileReport]]" = weakref.WeakKeyDictionary()
_dropped_by_model: "weakref.WeakKeyDictionary[Any, int]" = weakref.WeakKeyDictionary()
_next_graph_index = 0


def compiled_model_on_stack() -> Any:
    """The outermost compiled module whose call is running: the original module of an `OptimizedModule`
    (``torch.compile(model)``), or a module compiled in place (``model.compile()``); None if there is none."""
    from torch._dynamo.eval_frame import OptimizedModule
    from torch.nn import Module

    found = None
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_argcount and code.co_varnames[0] == "self":
            owner = frame.f_locals.get("self")
            if isinstance(owner, OptimizedModule):
                found = owner._orig_mod
            elif isinstance(owner, Module) and getattr(owner, "_compiled_call_impl", None) is not None:
                found = owner
        frame = frame.f_back
    return found


_SOURCE_ROOT = re.compile(r"^L\[['\"]([^'\"]+)['\"]\]")


def attention_source(source: str, frame_locals: dict[str, Any]) -> Optional[tuple[weakref.ref, str]]:
    """(the local module a Dynamo source path such as ``L['dit'].blocks.1.attn`` starts from, weakly; the rest of the
    path as `named_modules` spells it: ``blocks.1.attn``); None if the root is not a module of the frame."""
    import torch

    from paro_compile.passes.discover import normalize_module_path

    root = _SOURCE_ROOT.match(source)
    value = frame_locals.get(root.group(1)) if root is not None else None
    if not isinstance(value, torch.nn.Module):
        return None
    return weakref.ref(value), normalize_module_path(source)


def compile_origin(gm: Any = None) -> CompileOrigin:
    """What the backend can learn about the graph it is handed: the compiled model, the frame, the compile id and the
    module of each SDPA call of ``gm``. Call it from the backend itself (the frame, its locals and the compile id are
    Dynamo's state while it calls the backend)."""
    origin = CompileOrigin()
    try:
        model = compiled_model_on_stack()
        origin.model = weakref.ref(model) if model is not None else None
    except (ImportError, TypeError):  # a torch without OptimizedModule, or a model that refuses weak references
        pass
    try:
        import torch
        import torch._guards

        compile_id = torch._guards.CompileContext.current_compile_id()
        origin.compile_id = str(compile_id) if compile_id is not None else ""
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        code = tx.f_code
        origin.frame = f"{code.co_name} ({code.co_filename.replace(chr(92), '/').rsplit('/', 1)[-1]}:{code.co_firstlineno})"
        if gm is not None:
            from paro_compile.passes.discover import is_sdpa

            for node in gm.graph.nodes:
                if is_sdpa(node):
                    stack = node.meta.get("nn_module_stack") or {}
                    origin.attention_sources.append(
                        attention_source(list(stack.values())[-1][0], tx.f_locals) if stack else None)
    except (ImportError, AttributeError, RuntimeError, TypeError):  # not inside Dynamo (a graph handed to the backend)
        pass
    return origin


def new_report(origin: Optional[CompileOrigin] = None) -> CompileReport:
    global _next_graph_index
    origin = origin or CompileOrigin()
    report = CompileReport(graph_index=_next_graph_index, compile_id=origin.compile_id, frame=origin.frame,
                           model=origin.model, attention_sources=list(origin.attention_sources))
    _next_graph_index += 1
    compile_reports.append(report)
    model = origin.model() if origin.model is not None else None
    if model is not None:
        kept = _reports_by_model.setdefault(model, deque(maxlen=HISTORY_LIMIT))
        if len(kept) == kept.maxlen:
            _dropped_by_model[model] = _dropped_by_model.get(model, 0) + 1
        kept.append(report)
    return report


def last_report() -> Optional[CompileReport]:
    """The report of the most recently compiled graph only (None before any compile); `paro_compile.model_report`
    gathers every graph of a model."""
    return compile_reports[-1] if compile_reports else None


def error_chain(error: BaseException) -> list[BaseException]:
    """``error`` and the errors it wraps, outermost first. Dynamo wraps backend errors (``inner_exception``) and errors
    of the traced code (``__cause__``, or a suppressed ``__context__`` under its own exception types)."""
    chain = [error]
    while True:
        current = chain[-1]
        inner = getattr(current, "inner_exception", None) or current.__cause__
        if inner is None and type(current).__module__.startswith(("torch._dynamo", "torch._inductor")):
            inner = current.__context__
        if inner is None or any(inner is seen for seen in chain):
            return chain
        chain.append(inner)


def error_summary(error: BaseException) -> str:
    """``"<type>: <first line of the message>"`` of the innermost error of ``error``'s chain."""
    cause = error_chain(error)[-1]
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__


def unwrap_model(model: Any) -> Any:
    """The module a report is kept under: ``torch.compile(model)`` gives an `OptimizedModule` around it."""
    return getattr(model, "_orig_mod", model)


def reports_for(model: Any = None) -> list[CompileReport]:
    """The kept reports of ``model`` and of its submodules compiled on their own (None: every kept report), oldest
    first."""
    if model is None:
        return list(compile_reports)
    model = unwrap_model(model)
    owners: Iterable[Any] = model.modules() if hasattr(model, "modules") else (model,)
    found: dict[int, CompileReport] = {}
    for owner in owners:
        try:
            kept = _reports_by_model.get(owner)
        except TypeError:  # not weak-referenceable: never a key
            kept = None
        for report in kept or ():
            found[report.graph_index] = report
    return [found[index] for index in sorted(found)]


def dropped_reports(model: Any = None) -> int:
    """How many reports of ``model`` and of its submodules compiled on their own (None: of the process) the history
    limit has dropped since the last `clear_reports`."""
    if model is None:
        return _next_graph_index - len(compile_reports)
    model = unwrap_model(model)
    owners: Iterable[Any] = model.modules() if hasattr(model, "modules") else (model,)
    total = 0
    for owner in owners:
        try:
            total += _dropped_by_model.get(owner, 0)
        except TypeError:
            pass
    return total


def next_graph_index() -> int:
    """The ``graph_index`` the next compiled graph gets (indices count up from the last `clear_reports`)."""
    return _next_graph_index


def clear_reports() -> None:
    global _next_graph_index
    compile_reports.clear()
    _reports_by_model.clear()
    _dropped_by_model.clear()
    _next_graph_index = 0
