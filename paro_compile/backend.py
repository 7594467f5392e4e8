"""The `paro` torch.compile backend.

Graph level: we rewrite the Dynamo (torch-level) FX graph, before AOT autograd, then hand it to
Inductor's `compile_fx`. Reasons (see docs/DESIGN_NOTES.md): SDPA is one node there on every device
(after AOT on CUDA it is a device-specific ATen variant that cannot be produced on a CPU machine, so a
post-grad matcher would be untestable in CI); nodes still carry ``nn_module_stack`` for stable site ids;
the layout ops around attention (flatten/transpose/cat of the patchify) are still visible as such for
the folding pass. Inductor then compiles the rewritten graph with its FX graph cache intact, because we
register no custom Inductor pass.

Registered once, through the ``torch_dynamo_backends`` entry point in pyproject.toml.
"""
from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from paro_compile.config import ParoConfig
from paro_compile.passes.context_parallel import localize_plan
from paro_compile.passes.discover import find_attention_sites
from paro_compile.passes.lower import lower_attention_sites
from paro_compile.report import CompileReport, compile_origin, error_summary, new_report

log = logging.getLogger("paro_compile")


class UnsupportedAttentionError(RuntimeError):
    """Raised with ``fallback="error"`` when a site cannot be lowered."""


def load_plan(plan: Any):
    if plan is None:
        return None
    if isinstance(plan, (str, Path)):
        from paro_compile.plan import Plan

        path = Path(plan)
        if not path.exists():
            raise FileNotFoundError(f"paro plan file {str(path)!r} does not exist; build one with paro_compile.calibrate(...).save(path)")
        return Plan.load(path)
    return plan


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


def rewrite_graph(gm: fx.GraphModule, config: ParoConfig, plan, report: CompileReport) -> fx.GraphModule:
    """Run the paro passes on a copy of ``gm``; fill ``report``. Returns the rewritten graph module."""
    gm = copy.deepcopy(gm)
    before = graph_code(gm)
    sites = find_attention_sites(gm, config)
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
    from paro_compile.calibration.summary import skipped_sites

    # Sites calibration skipped (plan.meta["skipped_sites"]) are not missing from the plan: they run dense, model order.
    skipped = {sid: reasons for sid, reasons in skipped_sites(plan).items() if sid not in plan.sites} if plan is not None else {}
    if plan is not None and hasattr(plan, "check_sites"):
        # Cross-attention sites have no token order (plans never hold them); skipped sites run dense.
        plan.check_sites([s for s in sites if not s.is_cross and s.site_id not in skipped], allow_extra=True)
    from paro_compile.passes import fold

    kernel_perms = None
    fold_result = None
    if plan is not None and config.fold_permutations:
        fold_result = fold.fold_permutations(gm, sites, plan, config)
        kernel_perms, report.gathers_left = fold_result.kernel_perms, fold_result.gathers
        report.passes.append({"name": "fold_permutations", "before": before, "after": graph_code(gm)})
        before = report.passes[-1]["after"]
    report.sites = lower_attention_sites(gm, sites, config, plan, kernel_perms)
    for record in report.sites:
        if record.lowered and record.site_id in skipped:
            record.reasons.append(f"calibration skipped this site ({'; '.join(skipped[record.site_id])}); dense, "
                                  "model token order")
    fold.describe_permutations(report.sites, fold_result)
    report.passes.append({"name": "lower_attention", "before": before, "after": graph_code(gm)})
    log.info("%s", report.summary())
    from paro_compile.inspection import emit_report_artifacts

    emit_report_artifacts(report)
    return gm


def paro_backend(gm: fx.GraphModule, example_inputs: list[Any], **kwargs: Any) -> Callable:
    """Dynamo backend: ``torch.compile(model, backend="paro", options={...}, mode=...)``."""
    origin = compile_origin(gm)
    config = ParoConfig.from_options(kwargs.get("options"), kwargs.get("mode"))
    notes = ignored_option_notes(config)
    for note in notes:
        warnings.warn(f"paro: {note}", UserWarning)
    from paro_compile.kernels import tuning

    tuning.set_cache_dir(config.resolved_cache_dir)
    plan = load_plan(config.plan)

    def compile_with_plan(plan_to_use) -> Callable:
        report = new_report(origin)
        report.notes.extend(notes)
        try:
            rewritten = rewrite_graph(gm, config, plan_to_use, report)
            from torch._inductor.compile_fx import compile_fx

            return compile_fx(rewritten, example_inputs, config_patches=dict(config.inductor) or None)
        except Exception as error:
            report.error = error_summary(error)
            raise

    if plan is None and config.auto_calibrate:
        from paro_compile.autocalib import make_auto_calibrating_callable

        return make_auto_calibrating_callable(gm, example_inputs, config, compile_with_plan)
    return compile_with_plan(plan)


def registered_backend() -> Any:
    """``"paro"`` when the entry point is registered (pip install), else the backend function itself (a source
    checkout on a machine where the package is not installed); torch.compile takes either, with ``options``."""
    import torch._dynamo

    return "paro" if "paro" in torch._dynamo.list_backends() else paro_backend
