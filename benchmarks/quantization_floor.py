"""Error floor of each quantization step of the paro op, in isolation, against exact attention (CPU, float64).

The attention kernel's accuracy target is an output rel-L2 ≤ 2e-2 against bf16 SDPA with INT8 QKᵀ and FP8 PV. This
script separates what each step costs on the same inputs as `bench_attention.py` (standard normal q, k, v, bf16), with
everything else exact (float64), so the kernel's measured error can be read against the floor its number formats set:

- ``p_fp8``: P·448 rounded to FP8 e4m3 (the kernel's P operand), V exact;
- ``v_fp8``: V per channel to FP8 e4m3 (`reference.quantize_v_per_channel`), P exact;
- ``pv_fp8``: both (what FP8 PV costs at best: the row sum uses the same rounded P, as in the kernel);
- ``qk_int8``: Q and K per 64-token block to INT8 after K smoothing, PV exact;
- ``op_int8_fp8`` / ``op_int8_bf16`` / ``op_int8_int8``: the whole op (`paro_attention_reference`, dense);
- ``sdpa_bf16``: bf16 SDPA itself (the reference the target is measured against).

Each row gives rel-L2 vs float64 attention and vs bf16 SDPA. FP8 e4m3 keeps 3 mantissa bits: one rounding has a
relative RMS error of about 2^-4/√3 · (mean over the binade) ≈ 0.026, P and V each contribute one, so on inputs
whose output is not dominated by a common mean the FP8 PV floor is ≈ √2 · 0.026 ≈ 0.037 — above 2e-2 whatever
the kernel does.

    python benchmarks/quantization_floor.py                      # B1 H4 N4096 D64
    python benchmarks/quantization_floor.py --n 1024 --heads 2 --out /tmp/floor
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

from paro_compile.kernels import reference as R  # noqa: E402
from paro_compile.kernels.block_mask import BlockMask  # noqa: E402


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def attention_with(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *, p_fp8: bool,
                   v_fp8: bool) -> torch.Tensor:
    """float64 softmax attention with P·448 and/or V rounded to FP8 e4m3 (max-subtracted exp, exact row max)."""
    s = (q @ k.transpose(-1, -2)) * scale
    p = torch.exp(s - s.amax(-1, keepdim=True))
    if p_fp8:
        p = (p * R.FP8_MAX).to(torch.float32).to(torch.float8_e4m3fn).double() / R.FP8_MAX
    if v_fp8:
        vq, vs = R.quantize_v_per_channel(v.float(), "fp8")
        v = vq.double() * vs.double()[:, :, None, :]
    return (p @ v) / p.sum(-1, keepdim=True)


def qk_int8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, block: int) -> torch.Tensor:
    """float64 attention on per-block INT8 Q and smoothed K (`reference.quantize_blockwise`), exact P and V."""
    k = k - k.mean(dim=2, keepdim=True)  # smoothing: softmax is invariant to a per-row constant
    qv, qs = R.quantize_blockwise(q.float(), block, 8)
    kv, ks = R.quantize_blockwise(k.float(), block, 8)
    qd = qv.double() * qs.double().repeat_interleave(block, dim=2)[:, :, : q.shape[2], None]
    kd = kv.double() * ks.double().repeat_interleave(block, dim=2)[:, :, : k.shape[2], None]
    return torch.softmax((qd @ kd.transpose(-1, -2)) * scale, dim=-1) @ v


def measure(batch: int = 1, heads: int = 4, n: int = 4096, dim: int = 64, seed: int = 0, block: int = 64) -> dict:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, dim, generator=g).to(torch.bfloat16) for _ in range(3))
    scale = 1.0 / math.sqrt(dim)
    q64, k64, v64 = q.double(), k.double(), v.double()
    exact = torch.softmax((q64 @ k64.transpose(-1, -2)) * scale, dim=-1) @ v64
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    outputs = {
        "p_fp8": attention_with(q64, k64, v64, scale, p_fp8=True, v_fp8=False),
        "v_fp8": attention_with(q64, k64, v64, scale, p_fp8=False, v_fp8=True),
        "pv_fp8": attention_with(q64, k64, v64, scale, p_fp8=True, v_fp8=True),
        "qk_int8": qk_int8_attention(q64, k64, v64, scale, block),
        "sdpa_bf16": sdpa,
    }
    for pv in ("fp8", "fp16", "int8"):
        name = {"fp8": "op_int8_fp8", "fp16": "op_int8_bf16", "int8": "op_int8_int8"}[pv]
        outputs[name] = R.paro_attention_reference(q, k, v, scale=scale, qk_bits=8, pv_dtype=pv,
                                                   mask=BlockMask.dense(q.shape[2], block, block))
    rows = [{"step": name, "rel_l2_vs_fp64": rel_l2(o, exact), "rel_l2_vs_bf16_sdpa": rel_l2(o, sdpa)}
            for name, o in outputs.items()]
    return {"shape": dict(batch=batch, heads=heads, n=n, dim=dim), "seed": seed, "block": block,
            "inputs": "standard normal, bf16 (as bench_attention.py)", "rows": rows}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="folder for quantization_floor.json and .md")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    run_stamp = harness.stamp(__file__, argv)
    result = measure(args.batch, args.heads, args.n, args.dim, args.seed)
    print(f"{'step':14s} {'rel-L2 vs fp64':>15s} {'vs bf16 SDPA':>13s}   (B{args.batch} H{args.heads} N{args.n} D{args.dim})")
    for row in result["rows"]:
        print(f"{row['step']:14s} {row['rel_l2_vs_fp64']:15.4e} {row['rel_l2_vs_bf16_sdpa']:13.4e}")
    if args.out is not None:
        harness.write_results(args.out / "quantization_floor.json", result, run_stamp,
                              title=f"error of each quantization step alone (B{args.batch} H{args.heads} N{args.n} "
                                    f"D{args.dim}, rel-L2)")
    return result


if __name__ == "__main__":
    main()
