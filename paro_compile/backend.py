"""The `paro` torch.compile backend.

Graph level: we rewrite the Dynamo (torch-level) FX graph, before AOT autograd, then hand it to
Inductor's `compile_fx`. Reasons (see docs/DESIGN_NOTES.md): SDPA is one node there on every device
(after AOT on CUDA it is a device-specific ATen variant that cannot be produced on a CPU machine, so a
post-grad matcher would be untestable in CI); nodes still carry ``nn_module_stack`` for stable site ids;
the layout ops around attention (flatten/transpose/cat of the patchify) are still visible as such for
the folding pass. Inductor then compiles the rewritten graph with its FX graph cache intact, because we
register no custom Inductor pass.

With a plan, each graph gets the plan's entries for its token grid (`prepare_plan`: `Plan.select`), with the token
axis kept static under Dynamo's automatic dynamic shapes (`keep_token_axis_static`), so every grid compiles its own
sparse graph; a grid the plan lacks follows ``on_missing_shape``. Plan errors are raised as `CompileTimePlanError` /
`CompileTimePlanMismatchError`, which Dynamo passes to the caller as themselves (docs/calibration.md, "Several
resolutions"). `compile` checks a plan against the model before tracing.

Registered once, through the ``torch_dynamo_backends`` entry point in pyproject.toml.
"""
from __future__ import annotations

import copy
import inspect
import logging
import types
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
import torch.fx as fx

from paro_compile.config import ParoConfig
from paro_compile.passes.context_parallel import localize_plan
from paro_compile.grid import TokenGrid
from paro_compile.passes.discover import find_attention_sites
from paro_compile.passes.fx_utils import static_int
from paro_compile.passes.lower import lower_attention_sites
from paro_compile.plan import Plan, PlanError, PlanMismatchError, model_fingerprint
from paro_compile.report import CompileReport, compile_origin, error_summary, new_report

log = logging.getLogger("paro_compile")


class UnsupportedAttentionError(RuntimeError):
    """Raised with ``fallback="error"`` when a site cannot be lowered."""


def _reraised_by_dynamo() -> tuple[type, ...]:
    """Dynamo wraps what a backend raises in ``BackendCompilerFailed`` (torch/_dynamo/output_graph.py,
    ``_call_user_compiler``), whose message adds torch's hints for reporting a PyTorch bug, except the
    ``ShortenTraceback`` family, which it re-raises as is and whose traceback it trims to the backend's frame."""
    try:
        from torch._dynamo.exc import ShortenTraceback
    except ImportError:  # a torch without it: plan errors arrive wrapped, with the same message inside
        return ()
    return (ShortenTraceback,)


_DYNAMO_RERAISED = _reraised_by_dynamo()


class CompileTimePlanError(PlanError, *_DYNAMO_RERAISED):
    """A `PlanError` raised while the backend compiles a graph: it reaches the caller of the compiled model as itself
    (``except PlanError`` catches it), not inside ``BackendCompilerFailed``, and its message is the plan's alone."""

    def __init__(self, message: str, frame: Optional[types.FrameType] = None) -> None:
        if _DYNAMO_RERAISED:
            _DYNAMO_RERAISED[0].__init__(self, message, first_useful_frame=frame)
        else:
            PlanError.__init__(self, message)
        self.message = message

    def __str__(self) -> str:
        # Dynamo appends its pointers for debugging PyTorch itself to ``args`` on the way out
        # (exc.augment_exc_message); a plan that does not fit is the user's to fix, so the message stays ours.
        return self.message


class CompileTimePlanMismatchError(PlanMismatchError, CompileTimePlanError):
    """A `PlanMismatchError` raised while the backend compiles a graph (see `CompileTimePlanError`)."""


def compile_time_error(error: BaseException, frame: Optional[types.FrameType] = None) -> CompileTimePlanError:
    """``error`` (a PlanError, or a missing plan file) as the error the backend raises, same message and kind."""
    if isinstance(error, CompileTimePlanError):
        return error
    kind = CompileTimePlanMismatchError if isinstance(error, PlanMismatchError) else CompileTimePlanError
    return kind(str(error), frame)


_LOADED_PLANS: "OrderedDict[str, tuple[tuple[int, int, int], Plan]]" = OrderedDict()
_LOADED_PLANS_KEPT = 4
"""Plans read from files, by resolved path: every graph of a model (one per token grid) reads the same file once."""


def load_plan(plan: Any):
    """A `Plan` from the ``plan`` option: a Plan as is, a path read and validated (`Plan.load`), kept while the file
    (modification time, size, inode) is unchanged."""
    if plan is None:
        return None
    if isinstance(plan, (str, Path)):
        path = Path(plan)
        if not path.exists():
            raise FileNotFoundError(f"paro plan file {str(path)!r} does not exist; build one with paro_compile.calibrate(...).save(path)")
        stat = path.stat()
        key, signature = str(path.resolve()), (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        cached = _LOADED_PLANS.get(key)
        if cached is not None and cached[0] == signature:
            _LOADED_PLANS.move_to_end(key)
            return cached[1]
        loaded = Plan.load(path)
        _LOADED_PLANS[key] = (signature, loaded)
        while len(_LOADED_PLANS) > _LOADED_PLANS_KEPT:
            _LOADED_PLANS.popitem(last=False)
        return loaded
    return plan


def plan_name(plan: Plan) -> str:
    return f"plan file {plan.source}" if getattr(plan, "source", None) else "the plan (built in code)"


# ---- plans against the compiled model and its graphs ------------------------------------------------------------
def fingerprint_mismatch(plan: Plan, model: Optional[torch.nn.Module]) -> Optional[str]:
    """Why ``plan`` looks calibrated on another model than ``model`` (its `model_fingerprint` differs), or None.
    Auto-calibrated plans carry a graph fingerprint instead and are not compared."""
    if model is None or not isinstance(plan, Plan) or plan.fingerprint is None or plan.meta.get("auto_calibrated"):
        return None
    actual = model_fingerprint(model)
    if actual == plan.fingerprint:
        return None
    return (f"{plan_name(plan)} was calibrated on a model with fingerprint {plan.fingerprint}, the compiled module "
            f"({type(model).__name__}) has {actual}: parameter names or shapes differ (another model, one with "
            "adapters or fused projections, or a module that contains or is contained in the calibrated one)")


def _module_path(site_id: str) -> str:
    path = site_id.rsplit("#", 1)[0]
    return "" if path == "<root>" else path


def check_plan_against_model(plan: Plan, model: torch.nn.Module) -> None:
    """Before tracing: a plan whose fingerprint differs from ``model``'s and whose sites name modules ``model`` does
    not have is from another model (PlanMismatchError naming the file, a site and the fix); a differing fingerprint
    whose sites all name modules of ``model`` is a warning (the backend checks each graph's sites)."""
    mismatch = fingerprint_mismatch(plan, model)
    if mismatch is None:
        return
    modules = {name for name, _ in model.named_modules()}
    absent = [sid for sid in plan.sites if _module_path(sid) not in modules]
    if absent:
        raise PlanMismatchError(
            f"{plan_name(plan)} is for another model: its site {absent[0]!r} names module {_module_path(absent[0])!r}, "
            f"which {type(model).__name__} does not have ({len(absent)} of {len(plan.sites)} sites). Fix: calibrate "
            f"this model (paro_compile.calibrate(model, inputs).save(path), or `paro calibrate`) and compile with "
            f"that plan.\n{mismatch}")
    warnings.warn(f"paro: {mismatch}; its sites name modules of this model, so it is used (each graph's sites are "
                  "checked against it)", UserWarning, stacklevel=3)


def keep_token_axis_static(sites: list, plan: Plan) -> list[str]:
    """With a plan and Dynamo's automatic dynamic shapes (``torch.compile(dynamic=None)``, the default), a second
    token grid reaches the backend as a graph with a symbolic token count, where block masks and fixed orders cannot
    apply. This specializes the input sizes the plan's sites' token counts are made of, so the graph serves this token
    grid only and the next grid compiles its own: ``int()`` on a SymInt guards it to its value (the symbolic-shapes
    contract; the guards join this graph's, which Dynamo builds after the backend returns). Other symbolic sizes (the
    batch) stay symbolic. Not with ``dynamic=True`` (one symbolic graph, order plans, dense masks: asked for) and not
    for sizes the user marked dynamic (``torch._dynamo.mark_dynamic``). Returns the specialized sizes, e.g.
    ``["L['latent'].size()[3] = 12"]``."""
    import torch._dynamo.config as dynamo_config

    if not dynamo_config.assume_static_by_default:  # dynamic=True
        return []
    planned = {sid for sid in plan.sites}
    symbols: set = set()
    shape_env = None
    for site in sites:
        if site.site_id in planned and not site.is_cross and isinstance(site.seq_len, torch.SymInt) \
                and static_int(site.seq_len) is None:
            symbols |= set(site.seq_len.node.expr.free_symbols)
            shape_env = site.seq_len.node.shape_env
    if not symbols or shape_env is None:
        return []
    tracked = list(getattr(shape_env, "tracked_fakes", None) or ())
    symbols -= _user_dynamic_symbols(tracked)
    from torch.fx.experimental.symbolic_shapes import guard_int

    specialized = []
    for entry in tracked:
        name = getattr(entry.source, "name", "?")
        name = name() if callable(name) else name
        value = entry.fake
        sizes = ([(f"{name}.size()[{dim}]", size) for dim, size in enumerate(value.size())]
                 if isinstance(value, torch.Tensor) else [(name, value)])
        for label, size in sizes:
            if isinstance(size, torch.SymInt) and size.node.expr in symbols and static_int(size) is None:
                specialized.append(f"{label} = {guard_int(size)}")
    return specialized


def _user_dynamic_symbols(tracked: list) -> set:
    """Symbols of sizes marked dynamic by the user (``mark_dynamic``: a constraint that is not warn-only)."""
    symbols: set = set()
    for entry in tracked:
        value = entry.fake
        constraints = getattr(getattr(entry, "symbolic_context", None), "constraint_sizes", None) or ()
        if not isinstance(value, torch.Tensor):
            continue
        for dim, constraint in enumerate(constraints):
            if constraint is not None and not getattr(constraint, "warn_only", True) and dim < value.dim():
                size = value.size(dim)
                if isinstance(size, torch.SymInt):
                    symbols |= set(size.node.expr.free_symbols)
    return symbols


def graph_site_shapes(gm: fx.GraphModule, sites: list, plan: Plan) -> dict[str, tuple[Optional[int], Optional[TokenGrid]]]:
    """Per planned site of the graph: (static token count or None, the grid layout inference finds). Cross-attention
    sites are included when a plan has them (plans built in code may): the op never takes their masks, but the folding
    pass reads their orders."""
    from paro_compile.passes.layout import infer_token_grids

    planned = [s for s in sites if plan.entries(s.site_id)]
    # under context parallelism the layout pass follows the tokens through the all-to-all and the sharding chunk
    # (passes/layout.py); an exchange it cannot read gives no grid, never the exchange's (U, N/U) reshape
    readable = [s for s in planned if static_int(s.seq_len) is not None]
    grids = infer_token_grids(gm, readable)
    return {s.site_id: (static_int(s.seq_len), grids.get(s.site_id)) for s in planned}


@dataclass
class PreparedPlan:
    """What `prepare_plan` decided for one graph."""

    plan: Plan
    """The single-shape plan the passes read."""
    missing: dict[str, str] = field(default_factory=dict)
    """Planned sites without an entry for this graph's shape, and why."""
    notes: list[str] = field(default_factory=list)
    """For the graph's report."""


def _fix_for_missing_shape(plan: Plan) -> str:
    target = plan.source or "PLAN"
    return (f"add this shape to the plan (`paro calibrate MODEL --inputs INPUTS_AT_THIS_SHAPE --add-to {target}`, or "
            "Plan.merge / Plan.add_shape), or compile with options={'on_missing_shape': 'dense'} (dense at these sites) "
            "or 'calibrate' (calibrate this shape on its first call)")


def calibration_skipped(plan: Optional[Plan]) -> dict[str, list[str]]:
    """Sites calibration skipped (``plan.meta["skipped_sites"]``) and the plan holds no entry for → their reasons.
    They are not missing from the plan: they run dense, in model token order."""
    if plan is None:
        return {}
    from paro_compile.calibration.summary import skipped_sites

    return {sid: reasons for sid, reasons in skipped_sites(plan).items() if sid not in plan.sites}


def sites_the_plan_must_cover(sites: list, skipped: Mapping[str, Any], missing_shapes: Mapping[str, str]) -> list:
    """The sites a plan must hold an entry for: not cross-attention (no token order, plans never hold them), not
    skipped by calibration (``skipped``: `calibration_skipped`), not without an entry at this shape
    (``on_missing_shape="dense"``)."""
    return [s for s in sites if not s.is_cross and s.site_id not in skipped and s.site_id not in missing_shapes]


def prepare_plan(gm: fx.GraphModule, plan: Plan, config: ParoConfig, origin: Any = None) -> PreparedPlan:
    """Keep the token axis static (`keep_token_axis_static`), pick the plan's entries for the graph's shape
    (`Plan.select`), check them against the graph's sites and the compiled model's fingerprint, and apply
    ``config.on_missing_shape`` ("error" raises here; "dense" warns; "calibrate" is the caller's). Raises
    PlanMismatchError naming the plan file, a site and the fix."""
    if not isinstance(plan, Plan):  # a plan-like object of the caller's: used as it is
        return PreparedPlan(plan)
    sites = find_attention_sites(gm, config)
    notes = []
    specialized = keep_token_axis_static(sites, plan)
    if specialized:
        notes.append(f"token axis kept static ({', '.join(specialized)}): with a plan every token grid compiles its own "
                     "graph (dynamic=True keeps one symbolic graph, block masks dense)")
    selection = plan.select(graph_site_shapes(gm, sites, plan))
    cross = {s.site_id for s in sites if s.is_cross}
    skipped = calibration_skipped(plan)
    missing = {sid: why for sid, why in selection.missing.items() if sid not in cross and sid not in skipped}
    model = origin.model() if origin is not None and origin.model is not None else None
    mismatch = fingerprint_mismatch(plan, model)
    checked = sites_the_plan_must_cover(sites, skipped, missing)
    # under context parallelism a site holds this rank's heads: check them against the plan's rows of those heads
    local_plan = localize_plan(sites, selection.plan, config.heads).plan
    problems = local_plan.site_problems(checked, allow_extra=True)
    if problems:
        site_id, first = problems[0]
        where = f" at site {site_id!r}" if site_id else ""
        details = "\n".join(f"  - {problem}" for _, problem in problems)
        if mismatch:
            raise PlanMismatchError(f"{plan_name(plan)} is for another model{where}: {first}. Fix: calibrate this model "
                                    f"and compile with that plan.\n{mismatch}\nEvery problem:\n{details}")
        raise PlanMismatchError(f"{plan_name(plan)} does not match this graph{where}: {first}. Fix: calibrate this "
                                f"model (`paro calibrate`, paro_compile.calibrate) and compile with that plan.\n"
                                f"Every problem:\n{details}")
    if mismatch:
        warnings.warn(f"paro: {mismatch}; its sites fit this graph, so it is used", UserWarning, stacklevel=3)
        notes.append(mismatch)
    if missing:
        first_id = next(iter(missing))
        others = f" (and {len(missing) - 1} more site{'s' if len(missing) > 2 else ''})" if len(missing) > 1 else ""
        summary = (f"{plan_name(plan)} does not match this graph's token grid at site {first_id!r}{others}: "
                   f"{missing[first_id]}")
        if config.on_missing_shape == "error":
            details = "\n".join(f"  - {sid}: {why}" for sid, why in missing.items())
            raise PlanMismatchError(f"{summary}. Fix: {_fix_for_missing_shape(plan)}.\nThe plan covers: "
                                    f"{plan.describe_shapes()}.\nSites without an entry:\n{details}")
        if config.on_missing_shape == "dense":
            warnings.warn(f"paro: {summary}; {len(missing)} site(s) run dense (on_missing_shape='dense'). To make them "
                          f"sparse: {_fix_for_missing_shape(plan)}", UserWarning, stacklevel=3)
            notes.append(f"{summary}; {len(missing)} site(s) dense (on_missing_shape='dense')")
    return PreparedPlan(selection.plan, missing, notes)


def ignored_option_notes(config: ParoConfig) -> list[str]:
    """Options that cannot take effect with the rest of ``config`` (warned about, and noted in every graph's report)."""
    notes = []
    if config.density != 1.0 and config.plan is None and not config.auto_calibrate:
        notes.append(f"density={config.density} has no effect: no plan is given and auto_calibrate is off, so every "
                     f"site runs dense. Pass options={{'plan': ...}} with a plan from paro_compile.calibrate(model, "
                     f"inputs, density={config.density}), or add 'auto_calibrate': True")
    return notes


def graph_code(gm: fx.GraphModule) -> str:
    return gm.print_readable(print_output=False, include_stride=False, include_device=False)


def rewrite_graph(gm: fx.GraphModule, config: ParoConfig, plan, report: CompileReport,
                  missing_shapes: Optional[Mapping[str, str]] = None) -> fx.GraphModule:
    """Run the paro passes on a copy of ``gm``; fill ``report``. Returns the rewritten graph module.
    ``missing_shapes``: planned sites the plan has no entry for at this graph's shape (`prepare_plan`), lowered dense
    with the reason in their record."""
    missing_shapes = dict(missing_shapes or {})
    gm = copy.deepcopy(gm)
    before = graph_code(gm)
    sites = find_attention_sites(gm, config)
    for site in sites:  # sizes specialized by keep_token_axis_static are constants: report them as numbers
        for name in ("batch", "heads", "seq_len", "kv_seq_len", "head_dim"):
            value = getattr(site, name)
            if isinstance(value, torch.SymInt) and static_int(value) is not None:
                setattr(site, name, static_int(value))
    global_plan = plan
    parallel = localize_plan(sites, plan, config.heads)  # context parallelism: this rank's heads of the plan
    plan = parallel.plan
    report.context_parallel = parallel.notes()
    unsupported = [s for s in sites if not s.supported]
    if unsupported and config.fallback == "error":
        details = "\n".join(f"  {s.site_id}: {'; '.join(s.reasons)}" for s in unsupported)
        raise UnsupportedAttentionError(
            f"{len(unsupported)} attention site(s) cannot use paro attention:\n{details}\n"
            "Fix the causes above, or use options={'fallback': 'sdpa'} to keep those sites on SDPA."
        )
    skipped = calibration_skipped(plan)
    if plan is not None and hasattr(plan, "check_sites"):
        plan.check_sites(sites_the_plan_must_cover(sites, skipped, missing_shapes), allow_extra=True)
    from paro_compile.passes import fold

    kernel_perms = None
    fold_result = None
    # under Ulysses the common order comes from the global plan (every rank folds the same one) and the token
    # sharding lets the fold follow the tokens through the chunk, the exchanges and the final all-gather
    sharding = parallel.token_sharding() if parallel.ulysses else None
    if plan is not None and config.fold_permutations:
        fold_result = fold.fold_permutations(gm, sites, plan, config, order_plan=global_plan,
                                             sharding=sharding if not isinstance(sharding, str) else None)
        kernel_perms, report.gathers_left = fold_result.kernel_perms, fold_result.gathers
        report.passes.append({"name": "fold_permutations", "before": before, "after": graph_code(gm)})
        before = report.passes[-1]["after"]
    if parallel.ulysses:  # what the fold did across the exchange, or why it did nothing
        report.context_parallel_fold = fold.describe_context_parallel_fold(fold_result, sharding)
        log.info("paro context parallel: %s", report.context_parallel_fold)
    report.sites = lower_attention_sites(gm, sites, config, plan, kernel_perms)
    for record in report.sites:
        if record.lowered and record.site_id in skipped:
            record.reasons.append(f"calibration skipped this site ({'; '.join(skipped[record.site_id])}); dense, "
                                  "model token order")
        if record.site_id in missing_shapes and record.lowered:
            record.reasons.append(f"no plan entry for this shape ({missing_shapes[record.site_id]}); dense at this "
                                  "site (on_missing_shape='dense')")
    fold.describe_permutations(report.sites, fold_result)
    report.passes.append({"name": "lower_attention", "before": before, "after": graph_code(gm)})
    log.info("%s", report.summary())
    from paro_compile.inspection import emit_report_artifacts

    emit_report_artifacts(report)
    return gm


def paro_backend(gm: fx.GraphModule, example_inputs: list[Any], **kwargs: Any) -> Callable:
    """Dynamo backend: ``torch.compile(model, backend="paro", options={...}, mode=...)``.

    A plan error (a malformed file, a plan for another model, a shape the plan lacks with
    ``on_missing_shape="error"``) is raised as `CompileTimePlanError` / `CompileTimePlanMismatchError`: Dynamo passes
    it to the caller as itself, with the plan's message."""
    origin = compile_origin(gm)
    config = ParoConfig.from_options(kwargs.get("options"), kwargs.get("mode"))
    notes = ignored_option_notes(config)
    for note in notes:
        warnings.warn(f"paro: {note}", UserWarning)
    from paro_compile.kernels import tuning

    tuning.set_cache_dir(config.resolved_cache_dir)
    frame = inspect.currentframe()
    prepared = None
    try:
        plan = load_plan(config.plan)
        if plan is not None:
            prepared = prepare_plan(gm, plan, config, origin)
            plan = prepared.plan
            notes = notes + prepared.notes
    except (PlanError, FileNotFoundError) as error:
        report = new_report(origin)
        report.notes.extend(notes)
        report.error = error_summary(error)
        raise compile_time_error(error, frame) from error
    missing = prepared.missing if prepared is not None else {}

    def compile_with_plan(plan_to_use, missing_shapes: Mapping[str, str] = missing, more_notes: tuple = ()) -> Callable:
        report = new_report(origin)
        report.notes.extend(notes)
        report.notes.extend(more_notes)
        try:
            rewritten = rewrite_graph(gm, config, plan_to_use, report, missing_shapes)
            from torch._inductor.compile_fx import compile_fx

            # Inductor's benchmark harness (a `__main__` block in the generated module, for running it by hand) asks
            # every size symbol for a hint; on torch 2.11 a graph recompiled for a second token grid with a plan
            # holds a size symbol without one and the harness's codegen fails the compile (tests/test_multi_shape.py).
            # Off by default; `options={"inductor": {"benchmark_harness": True}}` turns it back on.
            return compile_fx(rewritten, example_inputs, config_patches={"benchmark_harness": False, **config.inductor})
        except Exception as error:
            report.error = error_summary(error)
            if isinstance(error, PlanError):
                raise compile_time_error(error, frame) from error
            raise

    if plan is None and config.auto_calibrate:
        from paro_compile.autocalib import make_auto_calibrating_callable

        return make_auto_calibrating_callable(gm, example_inputs, config, compile_with_plan)
    if missing and config.on_missing_shape == "calibrate":
        from paro_compile.autocalib import make_shape_calibrating_callable

        full_plan = load_plan(config.plan)
        return make_shape_calibrating_callable(
            gm, example_inputs, config, plan, missing, compile_with_plan,
            dense_buckets=full_plan.common_dense_buckets(), block_size=full_plan.block_size_of(missing))
    return compile_with_plan(plan)


def compile(model: torch.nn.Module, plan: Any = None, *, options: Optional[Mapping[str, Any]] = None,
            **compile_kwargs: Any) -> Callable:
    """``torch.compile(model, backend="paro", options={**options, "plan": plan}, **compile_kwargs)``, after checking
    what can be checked before tracing, so that these errors come from this call, plainly: the options
    (ValueError), the plan file (FileNotFoundError; PlanError naming the file, the site and the field) and whether
    the plan is from another model (PlanMismatchError: its fingerprint differs and its sites name modules ``model``
    does not have; a differing fingerprint alone is a warning). What needs the graph (the token grid, heads) is
    checked when each graph compiles. ``mode`` may be given here or in ``options``."""
    options = dict(options or {})
    if plan is not None:
        if "plan" in options:
            raise TypeError("paro_compile.compile: pass the plan either as plan= or as options['plan'], not both")
        options["plan"] = plan
    if "mode" in compile_kwargs:
        options["mode"] = compile_kwargs.pop("mode")
    config = ParoConfig.from_options(options)
    if config.plan is not None:
        loaded = load_plan(config.plan)
        if isinstance(loaded, Plan):
            check_plan_against_model(loaded, model)
        options["plan"] = loaded
    return torch.compile(model, backend=registered_backend(), options=options, **compile_kwargs)


def registered_backend() -> Any:
    """``"paro"`` when the entry point is registered (pip install), else the backend function itself (a source
    checkout on a machine where the package is not installed); torch.compile takes either, with ``options``."""
    import torch._dynamo

    return "paro" if "paro" in torch._dynamo.list_backends() else paro_backend
