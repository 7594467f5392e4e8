"""Set-up shared by the device probes (run from the repository root): fixed launch configs (PARO_AUTOTUNE=0, so every
row of a probe is one config), the repository on ``sys.path``, the CogVideoX-5B attention inputs and a median timer."""
import os
import sys

import torch
import triton

os.environ["PARO_AUTOTUNE"] = "0"
sys.path.insert(0, os.getcwd())

COG_SHAPE = (2, 48, 17776, 64)  # B (CFG), heads, tokens, head dim


def cog_qkv(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standard normal q, k, v of the CogVideoX-5B shape, bf16 on the GPU, drawn from ``gen`` (the probes then draw
    their masks from the same generator)."""
    return tuple(torch.randn(*COG_SHAPE, generator=gen).to(torch.bfloat16).cuda() for _ in range(3))


def bench(fn) -> float:
    """Median milliseconds of ``fn`` (triton.testing.do_bench, after one synchronised warm call)."""
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")
