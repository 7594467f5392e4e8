"""`paro` console script: calibrate, diff, tune, bench, demo.

Exit codes (docs/cli.md):
  0  success
  1  the command ran and failed (calibration error, model raised, benchmark failed)
  2  bad usage: bad argument, unimportable factory, missing file, no GPU for a GPU-only command
  3  the plan file is invalid or does not match the model
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from paro_compile.cli_common import (  # noqa: F401 - re-exported: `paro_compile.cli.<name>` keeps working
    DYNAMO_BOILERPLATE,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PLAN,
    EXIT_USAGE,
    CliError,
    cast_floats,
    failure_message,
    find_cause,
    import_user_module,
    load_inputs,
    load_model,
    load_object,
    normalize_item,
    parse_option,
    parse_options,
    plan_error_types,
    quiet_fake_tensor_errors,
    user_frame,
)

DEFAULT_PLAN_PATH = "plan.paro.safetensors"

DTYPES = ("float32", "float16", "bfloat16")


# ------------------------------------------------------------------------------------------------------
# Tune and bench: arguments and the GPU check
# ------------------------------------------------------------------------------------------------------
def parse_float_list(text: str, what: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CliError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise CliError(f"{what}: empty list")
    return values


def parse_shape(text: str) -> list[int]:
    parts = text.replace("x", ",").split(",")
    try:
        shape = [int(p) for p in parts]
    except ValueError:
        shape = []
    if len(shape) != 4 or any(s <= 0 for s in shape):
        raise CliError(f"--shapes: expected B,H,N,D (four positive integers, e.g. 1,24,17776,64), got {text!r}")
    return shape


def cuda_available() -> bool:
    from paro_compile import envs

    if envs.PARO_CLI_FORCE_NO_CUDA:  # for tests on GPU machines
        return False
    import torch

    return torch.cuda.is_available()


# ------------------------------------------------------------------------------------------------------
# Subcommands
# ------------------------------------------------------------------------------------------------------
def option_value_parser(kind: type, is_list: bool) -> Callable[[str], Any]:
    """argparse ``type=`` of a calibration option: a number/string, or a comma-separated list of them."""

    def parse_one(text: str) -> Any:
        try:
            return kind(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a number' if kind is float else 'an integer'}, got {text!r}") from None

    def parse_list(text: str) -> list:
        values = [parse_one(part) for part in text.split(",") if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return values

    if is_list:
        parse_list.__name__ = f"{kind.__name__} list"
        return parse_list
    if kind is str:
        return str
    parse_one.__name__ = kind.__name__
    return parse_one


class StoreCalibrationOption(argparse.Action):
    """Stores the flag's value and notes its option in ``namespace.explicit_options``: with ``--add-to``, options left
    unset take the existing plan's values, options given are kept (and must agree with the plan)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        setattr(namespace, self.dest, values)
        explicit = set(getattr(namespace, "explicit_options", None) or ())
        namespace.explicit_options = explicit | {self.dest}


def add_calibration_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per `CalibrationOptions` field; its name, type, default, choices and help come from the dataclass."""
    from paro_compile.calibration.options import option_fields, option_flag, option_value_type, shown_default

    group = parser.add_argument_group("calibration options (CalibrationOptions fields; docs/calibration.md)")
    for option in option_fields():
        kind, is_list = option_value_type(option)
        metavar = None if option.metadata["choices"] else (f"{kind.__name__.upper()},..." if is_list else kind.__name__.upper())
        default = "" if option.default is None else " (default " + shown_default(option).strip('"') + ")"
        help_text = (option.metadata["help"] + default).replace("%", "%%")
        group.add_argument(option_flag(option.name), dest=option.name, type=option_value_parser(kind, is_list),
                           action=StoreCalibrationOption, default=option.default, choices=option.metadata["choices"], metavar=metavar, help=help_text)


def calibration_options_from_args(args: argparse.Namespace):
    """The `CalibrationOptions` the flags give; an invalid value is a usage error that names its flag."""
    from paro_compile.calibration.options import CalibrationOptionError, CalibrationOptions, option_fields, option_flag

    try:
        return CalibrationOptions(**{option.name: getattr(args, option.name) for option in option_fields()})
    except CalibrationOptionError as error:
        raise CliError(error.render(option_flag)) from error


def check_plan_destination(out: Path, force: bool) -> None:
    """Refuse, before anything runs, a plan path that is a directory, sits in a missing directory, or exists
    without ``--force``."""
    if out.is_dir():
        raise CliError(f"--out {str(out)!r} is a directory; give the plan file's path, e.g. --out {str(out / 'plan.paro.safetensors')!r}")
    if not out.parent.is_dir():
        raise CliError(f"--out: directory {str(out.parent)!r} does not exist")
    if out.exists() and not force:
        raise CliError(f"--out {str(out)!r} already exists; pass --force to overwrite it, or choose another path")


def load_plan_to_extend(path_text: str):
    """The plan ``--add-to`` names; a missing file is a usage error, an invalid one a plan error."""
    from paro_compile.plan import Plan, PlanError

    path = Path(path_text)
    if not path.is_file():
        raise CliError(f"--add-to {path_text!r}: no such plan file (write the first token grid with --out {path_text})")
    try:
        return Plan.load(path)
    except PlanError as error:
        raise CliError(str(error), EXIT_PLAN) from error


def options_for_added_shape(options: Any, plan: Any, explicit: set[str]) -> tuple[Any, list[str]]:
    """``options`` with what ``--add-to``'s plan fixes for every token grid taken from the plan where the flags leave
    it unset: the step boundaries (and a dense first bucket), the mask density, alpha, the block size and the timestep
    argument. Returns the options and what was taken, for the log line."""
    import dataclasses

    changes: dict[str, Any] = {}
    if not explicit & {"step_boundaries", "step_buckets", "dense_steps"} and plan.step_boundaries:
        changes["step_boundaries"] = list(plan.step_boundaries)
        changes["dense_steps"] = 1 if 0 in plan.common_dense_buckets() else 0
    if not explicit & {"density", "average_density", "mass_threshold"} and plan.density is not None:
        changes["density"] = plan.density
    if "alpha" not in explicit and plan.alpha is not None:
        changes["alpha"] = plan.alpha
    block = plan.block_size_of(plan.sites)
    if "block_size" not in explicit and block is not None:
        changes["block_size"] = block
    if "timestep_arg" not in explicit:
        changes["timestep_arg"] = plan.timestep_arg
    taken = [f"{name} {value}" for name, value in changes.items() if getattr(options, name) != value]
    return dataclasses.replace(options, **changes), taken


def cmd_calibrate(args: argparse.Namespace) -> int:
    try:
        from paro_compile.calibration import calibrate
    except ImportError as error:
        raise CliError(f"calibration is not available in this install: {error}", EXIT_FAILED) from error
    options = calibration_options_from_args(args)
    existing = load_plan_to_extend(args.add_to) if args.add_to else None
    if args.replace and existing is None:
        raise CliError("--replace only applies with --add-to PLAN")
    out = Path(args.out or args.add_to or DEFAULT_PLAN_PATH)
    if existing is None or out.resolve() != Path(args.add_to).resolve():
        check_plan_destination(out, args.force)
    if existing is not None:
        from paro_compile.calibration.options import CalibrationOptionError, option_flag

        try:
            options, taken = options_for_added_shape(options, existing, getattr(args, "explicit_options", set()))
        except CalibrationOptionError as error:
            raise CliError(error.render(option_flag)) from error
        print(f"paro calibrate: adding a token grid to {args.add_to} (it covers {existing.describe_shapes()})"
              + (f"; from the plan: {', '.join(taken)}" if taken else ""), file=sys.stderr)
    model = load_model(args.model, args.dtype)
    inputs = load_inputs(args.inputs, args.dtype)
    budget = (f"average density {options.average_density}" if options.average_density is not None
              else f"mass threshold {options.mass_threshold}" if options.mass_threshold is not None
              else f"density {options.mask_density}")
    print(f"paro calibrate: {type(model).__name__} on {len(inputs)} input(s), {budget}, alpha {options.alpha}, "
          f"{options.step_buckets} step bucket(s), {options.dense_steps} dense step(s), allocation {options.allocation}",
          file=sys.stderr)
    try:
        plan = calibrate(model, inputs, options=options, progress=not args.quiet)
    except Exception as error:
        cause = find_cause(error, plan_error_types())
        if cause is not None:
            raise CliError(str(cause), EXIT_PLAN) from error
        from paro_compile.calibration import CalibrationError

        cause = find_cause(error, (CalibrationError, ValueError))
        raise CliError(f"calibration failed: {failure_message(cause or error)}", EXIT_FAILED) from error
    if existing is not None:
        from paro_compile.plan import PlanError

        try:
            plan = existing.merge(plan, replace=args.replace)
        except PlanError as error:
            hint = "" if args.replace else " (--replace replaces the plan's entries for this token grid)"
            raise CliError(f"cannot add the calibrated token grid to {args.add_to}: {error}{hint}", EXIT_PLAN) from error
    plan.save(out)
    if args.quiet or existing is not None:  # with progress, calibrate() printed the new grid's summary only
        from paro_compile.calibration.summary import calibration_summary

        print(calibration_summary(plan))
    print(f"wrote plan {out} (use: torch.compile(model, backend='paro', options={{'plan': '{out}'}}) "
          f"or `paro diff ... -o plan={out}`)")
    return EXIT_OK


def cmd_diff(args: argparse.Namespace) -> int:
    options = parse_options(args.option)
    for path in (args.html, args.json):
        if path and not Path(path).resolve().parent.exists():
            raise CliError(f"output directory {str(Path(path).parent)!r} does not exist")
    model = load_model(args.model, args.dtype)
    inputs = load_inputs(args.inputs, args.dtype)
    if not 0 <= args.call < len(inputs):
        raise CliError(f"--call {args.call}: the inputs factory gave {len(inputs)} input(s)")
    call_args, call_kwargs = inputs[args.call]
    from paro_compile.inspection import inspect

    try:
        report = inspect(model, *call_args, example_kwargs=call_kwargs, **options)
    except Exception as error:
        cause = find_cause(error, plan_error_types())
        if cause is not None:
            raise CliError(f"the plan does not match this model/inputs:\n{cause}", EXIT_PLAN) from error
        from paro_compile.backend import UnsupportedAttentionError

        cause = find_cause(error, (UnsupportedAttentionError,))
        raise CliError(f"compiling/running the model failed: {failure_message(cause or error)}", EXIT_FAILED) from error
    report.model_name = args.model
    if not args.quiet:
        from rich.console import Console

        report.render(Console() if sys.stdout.isatty() else Console(width=160), code=args.code)
    if args.html:
        report.to_html(args.html)
        print(f"wrote {args.html}", file=sys.stderr)
    if args.json:
        report.to_json(args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    return EXIT_OK


def cmd_tune(args: argparse.Namespace) -> int:
    shapes = [parse_shape(s) for s in args.shapes]
    densities = parse_float_list(args.densities, "--densities")
    if any(not 0.0 < d <= 1.0 for d in densities):
        raise CliError(f"--densities must lie in (0, 1], got {densities}")
    dtype_names = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [d for d in dtype_names if d not in ("float16", "bfloat16")]
    if bad or not dtype_names:
        raise CliError(f"--dtypes: the kernels take float16/bfloat16, got {args.dtypes!r}")
    if not cuda_available():
        raise CliError("tuning needs a CUDA GPU: no CUDA device is visible here. Run `paro tune` on the GPU machine "
                       "that will run the model; the winners are cached under <cache_dir>/autotune (PARO_CACHE_DIR).")
    import torch

    from paro_compile.kernels.attention import tune
    from paro_compile.kernels.tuning import cache_dir

    try:
        winners = tune(shapes, densities, [getattr(torch, d) for d in dtype_names], qk_bits=args.qk_bits,
                       pv_dtype=args.pv_dtype, perm=args.perm, force=args.force)
    except RuntimeError as error:
        raise CliError(f"tuning failed: {failure_message(error)}", EXIT_FAILED) from error
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"paro attention kernel: tuned configs (cache {cache_dir()})"))
    for column in ("shape", "density", "dtype", "config", "warps", "stages", "tuned now"):
        table.add_column(column)
    for w in winners:
        table.add_row(*(escape(cell) for cell in (
            "×".join(str(x) for x in w.get("shape", [])), f"{w.get('density', '')}", str(w.get("dtype", "")),
            json.dumps(w.get("kwargs", {})), str(w.get("num_warps", "")), str(w.get("num_stages", "")),
            "yes" if w.get("tuned_now") else "cached")))
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(winners, indent=2, default=str) + "\n")
    return EXIT_OK


def find_bench_script() -> Optional[Path]:
    candidates = [Path.cwd() / "benchmarks" / "bench_attention.py",
                  Path(__file__).resolve().parent.parent / "benchmarks" / "bench_attention.py"]
    return next((p for p in candidates if p.is_file()), None)


def cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    if not cuda_available():
        raise CliError("the attention benchmark needs a CUDA GPU: no CUDA device is visible here "
                       "(on a CPU paro runs its PyTorch reference numerics; speed is a GPU matter). "
                       "Run `paro bench` on the GPU machine.")
    script = find_bench_script()
    if script is None:
        raise CliError("benchmarks/bench_attention.py not found (run `paro bench` from a source checkout of paro_compile)")
    spec = importlib.util.spec_from_file_location("paro_bench_attention", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "main"):
        raise CliError(f"{script} has no main(argv) function", EXIT_FAILED)
    argv = (["--quick"] if args.quick else []) + (["--out", args.out] if args.out else []) + rest
    try:
        result = int(module.main(argv) or 0)
    except Exception as error:
        raise CliError(f"the benchmark failed: {failure_message(error)}", EXIT_FAILED) from error
    if result == 0:
        out = Path(args.out) if args.out else script.parent / "results"
        written = [str(out / name) for name in ("attention.json", "attention.md", "attention.png") if (out / name).exists()]
        if written:
            print("wrote " + ", ".join(written))
    return result


# ------------------------------------------------------------------------------------------------------
# Parser
# ------------------------------------------------------------------------------------------------------
EPILOG = """exit codes: 0 ok, 1 the run failed, 2 bad usage / missing file / no GPU, 3 plan invalid or mismatched.
examples:
  paro calibrate paro_compile.toy:toy_model --inputs paro_compile.toy:toy_calibration_inputs --density 0.3 --out toy.paro.safetensors
  paro calibrate paro_compile.toy:toy_model --inputs my_inputs:at_another_resolution --add-to toy.paro.safetensors
  paro diff paro_compile.toy:toy_model --inputs paro_compile.toy:toy_calibration_inputs -o allow_fp32=true -o plan=toy.paro.safetensors --html diff.html --json diff.json
  paro tune --shapes 1,48,17776,64 --densities 1.0,0.5,0.3 --dtypes bfloat16
  paro bench --quick --out bench_results
  paro demo --frames 2
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paro", description="paro_compile command line (PAROAttention for torch.compile)",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{calibrate,diff,tune,bench,demo}")

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", help="module:factory returning an nn.Module (e.g. paro_compile.toy:toy_model)")
        p.add_argument("--inputs", required=True, metavar="MODULE:FACTORY",
                       help="module:factory returning an iterable of (args, kwargs) pairs or dicts of keyword arguments")
        p.add_argument("--dtype", choices=DTYPES, help="cast the model and the floating inputs (2+ dims) to this dtype")

    p = sub.add_parser("calibrate", help="calibrate a model on inputs and write a plan file")
    model_args(p)
    p.add_argument("--out", default=None, help=f"plan file to write (default {DEFAULT_PLAN_PATH}; with --add-to: the "
                                               "plan added to)")
    p.add_argument("--force", action="store_true", help="overwrite the --out file if it exists")
    p.add_argument("--add-to", metavar="PLAN", help="add the token grid of these inputs to an existing plan file (one "
                   "plan, several resolutions / frame counts / text lengths): step boundaries, density, alpha and block "
                   "size default to the plan's; writes the merged plan over PLAN, or to --out")
    p.add_argument("--replace", action="store_true", help="with --add-to: replace the plan's entries for the token "
                   "grid calibrated (else covering it already is an error)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_calibration_option_flags(p)

    p = sub.add_parser("diff", help="compile with backend='paro' and show what each pass did")
    model_args(p)
    p.add_argument("-o", "--option", action="append", metavar="KEY=VALUE",
                   help="paro/Inductor option (repeatable); values are JSON when they parse: -o qk_bits=4 -o plan=p.safetensors")
    p.add_argument("--call", type=int, default=0, help="which item of the inputs to run (default 0)")
    p.add_argument("--html", metavar="PATH", help="also write a self-contained HTML report")
    p.add_argument("--json", metavar="PATH", help="also write the JSON report (docs/report_schema.md)")
    p.add_argument("--code", action="store_true", help="also print the full graph code after each pass")
    p.add_argument("-q", "--quiet", action="store_true", help="no terminal report")

    p = sub.add_parser("tune", help="pre-tune the attention kernel for shapes/densities (CUDA only)")
    p.add_argument("--shapes", action="append", required=True, metavar="B,H,N,D", help="attention shape (repeatable)")
    p.add_argument("--densities", default="1.0,0.5,0.3,0.2", help="comma-separated block densities")
    p.add_argument("--dtypes", default="bfloat16", help="comma-separated: bfloat16,float16")
    p.add_argument("--qk-bits", type=int, default=8, choices=(4, 8))
    p.add_argument("--pv-dtype", default="fp8", choices=("fp8", "int8", "fp16"))
    p.add_argument("--perm", action="store_true", help="tune the variant with a per-head token permutation in the kernel")
    p.add_argument("--force", action="store_true", help="re-benchmark configs that are already cached")
    p.add_argument("--json", metavar="PATH", help="also write the winners as JSON")

    p = sub.add_parser("bench", help="run benchmarks/bench_attention.py (CUDA only); extra arguments are passed on "
                       "(--shapes, --densities, --modes, --no-flex, --rep)")
    p.add_argument("--quick", action="store_true", help="CogVideoX shape only, densities 1.0 and 0.2")
    p.add_argument("--out", metavar="DIR", help="where attention.json / .md / .png go (default benchmarks/results)")

    sub.add_parser("demo", help="run the built-in demo (python -m paro_compile.demo; its options pass through)",
                   add_help=False)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "demo":
        from paro_compile.demo import main as demo_main

        return demo_main(argv[1:])
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    handlers: dict[str, Callable[[], int]] = {
        "calibrate": lambda: cmd_calibrate(args),
        "diff": lambda: cmd_diff(args),
        "tune": lambda: cmd_tune(args),
        "bench": lambda: cmd_bench(args, rest),
    }
    try:
        with quiet_fake_tensor_errors():
            return handlers[args.command]()
    except CliError as error:
        print(f"paro {args.command}: error: {error}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        print(f"paro {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
