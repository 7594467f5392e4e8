"""Where the attention kernels' time goes, from the hardware counters: Nsight Compute (``ncu``) on one call of each
kernel, and a summary of the numbers that decide what to change (pipe utilisation, issue slots, warp stall reasons).

On a GPU machine whose ``ncu`` can read the counters:

    python benchmarks/kernel_profile.py --out DIR [--cases wan-dense-gluon,...]

For each case this script runs itself under ``ncu --set full`` (``--clock-control none``: the clocks stay as the
machine sets them, as the timed benchmarks see them) with an NVTX filter, so that only the kernels of the profiled
call are replayed; the warm-up call before it (Triton's autotuning included) runs unprofiled. Per case it writes
``DIR/<case>.ncu-rep`` (open it in Nsight Compute), ``DIR/<case>_raw.csv`` (every metric of every profiled kernel)
and ``DIR/<case>_sass.csv.gz`` (per-SASS-instruction samples: where the warps stall), and ``DIR/kernel_profile.json``
with the summary rows. Counters disturb nothing but time: the durations ncu reports are its replay's, compare them
within this file only.

The shapes are the benchmark shapes of `hopper_kernel.py` with fewer heads (the kernels' per-CTA work is the same;
the replay is shorter): Wan-720p B1·H8·N75600·D128 and CogVideoX B1·H16·N17776·D64, dense and at density 0.2
(random 64-token block masks keeping the diagonal), bf16 inputs, INT8 QKᵀ and FP8 PV.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {"wan": (1, 8, 75600, 128), "cog": (1, 16, 17776, 64)}
NVTX_RANGE = "paro_profile"
# Case name → (shape, density, implementation). "cudnn" is dense SDPA on cuDNN, the peer the dense rows are judged by.
CASES = {
    f"{shape}-{'dense' if density == 1.0 else 'd02'}-{impl}": (shape, density, impl)
    for shape in ("wan", "cog") for density in (1.0, 0.2) for impl in ("triton", "gluon", "cudnn")
    if not (impl == "cudnn" and density < 1.0)
}
# Metrics of the summary: ncu's names, the first one the report holds (names differ between ncu versions and
# sections; the raw CSV holds the rest). Percentages are of the peak sustained rate over the cycles the SMs were active.
SUMMARY_METRICS = {
    "duration_ms": ("gpu__time_duration.sum",),
    "sm_active_cycles": ("sm__cycles_active.avg",),
    "issue_slots_busy_pct": ("smsp__issue_active.avg.pct_of_peak_sustained_active",
                             "sm__inst_issued.avg.pct_of_peak_sustained_active",
                             "smsp__inst_issued.avg.pct_of_peak_sustained_active"),
    "instructions_per_cycle_per_sm": ("sm__inst_executed.avg.per_cycle_active",),
    "tensor_pipe_pct": ("sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
                        "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
                        "sm__inst_executed_pipe_tensor_op_gmma.avg.pct_of_peak_sustained_active",
                        "sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active"),
    "xu_pipe_pct": ("sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active",),
    "fma_pipe_pct": ("sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active",),
    "alu_pipe_pct": ("sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active",),
    "registers_per_thread": ("launch__registers_per_thread",),
    "warps_active_per_scheduler": ("smsp__warps_active.avg.per_cycle_active",),
    "eligible_warps_per_scheduler": ("smsp__warps_eligible.avg.per_cycle_active",),
    "l2_hit_pct": ("lts__t_sector_hit_rate.pct",),
    "dram_read_gbytes": ("dram__bytes_read.sum",),
}
# Every pipe's utilisation the report holds, whatever the version names it: kept beside the summary (small).
PIPE_METRIC = re.compile(r"^sm[sp]*__(pipe_\w+_cycles_active|inst_executed_pipe_\w+)\.avg\.pct_of_peak_sustained_active$")
STALL_PREFIX = "smsp__average_warps_issue_stalled_"
STALL_SUFFIX = "_per_issue_active.ratio"


def _inputs(shape_name: str, density: float):
    import torch

    from paro_compile.kernels import tuning
    from paro_compile.kernels.block_mask import BlockMask, num_blocks

    b, h, n, d = SHAPES[shape_name]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(device="cuda", dtype=torch.bfloat16) for _ in range(3))
    mask = None
    if density < 1.0:
        nb = num_blocks(n, 64)
        mask = BlockMask.from_dense(tuning.random_block_mask(h, nb, nb, density, generator=gen)).to("cuda")
    return q, k, v, mask


def worker(case: str) -> None:
    """One warm-up call, then the profiled call inside the NVTX range."""
    import torch

    shape_name, density, impl = CASES[case]
    q, k, v, mask = _inputs(shape_name, density)
    if impl == "cudnn":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def call():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    elif impl == "triton":
        from paro_compile.kernels.attention import paro_attention_triton

        def call():
            return paro_attention_triton(q, k, v, mask=mask)
    else:
        from paro_compile.kernels import attention_hopper as AH
        from paro_compile.kernels.prologue import paro_prologue

        if not AH.available():
            raise SystemExit("the Gluon Hopper kernel does not run on this GPU")
        pro = paro_prologue(q, k, v)
        out = torch.empty_like(q)
        counts, indices = (None, None) if mask is None else (mask.counts, mask.indices)
        n, h = q.shape[2], q.shape[1]

        def call():
            return AH.paro_attention_hopper(pro, out, None, counts, indices, n, h)
    call()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push(NVTX_RANGE)
    call()
    torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()


def _metric_rows(raw_csv: str) -> list[dict]:
    """ncu's raw CSV: a header row of metric names, a row of units, then one row per kernel."""
    rows = list(csv.reader(io.StringIO(raw_csv)))
    if len(rows) < 3:
        return []
    names = rows[0]
    return [dict(zip(names, r)) for r in rows[2:]]


def _number(text: str):
    try:
        return float(text.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def summarise(kernel: dict) -> dict:
    row = {"kernel": kernel.get("Kernel Name", "")[:120]}
    for key, names in SUMMARY_METRICS.items():
        values = [_number(kernel.get(name, "")) for name in names]
        row[key] = next((value for value in values if value is not None), None)
    pipes = {name: _number(value) for name, value in kernel.items() if PIPE_METRIC.match(name)}
    row["pipes_pct"] = {name: round(value, 2) for name, value in sorted(pipes.items()) if value}
    stalls = {name[len(STALL_PREFIX):-len(STALL_SUFFIX)]: _number(value) for name, value in kernel.items()
              if name.startswith(STALL_PREFIX) and name.endswith(STALL_SUFFIX)}
    top = sorted(((k, v) for k, v in stalls.items() if v), key=lambda kv: -kv[1])[:8]
    row["stall_cycles_per_issue"] = {k: round(v, 3) for k, v in top}
    return row


def profile(case: str, out: Path, ncu: str, timeout_s: int) -> dict:
    report = out / case
    cmd = [ncu, "--clock-control", "none", "--set", "full", "--nvtx", "--nvtx-include", f"{NVTX_RANGE}/",
           "--launch-count", "6", "-f", "-o", str(report), sys.executable, str(Path(__file__).resolve()),
           "--worker", case]
    started = time.time()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=dict(os.environ))
    result = {"case": case, "shape": SHAPES[CASES[case][0]], "density": CASES[case][1], "impl": CASES[case][2],
              "profile_s": round(time.time() - started, 1), "rc": run.returncode}
    if run.returncode != 0 or not report.with_suffix(".ncu-rep").exists():
        result["error"] = (run.stdout + run.stderr)[-1500:]
        return result
    raw = subprocess.run([ncu, "-i", str(report.with_suffix(".ncu-rep")), "--page", "raw", "--csv"],
                         capture_output=True, text=True)
    with gzip.open(out / f"{case}_raw.csv.gz", "wt") as fh:
        fh.write(raw.stdout)
    kernels = _metric_rows(raw.stdout)
    result["kernels"] = [summarise(k) for k in kernels]
    source = subprocess.run([ncu, "-i", str(report.with_suffix(".ncu-rep")), "--page", "source", "--csv",
                             "--print-source", "sass"], capture_output=True, text=True)
    if source.returncode == 0 and source.stdout:
        with gzip.open(out / f"{case}_sass.csv.gz", "wt") as fh:
            fh.write(source.stdout)
    else:
        result["sass_export_error"] = source.stderr[-500:]
    # The report itself (tens of MB) stays behind: the summary, raw CSV and SASS table carry what it measured.
    report.with_suffix(".ncu-rep").unlink()
    return result


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    ap.add_argument("--worker", choices=sorted(CASES), help=argparse.SUPPRESS)
    ap.add_argument("--case-timeout", type=int, default=150, help="seconds one case's profile may take")
    ap.add_argument("--max-minutes", type=float, default=9.0, help="skip the cases left after this long")
    args = ap.parse_args(argv)
    if not args.worker:
        if args.out is None:
            ap.error("--out is required")
        unknown = [c for c in args.cases.split(",") if c and c not in CASES]
        if unknown:
            ap.error(f"unknown case(s) {unknown}; known: {', '.join(CASES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    cases = [c for c in args.cases.split(",") if c]
    deadline = time.time() + 60 * args.max_minutes
    ncu = shutil.which("ncu") or next((str(p) for p in sorted(Path("/opt/nvidia").glob("nsight-compute/*/ncu"))), None)
    if ncu is None:
        raise SystemExit("ncu (Nsight Compute) is not on this machine's PATH")
    import torch
    import triton

    args.out.mkdir(parents=True, exist_ok=True)
    results = {"meta": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                        "ncu": subprocess.run([ncu, "--version"], capture_output=True, text=True).stdout.strip()[-80:],
                        "time": time.strftime("%Y-%m-%d %H:%M:%S")}, "cases": []}
    for case in cases:
        left = deadline - time.time()
        if left < 20:
            row = {"case": case, "error": "skipped: --max-minutes spent"}
            results["cases"].append(row)
            print(json.dumps(row), flush=True)
            continue
        try:
            row = profile(case, args.out, ncu, int(min(args.case_timeout, left)))
        except subprocess.TimeoutExpired:
            row = {"case": case, "error": f"ncu ran past its {int(min(args.case_timeout, left))} s"}
        results["cases"].append(row)
        print(json.dumps(row), flush=True)
        (args.out / "kernel_profile.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
