"""Ulysses context parallelism of paro attention on several GPUs against one GPU (spec ``cp-wan720``).

One attention layer at the Wan2.1-14B 720p shape (40 heads × 75,600 tokens × 128, bf16), with a plan of mixed
per-head PARO orders and block masks of average density 0.2 (per-head densities spread the way site/global allocation
spreads them, or all equal with ``--uniform``):

- one GPU: `paro_attention` on all heads (kernel-applied permutations), the baseline;
- ``--world`` GPUs over NCCL, diffusers' Ulysses step by step: every rank holds N/U tokens of q, k, v as [B, N/U, H, D];
  the layout of diffusers' ``TemplatedUlyssesAttention`` (reshape to [U, N/U, B, H/U, D], ``all_to_all_single``,
  back to [B, H/U, N, D]), paro attention on the rank's heads with its plan rows (`paro_compile.parallel.select_heads`,
  what the context-parallel pass does), and the all-to-all of the output back to tokens. Timed in the model's head
  order and in the balanced one (`balanced_head_order`).

Reported (after checking every rank's output against one process's on the same inputs): the time of a layer, its
all-to-all share, the kernel time of every rank, the head imbalance (slowest rank
over the mean, kept blocks and measured), the speed-up over one GPU, the all-to-all bandwidth, and a model of 4 and 8
GPUs from that bandwidth (docs/context_parallel.md): ``t_U = t_1 / U · (1 + imbalance_U) + 4 · bytes_U / bandwidth``.

    python benchmarks/bench_cp.py --world 2 --out OUT
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
"""NVLink multicast stays off: a program using it can take the host's shared GPUs out of service."""


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2, help="GPUs of the Ulysses group")
    ap.add_argument("--heads", type=int, default=40)
    ap.add_argument("--grid", default="21,45,80", help="frames,height,width of the visual tokens")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--uniform", action="store_true", help="every head at --density (default: spread per head)")
    ap.add_argument("--rep-ms", type=float, default=1500.0, help="timed milliseconds of a kernel measurement")
    ap.add_argument("--iters", type=int, default=30, help="timed calls of a measurement with collectives")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: gloo and the reference numerics in fp32 (a check of this script, not a timing)")
    ap.add_argument("--no-check", action="store_true",
                    help="skip comparing every rank's output with one process's on the same inputs")
    ap.add_argument("--out", required=True)
    return ap.parse_args(argv)


def build_plan(args):
    """The global plan: mixed orders over the grid, per-head densities averaging --density."""
    from paro_compile.grid import TokenGrid, candidate_orders
    from paro_compile.kernels import tuning
    from paro_compile.kernels.block_mask import num_blocks
    from paro_compile.plan import SitePlan

    frames, height, width = (int(x) for x in args.grid.split(","))
    grid = TokenGrid(frames=frames, height=height, width=width)
    orders = candidate_orders(grid)
    head_orders = [orders[h % len(orders)] for h in range(args.heads)]
    nb = num_blocks(grid.num_tokens, args.block)
    generator = torch.Generator().manual_seed(0)
    if args.uniform:
        densities = [args.density] * args.heads
    else:  # log-uniform over a 5x range, rescaled to the mean
        spread = torch.exp(torch.rand(args.heads, generator=generator) * torch.log(torch.tensor(5.0)))
        densities = (spread / spread.mean() * args.density).clamp(0.02, 1.0).tolist()
    masks = torch.cat([tuning.random_block_mask(1, nb, nb, d, generator=generator, block_m=args.block,
                                                block_n=args.block) for d in densities])
    return SitePlan.from_orders("layer#0", head_orders, grid, block_size=args.block, block_masks=masks[None])


def attention_fn(site, device):
    """``fn(q, k, v)``: paro attention with ``site``'s permutation and masks, built on ``device`` once."""
    from paro_compile.kernels.block_mask import BlockMask
    from paro_compile.ops import paro_attention

    mask = BlockMask.from_dense(site.block_masks[0], site.block_size, site.block_size).to(device)
    perm = site.perm.to(device)
    return lambda q, k, v: paro_attention(q, k, v, perm=perm, mask=mask)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dtype_of(args) -> torch.dtype:
    return torch.bfloat16 if args.device == "cuda" else torch.float32


def global_qkv(args, n: int, device) -> list[torch.Tensor]:
    """The layer's q, k, v [B, N, H, D] in the model's layout, the same on every rank (one seed)."""
    generator = torch.Generator(device=device).manual_seed(1)
    return [torch.randn(1, n, args.heads, args.head_dim, device=device, dtype=dtype_of(args), generator=generator)
            for _ in range(3)]


def one_gpu(args, site) -> dict:
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    qkv = [x.transpose(1, 2) for x in global_qkv(args, site.seq_len, device)]
    attend = attention_fn(site, device)
    timing = harness.time_ms(lambda: attend(*qkv), device, warmup_ms=500, rep_ms=args.rep_ms)
    del qkv
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return {"gpus": 1, "order": "model", "layer_ms": timing.median_ms, "kernel_ms": [timing.median_ms],
            "all_to_all_ms": 0.0, "tokens": site.seq_len}


def time_collective(fn, iters: int, warmup: int = 3) -> float:
    """Median ms of ``fn`` over ``iters`` calls that every rank makes in lockstep: a call holding collectives cannot
    use an adaptive timer (ranks would pick different repeat counts and wait on each other forever)."""
    import torch.distributed as dist

    for _ in range(warmup):
        fn()
    if not torch.cuda.is_initialized():  # the CPU check: wall clock
        dist.barrier()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[len(times) // 2]
    torch.cuda.synchronize()
    dist.barrier()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return times[len(times) // 2]


def _rank(rank: int, world: int, port: int, args, site, orders: dict, out_dir: str) -> None:
    import torch.distributed as dist

    from paro_compile.parallel import select_heads

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **NO_MULTICAST)
    heads, d, n = args.heads, args.head_dim, site.seq_len
    local_heads, local_tokens = heads // world, n // world
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", rank=rank, world_size=world)
    full = global_qkv(args, n, device)
    local = [x[:, rank * local_tokens:(rank + 1) * local_tokens].contiguous() for x in full]
    expected = None
    if not args.no_check:  # one process's output for this rank's tokens, all heads, the whole plan
        expected = attention_fn(site, device)(*(x.transpose(1, 2) for x in full)).transpose(1, 2)
        expected = expected[:, rank * local_tokens:(rank + 1) * local_tokens]
    del full

    def to_heads(x):  # diffusers' TemplatedUlyssesAttention: [B, S, H, D] -> [B, H/U, N, D] (a strided view)
        send = x.reshape(1, local_tokens, world, local_heads, d).permute(2, 1, 0, 3, 4).contiguous()
        got = torch.empty_like(send)
        dist.all_to_all_single(got, send)
        return got.flatten(0, 1).permute(1, 0, 2, 3).contiguous().permute(0, 2, 1, 3)

    def to_tokens(o):  # [B, H/U, N, D] -> [B, S, H, D], as diffusers sends the output back
        send = o.permute(0, 2, 1, 3).reshape(1, world, local_tokens, local_heads, d).permute(1, 3, 0, 2, 4).contiguous()
        got = torch.empty_like(send)
        dist.all_to_all_single(got, send)
        return got.flatten(0, 1).permute(1, 2, 0, 3).contiguous()

    results = []
    for name, order in orders.items():
        mine = order[rank * local_heads:(rank + 1) * local_heads]
        attend = attention_fn(select_heads(site, mine), device)
        # the projections' outputs of a model whose heads were reordered (`balance_heads` permutes the weights)
        ordered = [x[:, :, torch.tensor(order, device=x.device)].contiguous() for x in local]
        exchanged = [to_heads(x) for x in ordered]

        def kernel():
            return attend(*exchanged)

        def layer():
            return to_tokens(attend(*(to_heads(x) for x in ordered)))

        def exchange_only():  # the layer's four all-to-alls (q, k, v in, the output back)
            return [to_tokens(to_heads(x)) for x in ordered[:2]]

        dist.barrier()
        measured = {"kernel_ms": harness.time_ms(kernel, device, warmup_ms=300, rep_ms=args.rep_ms).median_ms}
        for what, fn in (("layer_ms", layer), ("all_to_all_ms", exchange_only)):
            measured[what] = time_collective(fn, args.iters)
        if expected is not None:
            # the output's heads are in the order's order: put them back in the model's before comparing
            got = layer()
            back = torch.empty_like(got)
            back[:, :, torch.tensor(order, device=got.device)] = got
            measured["max_abs_diff_vs_one_process"] = float((back.float() - expected.float()).abs().max())
        results.append({"order": name, "heads": [int(h) for h in mine], **measured})
        del exchanged, ordered
    dist.barrier()
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def main(argv=None) -> dict:
    args = parse_args(argv)
    for key, value in NO_MULTICAST.items():
        os.environ[key] = value
    if args.device == "cuda" and (not torch.cuda.is_available() or torch.cuda.device_count() < args.world):
        raise SystemExit(f"bench_cp.py needs {args.world} CUDA GPUs, found {torch.cuda.device_count()} "
                         "(--device cpu checks the script on gloo)")
    if args.heads % args.world:
        raise SystemExit(f"--heads {args.heads} does not split over --world {args.world}")
    import torch.multiprocessing as mp

    from paro_compile.parallel import balanced_head_order, head_costs, imbalance

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_stamp = harness.stamp(__file__, argv)
    started = time.time()
    site = build_plan(args)
    costs = head_costs(site)
    orders = {"model": list(range(args.heads)), "balanced": balanced_head_order(costs, args.world)}
    base = one_gpu(args, site)
    mp.spawn(_rank, args=(args.world, free_port(), args, site, orders, str(out_dir)), nprocs=args.world, join=True)
    per_rank = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(args.world)]
    rows = [base]
    element = 2  # bf16
    exchanged_bytes = site.seq_len // args.world * args.heads * args.head_dim * element * (args.world - 1) / args.world
    for index, name in enumerate(orders):
        entries = [ranks[index] for ranks in per_rank]
        kernels = [e["kernel_ms"] for e in entries]
        layer = max(e["layer_ms"] for e in entries)
        exchange = max(e["all_to_all_ms"] for e in entries)
        bandwidth = 4 * exchanged_bytes / (exchange / 1e3) / 1e9  # GB/s per rank, 4 all-to-alls
        diffs = [e.get("max_abs_diff_vs_one_process") for e in entries]
        rows.append({"gpus": args.world, "order": name, "layer_ms": layer, "kernel_ms": kernels,
                     "max_abs_diff_vs_one_process": None if None in diffs else max(diffs),
                     "all_to_all_ms": exchange, "speedup": base["layer_ms"] / layer,
                     "kept_block_imbalance": imbalance(costs, orders[name], args.world),
                     "kernel_imbalance": max(kernels) / (sum(kernels) / len(kernels)) - 1,
                     "all_to_all_GBps": bandwidth})
    best = min(rows[1:], key=lambda r: r["layer_ms"])
    model_rows = []
    for gpus in (2, 4, 8):
        if args.heads % gpus:
            continue
        moved = site.seq_len // gpus * args.heads * args.head_dim * element * (gpus - 1) / gpus
        order = balanced_head_order(costs, gpus)
        spread = imbalance(costs, order, gpus)
        modelled = base["layer_ms"] / gpus * (1 + spread) + 4 * moved / (best["all_to_all_GBps"] * 1e9) * 1e3
        model_rows.append({"gpus": gpus, "modelled_layer_ms": modelled, "modelled_speedup": base["layer_ms"] / modelled,
                           "balanced_imbalance": spread, "all_to_all_MB_per_rank": 4 * moved / 1e6})
    results = {"args": vars(args), "rows": rows, "model": model_rows, "seconds": time.time() - started,
               "target_speedup": 1.85, "met": best["speedup"] >= 1.85}
    harness.write_results(out_dir / "cp_wan720.json", results, run_stamp,
                          title=f"Ulysses paro attention, {args.world} GPUs vs 1 (Wan-720p layer)",
                          notes=[f"model of more GPUs from the measured all-to-all bandwidth: "
                                 f"{json.dumps(model_rows)}"])
    print(json.dumps({"rows": rows, "model": model_rows}, indent=1))
    return results


if __name__ == "__main__":
    main()
