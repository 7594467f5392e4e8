"""Kernel variants of the paro attention on the CogVideoX shape: code variant × fixed launch config.

One short run that answers "which kernel variant / config is fastest, and is it
still right":

- shape B2 H48 N17776 D64 bf16 (``--shape``; ``--tiny``: B1 H2 N200 on the CPU under TRITON_INTERPRET=1);
- dense and density 0.2 (random 64×64 block mask keeping the diagonal, `tuning.random_block_mask`);
- every kernel variant of `KERNEL_VARIANTS` (PV dtype × exp2 mode × code-generation switches of
  `attention.KERNEL_VARIANT_DEFAULTS`) × a few fixed configs (TILE_M / num_warps / num_stages),
  launched through ``config=`` / ``variant=`` (no autotune);
- peers in the same run: cuDNN SDPA (dense) and compiled FlexAttention with the same block mask;
- rel-L2 of each variant vs the first variant's first config and vs the bf16 peer (SDPA dense /
  Flex sparse: the quantization error of that PV dtype);
- ``--int4``: INT4 diagnostic: prologue values vs torch quantization, kernel vs reference at
  the shape (2, 3, 2010, 64), INT4 and INT8.

Times are `harness.time_ms` medians (triton.testing.do_bench on the GPU). Prints a table per density sorted by time
and writes ``--out`` (JSON, and a markdown table beside it) after every measurement, so a run cut by a timeout still
leaves its numbers. Usage on the GPU::

    python benchmarks/kernel_variants.py --out $OUT/variants.json

and on a CPU (smoke test)::

    TRITON_INTERPRET=1 python benchmarks/kernel_variants.py --tiny --out /tmp/variants.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if "--tiny" in sys.argv and not os.environ.get("TRITON_INTERPRET"):
    try:
        import torch as _t

        if not _t.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from bench_attention import flex_block_mask, rel_l2  # noqa: E402
from paro_compile.kernels import reference as R  # noqa: E402
from paro_compile.kernels import tuning  # noqa: E402
from paro_compile.kernels.block_mask import BlockMask as ParoBlockMask  # noqa: E402
from paro_compile.kernels.attention import paro_attention_triton  # noqa: E402
from paro_compile.kernels.prologue import dequantized_views, paro_prologue  # noqa: E402

# (TILE_M, num_warps, num_stages); TILE_M 128 only for the dense mask.
DENSE_CONFIGS = [(128, 8, 2, None), (64, 4, 3, None)]
SPARSE_CONFIGS = [(64, 4, 3, None), (64, 4, 2, None)]

# name -> (pv_dtype, exp2_mode, code-generation switches of attention.KERNEL_VARIANT_DEFAULTS)
KERNEL_VARIANTS = {
    "fp8 unfused": ("fp8", 0, {"fused_softmax": False}),
    "fp8": ("fp8", 0, {}),
    "fp8 no-prefetch": ("fp8", 0, {"prefetch_qk": False}),
    "fp8 ftz": ("fp8", 3, {}),
    "fp8 ftz ws": ("fp8", 3, {"warp_specialize": True}),
    "int8 ftz": ("int8", 3, {}),
    "bf16 ftz": ("fp16", 3, {}),
    "bf16 ftz intround": ("fp16", 3, {"p_round_int": True}),
    "fp8 poly-half": ("fp8", 2, {}),
    "fp8 prefetch": ("fp8", 0, {"prefetch_qk": True}),
    "bf16 prefetch": ("fp16", 0, {"prefetch_qk": True}),
    "bf16": ("fp16", 0, {}),
    "fp8 tma": ("fp8", 0, {"tma_kv": True}),
    "fp8 tma prefetch": ("fp8", 0, {"tma_kv": True, "prefetch_qk": True}),
    "fp8 two-step exp-arg": ("fp8", 0, {"fma_exp_arg": False}),
    "fp8 lazy-rescale": ("fp8", 0, {"lazy_rescale": True}),
    "fp8 tma lazy-rescale": ("fp8", 0, {"tma_kv": True, "lazy_rescale": True}),
}


def parse_configs(spec: str) -> list[tuple]:
    """``"128,8,2;64,4,3,168"`` → [(TILE_M, num_warps, num_stages, maxnreg or None), ...]."""
    out = []
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        vals = [int(x) for x in item.split(",")]
        if len(vals) not in (3, 4):
            raise ValueError(f"a config is TILE_M,num_warps,num_stages[,maxnreg], got {item!r}")
        out.append((*vals[:3], vals[3] if len(vals) == 4 and vals[3] > 0 else None))
    return out


def int4_diagnostic(dev, tiny: bool) -> dict:
    """Where does INT4 differ from the reference on this backend: prologue values or the kernel?"""
    gen = torch.Generator().manual_seed(192678357)
    b, h, n, d = (1, 2, 150, 64) if tiny else (2, 3, 2010, 64)
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
    k = k + 2.0 * torch.randn(1, 1, 1, d, generator=gen)
    q = q * 1.5
    pm = torch.stack([torch.randperm(n, generator=gen) for _ in range(h)])
    mq = R.num_blocks(n, 64)
    mask = tuning.random_block_mask(h, mq, mq, 0.3, generator=gen)
    plan_mask = ParoBlockMask.from_dense(mask).to(dev)
    q, k, v = (x.to(torch.bfloat16).to(dev) for x in (q, k, v))
    pm = pm.to(dev)
    res = {"shape": [b, h, n, d]}
    for bits in (4, 8):
        p = paro_prologue(q, k, v, perm=pm, qk_bits=bits, pv_dtype="fp8")
        got = {key: val.cpu() for key, val in dequantized_views(p).items()}
        qf, kf = (R.permute_tokens(x.cpu(), pm.cpu()).float() for x in (q, k))
        kf = kf - kf.mean(2, keepdim=True)
        qv, _ = R.quantize_blockwise(qf, 64, bits)
        kv, _ = R.quantize_blockwise(kf, 64, bits)
        dq = (got["q"].view(b, h, n, -1) - qv).abs()
        dk = (got["k"].view(b, h, n, -1) - kv).abs()
        kw = dict(perm=pm, mask=plan_mask, qk_bits=bits, pv_dtype="fp8")
        out = paro_attention_triton(q, k, v, exp2_mode=0, **kw)
        ref = R.paro_attention_reference(q, k, v, **kw)
        res[f"int{bits}"] = {
            "q_values_differing": int((dq > 0).sum()), "k_values_differing": int((dk > 0).sum()),
            "k_max_diff": float(dk.max()), "kernel_vs_reference_rel_l2": rel_l2(out, ref),
            "kernel_nan": bool(out.isnan().any()),
        }
    return res


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="B1 H2 N200 on the CPU (TRITON_INTERPRET=1)")
    ap.add_argument("--out", default="kernel_variants.json")
    ap.add_argument("--rep", type=int, default=100, help="timed milliseconds per variant (CPU: at least one call)")
    ap.add_argument("--variants", default=",".join(KERNEL_VARIANTS),
                    help=f"comma list of kernel variants (default all): {', '.join(KERNEL_VARIANTS)}")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--dense-configs", default=None, help='"TILE_M,warps,stages[,maxnreg];..." (default: DENSE_CONFIGS)')
    ap.add_argument("--sparse-configs", default=None, help="as --dense-configs, for the sparse densities")
    ap.add_argument("--compensate", action="store_true", help="skipped-block compensation on the sparse densities")
    ap.add_argument("--densities", default="1.0,0.2", help="comma list; < 1 = random block mask keeping the diagonal")
    ap.add_argument("--int4", action="store_true", help="also run the INT4 diagnostic")
    ap.add_argument("--shape", default=None,
                    help="B,H,N,D of the GPU run (default 2,48,17776,64, CogVideoX-5B; 1,40,75600,128 is Wan 720p)")
    args = ap.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in KERNEL_VARIANTS]
    if bad:
        ap.error(f"unknown variants {bad}; known: {list(KERNEL_VARIANTS)}")
    for flag in ("dense_configs", "sparse_configs"):
        if getattr(args, flag):
            try:
                setattr(args, flag, parse_configs(getattr(args, flag)))
            except ValueError as error:
                ap.error(str(error))
    return args


def main(argv=None):
    args = parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("no CUDA: run with --tiny (TRITON_INTERPRET=1)")
    dev = "cuda" if cuda else "cpu"
    os.environ["PARO_AUTOTUNE"] = "0"  # fixed configs only (config= bypasses it anyway)
    variants = args.variants
    b, h, n, d = (1, 2, 200, 64) if args.tiny else tuple(int(x) for x in (args.shape or "2,48,17776,64").split(","))
    dtype = torch.bfloat16
    def bench(fn) -> float:
        return harness.time_ms(fn, dev, warmup_ms=10, rep_ms=args.rep).median_ms

    t_start = time.time()
    run_stamp = harness.stamp(__file__, argv)
    results = {"device": "cuda" if cuda else "cpu (interpreter)", "shape": [b, h, n, d], "dtype": "bfloat16", "rows": [],
               "int4": None}
    out_path = Path(args.out)

    def save():
        results["elapsed_s"] = round(time.time() - t_start, 1)
        harness.write_results(out_path, results, run_stamp, title="paro kernel variants × fixed launch configs (ms)",
                              columns=["density", "method", "ms", "rel_l2_vs_mode0", "rel_l2_vs_peer"])

    def log(msg):
        print(f"[{time.time() - t_start:6.1f}s] {msg}", flush=True)

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(dtype).to(dev) for _ in range(3))
    mq = R.num_blocks(n, 64)
    flex = None
    if cuda and not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)

    dense_configs = args.dense_configs or DENSE_CONFIGS
    sparse_configs = args.sparse_configs or SPARSE_CONFIGS
    for dens in (float(x) for x in args.densities.split(",") if x.strip()):
        if dens >= 1.0:
            mask, plan_mask, configs = None, None, dense_configs
        else:
            mask = tuning.random_block_mask(h, mq, mq, dens, generator=gen)
            plan_mask = ParoBlockMask.from_dense(mask).to(dev)
            configs = sparse_configs
        if not cuda:
            configs = sorted({(c[0], 4, 1, None) for c in configs})
        rows = []

        def add(method, ms, err_base=None, err_peer=None, **extra):
            row = {"density": dens, "method": method, "ms": round(ms, 4), "rel_l2_vs_mode0": err_base,
                   "rel_l2_vs_peer": err_peer, **extra}
            rows.append(row)
            results["rows"].append(row)
            save()
            log(f"dens {dens}: {method:34s} {ms:9.3f} ms  vs first {err_base if err_base is None else f'{err_base:.2e}'}"
                f"  vs peer {err_peer if err_peer is None else f'{err_peer:.2e}'}")

        # ---- peers ----
        peer = None
        if dens >= 1.0:
            if cuda:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    peer = F.scaled_dot_product_attention(q, k, v)
                    add("sdpa_cudnn", bench(lambda: F.scaled_dot_product_attention(q, k, v)))
            else:
                peer = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(dtype)
        elif flex is not None:
            try:
                bm = flex_block_mask(mask.to(dev), n, 64)
                kopt = {"BLOCK_M": 64, "BLOCK_N": 64}
                peer = flex(q, k, v, block_mask=bm, kernel_options=kopt)
                torch.cuda.synchronize()
                add("flex_attention (compiled, 64x64)", bench(lambda: flex(q, k, v, block_mask=bm, kernel_options=kopt)))
            except Exception as e:  # noqa: BLE001
                log(f"FlexAttention failed: {type(e).__name__}: {str(e)[:300]}")
        if peer is None and not cuda:  # CPU: the quantized reference of the same mask
            peer = R.paro_attention_reference(q, k, v, mask=plan_mask)

        # ---- our kernel variants ----
        base = None
        for vname in variants:
            pv, mode, knobs = KERNEL_VARIANTS[vname]
            for tile_m, warps, stages, maxnreg in configs:
                cfg = {"TILE_M": tile_m, "num_warps": warps, "num_stages": stages, "maxnreg": maxnreg}
                name = (f"ours {vname}{' +comp' if args.compensate and plan_mask is not None else ''} tile{tile_m} w{warps} "
                        f"s{stages}" + (f" r{maxnreg}" if maxnreg else ""))
                try:
                    fn = lambda: paro_attention_triton(q, k, v, mask=plan_mask,  # noqa: E731
                                                       pv_dtype=pv, exp2_mode=mode, config=cfg, variant=knobs,
                                                       compensate=args.compensate)
                    o = fn()
                    if cuda:
                        torch.cuda.synchronize()
                    if base is None:
                        base = o
                    ms = bench(fn)
                    add(name, ms, rel_l2(o, base), rel_l2(o, peer) if peer is not None else None,
                        variant=vname, pv_dtype=pv, exp2_mode=mode, knobs=knobs, config=cfg)
                except Exception as e:  # noqa: BLE001
                    log(f"{name} failed: {type(e).__name__}: {str(e)[:300]}")
        if not cuda:  # the first variant vs the reference of the same function
            ref = R.paro_attention_reference(q, k, v, mask=plan_mask, compensate=args.compensate)
            results.setdefault("tiny_first_vs_reference", {})[str(dens)] = rel_l2(base, ref)
        print(f"\n== density {dens}: sorted by time ==")
        peer_ms = min((r["ms"] for r in rows if not r["method"].startswith("ours")), default=None)
        for r in sorted(rows, key=lambda r: r["ms"]):
            ratio = f"{r['ms'] / peer_ms:6.3f}x peer" if peer_ms else ""
            e0 = "" if r["rel_l2_vs_mode0"] is None else f"vs first {r['rel_l2_vs_mode0']:.2e}"
            ep = "" if r["rel_l2_vs_peer"] is None else f"vs peer {r['rel_l2_vs_peer']:.2e}"
            print(f"  {r['method']:36s} {r['ms']:9.3f} ms  {ratio}  {e0}  {ep}")
        print(flush=True)
        del base, peer

    if args.int4:
        try:
            results["int4"] = int4_diagnostic(dev, args.tiny)
            log(f"INT4 diagnostic: {json.dumps(results['int4'])}")
        except Exception as e:  # noqa: BLE001
            log(f"INT4 diagnostic failed: {type(e).__name__}: {str(e)[:300]}")
    save()
    log(f"wrote {out_path}")
    return results


if __name__ == "__main__":
    main()
