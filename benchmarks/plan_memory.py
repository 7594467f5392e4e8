"""Device memory of a plan's mask constants per attention site: padded int32 CSRs vs the compact form the lowering
stores (`block_mask.trim_csr`: rows cut to the largest kept count, int16 indices). CPU only.

Synthetic CogVideoX-5B-shaped sites (48 heads, 17,776 tokens, 2 step buckets) with two kinds of masks: "random"
(kept blocks drawn independently per query block: the widest unions for grouped tiles) and "coherent" (a random
64-block mask refined to the finer block: neighbouring query blocks keep the same KV blocks, as calibrated PARO masks
tend to). ``--plan`` measures the sites of a saved plan instead.

    python benchmarks/plan_memory.py --out OUT            # plan_memory.json + .md; about 4 GB of RAM
    python benchmarks/plan_memory.py --plan my.paro.safetensors
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

from paro_compile.kernels.block_mask import BlockMask, block_mask_to_csr, grouped_block_csr, num_blocks  # noqa: E402
from paro_compile.kernels.tuning import random_block_mask, refine_block_mask  # noqa: E402


def padded_bytes(masks: torch.Tensor, block: int) -> int:
    """What the same constants took before compact CSRs: int32 indices padded to every KV block."""
    csr = grouped_block_csr(masks, 64 // block) if block < 64 else block_mask_to_csr(masks)
    return sum(t.numel() * (4 if t.dtype in (torch.int32, torch.int64) else t.element_size()) for t in csr)


def compact_bytes(masks: torch.Tensor, block: int) -> tuple[int, int]:
    """(bytes, slots per row) of the lowered constants (without compensation's bit words, equal in both forms)."""
    constants = BlockMask.from_dense(masks, block, block)
    return constants.nbytes, constants.row_width


def synthetic_masks(kind: str, heads: int, n: int, block: int, density: float, buckets: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    nb = num_blocks(n, block)
    out = []
    for _ in range(buckets):
        if kind == "random" or block == 64:
            out.append(random_block_mask(heads, nb, nb, density, generator=gen, block_m=block, block_n=block))
            continue
        coarse = random_block_mask(heads, num_blocks(n, 64), num_blocks(n, 64), density, generator=gen)
        f = 64 // block
        out.append(refine_block_mask(coarse, f, nb))
    return torch.stack(out)


def measure_synthetic(heads: int, n: int, buckets: int, blocks, densities, kinds, layers: int, seed: int) -> list[dict]:
    rows = []
    for block in blocks:
        for density in densities:
            for kind in (kinds if block < 64 else ["random"]):
                masks = synthetic_masks(kind, heads, n, block, density, buckets, seed)
                before = padded_bytes(masks, block)
                after, width = compact_bytes(masks, block)
                rows.append(dict(block=block, density=density, masks=kind if block < 64 else "any",
                                 kept=float(masks.float().mean()), slots=width, kv_blocks=masks.shape[-1],
                                 padded_mb=before / 2**20, compact_mb=after / 2**20, ratio=before / after,
                                 model_gb=after * layers / 2**30))
                del masks
    return rows


def measure_plan(path: Path) -> list[dict]:
    from paro_compile.plan import Plan

    plan = Plan.load(path)
    rows = []
    for site_id, site in plan.sites.items():
        masks = site.block_masks.bool()
        if bool(masks.all()):
            continue
        before = padded_bytes(masks, site.block_size)
        after, width = compact_bytes(masks, site.block_size)
        rows.append(dict(site=site_id, block=site.block_size, kept=float(masks.float().mean()), slots=width,
                         kv_blocks=masks.shape[-1], padded_mb=before / 2**20, compact_mb=after / 2**20,
                         ratio=before / after))
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", type=Path, default=None, help="measure a saved plan (.paro.safetensors)")
    ap.add_argument("--heads", type=int, default=48)
    ap.add_argument("--n", type=int, default=17776)
    ap.add_argument("--buckets", type=int, default=2)
    ap.add_argument("--blocks", default="64,32,16")
    ap.add_argument("--densities", default="0.3,0.2")
    ap.add_argument("--kinds", default="coherent,random")
    ap.add_argument("--layers", type=int, default=42, help="sites per model for the model-total column")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="folder for plan_memory.json and plan_memory.md")
    return ap.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    run_stamp = harness.stamp(__file__, argv)
    if args.plan is not None:
        rows = measure_plan(args.plan)
        print(f"{'site':40s} {'block':>5s} {'kept':>6s} {'slots/Nk':>10s} {'padded MB':>10s} {'compact MB':>11s} {'ratio':>6s}")
        for r in rows:
            print(f"{r['site'][:40]:40s} {r['block']:5d} {r['kept']:6.3f} {r['slots']:>4d}/{r['kv_blocks']:<5d} "
                  f"{r['padded_mb']:10.3f} {r['compact_mb']:11.3f} {r['ratio']:6.2f}")
    else:
        rows = measure_synthetic(args.heads, args.n, args.buckets, [int(b) for b in args.blocks.split(",")],
                                 [float(d) for d in args.densities.split(",")], args.kinds.split(","), args.layers,
                                 args.seed)
        print(f"per site: {args.heads} heads, N {args.n}, {args.buckets} step buckets; model total for {args.layers} sites")
        print(f"{'block':>5s} {'density':>7s} {'masks':>9s} {'slots/Nk':>10s} {'padded MB':>10s} {'compact MB':>11s} "
              f"{'ratio':>6s} {'model GB':>9s}")
        for r in rows:
            print(f"{r['block']:5d} {r['density']:7.2f} {r['masks']:>9s} {r['slots']:>4d}/{r['kv_blocks']:<5d} "
                  f"{r['padded_mb']:10.2f} {r['compact_mb']:11.2f} {r['ratio']:6.2f} {r['model_gb']:9.3f}")
    if args.out is not None:
        harness.write_results(args.out / "plan_memory.json", {"rows": rows}, run_stamp,
                              title="plan-constant memory per site: padded int32 CSR vs compact")
    return rows


if __name__ == "__main__":
    main()
