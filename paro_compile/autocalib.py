"""Auto-calibration: ``options={"auto_calibrate": True}`` without a plan.

The backend calls `make_auto_calibrating_callable(gm, example_inputs, config, compile_with_plan)` in place
of lowering directly. The returned callable

1. if a plan for this graph is cached (``config.resolved_cache_dir / "plans" / <graph fingerprint>.safetensors``),
   calls ``compile_with_plan(plan)`` once at construction and forwards every call to the result;
2. otherwise runs the first ``config.calibration_calls`` calls through an *observing copy* of the graph
   (dense SDPA + statistics, eager FX, no Inductor), then builds the plan, saves it in the cache, calls
   ``compile_with_plan(plan)`` exactly once and forwards every later call to the result.

The graph fingerprint hashes the plan format version, the graph's code, the example inputs' shapes and
dtypes, and the config fields that shape a plan (density, block_size, calibration_calls), so a changed
model, input shape or density calibrates again. Token grids are resolved like `calibrate` does: the
``grid`` / ``grid_for_site`` arguments, the layout-inference pass, then the graph inputs' names and shapes.
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.fx as fx

from paro_compile.calibration import (
    DEFAULT_ALPHA,
    CalibrationOptions,
    GridHook,
    GridResolver,
    GridSpec,
    Recorder,
    placeholder_inputs,
)
from paro_compile.plan import PLAN_FORMAT_VERSION, Plan, PlanError

PLAN_FIELDS = ("density", "block_size", "calibration_calls")


def _describe_input(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"T{tuple(value.shape)}:{value.dtype}"
    return f"{type(value).__name__}:{value!r}"


def graph_fingerprint(gm: fx.GraphModule, example_inputs: Iterable[Any], config: Any) -> str:
    """Key of the plan cache: format version + graph code + input shapes/dtypes + plan-shaping config."""
    digest = hashlib.sha256()
    digest.update(f"paro_plan_v{PLAN_FORMAT_VERSION}\n".encode())
    digest.update(gm.code.encode())
    for value in example_inputs:
        digest.update(_describe_input(value).encode())
    for name in PLAN_FIELDS:
        digest.update(f"{name}={getattr(config, name, None)!r};".encode())
    for name in ("alpha", "step_buckets", "dense_steps", "grid"):
        if hasattr(config, name):
            digest.update(f"{name}={getattr(config, name)!r};".encode())
    return digest.hexdigest()[:32]


def plan_cache_path(gm: fx.GraphModule, example_inputs: Iterable[Any], config: Any) -> Path:
    return Path(config.resolved_cache_dir) / "plans" / f"{graph_fingerprint(gm, example_inputs, config)}.safetensors"


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of ``gm``'s graph (parameters shared, node meta shallow-copied)."""
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph)


class AutoCalibratingCallable:
    """See the module docstring. ``state`` is "calibrating" or "compiled"."""

    def __init__(
        self,
        gm: fx.GraphModule,
        example_inputs: list[Any],
        config: Any,
        compile_with_plan: Callable[[Plan], Callable],
        *,
        grid: GridSpec = None,
        grid_for_site: Optional[GridHook] = None,
        text_position: str = "prefix",
        use_layout_pass: bool = True,
    ) -> None:
        self.config = config
        self.compile_with_plan = compile_with_plan
        self.key = graph_fingerprint(gm, example_inputs, config)
        self.path = Path(config.resolved_cache_dir) / "plans" / f"{self.key}.safetensors"
        self.calls = 0
        self.compiled: Optional[Callable] = None
        self.plan: Optional[Plan] = None
        self.recorder: Optional[Recorder] = None
        self.observed: Optional[fx.GraphModule] = None
        self.loaded_from_cache = False

        cached = self._load_cached(gm)
        if cached is not None:
            self.plan = cached
            self.loaded_from_cache = True
            self.compiled = compile_with_plan(cached)
            return
        options = CalibrationOptions(
            density=float(getattr(config, "density", 1.0)),
            alpha=float(getattr(config, "alpha", DEFAULT_ALPHA)),
            block_size=int(getattr(config, "block_size", 64)),
        )
        resolver = GridResolver(grid, grid_for_site, text_position=text_position, use_layout_pass=use_layout_pass)
        resolver.inputs = placeholder_inputs(gm, example_inputs)
        self.recorder = Recorder(options, resolver, num_buckets=1)
        try:
            self.observed = self.recorder.instrument(copy_graph_module(gm))
        except Exception:
            self.recorder.close()
            raise

    def _load_cached(self, gm: fx.GraphModule) -> Optional[Plan]:
        if not self.path.exists():
            return None
        try:
            plan = Plan.load(self.path)
            from paro_compile.config import ParoConfig
            from paro_compile.passes.discover import find_attention_sites

            plan.check_sites(find_attention_sites(gm, ParoConfig(allow_fp32=True)),
                             block_size=getattr(self.config, "block_size", None))
            return plan
        except PlanError as error:
            warnings.warn(f"paro: ignoring cached plan {self.path} ({error}); calibrating again", stacklevel=2)
            return None

    @property
    def state(self) -> str:
        return "compiled" if self.compiled is not None else "calibrating"

    def __call__(self, *args: Any) -> Any:
        if self.compiled is not None:
            return self.compiled(*args)
        assert self.observed is not None and self.recorder is not None
        out = self.observed(*args)
        self.calls += 1
        if self.calls >= int(getattr(self.config, "calibration_calls", 1)):
            self._finish()
        return out

    def _finish(self) -> None:
        assert self.recorder is not None
        try:
            plan = self.recorder.build_plan(step_boundaries=[], fingerprint=self.key,
                                            meta={"auto_calibrated": True, "calls": self.calls})
            plan.save(self.path)
        finally:
            self.recorder.close()
        self.plan = plan
        self.observed = None
        self.recorder = None
        self.compiled = self.compile_with_plan(plan)


def make_auto_calibrating_callable(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    config: Any,
    compile_with_plan: Callable[[Plan], Callable],
    **kwargs: Any,
) -> AutoCalibratingCallable:
    """The backend's entry point for auto-calibration (see the module docstring).

    ``compile_with_plan(plan) -> callable`` lowers ``gm`` with the plan and runs Inductor; it is called exactly
    once per returned callable. Keyword options: ``grid``, ``grid_for_site``, ``text_position``,
    ``use_layout_pass`` (as in `calibrate`).
    """
    return AutoCalibratingCallable(gm, example_inputs, config, compile_with_plan, **kwargs)
