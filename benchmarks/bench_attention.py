"""Benchmark of the paro attention kernels against SDPA flash / cuDNN, FlexAttention and SageAttention.

Same process, same bf16 inputs [B, H, N, D]; random 64×64 block masks that keep the diagonal at densities
1.0 / 0.5 / 0.3 / 0.2, passed to our kernel as compact CSRs (as plans store them). For every (shape, density) it prints
and records:
- median time of each method (`harness.time_ms`: triton.testing.do_bench);
- dense-equivalent TFLOP/s = 4·B·H·N²·D / t (the same number for every method: time ratios);
- achieved TFLOP/s on kept blocks = 4·B·H·D·(kept query×key pairs) / t, and its fraction of the FP8
  matmul ceiling (torch._scaled_mm 8192³ e4m3 measured in this run; INT8 torch._int_mm too);
- rel-L2 of ours vs bf16 attention restricted to the same kept blocks (FlexAttention with the same
  block mask; dense: SDPA flash).

Ours = the full `paro_attention_triton` call (stats + fused permute/quantize prologue + block-sparse
INT8-QK/FP8-PV kernel); "ours+perm" adds a random per-head token permutation (gathered in the
prologue, scattered in the epilogue); "prologue" is the prologue alone.
INT4 QKᵀ (qk_bits=4) is a numerics mode: Hopper has no INT4 tensor cores, so it runs the INT8 mma
after unpacking and is expected to be a little *slower* than INT8 on an H100.

Usage: python benchmarks/bench_attention.py [--quick] [--out DIR]  (needs CUDA; ``paro bench`` runs it too).
Writes DIR/attention.json (every row, the ratios, the stamp), DIR/attention.md (the ratios) and DIR/attention.png.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

SHAPES = {
    "cogvideox-5b": (2, 48, 17776, 64),
    "flux-1024": (1, 24, 4608, 128),
    "long-32k": (1, 24, 32768, 128),
}
DENSITIES = (1.0, 0.5, 0.3, 0.2)


def bench(fn, rep=100) -> float:
    """Median ms of ``fn`` on the GPU."""
    return harness.time_ms(fn, "cuda", warmup_ms=25, rep_ms=rep).median_ms


def rel_l2(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def fp8_ceiling():
    n = 8192
    a = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device="cuda").to(torch.float8_e4m3fn)
    one = torch.tensor(1.0, device="cuda")
    out = {}
    try:
        t = bench(lambda: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
        out["fp8_scaled_mm_tflops"] = 2 * n**3 / t / 1e9
    except Exception as e:  # noqa: BLE001
        print(f"  fp8 ceiling failed: {e!r}")
    try:
        ai = torch.randint(-127, 127, (n, n), device="cuda", dtype=torch.int8)
        bi = torch.randint(-127, 127, (n, n), device="cuda", dtype=torch.int8)
        t = bench(lambda: torch._int_mm(ai, bi.t()))
        out["int8_int_mm_tops"] = 2 * n**3 / t / 1e9
    except Exception as e:  # noqa: BLE001
        print(f"  int8 ceiling failed: {e!r}")
    try:
        ah = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        t = bench(lambda: ah @ ah)
        out["bf16_mm_tflops"] = 2 * n**3 / t / 1e9
    except Exception as e:  # noqa: BLE001
        print(f"  bf16 ceiling failed: {e!r}")
    del a, b
    return out


def flex_block_mask(mask, n, block):
    """BlockMask with every kept block as a full block (no mask_mod evaluation), from a [H, Mq, Nk] bool mask."""
    from torch.nn.attention.flex_attention import BlockMask

    from paro_compile.kernels.block_mask import block_mask_to_csr

    counts, indices = block_mask_to_csr(mask)
    counts, indices = counts[None].contiguous(), indices[None].contiguous()
    zeros_c = torch.zeros_like(counts)
    return BlockMask.from_kv_blocks(zeros_c, indices.clone(), counts, indices, BLOCK_SIZE=block, seq_lengths=(n, n))


def kept_pairs(mask, n, bm=64, bn=64):
    """Number of (query, key) token pairs inside kept blocks, summed over heads ([H, Mq, Nk] mask)."""
    mq, nk = mask.shape[-2:]
    rows = torch.full((mq,), bm, dtype=torch.float64)
    rows[-1] = n - (mq - 1) * bm
    cols = torch.full((nk,), bn, dtype=torch.float64)
    cols[-1] = n - (nk - 1) * bn
    return float((mask.double().cpu() * rows[:, None] * cols[None, :]).sum())


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--quick", action="store_true", help="CogVideoX shape only, densities 1.0 and 0.2, fewer peers")
    ap.add_argument("--shapes", nargs="*", default=None, help=f"subset of {list(SHAPES)}")
    ap.add_argument("--densities", nargs="*", type=float, default=None)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--modes", action="store_true", help="also time qk_bits=4 and pv int8/fp16 on the first shape")
    ap.add_argument("--rep", type=int, default=100, help="timed milliseconds per measurement")
    args = ap.parse_args(argv)
    unknown = [name for name in args.shapes or () if name not in SHAPES]
    if unknown:
        ap.error(f"--shapes takes {list(SHAPES)}, got {unknown}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention.py needs a CUDA GPU")
        return 1
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from paro_compile.kernels import tuning
    from paro_compile.kernels.attention import last_launch_info, paro_attention_triton
    from paro_compile.kernels.prologue import paro_prologue
    from paro_compile.kernels.block_mask import BlockMask, num_blocks

    shapes = args.shapes or (["cogvideox-5b"] if args.quick else list(SHAPES))
    densities = args.densities or ([1.0, 0.2] if args.quick else list(DENSITIES))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_stamp = harness.stamp(__file__, argv)
    dev = torch.cuda.get_device_name()
    meta = {"autotune": tuning.autotune_enabled()}
    try:
        import sageattention  # noqa: F401
        from sageattention import sageattn

        meta["sageattention"] = getattr(sageattention, "__version__", "importable")
    except Exception as e:  # noqa: BLE001
        sageattn = None
        print(f"note: SageAttention not importable ({e!r}); skipping it")
        meta["sageattention"] = None
    print(json.dumps(meta))
    ceil = fp8_ceiling()
    meta.update(ceil)
    print("ceilings:", {k: round(v, 1) for k, v in ceil.items()})
    fp8_peak = ceil.get("fp8_scaled_mm_tflops", float("nan"))

    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)

    rows = []
    gen = torch.Generator().manual_seed(1234)

    def record(shape_name, shape, density, method, ms, pairs, err=None, note=""):
        b, h, n, d = shape
        dense_tf = 4 * b * h * n * n * d / (ms * 1e-3) / 1e12
        kept_tf = 4 * b * d * pairs / (ms * 1e-3) / 1e12
        row = dict(shape=shape_name, B=b, H=h, N=n, D=d, density=density, method=method, ms=round(ms, 4),
                   dense_equiv_tflops=round(dense_tf, 1), kept_tflops=round(kept_tf, 1),
                   kept_frac_of_fp8_peak=round(kept_tf / fp8_peak, 3) if fp8_peak == fp8_peak else None,
                   rel_l2=None if err is None else float(f"{err:.3e}"), note=note)
        rows.append(row)
        print(f"  {shape_name:13s} dens={density:4.2f} {method:16s} {ms:9.3f} ms  dense-eq {dense_tf:7.1f} TFLOP/s  "
              f"kept {kept_tf:7.1f} TFLOP/s" + (f"  rel-L2 {err:.2e}" if err is not None else "") + (f"  [{note}]" if note else ""),
              flush=True)
        return row

    def write_outputs(shapes_done):
        shapes = shapes_done
        # ---- ratios vs peers
        summary = []
        for name in shapes:
            peer_ms = {r["method"]: r["ms"] for r in rows if r["shape"] == name and r["density"] == 1.0}
            for dens in densities:
                ours = [r for r in rows if r["shape"] == name and r["density"] == dens and r["method"] == "ours"]
                flexr = [r for r in rows if r["shape"] == name and r["density"] == dens and r["method"] == "flex_attention"]
                if not ours:
                    continue
                s = {"shape": name, "density": dens, "ours_ms": ours[0]["ms"], "rel_l2": ours[0]["rel_l2"],
                     "kept_tflops": ours[0]["kept_tflops"], "kept_frac_of_fp8_peak": ours[0]["kept_frac_of_fp8_peak"]}
                for peer in ("sdpa_flash", "sdpa_cudnn", "sageattn_1.0.6"):
                    if peer in peer_ms:
                        s[f"ours/{peer}"] = round(ours[0]["ms"] / peer_ms[peer], 3)
                if flexr:
                    s["ours/flex"] = round(ours[0]["ms"] / flexr[0]["ms"], 3)
                summary.append(s)
        print("== ratios (time ours / time peer; < 1 = ours faster)")
        for s in summary:
            print("  " + json.dumps(s))

        harness.write_results(out_dir / "attention.json",
                              {"meta": meta, "summary": summary, "rows": rows,
                               "autotune_cache": str(tuning.cache_dir())}, run_stamp,
                              title="paro attention against its peers (time ours / time peer; < 1 = ours faster)",
                              table=summary)
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4.2), squeeze=False)
            for ax, name in zip(axes[0], shapes):
                sel = [r for r in rows if r["shape"] == name]
                for method, style in (("ours", "o-"), ("ours+perm", "s--"), ("flex_attention", "^-")):
                    pts = sorted((r["density"], r["ms"]) for r in sel if r["method"] == method)
                    if pts:
                        ax.plot(*zip(*pts), style, label=method)
                for method, color in (("sdpa_flash", "gray"), ("sdpa_cudnn", "black"), ("sageattn_1.0.6", "tab:green")):
                    ms = [r["ms"] for r in sel if r["method"] == method]
                    if ms:
                        ax.axhline(ms[0], color=color, ls=":", label=f"{method} (dense)")
                b, h, n, d = SHAPES[name]
                ax.set_title(f"{name} B{b} H{h} N{n} D{d}")
                ax.set_xlabel("block density")
                ax.set_ylabel("ms (median)")
                ax.set_ylim(bottom=0)
                ax.grid(alpha=0.3)
            axes[0][0].legend(fontsize=7)
            fig.suptitle(f"paro attention on {dev} (torch {torch.__version__}, triton {triton.__version__})", fontsize=9)
            fig.tight_layout()
            fig.savefig(out_dir / "attention.png", dpi=120)
        except Exception as e:  # noqa: BLE001
            print(f"plot failed: {e!r}")

    done = []
    for name in shapes:
        shape = SHAPES[name]
        b, h, n, d = shape
        print(f"== {name} B{b} H{h} N{n} D{d}", flush=True)
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        perm = torch.stack([torch.randperm(n, generator=gen) for _ in range(h)]).cuda()
        full_pairs = float(h * n * n)
        # ---- dense peers
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            ref_dense = F.scaled_dot_product_attention(q, k, v)
            record(name, shape, 1.0, "sdpa_flash", bench(lambda: F.scaled_dot_product_attention(q, k, v), args.rep), full_pairs)
        try:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                o = F.scaled_dot_product_attention(q, k, v)
                record(name, shape, 1.0, "sdpa_cudnn", bench(lambda: F.scaled_dot_product_attention(q, k, v), args.rep),
                       full_pairs, rel_l2(o, ref_dense))
        except Exception as e:  # noqa: BLE001
            print(f"  cuDNN SDPA failed: {type(e).__name__}: {str(e)[:300]}")
        if sageattn is not None:
            try:
                o = sageattn(q, k, v, tensor_layout="HND", is_causal=False)
                record(name, shape, 1.0, "sageattn_1.0.6", bench(lambda: sageattn(q, k, v, tensor_layout="HND", is_causal=False), args.rep),
                       full_pairs, rel_l2(o, ref_dense))
            except Exception as e:  # noqa: BLE001
                print(f"  SageAttention failed: {type(e).__name__}: {str(e)[:300]}")
        t = bench(lambda: paro_prologue(q, k, v, perm=perm), args.rep)
        record(name, shape, 1.0, "prologue(perm)", t, full_pairs, note="stats + fused permute/quantize only")
        # ---- per density
        for dens in densities:
            mq, nk = num_blocks(n, 64), num_blocks(n, 64)
            if dens >= 1.0:
                mask = torch.ones(h, mq, nk, dtype=torch.bool)
                plan_mask = None
            else:
                mask = tuning.random_block_mask(h, mq, nk, dens, generator=gen)
                # as plans store it: compact CSR (rows cut to the largest count, int16 indices)
                plan_mask = BlockMask.from_dense(mask).to("cuda")
            pairs = kept_pairs(mask, n)
            real_dens = pairs / full_pairs
            ref = ref_dense
            if flex is not None:
                note = "BlockMask 64x64 full blocks"
                try:
                    try:
                        bm = flex_block_mask(mask.cuda(), n, 64)
                        kopt = {"BLOCK_M": 64, "BLOCK_N": 64}
                        o = flex(q, k, v, block_mask=bm, kernel_options=kopt)
                    except Exception as e:  # noqa: BLE001
                        # Fall back to 128-row query blocks (union of two 64-row mask rows: more work for flex).
                        print(f"  flex with 64x64 blocks failed ({type(e).__name__}: {str(e)[:300]}); using 128x64")
                        m2 = mask
                        if mq % 2:
                            m2 = torch.cat([mask, torch.zeros(h, 1, nk, dtype=torch.bool)], 1)
                        m2 = m2.view(h, -1, 2, nk).any(2)
                        bm = flex_block_mask(m2.cuda(), n, (128, 64))
                        kopt = {"BLOCK_M": 128, "BLOCK_N": 64}
                        o = flex(q, k, v, block_mask=bm, kernel_options=kopt)
                        note = "BlockMask 128x64 (union of 2 mask rows)"
                    torch.cuda.synchronize()
                    if dens < 1.0:
                        ref = o
                    record(name, shape, dens, "flex_attention", bench(lambda: flex(q, k, v, block_mask=bm, kernel_options=kopt), args.rep), pairs,
                           rel_l2(o, ref_dense) if dens >= 1.0 else None, note=note)
                except Exception as e:  # noqa: BLE001
                    print(f"  FlexAttention failed: {type(e).__name__}: {str(e)[:300]}")
            kw = dict(mask=plan_mask)
            o = paro_attention_triton(q, k, v, **kw)  # autotunes on first call (or reads the disk cache)
            cfg = last_launch_info()
            err = rel_l2(o, ref) if (dens >= 1.0 or ref is not ref_dense) else None
            record(name, shape, dens, "ours", bench(lambda: paro_attention_triton(q, k, v, **kw), args.rep), pairs, err,
                   note=f"int8 QK, fp8 PV; real density {real_dens:.3f}; cfg {cfg.get('kwargs')} w{cfg.get('num_warps')} s{cfg.get('num_stages')}")
            o = paro_attention_triton(q, k, v, perm=perm, **kw)
            record(name, shape, dens, "ours+perm", bench(lambda: paro_attention_triton(q, k, v, perm=perm, **kw), args.rep), pairs)
            if args.modes and name == shapes[0]:
                for bits, pv in ((4, "fp8"), (8, "int8"), (8, "fp16")):
                    o = paro_attention_triton(q, k, v, qk_bits=bits, pv_dtype=pv, **kw)
                    e2 = rel_l2(o, ref) if (dens >= 1.0 or ref is not ref_dense) else None
                    note = "INT4 numerics: no INT4 tensor cores on Hopper (unpacked to INT8 mma)" if bits == 4 else ""
                    record(name, shape, dens, f"ours_qk{bits}_pv{pv}",
                           bench(lambda: paro_attention_triton(q, k, v, qk_bits=bits, pv_dtype=pv, **kw), args.rep), pairs, e2, note=note)
            del o
        del q, k, v
        torch.cuda.empty_cache()
        done.append(name)
        write_outputs(done)  # partial results survive a timeout

    print(f"wrote {out_dir}/attention.json, attention.md, attention.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
