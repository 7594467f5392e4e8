"""Every environment variable paro_compile reads, parsed and checked in one place.

Read a variable as an attribute (``envs.PARO_AUTOTUNE``): each access reads the environment anew, so tests and
A/B runs can change a variable between calls. A malformed value raises `EnvironmentVariableError` naming the
variable, what it holds and what it may hold. `ENVIRONMENT_VARIABLES` is the table the README documents.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class EnvironmentVariableError(ValueError):
    """An environment variable that paro_compile reads holds a value it cannot use."""


def _flag(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise EnvironmentVariableError(f"{name}={raw!r}: expected one of {_TRUE + _FALSE}")


def _exp2_mode(name: str, raw: str) -> int:
    modes = ("0", "1", "2", "3")
    if raw.strip() not in modes:
        raise EnvironmentVariableError(f"{name}={raw!r}: expected one of {', '.join(modes)} "
                                       "(0 MUFU ex2, 1 polynomial, 2 half polynomial, 3 inline ex2.approx.ftz)")
    return int(raw)


def _kernel_variant(name: str, raw: str) -> dict[str, bool]:
    switches: dict[str, bool] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        key, sep, value = item.partition("=")
        if not sep or value.strip() not in ("0", "1") or not key.strip():
            raise EnvironmentVariableError(f"{name}: entries must look like switch=0 or switch=1, got {item!r}")
        switches[key.strip()] = value.strip() == "1"
    return switches


def _path(name: str, raw: str) -> Path:
    return Path(raw).expanduser()


@dataclass(frozen=True)
class EnvironmentVariable:
    name: str
    default: Any
    parse: Callable[[str, str], Any]
    doc: str


ENVIRONMENT_VARIABLES: dict[str, EnvironmentVariable] = {var.name: var for var in (
    EnvironmentVariable("PARO_CACHE_DIR", Path("~/.cache/paro_compile").expanduser(), _path,
                        "plan and autotune cache when `options={'cache_dir': ...}` is not given"),
    EnvironmentVariable("PARO_AUTOTUNE", True, _flag,
                        "0: launch the attention kernel with a fixed config instead of autotuning"),
    EnvironmentVariable("PARO_FAST_LAUNCH", True, _flag,
                        "0: launch every Triton kernel through `kernel[grid](...)` instead of directly through the "
                        "compiled kernel kept from its first launch (`paro_compile.kernels.launch`)"),
    EnvironmentVariable("PARO_EXP2_MODE", None, _exp2_mode,
                        "exp2 of P in the kernel: 0 MUFU, 1/2 polynomial, 3 inline `ex2.approx.ftz` (A/B runs)"),
    EnvironmentVariable("PARO_KERNEL_VARIANT", {}, _kernel_variant,
                        "kernel code switches for A/B runs, e.g. `prefetch_qk=1,fused_softmax=0` "
                        "(`paro_compile.kernels.attention.KERNEL_VARIANT_DEFAULTS`)"),
    EnvironmentVariable("PARO_CLI_FORCE_NO_CUDA", False, _flag,
                        "1: the CLI behaves as on a machine without CUDA (tests of its GPU-only commands)"),
    EnvironmentVariable("TRITON_INTERPRET", False, _flag,
                        "Triton's own switch, read here too: 1 runs the Triton kernels on the CPU (tests); set it "
                        "before paro_compile's kernels are imported"),
)}


def raw_values(names: tuple[str, ...]) -> tuple:
    """The unparsed text of ``names`` (None where unset): a cache key that changes whenever one of them is changed,
    without parsing them on every call."""
    environ = os.environ
    return tuple(environ.get(name) for name in names)


def __getattr__(name: str) -> Any:
    var = ENVIRONMENT_VARIABLES.get(name)
    if var is None:
        raise AttributeError(f"module 'paro_compile.envs' has no attribute {name!r}")
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return var.default
    return var.parse(name, raw)


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(ENVIRONMENT_VARIABLES))


def environment_markdown() -> str:
    """README's table of environment variables, generated from `ENVIRONMENT_VARIABLES` (a test keeps it in step)."""
    rows = ["| variable | meaning |", "| --- | --- |"]
    rows += [f"| `{var.name}` | {var.doc} |" for var in ENVIRONMENT_VARIABLES.values()]
    return "\n".join(rows)
