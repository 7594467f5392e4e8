"""What every benchmark script shares: one timer, one stamp and one result writer.

- `time_ms` / `time_calls`: the median time of a call. On CUDA `triton.testing.do_bench` (CUDA events, the L2 cache
  flushed before every timed call); on the CPU `torch.utils.benchmark.Timer.blocked_autorange` (with the process's
  thread count, not the Timer's default of one thread).
- `stamp`: where a result comes from: git commit, date, GPU, torch / triton / diffusers versions, the PARO_* switches
  and the command line. The device machine gets a copy of the working tree without ``.git``; there the commit comes from
  ``PARO_GIT_COMMIT`` (``benchmarks/run.py --commit``).
- `write_results`: one JSON per run (the stamp first; lists of rows one row per line) and a markdown table beside it.

The scripts import this file as ``harness`` (they put ``benchmarks/`` on ``sys.path``).
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
STAMP_KEYS = ("git_commit", "git_dirty", "date", "gpu", "cuda", "torch", "triton", "diffusers", "python", "paro_env",
              "command")


# ---------------------------------------------------------------------------------------------------------------------
# timer
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: the median and the samples it is the median of (CPU: one sample per timed block, each
    the mean of the block's calls)."""

    median_ms: float
    samples_ms: tuple[float, ...]
    timer: str

    def as_dict(self, samples: bool = True) -> dict:
        out = {"median_ms": self.median_ms, "timer": self.timer}
        if samples:
            out["samples_ms"] = [round(x, 4) for x in self.samples_ms]
        return out


def resolve_device(device=None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def synchronize(device=None) -> None:
    if resolve_device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], Any], device=None, *, warmup_ms: float = 25.0, rep_ms: float = 100.0) -> Timing:
    """Median milliseconds of ``fn()`` over about ``rep_ms`` of timed calls, after about ``warmup_ms`` of untimed ones
    (both at least one call)."""
    if resolve_device(device).type == "cuda":
        import triton

        samples = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
        samples = [float(x) for x in (samples if isinstance(samples, (list, tuple)) else [samples])]
        return Timing(statistics.median(samples), tuple(samples), "triton.testing.do_bench")
    from torch.utils.benchmark import Timer

    deadline = time.perf_counter() + warmup_ms / 1e3
    while time.perf_counter() < deadline:
        fn()
    measurement = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=rep_ms / 1e3)
    samples = [t * 1e3 for t in measurement.times]
    return Timing(measurement.median * 1e3, tuple(samples), "torch.utils.benchmark.Timer")


# Calls `time_calls` makes besides the timed and warm-up ones, at most: its sizing call, and do_bench's first call and
# five estimate calls (on the CPU: the Timer's block-size estimate).
UNTIMED_CALLS = 7


def time_calls(fn: Callable[[], Any], device=None, *, calls: int = 5, warmup_calls: int = 1) -> Timing:
    """`time_ms` sized in calls rather than milliseconds, for calls that take a long and unknown time (whole models): one
    call is timed first to convert ``calls`` / ``warmup_calls`` into the timer's time budgets."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    one_call_ms = max((time.perf_counter() - start) * 1e3, 1e-3)
    return time_ms(fn, device, warmup_ms=warmup_calls * one_call_ms, rep_ms=(calls + 0.5) * one_call_ms)


# ---------------------------------------------------------------------------------------------------------------------
# stamp
# ---------------------------------------------------------------------------------------------------------------------
def _git(*args: str) -> Optional[str]:
    try:
        run = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return run.stdout.strip() if run.returncode == 0 else None


def git_commit() -> Optional[str]:
    return os.environ.get("PARO_GIT_COMMIT") or _git("rev-parse", "HEAD")


def git_dirty() -> Optional[bool]:
    """Whether tracked files differ from the commit (None where there is no git checkout)."""
    if os.environ.get("PARO_GIT_COMMIT"):
        flag = os.environ.get("PARO_GIT_DIRTY")
        return None if flag is None else flag.lower() in ("1", "true", "yes")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def command_line(script: str | Path, argv: Optional[Sequence[str]] = None) -> str:
    """The command that reproduces this run: ``python benchmarks/<script> <argv>`` (``sys.argv[1:]`` by default)."""
    path = Path(script).resolve()
    try:
        shown = str(path.relative_to(REPO))
    except ValueError:
        shown = str(path)
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", shown, *map(str, args)])


def stamp(script: str | Path, argv: Optional[Sequence[str]] = None) -> dict:
    """Provenance of a run (`STAMP_KEYS`)."""
    return {
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": package_version("triton"),
        "diffusers": package_version("diffusers"),
        "python": platform.python_version(),
        "paro_env": {k: v for k, v in sorted(os.environ.items())
                     if k.startswith("PARO_") and k not in ("PARO_GIT_COMMIT", "PARO_GIT_DIRTY")},
        "command": command_line(script, argv),
    }


# ---------------------------------------------------------------------------------------------------------------------
# writer
# ---------------------------------------------------------------------------------------------------------------------
def _dump(value: Any) -> str:
    return json.dumps(value, default=str, ensure_ascii=False)


def compact_json(results: dict) -> str:
    """A JSON object with one top-level key per line and, where a value is a list of objects, one object per line:
    small, and a diff shows which rows changed."""
    lines = []
    for key, value in results.items():
        if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            rows = ",\n".join(f"  {_dump(item)}" for item in value)
            lines.append(f" {_dump(key)}: [\n{rows}\n ]")
        else:
            lines.append(f" {_dump(key)}: {_dump(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def format_cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4g}" if abs(value) < 10 else f"{value:.2f}"
    if isinstance(value, (list, tuple, dict)):
        value = _dump(value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Iterable[dict], columns: Optional[Sequence[str]] = None) -> str:
    """A markdown table of ``rows`` (``columns``: which keys, in order; default every key in order of appearance)."""
    rows = list(rows)
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(path: str | Path, results: dict, run_stamp: dict, *, title: str,
                  table: Optional[Iterable[dict]] = None, columns: Optional[Sequence[str]] = None,
                  notes: Sequence[str] = ()) -> Path:
    """Write ``path`` (JSON: ``{"stamp": run_stamp, **results}``) and the same name with ``.md``: the title, the stamp, the
    notes and a table of ``table`` (default ``results["rows"]``). Returns the JSON path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(compact_json({"stamp": run_stamp, **results}))
    rows = list(results.get("rows", []) if table is None else table)
    commit = run_stamp.get("git_commit") or "unknown commit"
    if run_stamp.get("git_dirty"):
        commit += " (with uncommitted changes)"
    md = [f"# {title}", "",
          f"{run_stamp.get('gpu') or 'CPU'}, torch {run_stamp.get('torch')}, triton {run_stamp.get('triton')}, "
          f"diffusers {run_stamp.get('diffusers')}; {commit}; {run_stamp.get('date')}", "",
          f"`{run_stamp.get('command')}`", ""]
    md += [*notes, ""] if notes else []
    md += [markdown_table(rows, columns) if rows else "(no rows)", ""]
    path.with_suffix(".md").write_text("\n".join(md))
    return path
