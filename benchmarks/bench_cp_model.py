"""The whole transformer under diffusers' Ulysses on several GPUs against one GPU (spec ``cp-wan720-model``).

diffusers' ``WanTransformer3DModel`` at Wan2.1-14B dimensions (``bench_e2e.wan_config``, reduced depth), 720p latents,
B=1, random bf16 weights and the random-order synthetic plan of ``bench_e2e`` (the same plan on every rank: one seed).
Every rank first runs the model alone on its GPU (no collective: the one-GPU baseline, measured on both GPUs at once),
then ``enable_parallelism(ContextParallelConfig(ulysses_degree=world))`` and the same variants again:

- ``compile-cudnn``: ``torch.compile`` with cuDNN SDPA;
- ``paro-<d>``: ``backend="paro"`` with the plan at density d (self-attention sites on the rank's heads, the
  context-parallel pass slicing the global plan);
- ``paro-<d>+overlap`` (several GPUs only): the same with Inductor's compute/communication reordering
  (``reorder_for_compute_comm_overlap``), which issues each all-to-all as early as its input allows and waits as late
  as its output allows, so the exchanges can overlap the projections around them.

Reported per variant: ms per forward (one GPU: `harness.time_calls`; several: the median over ranks' lockstep calls,
slowest rank), the speed-up of several GPUs over one for the same variant and against one-GPU paro, the graph breaks,
the report's site counts, and every rank's output against its one-GPU output (rel-L2). ``paro_compile.parallel.
make_context_parallel_traceable()`` is called first (torch before 2.13 breaks the graph at the final all-gather).

    python benchmarks/bench_cp_model.py --world 2 --out OUT
    python benchmarks/bench_cp_model.py --world 2 --tiny --device cpu --out OUT   # a check of this script on gloo
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from bench_cp import NO_MULTICAST, free_port, time_collective  # noqa: E402

DEFAULT_VARIANTS = "compile-cudnn,paro-0.2,paro-0.2+overlap"
OVERLAP = "+overlap"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2, help="GPUs of the Ulysses group")
    ap.add_argument("--layers", type=int, default=2, help="Wan blocks (the full model has 40)")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS,
                    help="comma list of compile, compile-cudnn, paro-<d>, paro-<d>+overlap (several GPUs only)")
    ap.add_argument("--iters", type=int, default=5, help="timed calls per variant")
    ap.add_argument("--block", type=int, default=None, help="mask block of the synthetic plan (default 64; 16 tiny)")
    ap.add_argument("--tiny", action="store_true", help="bench_e2e's tiny Wan config (a check of this script)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: gloo, fp32, the Triton interpreter (a check of this script, not a timing)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    for variant in split_variants(args.variants):
        try:
            parse_variant(variant)
        except ValueError as error:
            ap.error(str(error))
    return args


def split_variants(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def parse_variant(variant: str) -> tuple[str, bool]:
    """``paro-0.2+overlap`` → ("paro-0.2", True)."""
    import bench_e2e

    overlap = variant.endswith(OVERLAP)
    base = variant.removesuffix(OVERLAP)
    spec = bench_e2e.Variant.parse(base)
    if spec.fp8 is not None or spec.graphs or spec.compensate or not (spec.is_paro or spec.base in ("compile", "compile-cudnn")):
        raise ValueError(f"variant {variant!r}: expected compile, compile-cudnn, paro-<d> or paro-<d>+overlap")
    return base, overlap


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _compile(model, base: str, plans: dict, allow_fp32: bool):
    import bench_e2e

    from paro_compile.backend import registered_backend

    spec = bench_e2e.Variant.parse(base)
    if spec.sdpa_only:
        return torch.compile(model, dynamic=False), bench_e2e.sdpa_context(spec.base)
    options = {"plan": plans[spec.density], "allow_fp32": allow_fp32}
    return (torch.compile(model, backend=registered_backend(), dynamic=False, options=options),
            bench_e2e.sdpa_context(spec.base))


def run_variant(model, inputs: dict, variant: str, plans: dict, args, device, world: int,
                reference: dict) -> dict:
    """Compile ``variant``, call it once (the compile), time it; ``reference`` maps a base variant to its one-GPU output
    (filled on one GPU, compared with on several)."""
    import bench_e2e

    import paro_compile

    base, overlap = parse_variant(variant)
    entry: dict = {"variant": variant, "gpus": world}
    torch._dynamo.reset()
    paro_compile.clear_reports()
    torch._dynamo.utils.counters.clear()
    allow_fp32 = args.device == "cpu"
    compiled, ctx = _compile(model, base, plans, allow_fp32)
    patch = torch._inductor.config.patch(reorder_for_compute_comm_overlap=overlap)

    def call():
        with torch.no_grad(), ctx():
            return compiled(**inputs)[0]

    start = time.perf_counter()
    with patch:  # Inductor reads its config while it compiles, in the first call
        out = call()
    harness.synchronize(device)
    entry["first_call_s"] = time.perf_counter() - start
    if world == 1:
        reference[base] = out.float().cpu()
        entry["median_ms"] = harness.time_calls(call, device, calls=args.iters, warmup_calls=1).median_ms
    else:
        entry["rel_l2_vs_one_gpu"] = rel_l2(out.float().cpu(), reference[base]) if base in reference else None
        entry["median_ms"] = time_collective(call, args.iters, warmup=1)
    breaks = torch._dynamo.utils.counters["graph_break"]
    entry["graph_breaks"] = int(sum(breaks.values()))
    entry["graph_break_reasons"] = [str(reason)[:300] for reason in list(breaks)[:4]]
    if bench_e2e.Variant.parse(base).is_paro:
        report = paro_compile.model_report(compiled)
        lowered = [s for s in report.sites if s.lowered]
        entry["sites_lowered"] = f"{len(lowered)}/{len(report.sites)}"
        entry["folded"] = sorted({str(s.folded_order) for s in lowered if getattr(s, "folded_order", None)})
        entry["heads_per_site"] = sorted({int(s.shape[1]) for s in lowered if not getattr(s, "cross_attention", False)})
    del out
    torch._dynamo.reset()
    return entry


def _rank(rank: int, world: int, port: int, args, out_dir: str) -> None:
    import torch.distributed as dist

    import bench_e2e

    from paro_compile.parallel import make_context_parallel_traceable

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **NO_MULTICAST)
    if args.device == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device)
        dtype = torch.bfloat16
    else:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device, dtype = torch.device("cpu"), torch.float32
        dist.init_process_group("gloo", rank=rank, world_size=world)
        torch.set_num_threads(1)
        sys.path.insert(0, str(harness.REPO))
        from tests.parallel.cp_workers import cpu_workarounds  # a CPU-only torch's gaps (that module's docstring)

        cpu_workarounds()
    rows: list[dict] = []
    try:
        changed = make_context_parallel_traceable()
        cls = bench_e2e.model_class("wan")
        config = bench_e2e.wan_config(args.layers, args.tiny)
        block = args.block or (16 if args.tiny else 64)
        small = bench_e2e.build(cls, bench_e2e.one_block_config("wan", config), device, dtype, args.seed)
        small_inputs, grid = bench_e2e.wan_inputs(small, device, dtype, args.tiny)
        found = bench_e2e.discover_sites(small, small_inputs, dtype == torch.float32)
        del small, small_inputs
        model = bench_e2e.build(cls, config, device, dtype, args.seed)
        inputs, grid = bench_e2e.wan_inputs(model, device, dtype, args.tiny)
        heads = int(config["num_attention_heads"])
        sites = bench_e2e.extrapolate_site_ids(found, {"blocks": int(config["num_layers"])})
        grid_sites = [s.site_id for s in sites if s.self_attention and s.seq_len == grid.num_tokens]
        variants = split_variants(args.variants)
        densities = sorted({bench_e2e.Variant.parse(parse_variant(v)[0]).density for v in variants} - {None})
        plans = {d: bench_e2e.synthetic_plan(grid_sites, heads, grid, d, block, args.seed,
                                             local_blocks=bench_e2e.DEFAULT_LOCAL_BLOCKS["wan"]) for d in densities}
        meta = {"tokens": grid.num_tokens, "heads": heads, "layers": args.layers, "grid_sites": len(grid_sites),
                "tracing_gaps_closed": changed}
        reference: dict = {}
        for variant in variants:  # one GPU: the model alone on this rank's GPU
            if parse_variant(variant)[1]:
                continue
            rows.append(guarded_variant(model, inputs, variant, plans, args, device, 1, reference))
        from diffusers import ContextParallelConfig

        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        with torch.no_grad():
            model(**inputs)  # diffusers' hooks need one eager call before Dynamo traces them
        for variant in variants:
            dist.barrier()
            rows.append(guarded_variant(model, inputs, variant, plans, args, device, world, reference))
        rows = [dict(meta, rank=rank, **row) for row in rows]
    finally:
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(rows))
        dist.destroy_process_group()


def guarded_variant(model, inputs: dict, variant: str, plans: dict, args, device, world: int, reference: dict) -> dict:
    """`run_variant`'s entry, or what failed in it (one variant's failure does not cost the others)."""
    try:
        return run_variant(model, inputs, variant, plans, args, device, world, reference)
    except Exception as error:
        print(f"[bench_cp_model] {variant} on {world} GPU(s) FAILED: {type(error).__name__}: {error}", flush=True)
        return {"variant": variant, "gpus": world, "error": f"{type(error).__name__}: {error}"[:2000],
                "traceback": traceback.format_exc()[-3000:]}


def combine(per_rank: list[list[dict]], world: int) -> list[dict]:
    """One row per (variant, GPUs): the slowest rank's time, the worst rank's output error, speed-ups against one GPU."""
    keyed: dict[tuple, list[dict]] = {}
    for rows in per_rank:
        for row in rows:
            keyed.setdefault((row["variant"], row["gpus"]), []).append(row)
    out = []
    for (variant, gpus), entries in keyed.items():
        row = {k: v for k, v in entries[0].items() if k not in ("rank", "median_ms", "rel_l2_vs_one_gpu", "first_call_s")}
        errors = [e["error"] for e in entries if "error" in e]
        if errors:
            row["error"] = errors[0]
        times = [e["median_ms"] for e in entries if "median_ms" in e]
        if times and not errors:
            row["median_ms"] = max(times) if gpus > 1 else min(times)
            row["rank_ms"] = times
            row["first_call_s"] = max(e["first_call_s"] for e in entries)
        diffs = [e.get("rel_l2_vs_one_gpu") for e in entries]
        if gpus > 1 and diffs and None not in diffs:
            row["rel_l2_vs_one_gpu"] = max(diffs)
        out.append(row)
    one = {r["variant"]: r["median_ms"] for r in out if r["gpus"] == 1 and "median_ms" in r}
    paro_one = {v.removesuffix(OVERLAP): t for v, t in one.items() if v.startswith("paro")}
    for row in out:
        if row["gpus"] > 1 and "median_ms" in row:
            base = row["variant"].removesuffix(OVERLAP)
            if base in one:
                row["x_same_variant_one_gpu"] = one[base] / row["median_ms"]
            if base in paro_one:
                row["x_one_gpu_paro"] = paro_one[base] / row["median_ms"]
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.update(NO_MULTICAST)
    if args.device == "cuda" and (not torch.cuda.is_available() or torch.cuda.device_count() < args.world):
        raise SystemExit(f"bench_cp_model.py needs {args.world} CUDA GPUs, found {torch.cuda.device_count()} "
                         "(--device cpu --tiny checks the script on gloo)")
    import torch.multiprocessing as mp

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_stamp = harness.stamp(__file__, argv)
    started = time.time()
    mp.spawn(_rank, args=(args.world, free_port(), args, str(out_dir)), nprocs=args.world, join=True)
    per_rank = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(args.world)]
    rows = combine(per_rank, args.world)
    best = max((r.get("x_one_gpu_paro", 0.0) for r in rows), default=0.0)
    results = {"args": vars(args), "rows": rows, "seconds": time.time() - started, "target_x_one_gpu_paro": 1.85,
               "met": best >= 1.85}
    harness.write_results(out_dir / "cp_wan720_model.json", results, run_stamp,
                          title=f"Wan transformer under diffusers' Ulysses, {args.world} GPUs vs 1")
    for r in range(args.world):
        (out_dir / f"rank{r}.json").unlink()
    print(json.dumps(rows, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
