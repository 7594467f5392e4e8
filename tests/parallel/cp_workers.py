"""Multi-process helpers for the context-parallel tests: spawn ranks over gloo (CPU) or NCCL (GPU), a tiny Wan model
under diffusers' Ulysses, and the plans the tests apply.

CPU-only torch needs two workarounds before diffusers' context parallelism runs at all (both only in this harness,
never in the package): diffusers builds its device mesh for ``torch.accelerator.device_count()`` devices, which is 0
without an accelerator (we report 1), and its split hook calls ``logger.warning_once``, a method that only exists
once ``transformers`` is imported (we alias it to ``warning``).
"""
from __future__ import annotations

import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

EXACT = {"allow_fp32": True, "qk_bits": 16, "pv_dtype": "fp16", "impl": "reference"}
"""Reference numerics in fp32: bitwise comparable between one process and several on the CPU."""
WAN_FRAMES, WAN_HEIGHT, WAN_WIDTH = 4, 16, 16  # latent; patch (1, 2, 2) → 4 × 8 × 8 = 256 tokens
WAN_HEADS = 4
BLOCK = 16


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_workarounds() -> None:
    """What diffusers' context parallelism needs on a CPU-only torch (module docstring)."""
    if torch.accelerator.device_count() == 0:
        torch.accelerator.device_count = lambda: 1
    if not hasattr(logging.Logger, "warning_once"):
        logging.Logger.warning_once = logging.Logger.warning


def _entry(rank: int, world: int, port: int, backend: str, out_dir: str, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    if os.environ.get("TRITON_INTERPRET") is None and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        cpu_workarounds()
        result = fn(rank, world, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, world: int = 2, *args: Any, backend: str = "gloo") -> list[Any]:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes with a process group; their return values."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_entry, args=(world, free_port(), backend, out_dir, fn, args), nprocs=world, join=True)
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]


# ---------------------------------------------------------------------------------------------------
# tiny Wan


def tiny_wan(device: str = "cpu", heads: int = WAN_HEADS, layers: int = 1, dtype: torch.dtype = torch.float32):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=64, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=layers, rope_max_seq_len=64,
    ).eval().to(device=device, dtype=dtype)
    generator = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 4, WAN_FRAMES, WAN_HEIGHT, WAN_WIDTH, generator=generator).to(device, dtype),
        timestep=torch.tensor([500], device=device),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=generator).to(device, dtype), return_dict=False,
    )
    return model, inputs


def wan_grid():
    from paro_compile.grid import TokenGrid

    return TokenGrid(frames=WAN_FRAMES, height=WAN_HEIGHT // 2, width=WAN_WIDTH // 2)


def wan_plan(orders_by_site: dict[str, list[str]], seed: int = 0, density: float = 0.4, buckets: int = 2):
    """A plan for tiny Wan's self-attention sites: the given per-head orders, random masks (diagonal kept) per step
    bucket; with two buckets the boundary 700 puts timestep 500 in bucket 1."""
    from paro_compile.plan import Plan, SitePlan

    grid = wan_grid()
    generator = torch.Generator().manual_seed(seed)
    sites = {}
    for sid, orders in orders_by_site.items():
        nb = -(-grid.num_tokens // BLOCK)
        masks = torch.rand(buckets, len(orders), nb, nb, generator=generator) < density
        masks |= torch.eye(nb, dtype=torch.bool)
        sites[sid] = SitePlan.from_orders(sid, orders, grid, block_size=BLOCK, block_masks=masks)
    return Plan(sites=sites, step_boundaries=[700.0] if buckets == 2 else [])


def enable_ulysses(model, world: int) -> None:
    from diffusers import ContextParallelConfig

    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
