"""What every `paro` subcommand shares: exit codes, `CliError`, loading the user's model and inputs factories
(``module:factory``, the current directory importable without shadowing installed packages), ``-o key=value``
options, and the one-message explanation of a failure (`failure_message`). `paro_compile.cli` re-exports every name.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Optional

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PLAN = 0, 1, 2, 3


class CliError(Exception):
    """A problem the user can act on: printed as ``paro <command>: error: <message>``, exit ``code``."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------------------
# Factories, inputs, options
# ------------------------------------------------------------------------------------------------------
def import_user_module(module_name: str) -> Any:
    """Import ``module_name``, finding it in the current directory too, without letting that directory shadow
    installed packages: the directory goes at the end of ``sys.path`` (the module's own imports of sibling files
    work), and only the named module's top-level package is taken from it first when it is there."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)
    top = module_name.split(".", 1)[0]
    if top not in sys.modules:
        spec = importlib.machinery.PathFinder.find_spec(top, [cwd])
        if spec is not None and spec.loader is not None:
            module = importlib.util.module_from_spec(spec)
            sys.modules[top] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(top, None)
                raise
    return importlib.import_module(module_name)


def load_object(spec: str, what: str) -> Any:
    """``"package.module:name"`` → the object (modules in the current directory are importable; `import_user_module`)."""
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise CliError(f"{what}: expected module:factory (e.g. paro_compile.toy:toy_model), got {spec!r}")
    module_name, attr = spec.split(":")
    try:
        module = import_user_module(module_name)
    except ModuleNotFoundError as error:
        raise CliError(f"{what}: cannot import module {module_name!r} ({error}); is it on PYTHONPATH?") from error
    except Exception as error:
        raise CliError(f"{what}: importing module {module_name!r} failed: {failure_message(error)}", EXIT_FAILED) from error
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CliError(f"{what}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def load_model(spec: str, dtype: Optional[str] = None):
    import torch

    obj = load_object(spec, "model")
    if not isinstance(obj, torch.nn.Module):
        if not callable(obj):
            raise CliError(f"model: {spec} is neither an nn.Module nor a callable returning one")
        try:
            obj = obj()
        except Exception as error:
            raise CliError(f"model: calling {spec}() failed: {failure_message(error)}", EXIT_FAILED) from error
    if not isinstance(obj, torch.nn.Module):
        raise CliError(f"model: {spec}() returned {type(obj).__name__}, expected a torch.nn.Module")
    obj = obj.eval()
    if dtype:
        obj = obj.to(getattr(torch, dtype))
    return obj


def normalize_item(item: Any, index: int) -> tuple[tuple, dict]:
    from collections.abc import Mapping

    if isinstance(item, Mapping):
        return (), dict(item)
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], (tuple, list)) and isinstance(item[1], Mapping):
        return tuple(item[0]), dict(item[1])
    raise CliError(f"inputs: item {index} is a {type(item).__name__}; each item must be an (args, kwargs) pair "
                   "or a dict of keyword arguments")


def cast_floats(value: Any, dtype: Optional[str]) -> Any:
    import torch

    if dtype is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(getattr(torch, dtype)) if value.is_floating_point() and value.dim() > 1 else value
    if isinstance(value, (list, tuple)):
        return type(value)(cast_floats(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: cast_floats(v, dtype) for k, v in value.items()}
    return value


def load_inputs(spec: str, dtype: Optional[str] = None) -> list[tuple[tuple, dict]]:
    """``module:factory`` returning an iterable of (args, kwargs) pairs or dicts (a single dict is one call).
    With ``dtype``, floating tensors of 2+ dims are cast (1-D ones, e.g. timesteps, are kept)."""
    from collections.abc import Mapping

    obj = load_object(spec, "inputs")
    if callable(obj) and not isinstance(obj, (list, tuple, Mapping)):
        try:
            obj = obj()
        except Exception as error:
            raise CliError(f"inputs: calling {spec}() failed: {failure_message(error)}", EXIT_FAILED) from error
    if isinstance(obj, Mapping):
        obj = [obj]
    if not isinstance(obj, Iterable):
        raise CliError(f"inputs: {spec} gave {type(obj).__name__}, expected an iterable of (args, kwargs) or dicts")
    items = [normalize_item(item, i) for i, item in enumerate(obj)]
    if not items:
        raise CliError(f"inputs: {spec} gave no inputs")
    return [(cast_floats(a, dtype), cast_floats(k, dtype)) for a, k in items]


def parse_option(text: str) -> tuple[str, Any]:
    """``key=value``; the value is parsed as JSON when it parses (1, 0.3, true, null, "x", [..]), else a string."""
    if "=" not in text or not text.split("=", 1)[0].strip():
        raise CliError(f"-o expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def parse_options(pairs: Optional[list[str]]) -> dict[str, Any]:
    options = dict(parse_option(p) for p in pairs or [])
    from paro_compile.config import ParoConfig

    try:
        ParoConfig.from_options(options)
    except (TypeError, ValueError) as error:
        raise CliError(f"bad -o option: {error}") from error
    plan = options.get("plan")
    if isinstance(plan, str) and not Path(plan).exists():
        raise CliError(f"plan file {plan!r} does not exist (build one with `paro calibrate ... --out {plan}`)")
    return options


def find_cause(error: BaseException, types: tuple) -> Optional[BaseException]:
    """The first exception of ``types`` in ``error``'s chain (Dynamo wraps backend errors)."""
    seen = set()
    stack = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, types):
            return e
        stack += [getattr(e, "inner_exception", None), e.__cause__, e.__context__]
    return None


DYNAMO_BOILERPLATE = ("\nfrom user code:", "\nSet TORCHDYNAMO_VERBOSE=1", "\n\nYou can suppress this exception",
                      "\n For more details about this graph break")


def user_frame(error: BaseException) -> Optional[str]:
    """``file:line in function`` of the model code Dynamo was tracing when ``error`` was raised, if it says."""
    from paro_compile.report import error_chain

    for each in error_chain(error):
        stack = getattr(each, "real_stack", None)
        if stack:
            torch_dir = str(Path(importlib.util.find_spec("torch").origin).parent)
            frame = ([f for f in stack if not str(f.filename).startswith(torch_dir)] or list(stack))[-1]
            return f"{frame.filename}:{frame.lineno} in {frame.name}"
    return None


def failure_message(error: BaseException) -> str:
    """What went wrong, without Dynamo's wrapping: the innermost error of the chain, ``<type>: <message>`` (paro's own
    errors, e.g. the list of unsupported sites, without the type), with the model line Dynamo was tracing. Dynamo's
    own error types keep their first line and explanation; Dynamo's hints, user stack and pointers are left out."""
    from paro_compile.report import error_chain

    cause = error_chain(error)[-1]
    text = str(cause).strip()
    for marker in DYNAMO_BOILERPLATE:
        text = text.split(marker, 1)[0].rstrip()
    if type(cause).__module__.startswith("paro_compile"):
        return text
    lines = [line.rstrip() for line in text.splitlines() if line.strip()] or [""]
    if type(cause).__module__.startswith("torch._dynamo"):
        explanation = next((line.strip() for line in lines[1:] if line.strip().startswith("Explanation:")), None)
        lines = [lines[0] + (f" ({explanation[len('Explanation:'):].strip()})" if explanation else "")]
    where = user_frame(error)
    lines[0] = f"{type(cause).__name__}: {lines[0]}" + (f" [at {where}]" if where else "")
    return "\n".join(lines)


@contextlib.contextmanager
def quiet_fake_tensor_errors():
    """Torch logs a traceback when a shape error surfaces while Dynamo traces the model; the CLI reports that error
    once, as `failure_message`, so those records are dropped while a command runs."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("failed while attempting to run meta")

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def plan_error_types() -> tuple:
    try:
        from paro_compile.plan import PlanError

        return (PlanError,)
    except Exception:  # pragma: no cover
        return ()
