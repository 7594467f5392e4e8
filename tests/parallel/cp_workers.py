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
from typing import Any, Callable, Optional

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


def wan_plan(orders_by_site: dict[str, list[str]], seed: int = 0, density=0.4, buckets: int = 2):
    """A plan for tiny Wan's self-attention sites: the given per-head orders, random masks (diagonal kept) per step
    bucket, ``density`` one number or one per head; with two buckets the boundary 700 puts timestep 500 in bucket
    1."""
    from paro_compile.plan import Plan, SitePlan

    grid = wan_grid()
    generator = torch.Generator().manual_seed(seed)
    sites = {}
    for sid, orders in orders_by_site.items():
        nb = -(-grid.num_tokens // BLOCK)
        per_head = torch.tensor(density if isinstance(density, (list, tuple)) else [density] * len(orders))
        masks = torch.rand(buckets, len(orders), nb, nb, generator=generator) < per_head[None, :, None, None]
        masks |= torch.eye(nb, dtype=torch.bool)
        sites[sid] = SitePlan.from_orders(sid, orders, grid, block_size=BLOCK, block_masks=masks)
    return Plan(sites=sites, step_boundaries=[700.0] if buckets == 2 else [])


def enable_ulysses(model, world: int) -> None:
    from diffusers import ContextParallelConfig

    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))


def compile_tiny_wan(world: int, orders: dict, reports: list, **compile_kwargs: Any) -> tuple[torch.nn.Module, torch.Tensor]:
    """tiny Wan (under Ulysses when world > 1) compiled with `paro_passes` and the plan of ``orders`` (exact
    numerics), called once after a reset of Dynamo and its counters; ``reports`` gets each graph's report. Returns the
    model and its output."""
    from torch._dynamo.utils import counters

    model, inputs = tiny_wan()
    if world > 1:
        enable_ulysses(model, world)
    with torch.no_grad():
        if world > 1:
            model(**inputs)  # diffusers' hooks need one eager call before Dynamo traces them
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend=paro_passes({**EXACT, "plan": wan_plan(orders)}, reports),
                                 **compile_kwargs)
        return model, compiled(**inputs)[0]


def paro_passes(options: dict, reports: Optional[list] = None) -> Callable:
    """A Dynamo backend that runs paro's passes (`backend.rewrite_graph`, the context-parallel pass included) and
    then the rewritten graph eagerly: what ``backend="paro"`` hands to Inductor, without Inductor's compile time
    (minutes on a shared CPU for every process). ``tests/parallel/test_ulysses.py`` runs the real backend once.
    ``reports``: a list that gets each graph's report."""
    from paro_compile.backend import load_plan, prepare_plan, rewrite_graph
    from paro_compile.config import ParoConfig
    from paro_compile.report import new_report

    config = ParoConfig.from_options(options)
    plan = load_plan(config.plan)

    def backend(gm, example_inputs):
        prepared = prepare_plan(gm, plan, config) if plan is not None else None  # the plan's entry for this graph
        report = new_report()
        if reports is not None:
            reports.append(report)
        return rewrite_graph(gm, config, prepared and prepared.plan, report, prepared and prepared.missing).forward

    return backend


# ---------------------------------------------------------------------------------------------------
# a hand-written Ulysses attention: other head layouts than diffusers', and a ring-style exchange


class ExchangedAttention(torch.nn.Module):
    """Self-attention over 256 image tokens (16 × 16) whose ranks exchange heads for tokens with
    ``funcol.all_to_all_single`` like diffusers' Ulysses, with the head layout ``layout``:

    - "contiguous": rank r attends heads [r·H/U, (r+1)·H/U) (diffusers' layout);
    - "strided": rank r attends heads r, r+U, r+2U, ... (the head axis split the other way round);
    - "ring": keys and values all-gathered, every rank keeps all heads and its query tokens (ring-style).
    One process (no process group) computes the same function on all tokens."""

    def __init__(self, heads: int = WAN_HEADS, head_dim: int = 64, layout: str = "contiguous") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.heads, self.head_dim, self.layout = heads, head_dim, layout
        self.qkv = torch.nn.Linear(32, 3 * heads * head_dim)
        self.out = torch.nn.Linear(heads * head_dim, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed._functional_collectives as funcol
        import torch.nn.functional as F

        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        b, n, _ = x.shape
        x = x.chunk(world, dim=1)[rank]
        s = n // world
        q, k, v = self.qkv(x).unflatten(2, (3, self.heads, self.head_dim)).unbind(2)  # [B, S, H, D] each
        hl, d = self.heads // world, self.head_dim
        if world == 1:
            q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
            o = F.scaled_dot_product_attention(q, k, v).permute(0, 2, 1, 3)
        elif self.layout == "ring":
            kv = funcol.all_gather_tensor(torch.cat([k.flatten(), v.flatten()]), 0, dist.group.WORLD)
            kv = kv.view(world, 2, b, s, self.heads, d)
            k, v = (kv[:, i].permute(1, 0, 2, 3, 4).reshape(b, n, self.heads, d) for i in range(2))
            q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
            o = F.scaled_dot_product_attention(q, k, v).permute(0, 2, 1, 3)
        else:
            def exchange(t):
                if self.layout == "contiguous":
                    send = t.reshape(b, s, world, hl, d).permute(2, 1, 0, 3, 4).contiguous()
                else:
                    send = t.reshape(b, s, hl, world, d).permute(3, 1, 0, 2, 4).contiguous()
                got = funcol.all_to_all_single(send.flatten(), None, None, dist.group.WORLD)
                got = funcol.wait_tensor(got).reshape(world, s, b, hl, d)
                return got.flatten(0, 1).permute(1, 2, 0, 3)  # [B, H_l, N, D]

            o = F.scaled_dot_product_attention(exchange(q), exchange(k), exchange(v))  # [B, H_l, N, D]
            send = o.reshape(b, hl, world, s, d).permute(2, 3, 0, 1, 4).contiguous()  # [U, S, B, H_l, D]
            got = funcol.wait_tensor(funcol.all_to_all_single(send.flatten(), None, None, dist.group.WORLD))
            got = got.reshape(world, s, b, hl, d)  # [source rank = head group, S, B, H_l, D]
            axes = (2, 1, 0, 3, 4) if self.layout == "contiguous" else (2, 1, 3, 0, 4)
            o = got.permute(*axes).reshape(b, s, self.heads, d)
        out = self.out(o.flatten(2))
        if world > 1:
            out = self.gather_tokens(out.contiguous(), world)
        return out

    def gather_tokens(self, out: torch.Tensor, world: int) -> torch.Tensor:
        """The whole sequence [B, N, C] from every rank's chunk ``out`` [B, N/U, C], as diffusers gathers it."""
        import torch.distributed._functional_collectives as funcol

        return funcol.all_gather_tensor(out, 1, dist.group.WORLD)


def exchanged_inputs() -> torch.Tensor:
    return torch.randn(1, 256, 32, generator=torch.Generator().manual_seed(2))


def image_plan(orders: list[str], seed: int = 0, density: float = 0.4, text_tokens: int = 0):
    from paro_compile.calibration.masks import mandatory_blocks
    from paro_compile.grid import TokenGrid
    from paro_compile.plan import Plan, SitePlan

    grid = TokenGrid(frames=None, height=16 - text_tokens // 16, width=16, text_tokens=text_tokens)
    nb = grid.num_tokens // BLOCK
    masks = torch.rand(1, len(orders), nb, nb, generator=torch.Generator().manual_seed(seed)) < density
    masks |= mandatory_blocks(grid, BLOCK)
    return Plan(sites={"<root>#0": SitePlan.from_orders("<root>#0", orders, grid, block_size=BLOCK, block_masks=masks)})
