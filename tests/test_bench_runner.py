"""benchmarks/harness.py (timer, stamp, writer), benchmarks/specs.py (named runs) and benchmarks/run.py (their runner),
on the CPU: the stamp carries the right provenance, every spec names a script that accepts its arguments, and the
runner archives a spec's outputs, records its exit and stops it at its budget."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import re
import subprocess
import tarfile
import time
import tomllib
from pathlib import Path

import pytest
import torch

from bench_helpers import BENCHMARKS, load_benchmark

REPO = BENCHMARKS.parent


@pytest.fixture(scope="module")
def harness():
    return load_benchmark("harness")


@pytest.fixture(scope="module")
def specs():
    return load_benchmark("specs")


def git_head() -> str | None:
    try:
        run = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=20)
    except OSError:
        return None
    return run.stdout.strip() if run.returncode == 0 else None


def test_stamp_names_commit_date_gpu_versions_and_command(harness, monkeypatch):
    monkeypatch.delenv("PARO_GIT_COMMIT", raising=False)
    monkeypatch.setenv("PARO_AUTOTUNE", "0")
    stamp = harness.stamp(BENCHMARKS / "quality.py", ["--out", "a b", "--tiny"])
    assert tuple(stamp) == harness.STAMP_KEYS
    assert stamp["git_commit"] == git_head()
    assert stamp["torch"] == torch.__version__
    assert stamp["triton"] == importlib.metadata.version("triton")
    assert stamp["diffusers"] == importlib.metadata.version("diffusers")
    assert stamp["gpu"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    assert stamp["paro_env"]["PARO_AUTOTUNE"] == "0"
    assert stamp["command"] == "python benchmarks/quality.py --out 'a b' --tiny"
    age = datetime.datetime.now(datetime.timezone.utc) - datetime.datetime.fromisoformat(stamp["date"])
    assert datetime.timedelta(0) <= age < datetime.timedelta(minutes=5)


def test_stamp_takes_the_commit_from_the_environment_where_there_is_no_git(harness, monkeypatch):
    monkeypatch.setenv("PARO_GIT_COMMIT", "0123abc")
    monkeypatch.setenv("PARO_GIT_DIRTY", "1")
    stamp = harness.stamp(BENCHMARKS / "bench_e2e.py", [])
    assert stamp["git_commit"] == "0123abc" and stamp["git_dirty"] is True
    assert "PARO_GIT_COMMIT" not in stamp["paro_env"] and stamp["command"] == "python benchmarks/bench_e2e.py"


def test_writer_puts_the_stamp_first_one_row_per_line_and_a_markdown_table(harness, tmp_path):
    stamp = harness.stamp(BENCHMARKS / "bench_fold.py", ["--tiny"])
    rows = [{"variant": "identity", "ms": 12.5}, {"variant": "paro", "ms": 13.25, "note": None}]
    path = harness.write_results(tmp_path / "sub" / "fold.json", {"config": {"depth": 2}, "rows": rows}, stamp,
                                 title="fold overhead", notes=["a note"])
    text = path.read_text()
    assert json.loads(text) == {"stamp": stamp, "config": {"depth": 2}, "rows": rows}
    lines = text.splitlines()
    assert lines[1].startswith(' "stamp": {') and sum(line.startswith('  {"variant"') for line in lines) == 2
    md = (tmp_path / "sub" / "fold.md").read_text()
    assert md.startswith("# fold overhead\n") and "`python benchmarks/bench_fold.py --tiny`" in md and "a note" in md
    assert "| variant | ms | note |" in md and "| identity | 12.50 | – |" in md and "| paro | 13.25 | – |" in md
    assert (stamp["git_commit"] or "unknown commit") in md and stamp["torch"] in md


def test_cpu_timer_reports_the_median_of_timed_calls(harness):
    calls = []

    def sleep_10ms():
        calls.append(1)
        time.sleep(0.01)

    timing = harness.time_ms(sleep_10ms, "cpu", warmup_ms=0, rep_ms=60)
    assert timing.timer == "torch.utils.benchmark.Timer"
    assert 9.5 < timing.median_ms < 40 and len(timing.samples_ms) >= 2
    assert timing.median_ms == pytest.approx(sorted(timing.samples_ms)[len(timing.samples_ms) // 2], rel=0.5)
    calls.clear()
    timing = harness.time_calls(sleep_10ms, "cpu", calls=4, warmup_calls=0)
    assert len(calls) >= 5  # the sizing call and at least the four timed ones
    assert 9.5 < timing.median_ms < 40


def script_arguments_accepted(spec, out: str) -> None:
    module = load_benchmark(Path(spec.script).stem)
    module.parse_args(spec.argv(out))  # argparse exits (SystemExit) on an argument it does not accept


def test_every_spec_names_a_script_that_accepts_its_arguments(specs, tmp_path):
    assert {"attention", "e2e-cog42", "e2e-flux", "compensation", "quality-seeds", "fold-depth6", "gpu-tests"} <= set(
        specs.SPECS)
    for name, spec in specs.SPECS.items():
        assert name == spec.name and re.fullmatch(r"[a-z0-9-]+", name), name
        assert 0 < spec.budget_s <= 600, name
        argv = spec.argv(str(tmp_path / name))
        assert not any("{" in a for a in argv), (name, argv)
        if spec.script == "pytest":
            markers = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
            if "-m" in argv:
                assert any(m.startswith(argv[argv.index("-m") + 1] + ":") for m in markers), name
            paths = [a for a in argv if not a.startswith("-") and (REPO / a).exists()]
            assert paths, (name, argv)
            continue
        assert spec.script.startswith("benchmarks/") and (REPO / spec.script).is_file(), name
        script_arguments_accepted(spec, str(tmp_path / name))
        if "--max-minutes" in argv:  # the script's own guard ends before the runner's budget
            seeds = argv[argv.index("--seeds") + 1].count(",") + 1 if "--seeds" in argv else 1
            assert float(argv[argv.index("--max-minutes") + 1]) * 60 * seeds < spec.budget_s, name


def test_spec_check_catches_an_argument_the_script_does_not_accept(specs, tmp_path):
    bad = specs.Spec("bad", "benchmarks/bench_e2e.py", ("--out", "{out}", "--variants", "paro-fast"), 60, "")
    with pytest.raises(SystemExit):
        script_arguments_accepted(bad, str(tmp_path))
    bad = specs.Spec("bad", "benchmarks/quality.py", ("--out", "{out}", "--no-such-flag"), 60, "")
    with pytest.raises(SystemExit):
        script_arguments_accepted(bad, str(tmp_path))


def test_dry_run_prints_each_spec_command(capsys):
    run = load_benchmark("run")
    assert run.main(["fold-depth2", "gpu-tests", "--dry-run", "--work", "/tmp/w"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("[run]")]
    assert lines[0].endswith("benchmarks/bench_fold.py --depth 2 --iters 10 --json /tmp/w/fold-depth2/fold_depth2.json")
    assert lines[1].endswith(" -m pytest -q -rf -p no:logging --timeout 240 --durations 15 -m gpu tests --ignore "
                             "tests/test_more_diffusers_models.py")


def test_backend_entry_point_written_from_pyproject(tmp_path):
    run = load_benchmark("run")
    run.write_backend_entry_point(tmp_path)
    (dist,) = importlib.metadata.distributions(path=[str(tmp_path)])
    backends = [ep for ep in dist.entry_points if ep.group == "torch_dynamo_backends"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert [(ep.name, ep.value) for ep in backends] == list(project["entry-points"]["torch_dynamo_backends"].items())
    assert dist.metadata["Name"] == project["name"] and dist.version == project["version"]


def test_only_wheels_of_missing_distributions_are_installed(tmp_path):
    run = load_benchmark("run")
    for name in ("diffusers-0.42.1-py3-none-any.whl", "no_such_distribution_paro-1.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    assert [w.name for w in run.missing_wheels(tmp_path)] == ["no_such_distribution_paro-1.0-py3-none-any.whl"]


def test_pth_files_of_the_target_folder_reach_the_path(tmp_path):
    """pip --target installs .pth files without running them; the runner runs them as Python's site would: a plain
    folder line, and an import line that needs a package of the same folder (the CUDA DSL under FlashAttention-4)."""
    run = load_benchmark("run")
    assert run.pth_paths(tmp_path) == []
    (tmp_path / "plain").mkdir()
    (tmp_path / "dsl_pkg" / "inner").mkdir(parents=True)
    (tmp_path / "dsl_pkg" / "__init__.py").write_text("")
    (tmp_path / "a.pth").write_text("plain\n")
    (tmp_path / "b.pth").write_text("import sys, os, dsl_pkg; sys.path.insert(0, os.path.join(dsl_pkg.__path__[0], 'inner'))\n")
    assert sorted(run.pth_paths(tmp_path)) == sorted([str(tmp_path / "plain"), str(tmp_path / "dsl_pkg" / "inner")])


def test_runner_archives_a_spec_and_records_its_exit(tmp_path, monkeypatch):
    run = load_benchmark("run")
    specs = load_benchmark("specs")
    spec = specs.Spec("floor-small", "benchmarks/quantization_floor.py",
                      ("--n", "130", "--heads", "1", "--out", "{out}"), 300, "small error floor", gpu=False)
    monkeypatch.setattr(run, "SPECS", {spec.name: spec})
    out = tmp_path / "out"
    rc = run.main([spec.name, "--out", str(out), "--site", str(tmp_path / "site"), "--work", str(tmp_path / "work"),
                   "--commit", "feedc0de"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["floor-small.tar", "run.json"]
    summary = json.loads((out / "run.json").read_text())
    assert summary["stamp"]["git_commit"] == "feedc0de"
    (record,) = summary["specs"]
    assert record["rc"] == 0 and record["timed_out"] is False and record["archive"] == "floor-small.tar"
    assert record["command"].endswith("benchmarks/quantization_floor.py --n 130 --heads 1 --out "
                                      f"{tmp_path / 'work' / 'floor-small'}")
    with tarfile.open(out / "floor-small.tar") as tar:
        names = set(tar.getnames())
        assert {"floor-small/quantization_floor.json", "floor-small/quantization_floor.md",
                "floor-small/floor-small.log"} <= names
        result = json.load(tar.extractfile("floor-small/quantization_floor.json"))
        log = tar.extractfile("floor-small/floor-small.log").read().decode()
    assert result["stamp"]["git_commit"] == "feedc0de" and result["rows"]
    assert "op_int8_fp8" in log


def test_runner_stops_a_spec_at_its_budget(tmp_path, monkeypatch):
    run = load_benchmark("run")
    specs = load_benchmark("specs")
    script = tmp_path / "sleeper.py"
    script.write_text("import time\nprint('started', flush=True)\ntime.sleep(120)\n")
    spec = specs.Spec("sleeper", str(script), (), 3, "sleeps past its budget", gpu=False)
    monkeypatch.setattr(run, "SPECS", {spec.name: spec})
    out = tmp_path / "out"
    start = time.perf_counter()
    rc = run.main(["sleeper", "--out", str(out), "--site", str(tmp_path / "site"), "--work", str(tmp_path / "work"),
                   "--folders"])
    assert time.perf_counter() - start < 60
    assert rc == 1
    (record,) = json.loads((out / "run.json").read_text())["specs"]
    assert record["timed_out"] is True and record["rc"] != 0
    assert "started" in (out / "sleeper" / "sleeper.log").read_text()


def test_call_seconds_cut_the_later_specs_budgets(tmp_path, monkeypatch):
    """``--call-s``: each spec gets what is left of the call (less the archive margin); one with nothing left is
    skipped and recorded as such."""
    run = load_benchmark("run")
    specs = load_benchmark("specs")
    script = tmp_path / "sleeper.py"
    script.write_text("import time\nprint('started', flush=True)\ntime.sleep(120)\n")
    first = specs.Spec("first", str(script), (), 300, "sleeps past the call", gpu=False)
    second = specs.Spec("second", str(script), (), 300, "never starts", gpu=False)
    monkeypatch.setattr(run, "SPECS", {first.name: first, second.name: second})
    monkeypatch.setattr(run, "ARCHIVE_MARGIN_S", 1)
    out = tmp_path / "out"
    start = time.perf_counter()
    rc = run.main(["first", "second", "--out", str(out), "--site", str(tmp_path / "site"), "--work",
                   str(tmp_path / "work"), "--folders", "--call-s", "4"])
    assert time.perf_counter() - start < 30
    assert rc == 1
    records = {r["spec"]: r for r in json.loads((out / "run.json").read_text())["specs"]}
    assert records["first"]["timed_out"] is True and records["first"]["budget_s"] <= 3
    assert "no time left" in records["second"]["skipped"]
