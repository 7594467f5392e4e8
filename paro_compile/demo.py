"""`python -m paro_compile.demo`: the whole flow on the built-in toy video DiT, in well under a minute on a CPU.

Compiles the model with Inductor alone and with ``backend="paro"``, then prints what paro did to every
attention site and how the output and the speed compare. On a CUDA GPU it uses bf16 and the Triton
kernels; on the CPU fp32 with the PyTorch reference numerics (correct, but not a speed-up: the CPU path
exists for testing).
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import torch

import paro_compile
from paro_compile.toy.dit import ToyVideoDiT, toy_inputs


def median_ms(fn: Callable[[], torch.Tensor], device: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paro_compile.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=16, help="latent height = width")
    parser.add_argument("--qk-bits", type=int, default=8, choices=(4, 8, 16))
    parser.add_argument("--pv-dtype", default="fp8", choices=("fp8", "int8", "fp16"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    model = ToyVideoDiT(dim=256, heads=4, depth=4).eval().to(device, dtype)
    inputs = toy_inputs(frames=args.frames, height=args.size, width=args.size, dtype=dtype, device=device)
    options = {"qk_bits": args.qk_bits, "pv_dtype": args.pv_dtype, "allow_fp32": dtype == torch.float32}

    with torch.no_grad():
        reference = model(**inputs)
        start = time.perf_counter()
        inductor = torch.compile(model)
        inductor(**inputs)
        inductor_compile_s = time.perf_counter() - start
        start = time.perf_counter()
        paro = torch.compile(model, backend="paro", options=options)
        out = paro(**inputs)
        paro_compile_s = time.perf_counter() - start
        report = paro_compile.last_report()
        inductor_ms = median_ms(lambda: inductor(**inputs), device, args.repeats)
        paro_ms = median_ms(lambda: paro(**inputs), device, args.repeats)

    err = float((out.double() - reference.double()).norm() / reference.double().norm())
    cosine = float(torch.nn.functional.cosine_similarity(out.double().flatten(), reference.double().flatten(), dim=0))
    print(f"paro_compile {paro_compile.__version__} demo on {device} ({dtype}), "
          f"{args.frames}x{args.size}x{args.size} latent, qk={args.qk_bits}b pv={args.pv_dtype}")
    print(report.summary())
    print(f"accuracy vs eager: rel-L2 {err:.2e}, cosine {cosine:.5f}")
    print(f"compile: inductor {inductor_compile_s:.1f} s, paro {paro_compile_s:.1f} s")
    print(f"forward median of {args.repeats}: inductor+SDPA {inductor_ms:.2f} ms, paro {paro_ms:.2f} ms "
          f"(ratio {inductor_ms / paro_ms:.2f}x)")
    if device == "cpu":
        print("note: on the CPU paro runs its PyTorch reference numerics, which are slower than SDPA; speed is a GPU matter.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
