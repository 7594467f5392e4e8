"""Calibration at 720p: time and peak memory of one calibration call at a Wan2.1-720p and a HunyuanVideo-720p site,
and the plan size of the whole model.

Sites (random but structured q, k built on the device: every head is local along random axes, `structured_qk`):

- Wan2.1-14B 720p self-attention: B1·H40·N75,600·D128, grid 21×45×80, no text (Wan reads text by cross-attention);
- HunyuanVideo 720p joint attention: B1·H24·N(118,800 + 256 text)·D128, grid 33×45×80, text after the video.

Per site: one calibration call (`SiteStatistics.update`: statistics of all 6 orders, the Q/K outlier measurement) is
run ``1 + --repeats`` times; the first call (index tables, kernel warm-up) is reported apart, the median of the others
is ``update_s``. Peak memory per call is ``torch.cuda.max_memory_allocated`` over the call (reset before it), also as
the increase over what was allocated before it (inputs and accumulated statistics). Then the plan is built (orders and
masks, `build_site_plan`) at density 0.2 and 0.3 and its size is reported per site and for the whole model (40 Wan
layers, 60 HunyuanVideo blocks, all assumed like this one) with 1 and 2 step buckets: the device constants the
lowering stores (compact CSR, `BlockMask.from_dense(...).nbytes`) and the bit-packed masks of the plan file. Targets:
≤ 10 s and ≤ 20 GiB per site per call (``meets_targets``). A calibration call is seconds long, so each is timed once
with ``torch.cuda.synchronize`` and ``time.perf_counter`` rather than with `harness.time_calls` (whose sizing and
estimate calls would take minutes here). Results are rewritten after every site (calibrate_720p.json + .md in
``--out``), so a run cut by its budget keeps what it measured.

    python benchmarks/calibrate_720p.py --out OUT            # H200: about 3 minutes
    python benchmarks/calibrate_720p.py --tiny --out OUT     # CPU: small grids of the same shape, the CI check
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics as stats_module
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from paro_compile.calibration.options import CalibrationOptions  # noqa: E402
from paro_compile.calibration.statistics import SiteStatistics, chunk_rows_for, default_chunk_elements  # noqa: E402
from paro_compile.grid import TokenGrid  # noqa: E402
from paro_compile.kernels.block_mask import BlockMask  # noqa: E402
from paro_compile.plan_file import pack_bool  # noqa: E402

TARGET_S = 10.0
TARGET_GIB = 20.0
DENSITIES = (0.2, 0.3)


@dataclass(frozen=True)
class SiteShape:
    name: str
    heads: int
    head_dim: int
    grid: TokenGrid
    layers: int
    """Sites of this shape in the whole model (for the model's plan size)."""


SITES = (
    SiteShape("wan2.1-720p", 40, 128, TokenGrid(frames=21, height=45, width=80), 40),
    SiteShape("hunyuanvideo-720p", 24, 128, TokenGrid(frames=33, height=45, width=80, text_tokens=256,
                                                     text_position="suffix"), 60),
)
TINY_SITES = (
    SiteShape("wan2.1-720p (tiny)", 2, 128, TokenGrid(frames=3, height=5, width=8), 40),
    SiteShape("hunyuanvideo-720p (tiny)", 2, 128, TokenGrid(frames=3, height=5, width=8, text_tokens=8,
                                                            text_position="suffix"), 60),
)


def structured_qk(grid: TokenGrid, heads: int, dim: int, device: torch.device, dtype: torch.dtype, *,
                  noise: float = 0.3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [1, H, N, dim] built on ``device``, scores −|x_i − x_j|² (as `alpha_sweep.synthetic_qk`, vectorised over
    heads): x = the token's (f, h, w) position times per-head axis weights, log-uniform in [0.03, 3]; text tokens sit
    far away on a fourth coordinate. Scaled by 8 / the longest axis so that bf16 keeps the scores' precision."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.ones(heads, 4)
    weights[:, :3] = 10 ** (torch.rand(heads, 3, generator=gen) * 2.0 - 1.5)
    sizes = [grid.sizes[a] for a in grid.axes]
    mesh = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32, device=device) for s in sizes],
                                      indexing="ij"), -1).reshape(-1, len(sizes))
    position = torch.zeros(grid.num_tokens, 4, device=device)
    position[grid.visual_slice, 4 - len(sizes) - 1: 3] = mesh  # images: (h, w) in the last two coordinates
    position[grid.text_slice, 3] = 1e3
    scale = 8.0 / max(sizes)
    noise_gen = torch.Generator(device=device).manual_seed(seed + 1)
    qs, ks = [], []
    for h in range(heads):  # one head at a time keeps the fp32 intermediates small
        x = position * weights[h].to(device)
        pad = noise * torch.randn(grid.num_tokens, dim - 5, generator=noise_gen, device=device)
        q = torch.cat([2 * x, -torch.ones(grid.num_tokens, 1, device=device), pad], -1) * scale
        k = torch.cat([x, x.pow(2).sum(-1, keepdim=True), pad.roll(1, 0)], -1) * scale
        qs.append(q.to(dtype))
        ks.append(k.to(dtype))
    return torch.stack(qs)[None], torch.stack(ks)[None]


def plan_sizes(masks: torch.Tensor, block: int, layers: int, device: torch.device = torch.device("cpu")) -> dict:
    """Plan size of one site's masks [1, H, nb, nb] and of ``layers`` such sites, with 1 and 2 step buckets (the CSR
    is built on ``device``; its size does not depend on where)."""
    out = {}
    for buckets in (1, 2):
        stacked = masks.expand(buckets, -1, -1, -1).contiguous()
        constants = BlockMask.from_dense(stacked.to(device), block, block).nbytes
        packed = pack_bool(stacked).numel()
        out[f"csr_mib_per_site_{buckets}b"] = constants / 2**20
        out[f"csr_gib_model_{buckets}b"] = constants * layers / 2**30
        out[f"file_mib_model_{buckets}b"] = packed * layers / 2**20
    return out


def measure_site(site: SiteShape, device: torch.device, dtype: torch.dtype, args: argparse.Namespace) -> list[dict]:
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    grid, n = site.grid, site.grid.num_tokens
    t0 = time.perf_counter()
    q, k = structured_qk(grid, site.heads, site.head_dim, device, dtype)
    v = torch.randn(q.shape, device=device, dtype=dtype, generator=torch.Generator(device=device).manual_seed(2))
    sync()
    build_inputs_s = time.perf_counter() - t0
    options = CalibrationOptions(density=DENSITIES[0], block_size=args.block, max_chunk_elements=args.chunk_elements,
                                 stats_kernel=args.stats_kernel)
    stats = SiteStatistics(grid, site.heads, options)
    call_s, peak_gib, increase_gib = [], [], []
    for _ in range(1 + args.repeats):
        sync()
        before = torch.cuda.memory_allocated() if cuda else 0
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        stats.update(q, k, v)
        sync()
        call_s.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() if cuda else 0
        peak_gib.append(peak / 2**30)
        increase_gib.append((peak - before) / 2**30)
    steady = call_s[1:] or call_s
    update_s = stats_module.median(steady)
    rows_per_chunk = chunk_rows_for(1, site.heads, n, args.chunk_elements or default_chunk_elements(device))
    common = {
        "site": site.name, "shape": [1, site.heads, n, site.head_dim], "grid": str(grid),
        "stats_kernel": "triton" if stats.uses_kernel(q) else "torch",
        "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype).replace("torch.", ""),
        "chunk_rows": rows_per_chunk, "chunks": math.ceil(n / rows_per_chunk), "first_call_s": call_s[0],
        "update_s": update_s, "update_samples_s": steady, "peak_gib": max(peak_gib),
        "peak_increase_gib": max(increase_gib), "build_inputs_s": build_inputs_s,
        "dense_map_would_be_gib": site.heads * n * n * 4 / 2**30,
        "meets_targets": bool(update_s <= TARGET_S and max(peak_gib) <= TARGET_GIB) if cuda else None,
    }
    rows = []
    for density in DENSITIES:
        stats.options = dataclasses.replace(options, density=density)
        start = time.perf_counter()
        plan = stats.build_site_plan(site.name)
        build_s = time.perf_counter() - start
        outliers = plan.stats.get("qk_outliers", {})
        rows.append({**common, "density": density, "achieved_density": plan.density(), "build_plan_s": build_s,
                     "kept_mass": plan.stats["kept_mass"][0],
                     "orders_chosen": {o: plan.orders.count(o) for o in sorted(set(plan.orders))},
                     "qk_outliers_flagged": outliers.get("flagged"), "layers": site.layers,
                     **plan_sizes(plan.block_masks, args.block, site.layers, device)})
    del q, k, v, stats
    if cuda:
        torch.cuda.empty_cache()
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small grids on the CPU (the CI check of this script)")
    parser.add_argument("--sites", default=None, help="comma-separated site names (default: both)")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls after the first (default 1)")
    parser.add_argument("--block", type=int, default=None, help="token block (default 64; 16 with --tiny)")
    parser.add_argument("--chunk-elements", type=int, default=None, help="max B*H*rows*N per chunk (default 2**27)")
    parser.add_argument("--stats-kernel", default="auto", choices=["auto", "triton", "torch"],
                        help="CalibrationOptions.stats_kernel (auto: the Triton kernels on CUDA)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="result folder (default $OUT)")
    args = parser.parse_args(argv)
    if args.block is None:
        args.block = 16 if args.tiny else 64
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    device = torch.device("cpu" if args.tiny else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("calibrate_720p.py needs a CUDA GPU (or --tiny on the CPU)")
    dtype = torch.float32 if args.tiny else getattr(torch, args.dtype)
    sites = TINY_SITES if args.tiny else SITES
    if args.sites:
        wanted = args.sites.split(",")
        sites = tuple(s for s in sites if s.name.split(" ")[0] in wanted)
    run_stamp = harness.stamp(__file__, argv)
    results: dict = {"targets": {"update_s": TARGET_S, "peak_gib": TARGET_GIB}, "rows": []}
    columns = ["site", "density", "update_s", "first_call_s", "peak_gib", "peak_increase_gib", "meets_targets",
               "build_plan_s", "achieved_density", "kept_mass", "csr_mib_per_site_2b", "csr_gib_model_1b",
               "csr_gib_model_2b", "file_mib_model_2b"]
    for site in sites:
        rows = measure_site(site, device, dtype, args)
        results["rows"] += rows
        for row in rows:
            print({key: row[key] for key in columns})
        if args.out:
            harness.write_results(Path(args.out) / "calibrate_720p.json", results, run_stamp,
                                  title="calibration of one 720p site per model: time, peak memory, plan size",
                                  columns=columns)
    return results


if __name__ == "__main__":
    main()
