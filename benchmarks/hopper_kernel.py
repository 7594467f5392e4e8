"""The Gluon Hopper attention kernel (`paro_compile.kernels.attention_hopper`): correctness check and timing against
the Triton kernel and the peers (cuDNN SDPA, SageAttention, FlashAttention-4, FlexAttention) in one run, or
(``--sass``, no GPU needed) its offline code report.

On an H100/H200:

    python benchmarks/hopper_kernel.py --out DIR          # check + time; writes DIR/hopper_kernel.json

1. Checks the Gluon kernel against `reference.paro_attention_reference` on small inputs (D 64 and 128, dense and
   sparse, FP8 and bf16 PV, per-head permutation, N not a multiple of 64) and against the Triton kernel at every
   benchmark shape.
2. Times, with `triton.testing.do_bench` medians, at CogVideoX (B2·H48·N17776·D64) and Wan 720p (B1·H40·N75600·D128),
   dense and density 0.2 (random 64-token block masks keeping the diagonal, `tuning.random_block_mask`; the CSR
   trimmed to int16 as plans store it), bf16 inputs:
   - ``gluon``: prologue + Gluon kernel (`attention_hopper.paro_attention_hopper_qkv`), and ``gluon_kernel``: the
     kernel alone on a precomputed prologue, for each launch config in `CONFIGS`;
   - ``triton``: `attention.paro_attention_triton` (config=None: autotuned, winners cached on disk) and
     ``triton_kernel`` = triton − ``prologue`` (the prologue alone);
   - ``cudnn``: SDPA under ``sdpa_kernel(SDPBackend.CUDNN_ATTENTION)`` (dense bf16);
   - ``triton_lazy``: the Triton kernel with its ``lazy_rescale`` switch (autotuned the same way);
   - ``flex``: FlexAttention with a BlockMask of the same kept blocks (full blocks, no mask_mod), kernel tiles
     64×64 and, at head_dim 128, 128×64 over the union of two query-block rows (a superset of the work); the faster
     is reported. Dense: no block mask. ``flex_128``: its best block size at head_dim 128, 128-token blocks of its
     own random mask at the same density (equal kept area, coarser blocks);
   - ``sage``: SageAttention (``sageattn``, INT8 QKᵀ, fp16 PV) where it imports, dense;
   - ``fa4`` / ``fa4_128``: FlashAttention-4 (``flash_attn.cute``, bf16; its Hopper path) where it imports: dense, and
     block-sparse with the same 64-token kept blocks / its own 128-token mask (`block_sparse_lists`).
   Dense-equivalent TFLOP/s = 4·B·H·N²·D / t for every method. Each variant is timed in its own try block; a failure
   is recorded and the run goes on. A time budget (``--budget``, seconds) skips what is left when it runs out.

Offline (CPU only, Triton 3.6 with its bundled ptxas / nvdisasm):

    python benchmarks/hopper_kernel.py --sass             # registers, spills, wgmma / TMA / setmaxnreg counts, and the
                                                          # SASS size and opcode mix of the consumer's KV loop
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_attention import flex_block_mask  # noqa: E402

SHAPES = {"cogvideox": (2, 48, 17776, 64), "wan720p": (1, 40, 75600, 128)}
DENSITIES = (1.0, 0.2)
# Launch configs timed per case, over attention_hopper.default_config (the first: the default itself; a config that
# changes nothing of the default is skipped). At head_dim 64 the default fits two CTAs per SM; the extra head_dim-64
# configs are one CTA per SM (maxnreg 168), fewer ring stages and one consumer in the two-CTA budget.
CONFIGS = [{}, {"defer_pv_wait": True}, {"consumers": 1, "maxnreg": 128, "consumer_regs": 208}, {"stages": 4}]
CONFIGS_D64 = [{"consumer_regs": 232, "maxnreg": 168, "stages": 3}, {"stages": 2}, {"stages": 3},
               {"consumers": 1, "consumer_regs": 120, "maxnreg": 80, "stages": 3}, {"permuted_k": False}]


def configs_for(head_dim: int, pv_dtype: str = "fp8") -> list[dict]:
    """The launch configs timed at ``head_dim``: the default first, then those that change something of it."""
    from paro_compile.kernels import attention_hopper as AH

    default = AH.default_config(head_dim, pv_dtype)
    extra = CONFIGS[1:] + (CONFIGS_D64 if head_dim == 64 else [])
    return [{}] + [cfg for cfg in extra if dict(default, **cfg) != default]


# ------------------------------------------------------------------------------------------------ offline report
def _offline_compile(d: int, pv: str, dense: bool, config: dict, out_dtype: str = "bf16"):
    """Compile `attention_hopper._paro_fwd_hopper` for sm_90a without a GPU; return the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    from triton.runtime.jit import mangle_type

    from paro_compile.kernels import attention_hopper as AH

    cfg = dict(AH.default_config(d, pv), **config)
    qk = torch.zeros(4 * 64, d, dtype=torch.int8)
    vt = torch.zeros(4 * d, 4 * 64, dtype=torch.float8_e4m3fn if pv == "fp8" else torch.bfloat16)
    qk_desc = TensorDescriptor.from_tensor(qk, [64, d], gl.NVMMASharedLayout.get_default_for([64, d], gl.int8))
    v_desc = TensorDescriptor.from_tensor(vt, [d, 64], gl.NVMMASharedLayout.get_default_for(
        [d, 64], gl.float8e4nv if pv == "fp8" else gl.bfloat16))
    k_desc = AH._permuted_k_descriptor(qk) if (cfg["permuted_k"] and pv == "fp8") else qk_desc
    fn = AH._paro_fwd_hopper
    ptrs = {"QS": "*fp32", "KS": "*fp32", "VS": "*fp32", "OUT": f"*{out_dtype}", "PERM": "*i64", "COUNTS": "*i32",
            "IDX": "*i16", "Q_BAD": "*i8"}
    consts = dict(D=d, STAGES=cfg["stages"], CONSUMERS=cfg["consumers"], DENSE=dense, HAS_PERM=True,
                  CONSUMER_REGS=cfg["consumer_regs"], DEFER_PV_WAIT=cfg["defer_pv_wait"])
    sig = {}
    for name in fn.arg_names:
        if name == "q_desc":
            sig[name] = mangle_type(qk_desc)
        elif name == "k_desc":
            sig[name] = mangle_type(k_desc)
        elif name == "v_desc":
            sig[name] = mangle_type(v_desc)
        elif name in ptrs:
            sig[name] = ptrs[name]
        elif name in consts:
            sig[name] = "constexpr"
        else:
            sig[name] = "fp32" if name == "P_LOG2" else "i32"
    # What a real launch specialises: 16-byte aligned pointers, N / row width / output strides divisible by 16.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if name in ptrs or name in ("N", "IDX_STRIDE", "sob", "soh", "son")}
    return triton.compile(GluonASTSource(fn, sig, constexprs=consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=4, maxnreg=cfg["maxnreg"]))


def _loops(sass: str) -> list[tuple[int, collections.Counter, list[str]]]:
    """(instruction count, opcode histogram, opcodes in order) of every loop (label .. its backward branch)."""
    lines = sass.splitlines()
    found = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if not m:
            continue
        start = next((k for k in range(i) if lines[k].startswith(m.group(1) + ":")), None)
        if start is None:
            continue
        ops, seq = collections.Counter(), []
        for body in lines[start:i + 1]:
            ins = re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P[0-9T]+\s+)?([A-Z][A-Z0-9_]*)(\S*)\s*([^;]*)", body)
            if ins:
                ops[ins.group(1)] += 1
                seq.append("".join(ins.group(1, 2)) + " " + ins.group(3))
        found.append((sum(ops.values()), ops, seq))
    return found


def exp2_under_pv(seq: list[str]) -> int:
    """How many MUFU.EX2 of a KV loop (opcodes in order) run while the loop's P·V wgmma is in flight: those between
    its issue (the last FP8 / 16-bit GMMA of the loop) and the wait that retires every group (``WARPGROUP.DEPBAR.LE
    gsb0, 0x0``), in loop order (past the backward branch, round to the top)."""
    pv = [i for i, op in enumerate(seq) if op.startswith(("QGMMA", "HGMMA"))]
    if not pv:
        return 0
    count = 0
    for op in seq[pv[-1] + 1:] + seq[:pv[-1]]:
        if op.startswith("WARPGROUP.DEPBAR.LE") and op.replace(" ", "").endswith("gsb0,0x0"):
            break
        count += op.startswith("MUFU.EX2")
    return count


def sass_report(cases=None) -> list[dict]:
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas, nvdisasm = str(bin_dir / "ptxas"), str(bin_dir / "nvdisasm")
    cases = cases or [(d, pv, dense, cfg) for d in (64, 128) for pv in ("fp8", "fp16") for dense in (True, False)
                      for cfg in ({}, {"consumers": 1})]
    rows = []
    for d, pv, dense, cfg in cases:
        row = {"d": d, "pv": pv, "dense": dense, "config": cfg}
        try:
            kernel = _offline_compile(d, pv, dense, cfg)
            work = Path(tempfile.mkdtemp(prefix="paro_hopper_sass_"))
            (work / "k.ptx").write_text(kernel.asm["ptx"])
            run = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", str(work / "k.ptx"), "-o", str(work / "k.cubin")],
                                 capture_output=True, text=True, check=True)
            row["ptxas"] = " ".join(line.split("info    :")[-1].strip() for line in run.stderr.splitlines()
                                    if "Used" in line or "spill" in line)
            # ptxas serializes the wgmmas (C7514) when it cannot prove the accumulators are not read in flight.
            row["wgmma_serialized"] = "serialized" in run.stderr
            row["shared_bytes"] = kernel.metadata.shared
            sass = subprocess.run([nvdisasm, "-c", str(work / "k.cubin")], capture_output=True, text=True,
                                  check=True).stdout
            ops = collections.Counter(re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P[0-9T]+\s+)?([A-Z][A-Z0-9_.]*)", sass,
                                                 re.M))
            row["sass"] = {k: v for k, v in sorted(ops.items()) if re.match(r"(IGMMA|QGMMA|HGMMA|UTMALDG|USETMAXREG|"
                                                                            r"SYNCS|WARPGROUP)", k)}
            # The consumer's KV loop: the loop that holds the wgmmas (the smallest such loop).
            mma_loops = [lp for lp in _loops(sass) if lp[1]["IGMMA"] and (lp[1]["QGMMA"] or lp[1]["HGMMA"])]
            if mma_loops:
                total, hist, seq = min(mma_loops, key=lambda lp: lp[0])
                row["kv_loop_instructions"] = total
                # FlashAttention-3's intra-warpgroup overlap, as compiled: exp2s issued while P·V runs.
                row["kv_loop_exp2_under_pv"] = exp2_under_pv(seq)
                row["kv_loop_top"] = dict(hist.most_common(14))
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# ------------------------------------------------------------------------------------------------ GPU benchmark
def _bench(fn, rep: int) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def _rel_l2(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def block_sparse_lists(mask: torch.Tensor, batch: int) -> dict:
    """FlashAttention-4's block-sparse fields for a [H, Mq, Nk] bool mask whose kept blocks are all full blocks: every
    kept block in the full-block lists (no mask_mod runs), empty partial-block lists. Counts [B, H, Mq] int32, indices
    [B, H, Mq, Nk] int32 (kept blocks first, ascending; the rest padding), broadcast over the batch."""
    heads, mq, nk = mask.shape
    counts = mask.sum(-1, dtype=torch.int32)
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    expand = lambda t: t[None].expand(batch, *t.shape).contiguous()  # noqa: E731
    return {"mask_block_cnt": expand(torch.zeros_like(counts)), "mask_block_idx": expand(torch.zeros_like(order)),
            "full_block_cnt": expand(counts), "full_block_idx": expand(order)}


def import_fa4():
    """(flash_attn_func, BlockSparseTensorsTorch) of FlashAttention-4's CuTe package, or the reason it is missing."""
    try:
        from flash_attn.cute import flash_attn_func
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    except Exception as exc:  # noqa: BLE001  (not installed, or its CUDA DSL does not load)
        return None, f"{type(exc).__name__}: {str(exc)[:300]}"
    return (flash_attn_func, BlockSparseTensorsTorch), None


def import_sage():
    """SageAttention's ``sageattn``, or the reason it is missing."""
    try:
        from sageattention import sageattn
    except Exception as exc:  # noqa: BLE001
        return None, f"{type(exc).__name__}: {str(exc)[:300]}"
    return sageattn, None


def correctness_checks() -> list[dict]:
    """Gluon kernel vs the reference on small inputs (the tests' tolerances: bf16 rel-L2 1e-2)."""
    from paro_compile.kernels import attention_hopper as AH
    from paro_compile.kernels import reference as R
    from paro_compile.kernels import tuning
    from paro_compile.kernels.block_mask import BlockMask, num_blocks

    gen = torch.Generator().manual_seed(1234)
    rows = []
    for d in (64, 128):
        for pv in ("fp8", "fp16"):
            for density in (None, 0.3):
                n = 1000 + 37
                q, k, v = (torch.randn(2, 3, n, d, generator=gen).to(torch.bfloat16).cuda() for _ in range(3))
                perm = torch.stack([torch.randperm(n, generator=gen) for _ in range(3)]).cuda()
                bm = None
                if density is not None:
                    nb = num_blocks(n, 64)
                    bm = BlockMask.from_dense(tuning.random_block_mask(3, nb, nb, density, generator=gen)).to("cuda")
                row = {"d": d, "pv": pv, "density": density or 1.0}
                try:
                    out = torch.full_like(q, float("nan"))
                    AH.paro_attention_hopper_qkv(q, k, v, perm=perm, mask=bm, pv_dtype=pv, out=out)
                    ref = R.paro_attention_reference(q, k, v, perm=perm, mask=bm, pv_dtype=pv)
                    row["nan_rows"] = int(out.isnan().any(-1).sum())
                    row["rel_l2_vs_reference"] = _rel_l2(out.nan_to_num(), ref)
                    row["ok"] = row["nan_rows"] == 0 and row["rel_l2_vs_reference"] <= 1e-2
                except Exception as exc:  # noqa: BLE001
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
                    row["ok"] = False
                rows.append(row)
                print("check", json.dumps(row), flush=True)
    return rows


def run_benchmark(args) -> dict:
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from paro_compile.kernels import attention_hopper as AH
    from paro_compile.kernels import tuning
    from paro_compile.kernels.attention import last_launch_info, paro_attention_triton
    from paro_compile.kernels.prologue import paro_prologue
    from paro_compile.kernels.block_mask import BlockMask, num_blocks

    t_start = time.time()
    deadline = t_start + args.budget
    results = {"meta": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                        "cuda": torch.version.cuda, "hopper_available": AH.available(),
                        "default_config": {hd: AH.default_config(hd, "fp8") for hd in (64, 128)},
                        "time": time.strftime("%Y-%m-%d %H:%M:%S")},
               "checks": [], "timings": [], "failures": []}
    print(json.dumps(results["meta"]), flush=True)
    if not args.no_check:
        results["checks"] = correctness_checks()

    def record(shape_name, shape, density, method, ms, **extra):
        b, h, n, d = shape
        row = {"shape": shape_name, "density": density, "method": method, "ms": round(ms, 4),
               "dense_equiv_tflops": round(4 * b * h * n * n * d / (ms * 1e-3) / 1e12, 1), **extra}
        results["timings"].append(row)
        print(f"  {shape_name:10s} dens {density:.2f} {method:28s} {ms:9.3f} ms {row['dense_equiv_tflops']:8.1f} "
              f"TFLOP/s {json.dumps(extra) if extra else ''}", flush=True)

    def attempt(label, fn):
        if time.time() > deadline:
            results["failures"].append({"variant": label, "error": "skipped: time budget spent"})
            print(f"  skipped {label}: time budget spent", flush=True)
            return None
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001
            msg = f"{type(exc).__name__}: {str(exc)[:500]}"
            results["failures"].append({"variant": label, "error": msg})
            print(f"  FAILED {label}: {msg}", flush=True)
            if args.verbose:
                traceback.print_exc()
            torch.cuda.synchronize()
            return None

    fa4, why = (None, "not asked for (--no-fa4)") if args.no_fa4 else import_fa4()
    results["meta"]["fa4"] = "importable" if fa4 else why
    sage, why = (None, "not asked for (--no-sage)") if args.no_sage else import_sage()
    results["meta"]["sageattention"] = "importable" if sage else why
    print(f"peers: FlashAttention-4 {results['meta']['fa4']}; SageAttention {results['meta']['sageattention']}",
          flush=True)

    def fa4_call(qt, kt, vt, lists=None, block=None):
        func, sparse_type = fa4
        tensors = None if lists is None else sparse_type(**lists, block_size=(block, block))
        r = func(qt, kt, vt, block_sparse_tensors=tensors)
        return (r[0] if isinstance(r, tuple) else r).transpose(1, 2)

    flex = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
    gen = torch.Generator().manual_seed(0)
    for name in args.shapes:
        shape = SHAPES[name]
        b, h, n, d = shape
        print(f"== {name} B{b} H{h} N{n} D{d}", flush=True)
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        nb = num_blocks(n, 64)
        attempt(f"{name} cudnn", lambda: record(name, shape, 1.0, "cudnn", _cudnn_time(q, k, v, args.rep,
                                                                                       sdpa_kernel, SDPBackend)))
        pro_ms = attempt(f"{name} prologue", lambda: _bench(lambda: paro_prologue(q, k, v), args.rep))
        if pro_ms is not None:
            record(name, shape, 1.0, "prologue", pro_ms)
        pro = paro_prologue(q, k, v)
        qt, kt, vt = ((x.transpose(1, 2).contiguous() for x in (q, k, v)) if fa4 else (None, None, None))
        if sage is not None:
            attempt(f"{name} sage", lambda: record(name, shape, 1.0, "sage", _bench(
                lambda: sage(q, k, v, tensor_layout="HND", is_causal=False), args.rep)))
        if fa4 is not None:
            def fa4_dense_run():
                o = fa4_call(qt, kt, vt)
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
                record(name, shape, 1.0, "fa4", _bench(lambda: fa4_call(qt, kt, vt), args.rep),
                       rel_l2_vs_cudnn=round(_rel_l2(o, ref), 6))
            attempt(f"{name} fa4", fa4_dense_run)
        for density in args.densities:
            if density >= 1.0:
                mask, bm = None, None
            else:
                mask = tuning.random_block_mask(h, nb, nb, density, generator=gen)
                bm = BlockMask.from_dense(mask).to("cuda")
            kept = 1.0 if mask is None else float(mask.float().mean())
            counts, indices = (None, None) if bm is None else (bm.counts, bm.indices)
            kw = dict(mask=bm)
            out = torch.empty_like(q)

            def triton_run():
                ref = paro_attention_triton(q, k, v, **kw)  # autotunes on the first call (or reads the disk cache)
                cfg = last_launch_info()
                ms = _bench(lambda: paro_attention_triton(q, k, v, **kw), args.rep)
                extra = {"kept": round(kept, 4), "config": {"kwargs": cfg.get("kwargs"), "warps": cfg.get("num_warps"),
                                                            "stages": cfg.get("num_stages")}}
                record(name, shape, density, "triton", ms, **extra)
                if pro_ms is not None:
                    record(name, shape, density, "triton_kernel", ms - pro_ms, derived="triton - prologue")
                return ref
            triton_out = attempt(f"{name} {density} triton", triton_run)

            def triton_lazy_run():
                lazy = dict(kw, variant={"lazy_rescale": True})
                o = paro_attention_triton(q, k, v, **lazy)
                extra = {"kept": round(kept, 4)}
                if triton_out is not None:
                    extra["max_abs_diff_vs_triton"] = float((o.float() - triton_out.float()).abs().max())
                record(name, shape, density, "triton_lazy", _bench(lambda: paro_attention_triton(q, k, v, **lazy),
                                                                   args.rep), **extra)
            attempt(f"{name} {density} triton lazy_rescale", triton_lazy_run)

            for cfg in configs_for(d):
                label = "gluon" + "".join(f" {k}={v}" for k, v in cfg.items())

                def gluon_run(cfg=cfg, label=label):
                    AH.paro_attention_hopper(pro, out, None, counts, indices, n, h, config=cfg)
                    torch.cuda.synchronize()
                    extra = {"kept": round(kept, 4), "config": dict(AH.default_config(d, "fp8"), **cfg)}
                    if triton_out is not None:
                        extra["rel_l2_vs_triton"] = round(_rel_l2(out, triton_out), 6)
                    ms = _bench(lambda: AH.paro_attention_hopper(pro, out, None, counts, indices, n, h, config=cfg),
                                args.rep)
                    record(name, shape, density, label.replace("gluon", "gluon_kernel", 1), ms, **extra)
                    if not cfg:  # the full call (prologue + kernel) for the default config
                        full = _bench(lambda: AH.paro_attention_hopper_qkv(q, k, v, out=out, **kw), args.rep)
                        record(name, shape, density, "gluon", full, kept=round(kept, 4))
                attempt(f"{name} {density} {label}", gluon_run)

            if flex is not None:
                def flex_run():
                    best = None
                    settings = [("none", None, None)] if mask is None else [("64x64", 64, {"BLOCK_M": 64, "BLOCK_N": 64})]
                    if mask is not None and d == 128:
                        settings.append(("128x64 (union of 2 query-block rows)", (128, 64),
                                         {"BLOCK_M": 128, "BLOCK_N": 64}))
                    for note, block, options in settings:
                        try:
                            if block is None:
                                bm = None
                            elif block == 64:
                                bm = flex_block_mask(mask.cuda(), n, 64)
                            else:
                                m2 = torch.cat([mask, torch.zeros(h, nb % 2, nb, dtype=torch.bool)], 1)
                                bm = flex_block_mask(m2.view(h, -1, 2, nb).any(2).cuda(), n, block)
                            fn = (lambda bm=bm, options=options:
                                  flex(q, k, v, block_mask=bm, kernel_options=options))
                            fn()
                            ms = _bench(fn, args.rep)
                        except Exception as exc:  # noqa: BLE001
                            results["failures"].append({"variant": f"{name} {density} flex {note}",
                                                        "error": f"{type(exc).__name__}: {str(exc)[:400]}"})
                            print(f"  flex {note} failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                            continue
                        if best is None or ms < best[0]:
                            best = (ms, note)
                    if best is not None:
                        record(name, shape, density, "flex", best[0], kept=round(kept, 4), setting=best[1])
                attempt(f"{name} {density} flex", flex_run)
            nb128 = num_blocks(n, 128)
            mask128 = None if mask is None else tuning.random_block_mask(h, nb128, nb128, density, generator=gen)
            if flex is not None and mask128 is not None:
                def flex128_run():
                    bm128 = flex_block_mask(mask128.cuda(), n, 128)
                    fn = lambda: flex(q, k, v, block_mask=bm128)  # noqa: E731
                    fn()
                    record(name, shape, density, "flex_128", _bench(fn, args.rep),
                           kept=round(float(mask128.float().mean()), 4), setting="128-token blocks, own mask")
                attempt(f"{name} {density} flex 128", flex128_run)
            if fa4 is not None and mask is not None:
                for method, m, block in (("fa4", mask, 64), ("fa4_128", mask128, 128)):
                    def fa4_sparse_run(m=m, block=block, method=method):
                        lists = {key: t.cuda() for key, t in block_sparse_lists(m, b).items()}
                        o = fa4_call(qt, kt, vt, lists, block)
                        extra = {"kept": round(float(m.float().mean()), 4), "block": block}
                        if block == 64 and flex is not None:
                            try:  # the same kept blocks in bf16: the two should agree to bf16 rounding
                                ref = flex(q, k, v, block_mask=flex_block_mask(mask.cuda(), n, 64),
                                           kernel_options={"BLOCK_M": 64, "BLOCK_N": 64})
                                extra["rel_l2_vs_flex"] = round(_rel_l2(o, ref), 6)
                            except Exception as exc:  # noqa: BLE001
                                extra["rel_l2_vs_flex"] = f"flex failed: {type(exc).__name__}"
                        record(name, shape, density, method, _bench(lambda: fa4_call(qt, kt, vt, lists, block),
                                                                    args.rep), **extra)
                    attempt(f"{name} {density} {method}", fa4_sparse_run)
            torch.cuda.empty_cache()
        q = k = v = pro = qt = kt = vt = None  # free the shape's tensors before the next one
        torch.cuda.empty_cache()
    results["meta"]["permuted_k_refused"] = AH.permuted_k_refused()
    results["summary"] = _summary(results["timings"])
    results["meta"]["wall_s"] = round(time.time() - t_start, 1)
    return results


def _cudnn_time(q, k, v, rep, sdpa_kernel, backend) -> float:
    import torch.nn.functional as F

    with sdpa_kernel(backend.CUDNN_ATTENTION):
        F.scaled_dot_product_attention(q, k, v)
        return _bench(lambda: F.scaled_dot_product_attention(q, k, v), rep)


def _summary(timings: list[dict]) -> list[dict]:
    """Per (shape, density): the times and the ratios the kernel is judged by."""
    rows = []
    for shape in dict.fromkeys(t["shape"] for t in timings):
        for density in dict.fromkeys(t["density"] for t in timings if t["shape"] == shape and t["method"] != "cudnn"):
            get = {t["method"]: t for t in timings if t["shape"] == shape and t["density"] == density}
            cudnn = next((t for t in timings if t["shape"] == shape and t["method"] == "cudnn"), None)
            kernels = {m: t for m, t in get.items() if m.startswith("gluon_kernel")}
            best_name, best = min(kernels.items(), key=lambda kv: kv[1]["ms"]) if kernels else (None, None)
            row = {"shape": shape, "density": density, "best_gluon_config": best_name}
            dense_peer = {m: next((t for t in timings if t["shape"] == shape and t["method"] == m
                                   and t["density"] == 1.0), None) for m in ("sage", "fa4")}
            for key, t in (("gluon_ms", get.get("gluon")), ("gluon_kernel_ms", get.get("gluon_kernel")),
                           ("best_gluon_kernel_ms", best), ("triton_ms", get.get("triton")),
                           ("triton_kernel_ms", get.get("triton_kernel")), ("triton_lazy_ms", get.get("triton_lazy")),
                           ("flex_ms", get.get("flex")), ("flex_128_ms", get.get("flex_128")),
                           ("fa4_ms", get.get("fa4")), ("fa4_128_ms", get.get("fa4_128")),
                           ("cudnn_dense_ms", cudnn), ("sage_dense_ms", dense_peer["sage"]),
                           ("fa4_dense_ms", dense_peer["fa4"])):
                row[key] = t["ms"] if t else None
            ours = [row[k] for k in ("triton_ms", "triton_lazy_ms", "gluon_ms") if row.get(k)]
            peers = [row[k] for k in ("flex_ms", "flex_128_ms", "fa4_ms", "fa4_128_ms") if row.get(k)]
            if density >= 1.0:
                peers += [row[k] for k in ("cudnn_dense_ms", "sage_dense_ms", "fa4_dense_ms") if row.get(k)]
            row["best_ours/best_peer"] = round(min(ours) / min(peers), 3) if ours and peers else None
            if get.get("gluon_kernel"):
                row["gluon_kernel_tflops"] = get["gluon_kernel"]["dense_equiv_tflops"]

            def ratio(a, b):
                return round(row[a] / row[b], 3) if row.get(a) and row.get(b) else None
            row["gluon/cudnn"] = ratio("gluon_ms", "cudnn_dense_ms")
            row["gluon_kernel/cudnn"] = ratio("gluon_kernel_ms", "cudnn_dense_ms")
            row["gluon/flex"] = ratio("gluon_ms", "flex_ms")
            row["gluon_kernel/triton_kernel"] = ratio("gluon_kernel_ms", "triton_kernel_ms")
            row["gluon/triton"] = ratio("gluon_ms", "triton_ms")
            row["triton_lazy/triton"] = ratio("triton_lazy_ms", "triton_ms")
            rows.append(row)
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "hopper_kernel"))
    ap.add_argument("--sass", action="store_true", help="offline code report (no GPU); writes OUT/hopper_sass.json")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--densities", nargs="*", type=float, default=list(DENSITIES))
    ap.add_argument("--rep", type=int, default=60, help="do_bench rep (ms)")
    ap.add_argument("--budget", type=float, default=330.0, help="seconds; variants past it are skipped")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-fa4", action="store_true", help="leave FlashAttention-4 out even where it imports")
    ap.add_argument("--no-sage", action="store_true", help="leave SageAttention out even where it imports")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--verbose", action="store_true")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.sass:
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise SystemExit("--sass compiles real GPU code: run it with TRITON_INTERPRET unset")
        rows = sass_report()
        (out_dir / "hopper_sass.json").write_text(json.dumps(rows, indent=1))
        print(f"wrote {out_dir / 'hopper_sass.json'}")
        return 0
    if not torch.cuda.is_available():
        print("hopper_kernel.py needs a CUDA GPU (or --sass for the offline report)")
        return 1
    results = run_benchmark(args)
    path = out_dir / "hopper_kernel.json"
    path.write_text(json.dumps(results, indent=1))
    print("\nsummary (ms; ratios < 1 mean the Gluon kernel is faster)")
    cols = ["shape", "density", "gluon_ms", "best_gluon_kernel_ms", "best_gluon_config", "triton_ms",
            "triton_lazy_ms", "triton_kernel_ms", "cudnn_dense_ms", "sage_dense_ms", "fa4_dense_ms", "flex_ms",
            "flex_128_ms", "fa4_ms", "fa4_128_ms", "gluon_kernel_tflops", "gluon_kernel/triton_kernel",
            "triton_lazy/triton", "best_ours/best_peer"]
    print(" | ".join(cols))
    for row in results["summary"]:
        print(" | ".join(str(row.get(c)) for c in cols))
    checks_ok = all(c.get("ok") for c in results["checks"])
    print(f"checks: {'all ok' if checks_ok else 'FAILED'} ({len(results['checks'])}); "
          f"failures: {len(results['failures'])}; wall {results['meta']['wall_s']} s; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
