"""Auto-calibration: ``options={"auto_calibrate": True}`` without a plan.

The backend calls `make_auto_calibrating_callable(gm, example_inputs, config, compile_with_plan)` in place
of lowering directly. The returned callable

1. if a plan for this graph is cached (``config.resolved_cache_dir / "plans" / <graph fingerprint>.safetensors``,
   or in memory when that directory could not be written), calls ``compile_with_plan(plan)`` once at construction
   and forwards every call to the result;
2. otherwise runs the first ``config.calibration_calls`` calls through an *observing copy* of the graph
   (dense SDPA + statistics, eager FX, no Inductor), then builds the plan, saves it in the cache, calls
   ``compile_with_plan(plan)`` exactly once and forwards every later call to the result.

With a plan and ``on_missing_shape="calibrate"``, the backend calls `make_shape_calibrating_callable` for a graph whose
token grid the plan lacks at some sites: the same callable calibrates the graph (at the plan's density and block
size), and those sites' entries join the plan's entries for this graph, with the plan's step buckets (the calibrated
mask in every sparse bucket, the plan's dense buckets dense). The plan file is not changed; the calibrated plan is
cached like any other.

The graph fingerprint hashes the plan format version, the graph's code, the example inputs' shapes and
dtypes, a fingerprint of the weights (`weights_fingerprint`: per parameter and buffer its sum, min and max,
computed where the tensor lives), and the config fields that shape a plan (density, block_size,
calibration_calls), so a changed model, other weights, input shape or density calibrates again. Plans are
written atomically (a uniquely named temporary file in the cache directory, then ``os.replace``), so processes
that calibrate the same graph at once never leave a torn file; a cache directory that cannot be written costs a
warning (once per directory) and the plan stays in memory for the process. Token grids are resolved like
`calibrate` does: the ``grid`` / ``grid_for_site`` arguments, the layout-inference pass, then the graph inputs'
names and shapes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
import torch.fx as fx

from paro_compile.calibration.grids import GridHook, GridResolver, GridSpec, placeholder_inputs
from paro_compile.calibration.options import CalibrationOptions
from paro_compile.calibration.recording import Recorder
from paro_compile.plan import PLAN_FORMAT_VERSION, Plan, PlanError, SitePlan

PLAN_FIELDS = ("density", "block_size", "calibration_calls")

_PLANS_IN_MEMORY: dict[Path, Plan] = {}
"""Plans whose cache file could not be written, by the path they were meant for (this process only)."""
_UNWRITABLE_DIRS_WARNED: set[Path] = set()


def _describe_input(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"T{tuple(value.shape)}:{value.dtype}"
    return f"{type(value).__name__}:{value!r}"


def _is_weight_placeholder(node: fx.Node, value: Any) -> bool:
    return isinstance(value, torch.nn.Parameter) or "_parameters_" in node.name or "_buffers_" in node.name


def _tensor_statistics(data: torch.Tensor) -> torch.Tensor:
    """float64 [sum, min, max] of ``data``, on its device."""
    if data.dtype == torch.bool:
        data = data.to(torch.uint8)
    try:
        low, high = torch.aminmax(data)
        total = data.sum(dtype=torch.float64)
    except (RuntimeError, NotImplementedError):  # dtypes without these reductions (float8): reduce a float32 copy
        data = data.to(torch.float32)
        low, high = torch.aminmax(data)
        total = data.sum(dtype=torch.float64)
    return torch.stack([total, low.to(torch.float64), high.to(torch.float64)])


def weights_fingerprint(gm: fx.GraphModule, example_inputs: Iterable[Any]) -> str:
    """Hash of the values of the graph's weights: its own parameters and buffers and the lifted ones among the
    example inputs (Dynamo passes a module's parameters as graph inputs).

    Per tensor, its sum (accumulated in float64), min and max are reduced where the tensor lives, stacked per
    device and copied to the host as one small tensor, so the weights themselves never leave their device. The
    statistics are rounded to 12 significant digits before hashing: reduction order may differ between runs,
    other weights of the same architecture practically never agree in all three to that precision.
    """
    by_name = lambda item: item[0]  # noqa: E731
    tensors = [t for _, t in sorted(gm.named_parameters(remove_duplicate=False), key=by_name)]
    tensors += [t for _, t in sorted(gm.named_buffers(remove_duplicate=False), key=by_name)]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    tensors += [value for node, value in zip(placeholders, example_inputs)
                if isinstance(value, torch.Tensor) and _is_weight_placeholder(node, value)]
    digest = hashlib.sha256()
    stats_by_device: dict[torch.device, list[torch.Tensor]] = {}
    order: list[tuple[torch.device, int]] = []
    with torch.no_grad():
        for tensor in tensors:
            digest.update(f"{tuple(tensor.shape)}:{tensor.dtype};".encode())
            if tensor.numel() == 0 or tensor.is_meta or tensor.is_complex() or tensor.is_quantized:
                continue
            stats = _tensor_statistics(tensor)
            bucket = stats_by_device.setdefault(tensor.device, [])
            order.append((tensor.device, len(bucket)))
            bucket.append(stats)
        on_host = {device: torch.stack(stats).cpu() for device, stats in stats_by_device.items()}
    for device, index in order:
        digest.update(",".join(f"{float(x):.12g}" for x in on_host[device][index]).encode())
    return digest.hexdigest()[:32]


def graph_fingerprint(gm: fx.GraphModule, example_inputs: Iterable[Any], config: Any) -> str:
    """Key of the plan cache: format version + graph code + input shapes/dtypes + weights + plan-shaping config."""
    example_inputs = list(example_inputs)
    digest = hashlib.sha256()
    digest.update(f"paro_plan_v{PLAN_FORMAT_VERSION}\n".encode())
    digest.update(gm.code.encode())
    for value in example_inputs:
        digest.update(_describe_input(value).encode())
    digest.update(f"weights={weights_fingerprint(gm, example_inputs)};".encode())
    for name in PLAN_FIELDS:
        digest.update(f"{name}={getattr(config, name, None)!r};".encode())
    for name in ("alpha", "step_buckets", "dense_steps", "grid"):
        if hasattr(config, name):
            digest.update(f"{name}={getattr(config, name)!r};".encode())
    return digest.hexdigest()[:32]


def plan_cache_path(gm: fx.GraphModule, example_inputs: Iterable[Any], config: Any) -> Path:
    return Path(config.resolved_cache_dir) / "plans" / f"{graph_fingerprint(gm, example_inputs, config)}.safetensors"


def write_plan_atomically(plan: Plan, path: Path) -> Path:
    """Save ``plan`` to ``path`` through a uniquely named temporary file in the same directory and ``os.replace``:
    readers and concurrent writers of the same path only ever see a complete file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        plan.save(temporary)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return path


def _warn_unwritable(directory: Path, error: OSError) -> None:
    if directory in _UNWRITABLE_DIRS_WARNED:
        return
    _UNWRITABLE_DIRS_WARNED.add(directory)
    warnings.warn(
        f"paro: cannot write auto-calibrated plans to {directory} ({type(error).__name__}: {error}); keeping them in "
        "memory for this process only, so a new process calibrates again. Point the cache at a writable directory "
        "with the cache_dir option (options={'cache_dir': ...}) or the PARO_CACHE_DIR environment variable.",
        stacklevel=3,
    )


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

        cached = _PLANS_IN_MEMORY.get(self.path)
        if cached is None:
            cached = self._load_cached(gm)
        if cached is not None:
            self.plan = cached
            self.loaded_from_cache = True
            self.compiled = compile_with_plan(cached)
            return
        options = CalibrationOptions(density=float(getattr(config, "density", 1.0)), block_size=int(getattr(config, "block_size", 64)),
                                     **({"alpha": float(config.alpha)} if hasattr(config, "alpha") else {}))
        resolver = GridResolver(grid, grid_for_site, text_position=text_position, use_layout_pass=use_layout_pass)
        resolver.inputs = placeholder_inputs(gm, example_inputs)
        self.recorder = Recorder(options, resolver, num_buckets=1)
        try:
            self.observed = self.recorder.instrument(copy_graph_module(gm))
        except Exception:
            self.recorder.close()
            raise

    def _load_cached(self, gm: fx.GraphModule) -> Optional[Plan]:
        try:
            if not self.path.is_file():
                return None
        except OSError:  # an unreadable cache directory is no cache
            return None
        try:
            plan = Plan.load(self.path)
            from paro_compile.calibration.summary import skipped_sites
            from paro_compile.config import ParoConfig
            from paro_compile.passes.discover import find_attention_sites

            skipped = skipped_sites(plan)  # left out by calibration: dense, model order, not missing
            plan.check_sites([s for s in find_attention_sites(gm, ParoConfig(allow_fp32=True))
                              if s.site_id not in skipped or s.site_id in plan.sites],
                             block_size=getattr(self.config, "block_size", None))
            return plan
        except (PlanError, OSError) as error:
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
        finally:
            self.recorder.close()
        try:
            write_plan_atomically(plan, self.path)
        except OSError as error:
            _warn_unwritable(self.path.parent, error)
            _PLANS_IN_MEMORY[self.path] = plan
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


def entry_for_buckets(entry: SitePlan, num_buckets: int, dense_buckets: Iterable[int]) -> SitePlan:
    """A one-bucket auto-calibrated entry with ``num_buckets`` step buckets: its mask in every bucket, all ones in
    ``dense_buckets``."""
    masks = entry.block_masks[:1].expand(num_buckets, *entry.block_masks.shape[1:]).clone()
    dense = sorted(b for b in dense_buckets if 0 <= b < num_buckets)
    for bucket in dense:
        masks[bucket] = True
    return SitePlan(entry.site_id, entry.heads, entry.seq_len, entry.block_size, entry.perm, masks,
                    orders=list(entry.orders), grid=entry.grid, empty_heads=list(entry.empty_heads),
                    dense_buckets=dense, stats={**entry.stats, "auto_calibrated": True})


def fill_missing_sites(plan: Plan, calibrated: Plan, site_ids: Iterable[str], dense_buckets: Iterable[int] = ()) -> Plan:
    """``plan`` (one graph's entries) with the ``calibrated`` entries of ``site_ids`` added, brought to ``plan``'s step
    buckets (`entry_for_buckets`)."""
    dense = list(dense_buckets)
    added = {sid: entry_for_buckets(calibrated.sites[sid], plan.num_buckets, dense)
             for sid in site_ids if sid in calibrated.sites}
    return Plan(sites={**plan.sites, **added}, step_boundaries=list(plan.step_boundaries), timestep_arg=plan.timestep_arg,
                fingerprint=plan.fingerprint, density=plan.density, alpha=plan.alpha, qk_bits=plan.qk_bits,
                pv_dtype=plan.pv_dtype, meta=plan.meta, source=plan.source)


def make_shape_calibrating_callable(
    gm: fx.GraphModule,
    example_inputs: list[Any],
    config: Any,
    plan: Plan,
    missing: dict[str, str],
    compile_with_plan: Callable[..., Callable],
    *,
    dense_buckets: Iterable[int] = (),
    block_size: Optional[int] = None,
    **kwargs: Any,
) -> AutoCalibratingCallable:
    """``on_missing_shape="calibrate"``: an `AutoCalibratingCallable` for ``gm`` whose plan fills the ``missing`` sites
    of ``plan`` (the graph's entries the given plan has). Calibrated at the plan's density (``Plan.density``, else the
    ``density`` option), alpha (``Plan.alpha``, else the default) and ``block_size`` (the plan's, else the option's). ``compile_with_plan(plan, missing_shapes,
    more_notes)`` lowers the graph."""
    shape_config = dataclasses.replace(config, plan=None, auto_calibrate=True,
                                       density=float(plan.density if plan.density is not None else config.density),
                                       block_size=int(block_size or config.block_size))
    if plan.alpha is not None:
        # AutoCalibratingCallable reads an ``alpha`` attribute when the config has one (ParoConfig has no such option),
        # and the plan cache key includes it.
        shape_config.alpha = float(plan.alpha)
    dense = list(dense_buckets)

    def compile_filled(calibrated: Plan) -> Callable:
        filled = fill_missing_sites(plan, calibrated, missing, dense)
        note = (f"{len(missing)} site(s) without a plan entry for this token grid auto-calibrated "
                f"(on_missing_shape='calibrate', density {shape_config.density}, block {shape_config.block_size}; "
                f"cached under {Path(shape_config.resolved_cache_dir) / 'plans'})")
        return compile_with_plan(filled, {}, (note,))

    return AutoCalibratingCallable(gm, example_inputs, shape_config, compile_filled, **kwargs)
