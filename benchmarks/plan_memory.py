"""Device memory of a plan's mask constants per attention site: padded int32 CSRs vs the compact form the lowering
stores (`block_mask.trim_csr`: rows cut to the largest kept count, int16 indices). CPU only.

Synthetic CogVideoX-5B-shaped sites (48 heads, 17,776 tokens, 2 step buckets) with two kinds of masks: "random"
(kept blocks drawn independently per query block: the widest unions for grouped tiles) and "coherent" (a random
64-block mask refined to the finer block: neighbouring query blocks keep the same KV blocks, as calibrated PARO masks
tend to). ``--plan`` measures the sites of a saved plan instead.

    python benchmarks/plan_memory.py --out OUT            # plan_memory.json + .md; about 4 GB of RAM
    python benchmarks/plan_memory.py --plan my.paro.safetensors

``--models wan720,hunyuan720`` measures whole models instead: the constants the lowering stores for a site
(`lower.site_constants`: kernel permutation, the masks of every step bucket in the encoding the lowering picks, a
bitmap or a compact CSR) of Wan2.1-14B and HunyuanVideo at 720p, with calibrated-like masks (mandatory blocks,
per-head densities spread over 5x), times the model's attention sites, against its bf16 weights; "csr" is the same
site with compact CSR masks, "before" the CSR constants at their earlier widths (int64 permutation, int32 counts).

    python benchmarks/plan_memory.py --models wan720,hunyuan720 --out OUT   # plan_memory_models.json + .md
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

from paro_compile.grid import TokenGrid  # noqa: E402
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


@dataclass(frozen=True)
class ModelShape:
    """The attention sites of a video transformer at one resolution: every self-attention site has this shape."""

    name: str
    heads: int
    grid: TokenGrid
    layers: int
    params: float

    @property
    def weight_bytes(self) -> float:
        return 2.0 * self.params  # bf16


MODELS = {
    "wan720": ModelShape("Wan2.1-14B 720p", 40, TokenGrid(frames=21, height=45, width=80), 40, 14.0e9),
    "hunyuan720": ModelShape("HunyuanVideo 720p", 24,
                             TokenGrid(frames=33, height=45, width=80, text_tokens=256, text_position="suffix"), 60,
                             12.8e9),
}


def head_densities(heads: int, density: float, generator: torch.Generator, spread: float = 5.0) -> torch.Tensor:
    """Per-head densities averaging ``density``, log-uniform over a ``spread``-fold range (calibrated plans give some
    heads several times the blocks of others)."""
    raw = torch.exp(torch.rand(heads, generator=generator) * math.log(spread))
    return (raw / raw.mean() * density).clamp(0.02, 1.0)


def calibrated_like_masks(grid: TokenGrid, heads: int, density: float, buckets: int, block: int,
                          generator: torch.Generator) -> torch.Tensor:
    """bool [S, H, nb, nb]: per step bucket and head, the calibration's mandatory blocks (diagonal; every block of a
    text row or column) and random blocks at the head's density (`head_densities`, drawn per bucket). Blocks are
    chosen per head map, as `calibration.masks.select_blocks` does, so kept counts vary from row to row."""
    from paro_compile.calibration.masks import mandatory_blocks

    nb = num_blocks(grid.num_tokens, block)
    mandatory = mandatory_blocks(grid, block)
    masks = torch.empty(buckets, heads, nb, nb, dtype=torch.bool)
    for s in range(buckets):
        for h, d in enumerate(head_densities(heads, density, generator).tolist()):
            masks[s, h] = (torch.rand(nb, nb, generator=generator) < d) | mandatory
    return masks


PREVIOUS_ITEM_BYTES = {"perm": 8, "counts": 4}
"""Bytes per entry where the lowering's constants were wider before: int64 permutations and int32 counts (indices
were already int16)."""


def previous_bytes(constants, plan_buckets: int) -> int:
    """What the lowering stored for the same site before int16 counts, int32 permutations and distinct step buckets:
    from the shapes of the constants it stores now."""
    total = 0
    for name, tensor in constants.tensors.items():
        size = tensor.numel() * PREVIOUS_ITEM_BYTES.get(name, tensor.element_size())
        total += size if name == "perm" else size * plan_buckets // constants.step_buckets
    return total


def measure_model(model: ModelShape, density: float, buckets: int, block: int = 64, seed: int = 0,
                  masks: Optional[torch.Tensor] = None, encoding: str = "auto") -> dict:
    """Device bytes of one site's plan constants (`lower.site_constants`, the lowering's own code: kernel permutation
    of mixed per-head orders and the masks of every step bucket in ``encoding``, by default the lowering's per-site
    choice) and of the model's sites, against the bf16 weights; ``csr_*`` the same site with compact CSR masks.
    ``masks`` [S, H, nb, nb] (default `calibrated_like_masks`) may be passed to reuse them."""
    from paro_compile.grid import candidate_orders, orders_permutation
    from paro_compile.passes.lower import site_constants

    generator = torch.Generator().manual_seed(seed)
    if masks is None:
        masks = calibrated_like_masks(model.grid, model.heads, density, buckets, block, generator)
    orders = candidate_orders(model.grid)
    perm = orders_permutation(model.grid, [orders[int(i)] for i in torch.randint(len(orders), (model.heads,),
                                                                                  generator=generator)])
    tokens = model.grid.num_tokens
    csr_constants = site_constants(perm, masks, block, model.heads, tokens, validate=False, encoding="csr")
    constants = csr_constants if encoding == "csr" else \
        site_constants(perm, masks, block, model.heads, tokens, validate=False, encoding=encoding)
    perm_bytes = constants.tensors["perm"].numel() * constants.tensors["perm"].element_size()
    site_bytes, csr_bytes = constants.nbytes, csr_constants.nbytes
    # From `lower.SHARED_PERMUTATION_MIN_BYTES` per site, the lowering stores a graph's kernel permutations as one
    # table of distinct rows (at most one per candidate order) plus int64 row ids per site and head
    # (`lower.SharedPermutationRows`); smaller ones stay [H, N] per site.
    from paro_compile.passes.lower import SHARED_PERMUTATION_MIN_BYTES

    shared = perm_bytes >= SHARED_PERMUTATION_MIN_BYTES
    perm_rows = min(len(orders), model.layers * model.heads) if shared else model.layers * model.heads
    perm_model_bytes = (perm_rows * tokens * constants.tensors["perm"].element_size() + model.layers * model.heads * 8
                        if shared else perm_bytes * model.layers)
    mask_bytes, csr_mask_bytes = site_bytes - perm_bytes, csr_bytes - perm_bytes
    counts = csr_constants.mask.counts
    kept = int(masks.sum())
    site_previous = previous_bytes(csr_constants, buckets)
    share = lambda size: size * model.layers / model.weight_bytes  # noqa: E731
    model_bytes, csr_model_bytes = mask_bytes * model.layers + perm_model_bytes, csr_mask_bytes * model.layers + perm_model_bytes
    return dict(
        model=model.name, heads=model.heads, tokens=tokens, sites=model.layers, density=density,
        kept=kept / masks.numel(), step_buckets=buckets, kv_blocks=int(masks.shape[-1]), encoding=constants.mask.encoding,
        slots=constants.mask.row_width, max_count=int(counts.max()), mean_count=float(counts.float().mean()),
        dtypes={name: str(t.dtype).replace("torch.", "") for name, t in constants.tensors.items()},
        perm_mb=perm_bytes / 2**20, mask_mb=mask_bytes / 2**20, site_mb=site_bytes / 2**20,
        perm_shared=shared, perm_rows=perm_rows, perm_model_mb=perm_model_bytes / 2**20,
        csr_site_mb=csr_bytes / 2**20, previous_site_mb=site_previous / 2**20,
        model_gb=model_bytes / 2**30, folded_model_gb=mask_bytes * model.layers / 2**30,
        csr_model_gb=csr_model_bytes / 2**30, previous_model_gb=site_previous * model.layers / 2**30,
        weights_gb=model.weight_bytes / 2**30,
        share=model_bytes / model.weight_bytes, folded_share=share(mask_bytes),
        unshared_perm_share=share(site_bytes),
        csr_share=csr_model_bytes / model.weight_bytes, csr_folded_share=share(csr_mask_bytes),
        previous_share=share(site_previous),
        # An encoding the kernels do not read, for scale: every kept block listed once (int16, no padding to the
        # widest row).
        ragged_csr_share=share(kept * 2 + counts.numel() * 4 * buckets // constants.step_buckets),
        bitmap_share=masks.numel() / 8 * model.layers / model.weight_bytes,
    )


def measure_models(names: Sequence[str], densities: Sequence[float], bucket_counts: Sequence[int], block: int,
                   seed: int) -> list[dict]:
    """`measure_model` for every model, density and step-bucket count; masks are drawn once for the largest count and
    its first buckets serve the smaller ones."""
    rows = []
    for name in names:
        model = MODELS[name]
        for density in densities:
            generator = torch.Generator().manual_seed(seed)
            masks = calibrated_like_masks(model.grid, model.heads, density, max(bucket_counts), block, generator)
            for buckets in sorted(bucket_counts):
                rows.append(measure_model(model, density, buckets, block, seed, masks[:buckets]))
            del masks
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
    ap.add_argument("--models", default=None,
                    help=f"measure whole models instead ({','.join(MODELS)}): every site's plan constants against the "
                         "bf16 weights, with --densities and --step-buckets")
    ap.add_argument("--step-buckets", default="1,2", help="step-bucket counts for --models")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for plan_memory.json and plan_memory.md (plan_memory_models.* with --models)")
    return ap.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    run_stamp = harness.stamp(__file__, argv)
    if args.models is not None:
        rows = measure_models(args.models.split(","), [float(d) for d in args.densities.split(",")],
                              [int(b) for b in args.step_buckets.split(",")], int(args.blocks.split(",")[0]), args.seed)
        print(f"{'model':18s} {'density':>7s} {'S':>2s} {'masks':>6s} {'slots/Nk':>10s} {'perm MB':>8s} "
              f"{'mask MB':>8s} {'model GB':>9s} {'share':>6s} {'folded':>7s} {'csr':>6s} {'before':>7s}")
        for r in rows:
            print(f"{r['model']:18s} {r['density']:7.2f} {r['step_buckets']:2d} {r['encoding']:>6s} "
                  f"{r['slots']:>4d}/{r['kv_blocks']:<5d} {r['perm_mb']:8.2f} {r['mask_mb']:8.2f} {r['model_gb']:9.3f} "
                  f"{r['share']:6.1%} {r['folded_share']:7.1%} {r['csr_share']:6.1%} {r['previous_share']:7.1%}")
        if args.out is not None:
            harness.write_results(args.out / "plan_memory_models.json", {"rows": rows}, run_stamp,
                                  title="GPU-resident plan constants of whole models against their bf16 weights "
                                        "(CPU-measured byte counts of the lowering's constants)",
                                  table=[{k: v for k, v in r.items() if k != "dtypes"} for r in rows])
        return rows
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
