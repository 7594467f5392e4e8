"""What calibration's Q/K outlier measurement (`paro_compile.calibration.outliers`) reports on clean and outlier inputs,
next to the whole attention output's error with per-block INT8 Q/K (`kernels.reference`, qk_bits=8, PV unquantized).

Inputs: Gaussian q, k, v [1, 2, N, D] (seed 0), clean or with one outlier: a query token ×100, a key channel ×100, a
query channel ×10, a key token ×100, and a query value of 30 in a channel no key reads (an outlier that only coarsens
its block's quantization step). Quantization blocks of 64 tokens; the flag threshold is the default
``qk_outlier_error``. The table and its reading are in docs/calibration.md ("Q/K outliers"). CPU, about a minute.

    python benchmarks/qk_outliers.py [--tokens 1024,4096] [--dims 64,128] [--out DIR]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from paro_compile.calibration.options import DEFAULT_QK_OUTLIER_ERROR  # noqa: E402
from paro_compile.calibration.outliers import OutlierStatistics  # noqa: E402
from paro_compile.kernels.reference import paro_attention_reference  # noqa: E402

CASES = ("clean", "q token x100", "k channel x100", "q channel x10", "k token x100", "q value 30, unread channel")


def make_inputs(case: str, tokens: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, tokens, dim, generator=gen) for _ in range(3))
    if case == "q token x100":
        q[:, :, 100] *= 100
    elif case == "k channel x100":
        k[..., 5] *= 100
    elif case == "q channel x10":
        q[..., 5] *= 10
    elif case == "k token x100":
        k[:, :, 100] *= 100
    elif case == "q value 30, unread channel":
        k[..., 0] = 0
        q[:, :, 100, 0] = 30.0
    elif case != "clean":
        raise ValueError(f"unknown case {case!r}")
    return q, k, v


def measure(case: str, tokens: int, dim: int, block: int = 64) -> dict:
    q, k, v = make_inputs(case, tokens, dim)
    stats = OutlierStatistics(q.shape[1], block, DEFAULT_QK_OUTLIER_ERROR)
    stats.update(q, k, v, scale=1 / math.sqrt(dim), max_elements=2**22)
    report = stats.report()
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    int8 = paro_attention_reference(q, k, v, qk_bits=8, pv_dtype="fp16")
    return {
        "case": case, "tokens": tokens, "dim": dim,
        **{key: max(report[key]) for key in ("q_incoherence_max", "k_incoherence_max", "int8_error",
                                             "int8_error_q_only", "int8_error_k_only", "int8_error_fine")},
        "whole_output_rel_l2": float((int8 - exact).norm() / exact.norm()),
        "flagged": report["flagged"], "suggestion": report.get("suggestion"),
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1024,4096")
    parser.add_argument("--dims", default="64,128")
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="result folder (default $OUT)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> list[dict]:
    args = parse_args(argv)
    run_stamp = harness.stamp(__file__, argv)
    rows = [measure(case, int(n), int(d)) for n in args.tokens.split(",") for d in args.dims.split(",") for case in CASES]
    print(harness.markdown_table(rows))
    if args.out:
        harness.write_results(Path(args.out) / "qk_outliers.json", {"rows": rows}, run_stamp,
                              title="Q/K outlier measurement at calibration")
    return rows


if __name__ == "__main__":
    main()
