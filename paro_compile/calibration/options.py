"""Calibration options: `CalibrationOptions` is the one definition that `calibrate()`, auto-calibration and
``paro calibrate`` read.

Each field carries its help text (and choices) in its metadata; the ``paro calibrate`` flags are generated from
the fields (`option_flag`, `option_value_type`), and so is the flag table of docs/cli.md (`flags_markdown_table`;
a test keeps the two equal). Validation lives in `CalibrationOptions.__post_init__` and raises
`CalibrationOptionError`, which names the fields involved so that the CLI can name its flags instead.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch

DEFAULT_DENSITY = 0.3
# α = 0.9 with sparsity_metric="mass": the synthetic-head sweep in docs/calibration.md ("Order choice and α"),
# rerun by benchmarks/alpha_sweep.py.
DEFAULT_ALPHA = 0.9
# min_order_gain = 0.02: the synthetic-head measurement in docs/calibration.md ("Order choice and α"), rerun by
# benchmarks/order_gain_sweep.py.
DEFAULT_MIN_ORDER_GAIN = 0.02
# qk_outlier_error = 0.05: above the FP8-PV error floor, so a flagged site's Q/K quantization is its largest error
# source; measured on clean and outlier inputs in docs/calibration.md ("Q/K outliers").
DEFAULT_QK_OUTLIER_ERROR = 0.05
DEFAULT_EPS = 1e-3
DEFAULT_SIGMA = 0.9
SPARSITY_METRICS = ("both", "paper", "mass")
ALLOCATIONS = ("uniform", "site", "global")
BLOCK_SCORES = ("mass", "output")
EMPTY_HEAD_POLICIES = ("keep", "minimal")
STATS_KERNELS = ("auto", "triton", "torch")
STEP_OPTIONS = ("average_density", "sampling_timesteps", "step_buckets", "dense_steps", "step_boundaries")
"""Options that shape the step buckets of a whole calibration run; a single site (`calibrate_site`) has one bucket."""


class CalibrationError(ValueError):
    """Calibration cannot proceed (unknown token layout, no timesteps for step buckets, bad option, ...)."""


class CalibrationOptionError(CalibrationError):
    """An option value out of range, or options that contradict each other.

    ``options`` names the fields involved; the message template refers to them as ``{field}``, so `render` can
    name them as Python arguments (the default) or as command line flags.
    """

    def __init__(self, options: tuple[str, ...], template: str) -> None:
        self.options = tuple(options)
        self.template = template
        super().__init__(self.render())

    def render(self, name: Callable[[str], str] = str) -> str:
        text = self.template
        for option in self.options:
            text = text.replace("{" + option + "}", name(option))
        return text


def _option(default: Any, help: str, *, choices: Optional[tuple[str, ...]] = None, shown_default: Optional[str] = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "shown_default": shown_default})


@dataclass
class CalibrationOptions:
    """Everything that shapes a calibrated plan: the block budget, step buckets, order choice, masks and the
    statistics pass. Shared by `calibrate` (options=... or the same names as keyword arguments), auto-calibration
    and ``paro calibrate`` (one flag per field).

    How the model is observed (token grids, the layout pass, the progress bar) is an argument of `calibrate`
    instead: it describes the model, not the plan.
    """

    # ---- block budget ---------------------------------------------------------------------------------
    density: Optional[float] = _option(
        None, "share of attention blocks kept per head in every sparse step bucket, diagonal and text blocks "
              "included (unset: 0.3, or solved from average_density)", shown_default="None (0.3)")
    average_density: Optional[float] = _option(
        None, "instead of density: the kept share averaged over the sampling steps, dense-bucket steps counting 1.0; "
              "the sparse buckets' density is solved from it")
    sampling_timesteps: Optional[list[float]] = _option(
        None, "the timesteps average_density averages over (the sampler's schedule; unset: the calibration calls' "
              "timesteps)")
    mass_threshold: Optional[float] = _option(
        None, "instead of a density: keep blocks, heaviest first, until this share of the calibration mass is kept")
    """Per head; with ``allocation`` "site" / "global": of the site's / model's row-normalised mass."""
    allocation: str = _option(
        "uniform", "how the kept-block budget is spread: the same share per head (uniform), by row-normalised mass "
                   "across the heads of a site (site) or across all sites (global)", choices=ALLOCATIONS)
    """Mandatory diagonal/text blocks are always kept. "uniform": every head of every site keeps
    ``ceil(density · nb²)`` blocks, its heaviest; "site": the heaviest blocks of all heads of a site together,
    ``ceil(density · H · nb²)`` in all, so the site's density is ``density`` but its heads' densities differ;
    "global": the heaviest blocks of all heads of all sites (step bucket by step bucket), so only the model's
    block-weighted average density (`Plan.overall_density`) is ``density``. Blocks are ranked by
    `masks.row_normalized_mass` (each query row's attention sums to 1, so rows of different heads, sites, call
    counts and batch sizes compare): this maximises the summed kept attention share over all query rows and heads."""
    block_score: str = _option(
        "mass", "what ranks the blocks of a mask: calibrated attention mass (mass) or the first-order output change "
                "of dropping the block (output; uniform allocation only)", choices=BLOCK_SCORES)
    """"output": ``score(i, j) = sum over query rows r of block i (and calls, batch) of
    || P_r(j) · o_r − sum_{c in j} P_rc v_c ||`` = ``P_r(j) · || o_r − vbar_r(j) ||`` with P_r(j) the row's
    probability mass in key block j, vbar_r(j) the P-weighted mean of the block's values and o_r the row's output;
    accumulated in the same chunked pass, no N×N map; needs v. A block whose values equal the output costs nothing
    to drop whatever its mass. Only the ranking changes: orders are still chosen by mass."""

    # ---- step buckets ---------------------------------------------------------------------------------
    step_buckets: int = _option(1, "mask sets per range of timesteps, split from the calibration timesteps")
    dense_steps: int = _option(
        0, "that many largest calibration timesteps form an extra all-dense bucket 0 (with step_boundaries: any "
           "value > 0 makes bucket 0 dense)")
    step_boundaries: Optional[list[float]] = _option(
        None, "explicit step-bucket boundaries, timesteps in descending order (unset: derived from the calibration "
              "timesteps)")
    timestep_arg: str = _option("timestep", "the model input (keyword or positional name) holding the timestep")

    # ---- order choice ---------------------------------------------------------------------------------
    alpha: float = _option(DEFAULT_ALPHA, "weight of the sparsity score against the quantization score when "
                                          "choosing each head's token order")
    sparsity_metric: str = _option(
        "mass", "sparsity score of an order: mass kept at the target density (mass), the paper's block-sparsity "
                "share (paper) or their mean (both)", choices=SPARSITY_METRICS)
    eps: float = _option(DEFAULT_EPS, "the paper's block-sparsity threshold: an attention entry below eps counts "
                                      "as zero")
    sigma: float = _option(DEFAULT_SIGMA, "the paper's block-sparsity share: a block is sparse when at least sigma "
                                          "of its entries are below eps")
    orders: Optional[list[str]] = _option(
        None, "candidate token orders, e.g. FHW,HWF (unset: every permutation of the grid's axes)")
    min_order_gain: float = _option(
        DEFAULT_MIN_ORDER_GAIN, "a head leaves the model's token order only for an order whose gain over it exceeds "
                                "this: the share of the model order's dropped attention mass it recovers, mixed by "
                                "alpha with its relative incoherence reduction (0: any gain)")
    """Another order costs a kernel permutation or folded layout ops; on near-uniform maps every order keeps about the
    same mass and the best one wins by noise. `orders.order_gains` defines the gain."""

    # ---- blocks and the statistics pass ---------------------------------------------------------------
    block_size: int = _option(64, "token block of the masks (must equal the backend's block_size)")
    chunk_rows: Optional[int] = _option(
        None, "query rows per statistics chunk (unset: as many as max_chunk_elements allows)")
    max_chunk_elements: Optional[int] = _option(
        None, "bound on B·H·rows·N of one statistics chunk (unset: 2**27 on CUDA, 2**22 on the CPU)")
    stats_kernel: str = _option(
        "auto", "what computes the block maps: the Triton kernels, which recompute scores per order instead of holding "
                "attention rows (triton), chunked PyTorch (torch), or Triton on CUDA with block_score=mass and "
                "power-of-two blocks of 16-128, else PyTorch (auto)", choices=STATS_KERNELS)
    """Both give the same maps up to fp32 rounding (`kernels.block_stats`, tested against one reference). "triton" on
    a CPU tensor needs the Triton interpreter (TRITON_INTERPRET=1)."""
    stats_device: Optional[str] = _option(
        None, "device of the accumulated [orders, heads, nb, nb] mass maps, e.g. cpu to save GPU memory (unset: "
              "the attention inputs' device)")
    """A device name; a torch.device is accepted and stored as its name."""

    # ---- Q/K outliers ---------------------------------------------------------------------------------
    qk_outlier_error: Optional[float] = _option(
        DEFAULT_QK_OUTLIER_ERROR, "flag a site when per-block INT8 Q/K would give an attention-output error above this "
                                  "on a head's most incoherent query block (unset: not measured)")
    """The measurement and the suggested fix (finer quantization groups or qk_bits=16): `outliers`; the numbers go to
    ``SitePlan.stats["qk_outliers"]`` and flagged sites to the calibration summary."""

    # ---- empty heads ----------------------------------------------------------------------------------
    empty_head_tol: Optional[float] = _option(
        1e-2, "a head is empty when its output RMS is below this share of the site's median head (unset: no head "
              "is empty)")
    empty_heads: str = _option(
        "keep", "masks of empty heads: a normal mask, reported only (keep), or the diagonal and text blocks only "
                "(minimal)", choices=EMPTY_HEAD_POLICIES)

    def __post_init__(self) -> None:
        for name in ("density", "average_density", "mass_threshold"):
            self._fraction(name, low_inclusive=False)
        self._fraction("alpha", low_inclusive=True)
        self._fraction("min_order_gain", low_inclusive=True)
        self._fraction("sigma", low_inclusive=False)
        if self._number("eps", float) is not None and not 0.0 < self.eps < 1.0:
            raise CalibrationOptionError(("eps",), f"{{eps}} must be in (0, 1), got {self.eps}")
        for name, least in (("step_buckets", 1), ("dense_steps", 0), ("block_size", 1), ("chunk_rows", 1),
                            ("max_chunk_elements", 1)):
            value = self._number(name, int)
            if value is not None and value < least:
                raise CalibrationOptionError((name,), f"{{{name}}} must be >= {least}, got {value}")
        if self._number("qk_outlier_error", float) is not None and not self.qk_outlier_error > 0:
            raise CalibrationOptionError(("qk_outlier_error",), f"{{qk_outlier_error}} must be > 0 (unset: not measured), "
                                                                f"got {self.qk_outlier_error}")
        if self._number("empty_head_tol", float) is not None and self.empty_head_tol < 0:
            raise CalibrationOptionError(("empty_head_tol",), f"{{empty_head_tol}} must be >= 0, got {self.empty_head_tol}")
        for name in ("allocation", "block_score", "sparsity_metric", "empty_heads", "stats_kernel"):
            choices = self._field(name).metadata["choices"]
            if getattr(self, name) not in choices:
                raise CalibrationOptionError((name,), f"{{{name}}} must be one of {choices}, got {getattr(self, name)!r}")
        if not isinstance(self.timestep_arg, str) or not self.timestep_arg:
            raise CalibrationOptionError(("timestep_arg",), f"{{timestep_arg}} must be an input name, got {self.timestep_arg!r}")
        self.sampling_timesteps = self._timesteps("sampling_timesteps")
        self.step_boundaries = self._timesteps("step_boundaries")
        if self.step_boundaries is not None:
            self.step_boundaries = sorted(self.step_boundaries, reverse=True)
        if self.orders is not None:
            orders = self.orders
            if not isinstance(orders, (list, tuple)) or not orders or not all(isinstance(o, str) and o for o in orders):
                raise CalibrationOptionError(("orders",), f"{{orders}} must be a list of orders such as ['FHW', 'HWF'], "
                                                          f"got {orders!r}")
            if len(set(orders)) != len(orders):
                raise CalibrationOptionError(("orders",), f"{{orders}} lists an order twice: {list(orders)}")
            self.orders = list(orders)
        if self.stats_device is not None:
            self.stats_device = str(self.stats_device)
            try:
                torch.device(self.stats_device)
            except RuntimeError:
                raise CalibrationOptionError(("stats_device",), f"{{stats_device}} must be a device such as 'cpu' or "
                                                                f"'cuda:0', got {self.stats_device!r}") from None
        self._check_combinations()

    def _check_combinations(self) -> None:
        if self.density is not None and self.average_density is not None:
            raise CalibrationOptionError(("density", "average_density"),
                                         "pass {density} (per sparse bucket) or {average_density} (over the sampling "
                                         "steps), not both")
        if self.average_density is not None and self.mass_threshold is not None:
            raise CalibrationOptionError(("average_density", "mass_threshold"),
                                         "{average_density} and {mass_threshold} both set the kept-block budget; pass one")
        if self.sampling_timesteps is not None and self.average_density is None:
            raise CalibrationOptionError(("sampling_timesteps", "average_density"),
                                         "{sampling_timesteps} only weights {average_density}; pass {average_density} too")
        if self.block_score != "mass" and self.allocation != "uniform":
            raise CalibrationOptionError(("block_score", "allocation"),
                                         "{block_score}='output' supports {allocation}='uniform' only")
        if self.step_boundaries is not None:
            if self.dense_steps and not self.step_boundaries:
                raise CalibrationOptionError(("dense_steps", "step_boundaries"),
                                             "{dense_steps} with explicit {step_boundaries} needs at least one boundary")
            sparse_buckets = len(self.step_boundaries) + 1 - (1 if self.dense_steps else 0)
            if self.step_buckets not in (1, sparse_buckets):
                raise CalibrationOptionError(("step_buckets", "step_boundaries"),
                                             f"{{step_buckets}}={self.step_buckets} disagrees with the {sparse_buckets} sparse "
                                             f"bucket(s) that {{step_boundaries}}={self.step_boundaries} make; leave "
                                             "{step_buckets} unset with explicit boundaries")

    # ---- validation helpers ---------------------------------------------------------------------------
    @classmethod
    def _field(cls, name: str) -> dataclasses.Field:
        return next(f for f in dataclasses.fields(cls) if f.name == name)

    def _number(self, name: str, kind: type) -> Optional[float]:
        """The option as ``kind`` (stored back), None if unset; anything that is not a number is an error."""
        value = getattr(self, name)
        if value is None:
            if not str(self._field(name).type).startswith("Optional["):
                raise CalibrationOptionError((name,), f"{{{name}}} cannot be None")
            return None
        what = "an integer" if kind is int else "a number"
        if isinstance(value, (bool, str)):
            raise CalibrationOptionError((name,), f"{{{name}}} must be {what}, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise CalibrationOptionError((name,), f"{{{name}}} must be {what}, got {value!r}") from None
        if kind is int and number != int(number):
            raise CalibrationOptionError((name,), f"{{{name}}} must be {what}, got {value!r}")
        setattr(self, name, kind(number))
        return getattr(self, name)

    def _fraction(self, name: str, *, low_inclusive: bool) -> None:
        value = self._number(name, float)
        if value is None:
            return
        if not (0.0 <= value <= 1.0 if low_inclusive else 0.0 < value <= 1.0):
            interval = "[0, 1]" if low_inclusive else "(0, 1]"
            raise CalibrationOptionError((name,), f"{{{name}}} must be in {interval}, got {value}")

    def _timesteps(self, name: str) -> Optional[list[float]]:
        """A list of floats from any iterable of numbers (a generator is read once, here)."""
        values = getattr(self, name)
        if values is None:
            return None
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
            raise CalibrationOptionError((name,), f"{{{name}}} must be a list of timesteps, got {values!r}")
        try:
            return [float(t) for t in values]
        except (TypeError, ValueError):
            raise CalibrationOptionError((name,), f"{{{name}}} must be a list of numbers, got {values!r}") from None

    # ---- derived values -------------------------------------------------------------------------------
    @property
    def mask_density(self) -> float:
        """The density the sparse buckets' masks are built at: ``density``, or 0.3 when no budget is given.

        ``average_density`` is a target over the sampling steps that `calibrate` solves into a ``density``; per-site
        statistics cannot do that, so they refuse options that carry only the target."""
        if self.density is not None:
            return self.density
        if self.average_density is not None:
            raise CalibrationOptionError(("average_density", "density"),
                                         "{average_density} is solved into a {density} over a whole calibration run "
                                         "(calibrate()); per-site statistics need density=...")
        return DEFAULT_DENSITY

    def step_options_set(self) -> list[str]:
        """The options of `STEP_OPTIONS` that differ from their defaults."""
        return [name for name in STEP_OPTIONS if getattr(self, name) != self._field(name).default]


def option_fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(CalibrationOptions)


def merge_options(options: Optional[CalibrationOptions], overrides: dict[str, Any], caller: str) -> CalibrationOptions:
    """``options`` (default: all defaults) with the keyword arguments ``overrides`` of ``caller`` applied, validated."""
    names = [option.name for option in option_fields()]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise TypeError(f"{caller}() got unknown option(s) {unknown}; the options are the CalibrationOptions fields: "
                        f"{', '.join(names)}")
    if options is None:
        return CalibrationOptions(**overrides)
    if not isinstance(options, CalibrationOptions):
        raise TypeError(f"{caller}(options=...) takes a CalibrationOptions, got {type(options).__name__}")
    return dataclasses.replace(options, **overrides) if overrides else options


def option_flag(name: str) -> str:
    """The ``paro calibrate`` flag of an option: ``step_buckets`` → ``--step-buckets``."""
    return "--" + name.replace("_", "-")


def option_value_type(option: dataclasses.Field) -> tuple[type, bool]:
    """(element type, is a list) of an option, from its annotation: ``Optional[list[float]]`` → (float, True)."""
    hint = typing.get_type_hints(CalibrationOptions)[option.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) is typing.Union else [hint]
    if len(args) == 1:
        inner = args[0]
        if typing.get_origin(inner) is list and typing.get_args(inner)[0] in (float, int, str):
            return typing.get_args(inner)[0], True
        if inner in (float, int, str):
            return inner, False
    raise TypeError(f"option {option.name}: no command line form for the type {hint}")


def shown_default(option: dataclasses.Field) -> str:
    """The default as the docs and the CLI help show it."""
    if option.metadata.get("shown_default"):
        return option.metadata["shown_default"]
    value = option.default
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, float):
        return format(value, "g")
    return str(value)


def flags_markdown_table() -> str:
    """The ``paro calibrate`` option table of docs/cli.md (flag, default, meaning), one row per option."""
    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for option in option_fields():
        kind, is_list = option_value_type(option)
        choices = option.metadata["choices"]
        value = ("{" + ",".join(choices) + "}") if choices else (f"{kind.__name__.upper()},..." if is_list else kind.__name__.upper())
        rows.append(f"| `{option_flag(option.name)} {value}` | {shown_default(option)} | {option.metadata['help']} |")
    return "\n".join(rows)
