"""What the bitmap mask encoding costs per call: the walk decode (`mask_decode.decode_walk`) alone, and the attention
call with a bitmap-form mask (decode + kernel) against the same call with the CSR-form mask, at the 720p shapes of
Wan2.1-14B and HunyuanVideo (one attention site, B = 1, bf16, INT8 QKᵀ / FP8 PV, 64-token blocks).

Masks are `plan_memory.calibrated_like_masks` (the calibration's mandatory blocks, per-head densities over a 5x
range), built on the GPU in both encodings from the same boolean mask; the script first checks that the two calls
give the same output bit for bit. Per case it also reports the resident bytes of each encoding and the transient bytes
of the decoded walk (allocated per call, freed after it).

    python benchmarks/bench_mask_decode.py --out OUT [--models wan720,hunyuan720] [--densities 0.2,0.3]

Writes OUT/mask_decode.json and OUT/mask_decode.md. Needs CUDA.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import plan_memory  # noqa: E402

HEAD_DIM = 128
BLOCK = 64


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="wan720,hunyuan720", help=f"model shapes ({','.join(plan_memory.MODELS)})")
    ap.add_argument("--densities", default="0.2,0.3")
    ap.add_argument("--rep-ms", type=float, default=300.0, help="timed milliseconds per measurement")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    return ap.parse_args(argv)


def measure_case(model: "plan_memory.ModelShape", q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 masks: torch.Tensor, rep_ms: float) -> dict:
    """One site: both encodings of ``masks`` [H, nb, nb] (on the GPU), their bytes, and the timed calls."""
    from paro_compile.kernels.attention import paro_attention_triton
    from paro_compile.kernels.block_mask import BlockMask
    from paro_compile.kernels.mask_decode import decode_walk

    csr = BlockMask.from_dense(masks, BLOCK, BLOCK, encoding="csr")
    bitmap = BlockMask.from_dense(masks, BLOCK, BLOCK, encoding="bitmap")
    same = torch.equal(paro_attention_triton(q, k, v, mask=bitmap), paro_attention_triton(q, k, v, mask=csr))
    transient = decode_walk(bitmap).nbytes - bitmap.nbytes
    t_decode = harness.time_ms(lambda: decode_walk(bitmap), rep_ms=rep_ms)
    t_csr = harness.time_ms(lambda: paro_attention_triton(q, k, v, mask=csr), rep_ms=rep_ms)
    t_bitmap = harness.time_ms(lambda: paro_attention_triton(q, k, v, mask=bitmap), rep_ms=rep_ms)
    return dict(model=model.name, heads=model.heads, tokens=q.shape[2], density=round(csr.density, 4),
                same_output=same, walk_slots=csr.row_width, kv_blocks=csr.num_kv_blocks,
                csr_mb=csr.nbytes / 2**20, bitmap_mb=bitmap.nbytes / 2**20, transient_mb=transient / 2**20,
                decode_ms=t_decode.median_ms, csr_call_ms=t_csr.median_ms, bitmap_call_ms=t_bitmap.median_ms,
                overhead=t_bitmap.median_ms / t_csr.median_ms - 1.0)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_mask_decode.py needs CUDA")
    run_stamp = harness.stamp(__file__, argv)
    rows = []
    for name in args.models.split(","):
        model = plan_memory.MODELS[name]
        gen = torch.Generator().manual_seed(args.seed)
        q, k, v = (torch.randn(1, model.heads, model.grid.num_tokens, HEAD_DIM, generator=gen).to("cuda", torch.bfloat16)
                   for _ in range(3))
        for density in (float(d) for d in args.densities.split(",")):
            masks = plan_memory.calibrated_like_masks(model.grid, model.heads, density, 1, BLOCK, gen)[0].cuda()
            row = measure_case(model, q, k, v, masks, args.rep_ms)
            rows.append(row)
            print(f"{model.name:18s} d={row['density']:.3f} same={row['same_output']} csr {row['csr_mb']:.1f} MB / "
                  f"bitmap {row['bitmap_mb']:.1f} MB (+{row['transient_mb']:.1f} MB per call); decode "
                  f"{row['decode_ms']:.3f} ms, call csr {row['csr_call_ms']:.2f} ms, bitmap {row['bitmap_call_ms']:.2f} "
                  f"ms ({row['overhead']:+.2%})")
        torch.cuda.empty_cache()
    if args.out is not None:
        harness.write_results(args.out / "mask_decode.json", {"rows": rows}, run_stamp,
                              title="bitmap-form masks: walk decode + attention vs the CSR form (one 720p site)")
    return rows


if __name__ == "__main__":
    main()
