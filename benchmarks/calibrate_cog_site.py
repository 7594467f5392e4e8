"""Time calibrating one CogVideoX-5B-sized attention site on the GPU.

Site: B=1 (or --batch 2 for CFG), 48 heads, 13×30×45 video tokens + 226 text tokens = 17,776, D=64.
q/k are "random but structured": every head is local along random axes (synthetic_qk with random per-axis
weights) plus noise, so the six candidate orders really differ. Reports the time of one statistics pass
(`SiteStatistics.update`, all 6 orders at once; `harness.time_calls` median of ``--repeats`` calls), of building the
plan (orders + masks), and torch.cuda.max_memory_allocated, as one JSON line, and into ``--out``
(calibrate_cog_site.json + .md; default ``$OUT`` where it is set).

    python benchmarks/calibrate_cog_site.py [--batch 1] [--dtype bfloat16] [--chunk-elements 134217728] [--repeats 3]
    python benchmarks/calibrate_cog_site.py --device cpu --heads 2 --frames 2 --height 4 --width 6 --text 8   # smoke
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from alpha_sweep import synthetic_qk  # noqa: E402  (benchmarks/alpha_sweep.py)
from paro_compile.calibration.options import CalibrationOptions  # noqa: E402
from paro_compile.calibration.statistics import SiteStatistics, chunk_rows_for  # noqa: E402
from paro_compile.grid import TokenGrid  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=48)
    parser.add_argument("--frames", type=int, default=13)
    parser.add_argument("--height", type=int, default=30)
    parser.add_argument("--width", type=int, default=45)
    parser.add_argument("--text", type=int, default=226)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--density", type=float, default=0.3)
    parser.add_argument("--chunk-elements", type=int, default=None, help="max B*H*rows*N per chunk (default 2**27)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (smoke test at small sizes)")
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="result folder (default $OUT)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = getattr(torch, args.dtype)
    grid = TokenGrid(frames=args.frames, height=args.height, width=args.width, text_tokens=args.text)
    n = grid.num_tokens

    gen = torch.Generator().manual_seed(0)
    heads = [{a: float(10 ** (torch.rand(1, generator=gen).item() * 2.0 - 1.5)) for a in "FHW"} for _ in range(args.heads)]
    t0 = time.perf_counter()
    # Scores -|x_i - x_j|^2 / T with coordinates normalised to [0, 1] per axis and T chosen so that bf16 q/k keep
    # enough precision (|x|^2 stays O(100)).
    q, k = synthetic_qk(grid, heads, temperature=1.0, noise=0.3, seed=1)
    scale_axes = max(args.frames, args.height, args.width)
    q = (q / scale_axes * 8).to(device=device, dtype=dtype).expand(args.batch, -1, -1, -1).contiguous()
    k = (k / scale_axes * 8).to(device=device, dtype=dtype).expand(args.batch, -1, -1, -1).contiguous()
    v = torch.randn(args.batch, args.heads, n, 64, device=device, dtype=dtype)
    build_inputs_s = time.perf_counter() - t0

    options = CalibrationOptions(density=args.density, max_chunk_elements=args.chunk_elements)
    max_elements = args.chunk_elements or (2**27 if cuda else 2**22)
    rows = chunk_rows_for(args.batch, args.heads, n, max_elements)

    # Warm-up (index tables, kernels), then timed passes.
    run_stamp = harness.stamp(__file__, argv)
    stats = SiteStatistics(grid, args.heads, options)
    stats.update(q, k, v)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    timing = harness.time_calls(lambda: stats.update(q, k, v), device, calls=args.repeats, warmup_calls=0)
    t0 = time.perf_counter()
    site = stats.build_site_plan("transformer_blocks.0.attn1#0")
    sync()
    plan_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "shape": [args.batch, args.heads, n, 64],
        "dtype": args.dtype,
        "orders_evaluated": len(stats.orders),
        "chunk_rows": rows,
        "chunks": -(-n // rows),
        "update_s": timing.median_ms / 1e3,
        "update_samples_s": [t / 1e3 for t in timing.samples_ms],
        "build_plan_s": plan_s,
        "max_memory_allocated_gib": peak / 2**30,
        "inputs_and_state_gib": base / 2**30,
        "dense_attention_map_would_be_gib": args.batch * args.heads * n * n * 4 / 2**30,
        "density": site.density(),
        "kept_mass_mean": site.stats["kept_mass"][0],
        "natural_kept_mass_mean": sum(site.stats["natural_kept_mass_per_head"][0]) / args.heads,
        "orders_chosen": {o: site.orders.count(o) for o in sorted(set(site.orders))},
        "build_inputs_s": build_inputs_s,
    }
    print(json.dumps(result))
    if args.out:
        harness.write_results(Path(args.out) / "calibrate_cog_site.json", result, run_stamp,
                              title="calibration of one CogVideoX-5B-sized site",
                              table=[{k: result[k] for k in ("shape", "chunks", "update_s", "build_plan_s",
                                                             "max_memory_allocated_gib", "density")}])
    return result


if __name__ == "__main__":
    main()
