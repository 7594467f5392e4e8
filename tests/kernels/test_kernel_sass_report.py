"""The offline code report compiles the real kernel for sm_90a on a CPU machine (Triton's bundled ptxas)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_helpers import BENCHMARKS, load_benchmark  # noqa: E402

SCRIPT = BENCHMARKS / "kernel_sass_report.py"


def test_sparse_kernel_fits_without_spills(tmp_path):
    """Guards occupancy: the default sparse kernel (64×64 tiles, 4 warps) compiles for sm_90a without register
    spills and within 168 registers (3+ CTAs per SM); a regression here costs speed on the H100."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(SCRIPT), "--nvdisasm", "", "--out", str(tmp_path)], capture_output=True,
                         text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    sparse = next(line for line in run.stdout.splitlines() if line.startswith("sparse"))
    regs = int(re.search(r"Used (\d+) registers", sparse).group(1))
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill", sparse)]
    assert spills and max(spills) == 0, sparse
    assert regs <= 168, sparse
    written = json.loads((tmp_path / "kernel_sass_report.json").read_text())
    assert [row["mask"] for row in written["rows"]] == ["sparse", "dense"]
    assert f"Used {regs} registers" in written["rows"][0]["resources"] and written["stamp"]["triton"]


def test_loop_histogram_reads_a_backward_branch(tmp_path):
    mod = load_benchmark("kernel_sass_report")
    sass = tmp_path / "fake_nvdisasm"
    sass.write_text("#!/bin/sh\ncat <<'X'\n.L_x_0:\n        /*0000*/                   FADD R1, R2, R3 ;\n"
                    "        /*0010*/              @!P0 MUFU.EX2 R1, R1 ;\n        /*0020*/              @P1 BRA `(.L_x_0) ;\nX\n")
    sass.chmod(0o755)
    total, ops = mod.loop_histogram(tmp_path / "unused.cubin", str(sass))
    assert total == 3 and ops["FADD"] == 1 and ops["MUFU"] == 1 and ops["BRA"] == 1
