"""Cost and attention-level effect of skipped-block compensation (`compensate_skipped`) on the GPU.

Same process, same bf16 inputs: for each (shape, block, density) it times (`harness.time_ms`: triton.testing.do_bench
medians)
- ``ours`` (the full `paro_attention_triton` call, INT8 QKᵀ / FP8 PV) without and with compensation, with the mask's
  constants passed as the lowered op passes them (compact CSR; for blocks under 64 the grouped CSR of the shared 64-row
  tiles; the kept-block bit words);
- FlexAttention (compiled) with the same block mask, as full blocks;
- dense cuDNN SDPA once per shape (the speed-up reference).

Masks (``--masks``): ``random`` draws every block on its own (the worst case for shared tiles); ``coherent`` draws a
64-token mask and refines it to the block, so neighbouring query blocks keep the same KV blocks, as calibrated masks
tend to (the same at block 64).

It also reports each variant's rel-L2 against dense fp32 attention on *structured* inputs: keys and
queries follow a smooth function of the token position plus noise (video DiT attention concentrates
near the diagonal and pooled block means are informative there). Random Gaussian inputs would make every
sparse method look equally bad, so this is a check of the mechanism, not a quality claim (quality comes from
benchmarks/quality.py on the trained fixture).

Usage: python benchmarks/bench_compensation.py [--out DIR] [--shapes cogvideox-5b] [--blocks 64,32] [--masks random]
Writes DIR/compensation.json and DIR/compensation.md; prints the table.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_attention as BA  # noqa: E402  (benchmarks/bench_attention.py: bench, flex_block_mask, rel_l2, SHAPES)
import harness  # noqa: E402

DENSITIES = {64: (0.2, 0.3, 0.5), 32: (0.3, 0.2), 16: (0.3, 0.2)}


def structured_qkv(b, h, n, d, gen, device="cuda", dtype=torch.bfloat16):
    pos = torch.linspace(0, 8, n)
    freqs = torch.rand(d, generator=gen) * 6
    base = torch.sin(pos[:, None] * freqs[None, :] + torch.rand(d, generator=gen) * 6)
    q = 2.0 * base + 0.5 * torch.randn(b, h, n, d, generator=gen)
    k = 2.0 * base + 0.5 * torch.randn(b, h, n, d, generator=gen) + torch.randn(1, 1, 1, d, generator=gen)
    v = torch.randn(b, h, n, d, generator=gen)
    return tuple(x.to(device=device, dtype=dtype) for x in (q, k, v))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "compensation"))
    ap.add_argument("--shapes", nargs="*", default=["cogvideox-5b"])
    ap.add_argument("--blocks", default="64,32", help=f"comma list of mask blocks among {sorted(DENSITIES)}")
    ap.add_argument("--masks", default="random", choices=("random", "coherent"))
    ap.add_argument("--rep", type=int, default=100, help="timed milliseconds per measurement")
    ap.add_argument("--no-flex", action="store_true")
    args = ap.parse_args(argv)
    args.blocks = [int(b) for b in args.blocks.split(",") if b.strip()]
    unknown = [b for b in args.blocks if b not in DENSITIES]
    if unknown:
        ap.error(f"--blocks takes {sorted(DENSITIES)}, got {unknown}")
    unknown = [s for s in args.shapes if s not in BA.SHAPES]
    if unknown:
        ap.error(f"--shapes takes {sorted(BA.SHAPES)}, got {unknown}")
    return args


def block_mask(kind: str, heads: int, n: int, block: int, density: float, gen: torch.Generator) -> torch.Tensor:
    from paro_compile.kernels import tuning
    from paro_compile.kernels.block_mask import num_blocks

    nb = num_blocks(n, block)
    if kind == "random" or block == 64:
        return tuning.random_block_mask(heads, nb, nb, density, generator=gen, block_m=block, block_n=block)
    coarse = tuning.random_block_mask(heads, num_blocks(n, 64), num_blocks(n, 64), density, generator=gen)
    return tuning.refine_block_mask(coarse, 64 // block, nb)


def mask_arguments(mask: torch.Tensor, block: int) -> "BlockMask":
    """The block mask as the lowered op passes it (compact CSRs, the shared-tile walk for small blocks, kept bits)."""
    from paro_compile.kernels.block_mask import BlockMask

    return BlockMask.from_dense(mask, block, block, kept_bits=True).to("cuda")


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_compensation.py needs CUDA")
    from paro_compile.kernels.attention import paro_attention_triton
    from paro_compile.kernels.prologue import paro_prologue

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_stamp = harness.stamp(__file__, argv)
    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    rows: list[dict] = []
    gen = torch.Generator().manual_seed(0)
    for shape_name in args.shapes:
        b, h, n, d = BA.SHAPES[shape_name]
        q, k, v = structured_qkv(b, h, n, d, gen)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
            t_cudnn = BA.bench(lambda: F.scaled_dot_product_attention(q, k, v), args.rep)
        # fp32 dense reference on two heads of batch 0 (the full fp32 [N, N] map of every head does not fit)
        ref = F.scaled_dot_product_attention(q[:1, :2].float(), k[:1, :2].float(), v[:1, :2].float())
        rows.append({"shape": shape_name, "block": None, "density": 1.0, "method": "sdpa_cudnn", "ms": t_cudnn})
        print(f"{shape_name}: cuDNN dense {t_cudnn:.3f} ms")
        for block in args.blocks:
            for pooled in (False, True):  # the prologue's share of the cost (block means of K and V)
                t = BA.bench(lambda: paro_prologue(q, k, v, block_m=block, block_n=block, pooled=pooled), args.rep)
                rows.append({"shape": shape_name, "block": block, "density": None,
                             "method": "prologue+pooled" if pooled else "prologue", "ms": t})
                print(f"  prologue block {block} pooled={pooled}: {t:.3f} ms")
        for block in args.blocks:
            for dens in DENSITIES[block]:
                mask = block_mask(args.masks, h, n, block, dens, gen)
                plan_mask = mask_arguments(mask, block)
                kept = plan_mask.density
                case = {"shape": shape_name, "block": block, "masks": args.masks, "density": round(kept, 4)}
                t_flex = None
                if flex is not None:
                    try:
                        bm = BA.flex_block_mask(mask.cuda(), n, block)
                        kopt = {"BLOCK_M": block, "BLOCK_N": block} if block >= 32 else None
                        flex(q, k, v, block_mask=bm, kernel_options=kopt)
                        t_flex = BA.bench(lambda: flex(q, k, v, block_mask=bm, kernel_options=kopt), args.rep)
                        rows.append({**case, "method": "flex_attention", "ms": t_flex})
                    except Exception as error:  # noqa: BLE001  (a peer failing must not lose our numbers)
                        print(f"  flex failed at block {block}: {type(error).__name__}: {str(error)[:200]}")
                for comp in (False, True):
                    kw = dict(mask=plan_mask, compensate=comp)
                    o = paro_attention_triton(q, k, v, **kw)
                    t = BA.bench(lambda: paro_attention_triton(q, k, v, **kw), args.rep)
                    err = BA.rel_l2(o[:1, :2], ref)
                    rows.append({**case, "method": "ours+comp" if comp else "ours", "ms": t, "rel_l2_vs_dense_fp32": err,
                                 "vs_cudnn_dense": t / t_cudnn, "vs_flex": (t / t_flex) if t_flex else None})
                base, comp_row = rows[-2], rows[-1]
                comp_row["cost_vs_uncompensated"] = comp_row["ms"] / base["ms"]
                print(f"  block {block} density {kept:.3f}: ours {base['ms']:.3f} ms (err {base['rel_l2_vs_dense_fp32']:.3f})"
                      f"  +comp {comp_row['ms']:.3f} ms (x{comp_row['cost_vs_uncompensated']:.3f}, err "
                      f"{comp_row['rel_l2_vs_dense_fp32']:.3f})" + (f"  flex {t_flex:.3f} ms" if t_flex else ""), flush=True)
                harness.write_results(out_dir / "compensation.json", {"rows": rows}, run_stamp,
                                      title="skipped-block compensation: kernel cost (medians, ms)",
                                      columns=["shape", "block", "masks", "density", "method", "ms", "cost_vs_uncompensated",
                                               "vs_flex", "vs_cudnn_dense", "rel_l2_vs_dense_fp32"])
    return rows


if __name__ == "__main__":
    main()
