"""The kernel-profile benchmark's plumbing on the CPU: its cases and the summary it reads from ncu's raw CSV."""
from __future__ import annotations

import pytest

from bench_helpers import load_benchmark

kp = load_benchmark("kernel_profile")


def _raw_csv(kernels: list[dict]) -> str:
    names = sorted({name for k in kernels for name in k})
    lines = [",".join(f'"{n}"' for n in names), ",".join('""' for _ in names)]
    lines += [",".join(f'"{k.get(n, "")}"' for n in names) for k in kernels]
    return "\n".join(lines) + "\n"


def test_summary_reads_pipes_and_ranks_stall_reasons():
    stall = lambda reason: f"{kp.STALL_PREFIX}{reason}{kp.STALL_SUFFIX}"  # noqa: E731
    kernel = {"Kernel Name": "_paro_fwd_hopper", kp.SUMMARY_METRICS["tensor_pipe_pct"][1]: "41.5",
              kp.SUMMARY_METRICS["issue_slots_busy_pct"][0]: "", kp.SUMMARY_METRICS["issue_slots_busy_pct"][2]: "77",
              kp.SUMMARY_METRICS["duration_ms"][0]: "1,234.5", kp.SUMMARY_METRICS["xu_pipe_pct"][0]: "n/a",
              "sm__inst_executed_pipe_fmaheavy.avg.pct_of_peak_sustained_active": "12.345",
              "sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active": "0",
              stall("math_pipe_throttle"): "0.8", stall("wait"): "2.5", stall("barrier"): "0", stall("long_scoreboard"): "0.1"}
    rows = kp._metric_rows(_raw_csv([kernel, {"Kernel Name": "other"}]))
    assert [r["Kernel Name"] for r in rows] == ["_paro_fwd_hopper", "other"]
    summary = kp.summarise(rows[0])
    assert summary["tensor_pipe_pct"] == 41.5 and summary["duration_ms"] == 1234.5
    assert summary["issue_slots_busy_pct"] == 77.0  # the first name the report holds a value for
    # every pipe with a value, under ncu's own names (the tensor pipe's too)
    assert summary["pipes_pct"] == {"sm__inst_executed_pipe_fmaheavy.avg.pct_of_peak_sustained_active": 12.35,
                                    kp.SUMMARY_METRICS["tensor_pipe_pct"][1]: 41.5}
    assert summary["xu_pipe_pct"] is None  # a value ncu could not collect stays unknown, not 0
    assert list(summary["stall_cycles_per_issue"]) == ["wait", "math_pipe_throttle", "long_scoreboard"]


def test_every_case_names_a_known_shape_and_implementation():
    assert "wan-dense-gluon" in kp.CASES and "wan-d02-triton" in kp.CASES
    assert "wan-d02-cudnn" not in kp.CASES  # cuDNN runs dense only
    for shape, density, impl in kp.CASES.values():
        assert shape in kp.SHAPES and 0 < density <= 1 and impl in ("triton", "gluon", "cudnn")


def test_unknown_case_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        kp.main(["--out", str(tmp_path), "--cases", "wan-dense-nope"])
    assert "unknown case" in capsys.readouterr().err
