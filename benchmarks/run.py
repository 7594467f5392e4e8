"""Run named benchmark specs (`benchmarks/specs.py`), each under its own timeout, into few files.

    python benchmarks/run.py --list
    python benchmarks/run.py attention e2e-flux --out $OUT [--commit SHA]

Set-up, once per call: wheels carried in ``.whl/`` whose distributions are not installed go into ``--site`` (pip
``--target``, offline), which goes on ``PYTHONPATH`` with the repository root and the folders its ``.pth`` files add
(pip ``--target`` does not run them; e.g. the CUDA DSL under FlashAttention-4 puts its packages on the path through
one); where no installed distribution declares the ``paro`` torch.compile backend, a metadata-only ``paro_compile``
distribution declaring it (from pyproject.toml) is written there too, so ``backend="paro"`` works without installing
the checkout; Python output is unbuffered.

Each spec writes into its own folder and its output (stdout and stderr) goes to ``<spec>.log`` there and to this
process's stdout. Afterwards the folder becomes ``OUT/<spec>.tar`` (plan files left out); ``OUT/run.json`` records the
stamp of the call and each spec's command, exit status, time and whether its budget ran out. So a call returns
(specs + 1) files, none deeper than ``OUT``. The device machine's copy of the tree has no ``.git``: pass the commit with
``--commit`` (the results' stamps take it from ``PARO_GIT_COMMIT``).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from specs import SPECS, Spec  # noqa: E402

REPO = harness.REPO
DEVICE_CALL_S = 600
LEFT_OUT_OF_ARCHIVES = ("*.safetensors",)
ARCHIVE_MARGIN_S = 20


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="*", help="spec names (see --list)")
    ap.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="result folder (default $OUT)")
    ap.add_argument("--list", action="store_true", help="print the specs and exit")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--commit", default=None, help="git commit to stamp the results with (where there is no .git)")
    ap.add_argument("--site", type=Path, default=Path(tempfile.gettempdir()) / "paro_site",
                    help="where carried wheels and the backend's entry point go")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "paro_bench",
                    help="scratch folder of the specs' outputs before they are archived")
    ap.add_argument("--folders", action="store_true", help="copy each spec's folder to OUT instead of a tar")
    ap.add_argument("--cpu", action="store_true", help="also run GPU specs where no CUDA device is visible")
    ap.add_argument("--call-s", type=float, default=None,
                    help="seconds this whole call may take (the device command's timeout): each spec's budget is cut "
                         f"to what is left of it, less {ARCHIVE_MARGIN_S} s to archive, so a spec cut short still "
                         "comes back archived")
    args = ap.parse_args(argv)
    unknown = [name for name in args.specs if name not in SPECS]
    if unknown:
        ap.error(f"unknown specs {unknown}; known: {', '.join(SPECS)}")
    if not args.list and not args.specs:
        ap.error("name at least one spec (or --list)")
    if not (args.list or args.dry_run) and args.out is None:
        ap.error("--out is required where $OUT is not set")
    return args


def command(spec: Spec, out: Path) -> list[str]:
    head = ["-m", "pytest"] if spec.script == "pytest" else [str(REPO / spec.script)]
    return [sys.executable, *head, *spec.argv(str(out))]


# ---------------------------------------------------------------------------------------------------------------------
# set-up
# ---------------------------------------------------------------------------------------------------------------------
def wheel_distribution(path: Path) -> str:
    """``diffusers-0.42.1-py3-none-any.whl`` → ``diffusers``."""
    return path.name.split("-", 1)[0]


def missing_wheels(wheel_dir: Path) -> list[Path]:
    wanted = []
    for wheel in sorted(wheel_dir.glob("*.whl")):
        try:
            importlib.metadata.version(wheel_distribution(wheel))
        except importlib.metadata.PackageNotFoundError:
            wanted.append(wheel)
    return wanted


def pth_paths(site: Path) -> list[str]:
    """The folders ``site``'s ``.pth`` files put on ``sys.path``, as Python's ``site.addsitedir`` runs them (with ``site``
    importable, as their ``import`` lines may need)."""
    if not any(site.glob("*.pth")):
        return []
    code = ("import json, site, sys; before = set(sys.path); site.addsitedir(sys.argv[1]); "
            "print(json.dumps([p for p in sys.path if p not in before and p != sys.argv[1]]))")
    run = subprocess.run([sys.executable, "-c", code, str(site)], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(site)))
    if run.returncode != 0:
        print(f"[run] the .pth files of {site} failed: {run.stderr.strip()[-300:]}", flush=True)
        return []
    return json.loads(run.stdout.strip().splitlines()[-1])


def backend_declared() -> bool:
    return any(ep.name == "paro" for ep in importlib.metadata.entry_points(group="torch_dynamo_backends"))


def write_backend_entry_point(site: Path) -> Path:
    """A metadata-only distribution with pyproject.toml's entry points: torch.compile finds ``backend="paro"`` through
    ``importlib.metadata`` when ``site`` is on ``sys.path``; the code itself comes from the repository root."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    name = project["name"].replace("-", "_")
    dist = site / f"{name}-{project['version']}.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    groups = dict(project.get("entry-points", {}))
    if project.get("scripts"):
        groups["console_scripts"] = project["scripts"]
    (dist / "entry_points.txt").write_text(
        "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n" for group, eps in groups.items()))
    return dist


def set_up(site: Path, commit: str | None) -> dict:
    """The environment every spec runs in (see the module docstring). Prints what it did."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    site.mkdir(parents=True, exist_ok=True)
    wheels = missing_wheels(REPO / ".whl")
    if wheels:
        run = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                              "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)],
                             capture_output=True, text=True)
        status = "installed" if run.returncode == 0 else f"FAILED ({run.stderr.strip()[-500:]})"
        print(f"[run] wheels {', '.join(w.name for w in wheels)}: {status}", flush=True)
    if not backend_declared():
        print(f"[run] backend entry point: {write_backend_entry_point(site)}", flush=True)
    env["PYTHONPATH"] = os.pathsep.join([str(site), *pth_paths(site), str(REPO),
                                         *filter(None, [os.environ.get("PYTHONPATH")])])
    if commit:
        env["PARO_GIT_COMMIT"] = commit
    return env


# ---------------------------------------------------------------------------------------------------------------------
# one spec
# ---------------------------------------------------------------------------------------------------------------------
def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_spec(spec: Spec, folder: Path, env: dict, budget_s: Optional[float] = None) -> dict:
    """Run ``spec`` into ``folder`` under its budget (or ``budget_s`` where given); its output goes to
    ``folder/<name>.log`` and to stdout."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    argv = command(spec, folder)
    budget_s = spec.budget_s if budget_s is None else budget_s
    record = {"spec": spec.name, "command": shlex.join(argv[1:]), "budget_s": round(budget_s, 1)}
    print(f"[run] {spec.name} (budget {budget_s:.0f} s): {record['command']}", flush=True)
    start = time.perf_counter()
    with open(folder / f"{spec.name}.log", "w") as log:
        spec_env = {k: v for k, v in {**env, **spec.env}.items() if v is not None}
        proc = subprocess.Popen(argv, cwd=REPO, env=spec_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)

        def copy_output() -> None:
            for line in proc.stdout:
                log.write(line)
                sys.stdout.write(line)
            sys.stdout.flush()

        reader = threading.Thread(target=copy_output, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=budget_s)
            record["timed_out"] = False
        except subprocess.TimeoutExpired:
            record["timed_out"] = True
            signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        signal_group(proc.pid, signal.SIGKILL)  # whatever the spec left running in its process group
        proc.wait()
        reader.join(timeout=10)
    record["rc"] = proc.returncode
    record["seconds"] = round(time.perf_counter() - start, 1)
    verdict = "budget ran out" if record["timed_out"] else f"exit {proc.returncode}"
    print(f"[run] {spec.name}: {verdict} after {record['seconds']} s", flush=True)
    return record


def archive(folder: Path, out: Path, name: str, as_folder: bool) -> str:
    """``folder`` → ``out/<name>.tar`` (or a copy ``out/<name>/``) without plan files."""
    if as_folder:
        target = out / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(folder, target, ignore=shutil.ignore_patterns(*LEFT_OUT_OF_ARCHIVES))
        return target.name
    target = out / f"{name}.tar"

    def keep(info: tarfile.TarInfo):
        return None if any(Path(info.name).match(p) for p in LEFT_OUT_OF_ARCHIVES) else info

    with tarfile.open(target, "w") as tar:
        tar.add(folder, arcname=name, filter=keep)
    return target.name


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        width = max(map(len, SPECS))
        for spec in SPECS.values():
            print(f"{spec.name:{width}s} {spec.budget_s:4d} s {'GPU' if spec.gpu else 'any'}  {spec.about}")
        return 0
    specs = [SPECS[name] for name in dict.fromkeys(args.specs)]
    total = sum(s.budget_s for s in specs)
    if total > DEVICE_CALL_S:
        print(f"[run] note: the budgets add up to {total} s, more than one {DEVICE_CALL_S} s device call", flush=True)
    if args.dry_run:
        for spec in specs:
            print(shlex.join(command(spec, args.work / spec.name)))
        return 0
    import torch

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    env = set_up(args.site, args.commit)
    summary = {"specs": []}
    run_stamp = harness.stamp(__file__, argv)
    if args.commit:
        run_stamp["git_commit"] = args.commit
    deadline = None if args.call_s is None else time.monotonic() + args.call_s - ARCHIVE_MARGIN_S
    for spec in specs:
        if spec.gpu and not torch.cuda.is_available() and not args.cpu:
            summary["specs"].append({"spec": spec.name, "skipped": "needs a CUDA GPU (--cpu runs it anyway)"})
            print(f"[run] {spec.name}: skipped, no CUDA device", flush=True)
            (out / "run.json").write_text(harness.compact_json({"stamp": run_stamp, **summary}))
            continue
        budget_s = None if deadline is None else min(spec.budget_s, deadline - time.monotonic())
        if budget_s is not None and budget_s < 1:
            summary["specs"].append({"spec": spec.name, "skipped": f"no time left of the {args.call_s:.0f} s call"})
            print(f"[run] {spec.name}: skipped, no time left of the call", flush=True)
            (out / "run.json").write_text(harness.compact_json({"stamp": run_stamp, **summary}))
            continue
        folder = args.work / spec.name
        record = run_spec(spec, folder, env, budget_s)
        record["archive"] = archive(folder, out, spec.name, args.folders)
        summary["specs"].append(record)
        (out / "run.json").write_text(harness.compact_json({"stamp": run_stamp, **summary}))
    failed = [r for r in summary["specs"] if r.get("rc") not in (0, None) or r.get("timed_out")]
    print(harness.markdown_table(summary["specs"], ["spec", "rc", "timed_out", "seconds", "budget_s", "archive", "skipped"]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
