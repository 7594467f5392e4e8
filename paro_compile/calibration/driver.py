"""The calibration driver: `calibrate(model, inputs)` for a whole model, `calibrate_site(q, k, grid)` for one site.

`calibrate` compiles a private wrapper of the model with its own Dynamo backend (`recording.Recorder`), which
replaces every supported SDPA site by dense SDPA plus statistics and runs the graph eagerly; it reads the timesteps
for the step buckets, solves ``average_density`` into the sparse buckets' density, runs the inputs and builds the
`Plan`. Both entry points take a `CalibrationOptions` (``options=``) and/or its fields as keyword arguments.
"""
from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Sequence
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
import torch.fx as fx

from paro_compile.calibration.budget import derive_step_boundaries, solve_sparse_density, timestep_value
from paro_compile.calibration.grids import GridHook, GridResolver, GridSpec, named_inputs
from paro_compile.calibration.options import (
    CalibrationError,
    CalibrationOptionError,
    CalibrationOptions,
    merge_options,
)
from paro_compile.calibration.recording import Recorder
from paro_compile.calibration.statistics import SiteStatistics
from paro_compile.calibration.summary import calibration_summary
from paro_compile.grid import TokenGrid
from paro_compile.plan import Plan, SitePlan, model_fingerprint


def calibrate_site(
    q: torch.Tensor,
    k: torch.Tensor,
    grid: TokenGrid,
    *,
    v: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    site_id: str = "site",
    options: Optional[CalibrationOptions] = None,
    **option_fields: Any,
) -> SitePlan:
    """Calibrate one site from its q, k (and optionally v) [B, H, N, D]: one call, one mask set.

    ``options`` and/or keyword arguments: `CalibrationOptions` fields; the step-bucket options need a whole run
    (`calibrate`) and are refused here."""
    opts = merge_options(options, option_fields, "calibrate_site")
    step_options = opts.step_options_set()
    if step_options:
        raise CalibrationOptionError(tuple(step_options),
                                     "calibrate_site() builds one mask set from one attention call; "
                                     + ", ".join("{" + name + "}" for name in step_options)
                                     + " need calibrate(model, inputs) over the sampling steps")
    stats = SiteStatistics(grid, q.shape[1], opts)
    stats.update(q, k, v, scale=scale)
    return stats.build_site_plan(site_id)


def _split_inputs(item: Any) -> tuple[tuple, dict]:
    if isinstance(item, Mapping):
        return (), dict(item)
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], (tuple, list)) and isinstance(item[1], Mapping):
        return tuple(item[0]), dict(item[1])
    raise TypeError(f"calibration inputs must be (args, kwargs) tuples or dicts of keyword arguments, got {type(item).__name__}")


def _calibration_timesteps(model: torch.nn.Module, items: list, timestep_arg: str, why: str) -> list[float]:
    """The ``timestep_arg`` value of every calibration input (raises `CalibrationError` saying ``why`` if absent)."""
    out = []
    for item in items:
        args, kwargs = _split_inputs(item)
        t = timestep_value(named_inputs(model, args, kwargs).get(timestep_arg))
        if t is None:
            raise CalibrationError(f"{why}: input {timestep_arg!r} not found in a calibration input (set timestep_arg=...)")
        out.append(t)
    return out


def _reiterable(items: Iterable[Any]) -> Sequence:
    """``items`` itself when it can be read twice without a copy (a list, `capture.CapturedCalls`), else a list."""
    return items if isinstance(items, Sequence) else list(items)


def _fresh_runner(tag: int) -> Callable:
    """``run(model, args, kwargs)`` with a code object of its own.

    Dynamo keeps compiled graphs on the code object of the frame it compiles (with a per-code recompile
    limit) and guards them on the backend's identity. Compiling this fresh function instead of the model
    keeps our entries off ``model.forward``'s code: the user's own compiled model is untouched, repeated
    calibrations never hit the recompile limit, and the entries die with the function.
    """

    def run(model, args, kwargs):
        return model(*args, **kwargs)

    code = run.__code__.replace(co_name=f"paro_calibration_{tag}")
    return types.FunctionType(code, run.__globals__, code.co_name)


def _progress(iterable, total, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="call")


def calibrate(
    model: torch.nn.Module,
    inputs_iter: Iterable[Any],
    *,
    options: Optional[CalibrationOptions] = None,
    grid: GridSpec = None,
    grid_for_site: Optional[GridHook] = None,
    text_position: str = "prefix",
    use_layout_pass: bool = True,
    progress: bool = True,
    **option_fields: Any,
) -> Plan:
    """Run ``model`` on ``inputs_iter`` with instrumented attention and build a `Plan`.

    inputs_iter yields ``(args, kwargs)`` or a dict of keyword arguments, one model call each.
    options: a `CalibrationOptions`; its fields can also be given as keyword arguments (``density=0.3``,
    ``step_buckets=2``, ``average_density=0.3, dense_steps=2``, ...), which override ``options``. Every option is
    documented on the dataclass (and in docs/calibration.md).
    grid: one `TokenGrid` for every site, a dict {site_id: TokenGrid}, or None. Sites it does not cover ask
    ``grid_for_site(site)``, then the layout-inference pass (``use_layout_pass``), then the inputs' shapes
    (`grids.infer_grid`, with the text tokens at ``text_position``: "prefix" or "suffix"); a layout none of them
    determines raises `CalibrationError`.
    progress: a tqdm progress bar over the calls, and the calibration summary at the end (`summary.calibration_summary`:
    the plan, the skipped sites with their reasons, the sites flagged for Q/K outliers).

    A site that the backend cannot lower or calibration cannot read (symbolic sizes, all its tokens in one block, a
    token layout no source determines, a shape that changes between calls) is skipped: the plan's
    ``meta["skipped_sites"]`` maps it to its reasons, and the backend runs it dense in the model's token order. Only a
    model with no readable site raises `CalibrationError`, naming every site's reason.

    The step buckets come from ``step_boundaries``, or are derived from the calibration timesteps (read from the
    ``timestep_arg`` input). With ``average_density`` the sparse buckets' density is solved so that the kept share
    averaged over ``sampling_timesteps`` (default: the calibration calls' timesteps), dense buckets counting 1.0,
    meets the target (`budget.solve_sparse_density`); the plan's ``meta`` records the target, the solved sparse
    density, the dense share and the achieved average.
    """
    opts = merge_options(options, option_fields, "calibrate")
    model = getattr(model, "_orig_mod", model)  # an already compiled module: calibrate the original
    items: Iterable[Any] = inputs_iter
    total = len(items) if hasattr(items, "__len__") else None
    dense_buckets: list[int] = []
    timesteps: list[float] = []
    if opts.step_boundaries is not None:
        boundaries = list(opts.step_boundaries)
        if opts.dense_steps:
            dense_buckets = [0]
    elif opts.step_buckets > 1 or opts.dense_steps:
        items = _reiterable(items)
        total = len(items)
        timesteps = _calibration_timesteps(model, items, opts.timestep_arg, "step buckets need the timestep")
        boundaries, dense_buckets = derive_step_boundaries(timesteps, opts.step_buckets, opts.dense_steps)
    else:
        boundaries = []
    average_meta: dict[str, float] = {}
    weights_ts: list[float] = []
    site_options = opts
    if opts.average_density is not None:
        weights_from = opts.sampling_timesteps
        if weights_from is None and dense_buckets:
            if not timesteps:  # explicit boundaries: read the calibration timesteps now
                items = _reiterable(items)
                total = len(items)
                timesteps = _calibration_timesteps(model, items, opts.timestep_arg,
                                                   "average_density with dense buckets needs the timestep "
                                                   "(or pass sampling_timesteps=[...])")
            weights_from = timesteps
        if dense_buckets:
            sparse, dense_share = solve_sparse_density(opts.average_density, boundaries, dense_buckets, weights_from)
        else:
            sparse, dense_share = opts.average_density, 0.0
        site_options = dataclasses.replace(opts, density=sparse, average_density=None, sampling_timesteps=None)
        average_meta = {"average_density_target": opts.average_density, "sparse_density": sparse,
                        "dense_step_share": dense_share}
        weights_ts = weights_from or []
    plan_shell = Plan(sites={}, step_boundaries=boundaries)
    resolver = GridResolver(grid, grid_for_site, model=model, text_position=text_position, use_layout_pass=use_layout_pass)
    recorder = Recorder(site_options, resolver, num_buckets=plan_shell.num_buckets, progress=progress)

    def backend(gm: fx.GraphModule, example_inputs):
        return recorder.instrument(gm).forward

    try:
        compiled = functools.partial(torch.compile(_fresh_runner(recorder.id), backend=backend, dynamic=False), model)
        calls = 0
        with torch.no_grad():
            for item in _progress(items, total, progress, "paro calibration"):
                args, kwargs = _split_inputs(item)
                named = named_inputs(model, args, kwargs)
                resolver.inputs = named
                if boundaries:
                    t = timestep_value(named.get(opts.timestep_arg))
                    if t is None:
                        raise CalibrationError(f"step buckets need the timestep: input {opts.timestep_arg!r} not found")
                    recorder.bucket = plan_shell.bucket_for_timestep(t)
                try:
                    compiled(args, kwargs)
                except Exception as error:  # unwrap our own errors raised inside the Dynamo backend
                    inner = getattr(error, "inner_exception", None) or error.__cause__
                    if isinstance(inner, CalibrationError):
                        raise inner from None
                    raise
                calls += 1
        if not calls:
            raise CalibrationError("inputs_iter yielded no calibration inputs")
        plan = recorder.build_plan(step_boundaries=boundaries, dense_buckets=dense_buckets, timestep_arg=opts.timestep_arg,
                                   fingerprint=model_fingerprint(model),
                                   meta={"calls": calls, **({"allocation": opts.allocation} if opts.allocation != "uniform" else {}),
                                         **({"block_score": opts.block_score} if opts.block_score != "mass" else {}),
                                         **average_meta})
        if average_meta:
            plan.meta["average_density_achieved"] = (
                sum(plan.overall_density(plan.bucket_for_timestep(t)) for t in weights_ts) / len(weights_ts)
                if weights_ts else plan.overall_density())
    finally:
        recorder.close()
    if progress:
        from tqdm.auto import tqdm

        tqdm.write(calibration_summary(plan))
    return plan
