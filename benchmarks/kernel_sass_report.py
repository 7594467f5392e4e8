"""Offline (CPU-only) code report of the attention kernel for the H100: registers, spills, and the instruction mix
of its KV loop — without a GPU.

Compiles `paro_compile.kernels.attention._attn_fwd` for sm_90a with Triton's own ptxas, with the argument
specialisation a real launch gets (pointers and N / output strides 16-divisible; without it Triton cannot
vectorise the K/V loads, falls back to byte loads that are not pipelined, and ptxas reports far more registers than
a real launch uses). With ``nvdisasm`` (from CUDA, or the ``nvidia-cuda-nvdisasm``
wheel; ``--nvdisasm PATH``) it also prints the SASS opcode histogram of the KV loop (the first backward branch),
which is what bounds this kernel: it is issue-bound, so instructions per 64×64 tile track its time.

    python benchmarks/kernel_sass_report.py                       # sparse + dense, default variant
    python benchmarks/kernel_sass_report.py --variant fma_exp_arg=0 --compensate --warps 4 --stages 3
    python benchmarks/kernel_sass_report.py --out OUT              # also OUT/kernel_sass_report.json + .md

Run it with TRITON_INTERPRET unset: it compiles real GPU code.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from paro_compile.kernels import attention as A  # noqa: E402
from paro_compile.kernels.prologue import V_MODES  # noqa: E402

_V_PTR = {"fp8": "*fp8e4nv", "int8": "*i8", "fp16": "*bf16"}


def compile_kernel(*, dense: bool, pv: str = "fp8", tile_m: int = 64, warps: int = 4, stages: int = 3,
                   maxnreg=None, compensate: bool = False, variant: dict | None = None, group: int = 1) -> dict:
    """ptx, cubin path and ptxas' resource line of one specialisation (INT8 QKᵀ, bf16 out, D 64, block 64, or
    block 64 // group in shared 64-row tiles for a sparse mask)."""
    group = 1 if dense else group
    knobs = dict(A.KERNEL_VARIANT_DEFAULTS, **(variant or {}))
    ptrs = {"QQ": "*i8", "QS": "*fp32", "Q_BAD": "*i8", "KQ": "*i8", "KS": "*fp32", "VT": _V_PTR[pv], "VS": "*fp32", "OUT": "*bf16",
            "PERM": "*i64", "COUNTS": "*i32", "IDX": "*i32", "KBAR": "*fp16", "VBAR": "*fp16", "KEPT_BITS": "*i32",
            "SLOT_BITS": "*i8", "KBIAS": "*fp32", "KBIAS_FLAGS": "*i32"}
    consts = dict(TILE_M=tile_m, BLOCK_M=64 // group, BLOCK_N=64 // group, D=64, QK_BITS=8, PV_MODE=V_MODES[pv], HAS_PERM=True,
                  DENSE=dense, DOT_F32=False, IEEE=False, EMULATE=False, EXP2_MODE=0,
                  FUSED_SOFTMAX=bool(knobs["fused_softmax"]), P_ROUND_INT=bool(knobs["p_round_int"]),
                  WARP_SPEC=bool(knobs["warp_specialize"]),
                  PREFETCH_QK=(dense if knobs["prefetch_qk"] is None else bool(knobs["prefetch_qk"])),
                  COMPENSATE=compensate and not dense, TMA_KV=bool(knobs["tma_kv"]),
                  FMA_EXP_ARG=bool(knobs["fma_exp_arg"]), GROUP=group, HAS_BIAS=False,
                  LAZY_RESCALE=bool(knobs["lazy_rescale"]))
    names = A._attn_fwd.arg_names
    missing = [n for n in names if n not in ptrs and n not in consts and n != "P_LOG2" and not n.islower()
               and n not in ("N", "N_K", "H", "NQB", "NKB", "IDX_STRIDE")]
    if missing:
        raise SystemExit(f"kernel has arguments this report does not know: {missing}")
    if not dense:  # plans store compact CSRs (block_mask.trim_csr): int16 indices, rows a multiple of 16 slots
        ptrs["IDX"] = "*i16"
    sig = {n: ptrs.get(n) or ("constexpr" if n in consts else ("fp32" if n == "P_LOG2" else "i32")) for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in ptrs or n in ("N", "N_K", "IDX_STRIDE", "sob", "soh", "son")}
    opts = dict(num_warps=warps, num_stages=stages, **({"maxnreg": maxnreg} if maxnreg else {}))
    kernel = triton.compile(ASTSource(A._attn_fwd, sig, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options=opts)
    work = Path(tempfile.mkdtemp(prefix="paro_sass_"))
    (work / "k.ptx").write_text(kernel.asm["ptx"])
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas = next((str(p) for p in (bin_dir / "ptxas-blackwell", bin_dir / "ptxas") if p.exists()), shutil.which("ptxas"))
    run = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", str(work / "k.ptx"), "-o", str(work / "k.cubin")],
                         capture_output=True, text=True, check=True)
    info = " ".join(line.split("info    :")[-1].strip() for line in run.stderr.splitlines()
                    if "Used" in line or "spill" in line)
    return {"cubin": work / "k.cubin", "resources": info}


def loop_histogram(cubin: Path, nvdisasm: str) -> tuple[int, collections.Counter]:
    """Instruction count and opcode histogram of the first loop (label .. its backward branch) in the SASS."""
    sass = subprocess.run([nvdisasm, "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
    lines = sass.splitlines()
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if not m:
            continue
        start = next((k for k in range(i) if lines[k].startswith(m.group(1) + ":")), None)
        if start is None:  # a forward branch
            continue
        ops = collections.Counter()
        for body in lines[start:i + 1]:
            ins = re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P[0-9T]+\s+)?([A-Z][A-Z0-9_]*)", body)
            if ins:
                ops[ins.group(1)] += 1
        return sum(ops.values()), ops
    return 0, collections.Counter()


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pv", default="fp8", choices=sorted(_V_PTR))
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--maxnreg", type=int, default=None)
    ap.add_argument("--compensate", action="store_true", help="skipped-block compensation (sparse only)")
    ap.add_argument("--group", type=int, default=1, choices=(1, 2, 4),
                    help="sparse: query blocks of 64 // group tokens sharing a 64-row tile")
    ap.add_argument("--variant", default="", help="attention.KERNEL_VARIANT_DEFAULTS overrides, e.g. fma_exp_arg=0")
    ap.add_argument("--nvdisasm", default=shutil.which("nvdisasm"), help="nvdisasm binary (optional)")
    ap.add_argument("--out", type=Path, default=None, help="folder for kernel_sass_report.json and .md")
    args = ap.parse_args(argv)
    args.variant_switches = {}
    for item in filter(None, (x.strip() for x in args.variant.split(","))):
        name, _, value = item.partition("=")
        if name not in A.KERNEL_VARIANT_DEFAULTS or value not in ("0", "1"):
            ap.error(f"--variant takes name=0|1 with names {sorted(A.KERNEL_VARIANT_DEFAULTS)}, got {item!r}")
        args.variant_switches[name] = value == "1"
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("kernel_sass_report compiles real GPU code: run it with TRITON_INTERPRET unset")
    run_stamp = harness.stamp(__file__, argv)
    rows = []
    print(f"{'mask':7s} {'tile':>4s} {'warps':>5s} {'stages':>6s}  resources / KV-loop instructions")
    for dense in (False, True):
        res = compile_kernel(dense=dense, pv=args.pv, warps=args.warps, stages=args.stages, maxnreg=args.maxnreg,
                             compensate=args.compensate, variant=args.variant_switches, group=args.group)
        print(f"{'dense' if dense else 'sparse':7s} {64:4d} {args.warps:5d} {args.stages:6d}  {res['resources']}"
              + (f"  (block {64 // args.group}, {args.group} per tile)" if args.group > 1 and not dense else ""))
        row = {"mask": "dense" if dense else "sparse", "block": 64 if dense else 64 // args.group, "warps": args.warps,
               "stages": args.stages, "maxnreg": args.maxnreg, "resources": res["resources"]}
        if args.nvdisasm and os.path.exists(args.nvdisasm):
            total, ops = loop_histogram(res["cubin"], args.nvdisasm)
            top = ", ".join(f"{op} {n}" for op, n in ops.most_common(12))
            print(f"{'':27s}  loop: {total} instructions ({top})")
            row.update(loop_instructions=total, loop_opcodes=dict(ops.most_common()))
        rows.append(row)
    if args.out is not None:
        harness.write_results(args.out / "kernel_sass_report.json",
                              {"config": {"pv": args.pv, "compensate": args.compensate, "variant": args.variant_switches},
                               "rows": rows}, run_stamp, title="attention kernel for sm_90a: resources and KV loop",
                              columns=["mask", "block", "warps", "stages", "maxnreg", "resources", "loop_instructions"])
    return rows


if __name__ == "__main__":
    main()
