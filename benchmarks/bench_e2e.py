"""End-to-end transformer forward speed at real sizes: eager vs torch.compile (Inductor + SDPA) vs backend="paro".

Models (diffusers classes, random weights, bf16, inference):
- cog: CogVideoXTransformer3DModel with CogVideoX-5B dims: 48 heads × 64, 42 layers (--layers), text 226
  tokens × 4096, latent 13×16×60×90 → patch 2: 13·30·45 = 17,550 video tokens + 226 = 17,776; B = 2 (CFG).
- flux: FluxTransformer2DModel with FLUX.1-dev dims: 24 heads × 128, 19 double + 38 single blocks
  (--flux-layers D,S), 1024² image → 4096 image tokens + 512 text = 4608; B = 1.
Variants (--variants, comma list; default all):
  eager | compile (Inductor, default SDPA) | compile-flash | compile-cudnn (sdpa_kernel around compile and
  every run) | paro-<density> (backend="paro" with a synthetic plan: per site and head, diagonal + text
  blocks + random blocks up to the density, PARO order drawn at random among the candidates; INT8/FP8).
Per variant: median forward time (`harness.time_calls`: about --iters timed calls after --warmup untimed ones;
triton.testing.do_bench on the GPU), first-call (compile) time, of which
Inductor's compile_fx and our passes (paro_compile.backend.rewrite_graph), peak memory; ratios vs eager and
vs the fastest compiled SDPA variant of the same run.

Outputs under --out: results.json (every variant, the stamp), results.md (the table, also on stdout).
GPU:  python benchmarks/bench_e2e.py --out OUT --model cog              (--max-minutes bounds the run)
      python benchmarks/bench_e2e.py --out OUT --model flux
CI:   python benchmarks/bench_e2e.py --out OUT --tiny                   (CPU, tiny configs, reference kernels)
"""
from __future__ import annotations

import argparse
import gc
import math
import re
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import paro_compile  # noqa: E402
from paro_compile.backend import registered_backend  # noqa: E402
import paro_compile.backend as paro_backend_module  # noqa: E402
from paro_compile.grid import TokenGrid, candidate_orders, orders_permutation  # noqa: E402
from paro_compile.plan import Plan, SitePlan  # noqa: E402

ALL_VARIANTS = ("eager", "compile", "compile-flash", "compile-cudnn")
DEFAULT_DENSITIES = (0.5, 0.3, 0.2)
VARIANT_NAME = re.compile(r"^(eager|(compile|compile-flash|compile-cudnn|paro-(\d+\.?\d*|\.\d+)(\+comp)?)(\+cg)?)$")


def split_variant(variant: str) -> tuple[str, bool]:
    """``compile-cudnn+cg`` → ("compile-cudnn", True): a ``+cg`` suffix runs the variant with CUDA graphs
    (Inductor's ``mode="reduce-overhead"``), which removes per-kernel launch and Python overhead."""
    return (variant.removesuffix("+cg"), True) if variant.endswith("+cg") else (variant, False)


def paro_density(variant: str) -> float:
    """``paro-0.2`` / ``paro-0.2+comp`` (with skipped-block compensation) / ``paro-0.2+comp+cg`` -> 0.2."""
    return float(split_variant(variant)[0].split("-", 1)[1].removesuffix("+comp"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--model", default="cog", choices=("cog", "flux", "both"))
    p.add_argument("--layers", type=int, default=42, help="CogVideoX layers (5B: 42)")
    p.add_argument("--flux-layers", default="19,38", help="Flux double,single blocks (dev: 19,38)")
    p.add_argument("--variants", default="all",
                   help="comma list of eager,compile,compile-flash,compile-cudnn,paro-<d>,paro-<d>+comp (+comp: "
                        "compensate_skipped=True); any compiled variant may end in +cg (CUDA graphs, "
                        "mode='reduce-overhead') (default: all with --densities)")
    p.add_argument("--densities", default=",".join(str(d) for d in DEFAULT_DENSITIES))
    p.add_argument("--block", type=int, default=None, help="mask block of the synthetic plans (default 64; 16 with --tiny)")
    p.add_argument("--coherent", action="store_true",
                   help="blocks under 64: masks drawn per 64-token block and refined (neighbouring query blocks agree, "
                        "as calibrated masks tend to); default: drawn per block")
    p.add_argument("--qk-bits", type=int, default=8)
    p.add_argument("--pv-dtype", default="fp8")
    p.add_argument("--impl", default="auto")
    p.add_argument("--iters", type=int, default=5, help="timed calls per variant (about)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before them (about)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=8.0, help="skip remaining variants past this wall time")
    p.add_argument("--tiny", action="store_true", help="CPU, tiny configs (--model both for Flux too), density 0.5 (CI)")
    p.add_argument("--device", default=None)
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile 2 calls per variant (torch.profiler) and write the top GPU kernels "
                        "to OUT/profile_<model>_<variant>.txt")
    args = p.parse_args(argv)
    if args.variants != "all":
        bad = [v for v in args.variants.split(",") if v.strip() and not VARIANT_NAME.match(v.strip())]
        if bad:
            p.error(f"unknown variants {bad} (see --help)")
    return args


def profile_calls(call: Callable, device, path: Path, calls: int = 2, top: int = 30) -> None:
    """GPU time per kernel over `calls` calls (where the time goes inside one variant)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            call()
        harness.synchronize(device)
    sort = "cuda_time_total" if torch.device(device).type == "cuda" else "cpu_time_total"
    path.write_text(f"{calls} calls\n" + prof.key_averages().table(sort_by=sort, row_limit=top, max_name_column_width=90))


# ---------------------------------------------------------------------------------------------------
# compile-time accounting
# ---------------------------------------------------------------------------------------------------
TIMERS = {"paro_passes": 0.0, "inductor": 0.0}
_INSTALLED = {}


def install_timers() -> None:
    if _INSTALLED:
        return
    import torch._inductor.compile_fx as cfx

    orig_rewrite = paro_backend_module.rewrite_graph
    orig_compile_fx = cfx.compile_fx
    depth = [0]

    def timed_rewrite(*a, **k):
        t = time.perf_counter()
        try:
            return orig_rewrite(*a, **k)
        finally:
            TIMERS["paro_passes"] += time.perf_counter() - t

    def timed_compile_fx(*a, **k):
        depth[0] += 1
        t = time.perf_counter()
        try:
            return orig_compile_fx(*a, **k)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                TIMERS["inductor"] += time.perf_counter() - t

    paro_backend_module.rewrite_graph = timed_rewrite
    cfx.compile_fx = timed_compile_fx
    _INSTALLED.update(rewrite=orig_rewrite, compile_fx=orig_compile_fx)


def uninstall_timers() -> None:
    if not _INSTALLED:
        return
    import torch._inductor.compile_fx as cfx

    paro_backend_module.rewrite_graph = _INSTALLED["rewrite"]
    cfx.compile_fx = _INSTALLED["compile_fx"]
    _INSTALLED.clear()


# ---------------------------------------------------------------------------------------------------
# models and inputs
# ---------------------------------------------------------------------------------------------------
def cog_config(layers: int, tiny: bool) -> dict:
    if tiny:
        return dict(num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4, time_embed_dim=32,
                    text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
                    temporal_compression_ratio=4, max_text_seq_length=8, use_rotary_positional_embeddings=True)
    return dict(num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
                text_embed_dim=4096, num_layers=layers, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
                temporal_compression_ratio=4, max_text_seq_length=226, use_rotary_positional_embeddings=True,
                use_learned_positional_embeddings=False)


def flux_config(double: int, single: int, tiny: bool) -> dict:
    if tiny:
        return dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=64,
                    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
                    axes_dims_rope=(16, 24, 24))
    return dict(patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


def build(cls, config: dict, device, dtype, seed: int):
    """Construct directly on the device in the target dtype (a 12B model would not fit twice in fp32)."""
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(old)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def cog_inputs(model, device, dtype, tiny: bool) -> tuple[dict, TokenGrid]:
    from paro_compile.toy.cogvideox import rotary_embeddings

    cfg = model.config
    frames = (int(cfg.sample_frames) - 1) // int(cfg.temporal_compression_ratio) + 1
    h, w, c, p = int(cfg.sample_height), int(cfg.sample_width), int(cfg.in_channels), int(cfg.patch_size)
    text = int(cfg.max_text_seq_length)
    b = 2
    g = torch.Generator(device="cpu").manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(b, frames, c, h, w, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(b, text, int(cfg.text_embed_dim), generator=g).to(device, dtype),
        timestep=torch.full((b,), 500, device=device, dtype=torch.long),
        image_rotary_emb=rotary_embeddings(model, frames, h, w, device=device),
        return_dict=False,
    )
    return inputs, TokenGrid(frames=frames, height=h // p, width=w // p, text_tokens=text)


def flux_inputs(model, device, dtype, tiny: bool) -> tuple[dict, TokenGrid]:
    cfg = model.config
    side = 8 if tiny else 64  # 1024² image → 128² latent → 2×2 packing → 64×64 tokens
    text = 8 if tiny else 512
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    inputs = dict(
        hidden_states=torch.randn(1, side * side, int(cfg.in_channels), generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(1, text, int(cfg.joint_attention_dim), generator=g).to(device, dtype),
        pooled_projections=torch.randn(1, int(cfg.pooled_projection_dim), generator=g).to(device, dtype),
        timestep=torch.tensor([1.0], device=device, dtype=dtype),
        img_ids=ids.reshape(-1, 3).to(device, dtype),
        txt_ids=torch.zeros(text, 3, device=device, dtype=dtype),
        return_dict=False,
    )
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.tensor([3.5], device=device, dtype=dtype)
    return inputs, TokenGrid(frames=None, height=side, width=side, text_tokens=text)


# ---------------------------------------------------------------------------------------------------
# site ids and synthetic plans
# ---------------------------------------------------------------------------------------------------
def discover_site_ids(model, inputs: dict, allow_fp32: bool) -> list[tuple[str, Any, Any]]:
    """(site_id, heads, seq_len) of every supported SDPA site, from a Dynamo trace with a backend that only
    runs paro's discovery pass (no Inductor)."""
    from paro_compile.config import ParoConfig
    from paro_compile.passes.discover import find_attention_sites

    found = []

    def backend(gm, example_inputs):
        for site in find_attention_sites(gm, ParoConfig(allow_fp32=allow_fp32)):
            found.append((site.site_id, site.heads, site.seq_len, site.supported, list(site.reasons)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=False)(**inputs)
    torch._dynamo.reset()
    return found


def synthetic_plan(site_ids: list[str], heads: int, grid: TokenGrid, density: float, block: int, seed: int,
                   coherent: bool = False) -> Plan:
    """Random per-head orders and block masks at ``density`` (mandatory diagonal / text blocks kept). ``coherent``
    (blocks under 64): the block scores are drawn per 64-token block and refined, so neighbouring query blocks keep
    the same KV blocks, as calibrated masks tend to; otherwise every block is drawn on its own (the worst case for the
    kernel's shared 64-row tiles)."""
    from paro_compile.calibration.masks import mandatory_blocks, select_blocks
    from paro_compile.kernels.tuning import refine_block_mask

    g = torch.Generator().manual_seed(seed)
    cands = candidate_orders(grid)
    nb = math.ceil(grid.num_tokens / block)
    mandatory = mandatory_blocks(grid, block)
    sites = {}
    perm_cache: dict[tuple, torch.Tensor] = {}
    for sid in site_ids:
        orders = [cands[int(i)] for i in torch.randint(len(cands), (heads,), generator=g)]
        key = tuple(orders)
        if key not in perm_cache:
            perm_cache[key] = orders_permutation(grid, orders)
        if coherent and block < 64:
            f, coarse = 64 // block, math.ceil(grid.num_tokens / 64)
            scores = torch.rand(heads, coarse, coarse, generator=g)
            scores = refine_block_mask(scores, f, nb, keep_diagonal=False)
        else:
            scores = torch.rand(heads, nb, nb, generator=g)
        masks = select_blocks(scores, density, mandatory)
        sites[sid] = SitePlan(site_id=sid, heads=heads, seq_len=grid.num_tokens, block_size=block, perm=perm_cache[key],
                              block_masks=masks[None], orders=orders, grid=grid)
    return Plan(sites=sites, step_boundaries=[], density=density, meta={"synthetic": True, "seed": seed})


def sdpa_context(variant: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if variant == "compile-flash":
        return lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    if variant == "compile-cudnn":
        return lambda: sdpa_kernel([SDPBackend.CUDNN_ATTENTION])
    return nullcontext


def run_variant(model, inputs: dict, variant: str, device, args, plans: dict, allow_fp32: bool) -> dict:
    entry: dict[str, Any] = {"variant": variant}
    TIMERS["paro_passes"] = TIMERS["inductor"] = 0.0
    torch._dynamo.reset()
    paro_compile.clear_reports()
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base, graphs = split_variant(variant)
    ctx = sdpa_context(base)
    torch._dynamo.utils.counters.clear()
    if base == "eager" and not graphs:
        fn_model = model
    elif base.startswith("compile"):
        fn_model = torch.compile(model, dynamic=False, mode="reduce-overhead" if graphs else None)
    elif base.startswith("paro-"):
        density = paro_density(variant)
        plan = plans[density]
        entry["density"] = density
        entry["achieved_density"] = plan.overall_density()
        options = {"plan": plan, "qk_bits": args.qk_bits, "pv_dtype": args.pv_dtype, "impl": args.impl,
                   "allow_fp32": allow_fp32, "compensate_skipped": base.endswith("+comp")}
        if graphs:
            options["mode"] = "reduce-overhead"
        fn_model = torch.compile(model, backend=registered_backend(), dynamic=False, options=options)
    else:
        raise ValueError(f"unknown variant {variant!r}")

    def call():
        with torch.no_grad(), ctx():
            return fn_model(**inputs)

    t = time.perf_counter()
    out = call()
    harness.synchronize(device)
    entry["first_call_s"] = time.perf_counter() - t
    first = out[0] if isinstance(out, (tuple, list)) else out
    entry["output_finite"] = bool(torch.isfinite(first).all())
    del out, first
    if graphs:  # cudagraph trees record on the 2nd-3rd call: keep that out of the timed calls
        for _ in range(2):
            call()
        harness.synchronize(device)
        skips = dict(torch._dynamo.utils.counters.get("inductor", {}))
        entry["cudagraph_skips"] = int(skips.get("cudagraph_skips", 0))
    timing = harness.time_calls(call, device, calls=args.iters, warmup_calls=args.warmup)
    entry["times_ms"] = [round(t, 4) for t in timing.samples_ms]
    entry["median_ms"] = timing.median_ms
    entry["timer"] = timing.timer
    entry["compile_s"] = max(0.0, entry["first_call_s"] - entry["median_ms"] / 1e3) if variant != "eager" else 0.0
    entry["inductor_compile_fx_s"] = TIMERS["inductor"]
    entry["paro_passes_s"] = TIMERS["paro_passes"]
    if getattr(args, "profile", False) and getattr(args, "profile_dir", None) is not None:
        profile_calls(call, device, Path(args.profile_dir) / f"profile_{args.profile_model}_{variant}.txt")
    if torch.device(device).type == "cuda":
        entry["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    report = paro_compile.last_report()
    if base.startswith("paro-") and report is not None:
        entry["sites_lowered"] = f"{len(report.lowered)}/{len(report.sites)}"
        entry["compensated_sites"] = sum(bool(s.compensated) for s in report.lowered)
        entry["gathers_left"] = report.gathers_left
        entry["permutation"] = sorted({s.permutation for s in report.lowered})
        entry["fallback_reasons"] = sorted({r for s in report.fallbacks for r in s.reasons})
    del fn_model
    torch._dynamo.reset()
    return entry


def bench_model(name: str, args, device, dtype, t_start: float, on_row: Callable[[dict], None] = lambda row: None) -> list[dict]:
    import diffusers

    tiny = args.tiny
    block = args.block or (16 if tiny else 64)
    allow_fp32 = dtype == torch.float32
    t_build = time.perf_counter()
    if name == "cog":
        cls, cfg = diffusers.CogVideoXTransformer3DModel, cog_config(args.layers, tiny)
        small_cfg = dict(cfg, num_layers=1)
        make_inputs = cog_inputs
    else:
        double, single = (int(x) for x in args.flux_layers.split(","))
        cls, cfg = diffusers.FluxTransformer2DModel, flux_config(double, single, tiny)
        small_cfg = dict(cfg, num_layers=1, num_single_layers=1)
        make_inputs = flux_inputs
    # site ids: trace a 1-layer model of the same class and shapes, extrapolate over the layer index
    small = build(cls, small_cfg, device, dtype, args.seed)
    small_inputs, grid = make_inputs(small, device, dtype, tiny)
    found = discover_site_ids(small, small_inputs, allow_fp32)
    del small
    model = build(cls, cfg, device, dtype, args.seed)
    inputs, grid = make_inputs(model, device, dtype, tiny)
    n_params = sum(p.numel() for p in model.parameters())
    heads = int(cfg["num_attention_heads"])
    site_ids = []
    counts = {"transformer_blocks": int(cfg["num_layers"]), "single_transformer_blocks": int(cfg.get("num_single_layers", 0))}
    for sid, h, n, supported, reasons in found:
        if not supported:
            print(f"[bench] {name}: site {sid} unsupported: {reasons}")
            continue
        m = re.match(r"^(transformer_blocks|single_transformer_blocks)\.0\.(.*)$", sid)
        if m:
            site_ids += [f"{m.group(1)}.{i}.{m.group(2)}" for i in range(counts[m.group(1)])]
        else:
            site_ids.append(sid)
    modules = dict(model.named_modules())
    missing = [s for s in site_ids if s.split("#")[0] not in modules]
    if missing:
        print(f"[bench] warning: extrapolated site ids not in the model: {missing[:3]}")
    print(f"[bench] {name}: {n_params / 1e9:.2f}B params, {len(site_ids)} sites ({site_ids[0]} …), grid {grid}, "
          f"built in {time.perf_counter() - t_build:.1f}s", flush=True)

    densities = [float(d) for d in args.densities.split(",") if d]
    if args.variants == "all":
        # priority order (a time-out drops the tail): baselines, then paro, then the second SDPA backend
        paro = [f"paro-{d:g}" for d in sorted(densities, key=lambda d: abs(d - 0.3))]
        variants = ["eager", "compile", "compile-cudnn"] + paro + ["compile-flash"]
    else:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if torch.device(device).type != "cuda":
        variants = [v for v in variants if split_variant(v)[0] not in ("compile-flash", "compile-cudnn")]
        variants = [v for v in variants if not split_variant(v)[1]]  # CUDA graphs need a GPU
    plans = {}
    for v in variants:
        if v.startswith("paro-"):
            d = paro_density(v)
            t = time.perf_counter()
            plans[d] = synthetic_plan(site_ids, heads, grid, d, block, args.seed, coherent=args.coherent)
            print(f"[bench] synthetic plan d={d}: achieved {plans[d].overall_density():.3f} ({time.perf_counter() - t:.1f}s)", flush=True)

    rows = []
    longest_compile = 0.0
    for variant in variants:
        elapsed = time.perf_counter() - t_start
        needed = 0.0 if variant == "eager" else longest_compile
        if elapsed + needed > args.max_minutes * 60:
            rows.append({"model": name, "variant": variant,
                         "skipped": f"time budget ({args.max_minutes} min; {elapsed:.0f}s used, ~{needed:.0f}s needed)"})
            print(f"[bench] skip {variant}: time budget", flush=True)
            on_row(rows[-1])
            continue
        try:
            args.profile_dir, args.profile_model = args.out, name
            entry = run_variant(model, inputs, variant, device, args, plans, allow_fp32)
        except Exception as error:
            entry = {"variant": variant, "error": f"{type(error).__name__}: {error}"[:2000], "traceback": traceback.format_exc()[-3000:]}
            print(f"[bench] {name} {variant} FAILED: {entry['error'][:400]}", flush=True)
            torch._dynamo.reset()
        entry.update(model=name, tokens=grid.num_tokens, heads=heads, layers=cfg.get("num_layers"), params_b=n_params / 1e9)
        rows.append(entry)
        if variant != "eager" and "first_call_s" in entry:
            calls = args.iters + args.warmup + harness.UNTIMED_CALLS
            longest_compile = max(longest_compile, entry["first_call_s"] + entry["median_ms"] * calls / 1e3)
        on_row(entry)
        if "median_ms" in entry:
            print(f"[bench] {name:4s} {variant:14s} median {entry['median_ms']:9.2f} ms  first call {entry['first_call_s']:6.1f}s  "
                  f"(inductor {entry['inductor_compile_fx_s']:.1f}s, paro passes {entry['paro_passes_s']:.2f}s)"
                  f"{'  sites ' + entry['sites_lowered'] if 'sites_lowered' in entry else ''}", flush=True)
    ok = {r["variant"]: r for r in rows if "median_ms" in r}
    eager = ok.get("eager")
    compiled = [r for v, r in ok.items() if split_variant(v)[0] in ("compile", "compile-flash", "compile-cudnn")]
    best = min(compiled, key=lambda r: r["median_ms"]) if compiled else None
    for r in rows:
        if "median_ms" not in r:
            continue
        r["speedup_vs_eager"] = eager["median_ms"] / r["median_ms"] if eager else None
        r["speedup_vs_best_compile"] = best["median_ms"] / r["median_ms"] if best else None
        r["best_compile_variant"] = best["variant"] if best else None
    del model
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return rows


def table_row(r: dict) -> dict:
    """The markdown row of one variant (the JSON keeps everything)."""
    row = {"model": r.get("model"), "variant": r.get("variant")}
    if "median_ms" not in r:
        row["status"] = r.get("skipped") or "ERROR " + str(r.get("error", ""))[:150]
        return row
    row.update({"median ms": r["median_ms"], "× eager": r.get("speedup_vs_eager"),
                "× best compile": r.get("speedup_vs_best_compile"), "first call s": r["first_call_s"],
                "inductor s": r["inductor_compile_fx_s"], "paro passes s": r["paro_passes_s"], "peak GB": r.get("peak_gb"),
                "sites": r.get("sites_lowered")})
    return row


def main(argv=None) -> dict:
    args = parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        args.densities = args.densities if args.densities != ",".join(str(d) for d in DEFAULT_DENSITIES) else "0.5"
        args.iters, args.warmup = min(args.iters, 2), min(args.warmup, 1)
        if args.variants == "all":
            args.variants = "eager,compile," + ",".join(f"paro-{float(d):g}" for d in args.densities.split(","))
    install_timers()
    run_stamp = harness.stamp(__file__, argv)
    models = ["cog", "flux"] if args.model == "both" else [args.model]
    results: dict[str, Any] = {"config": {"device": str(device), "dtype": str(dtype),
                                          "args": {k: str(v) for k, v in vars(args).items()}}, "rows": []}
    title = f"end-to-end forward, {torch.cuda.get_device_name() if device.type == 'cuda' else device} ({dtype})"

    def write(rows: list[dict], notes=()) -> Path:
        return harness.write_results(out / "results.json", dict(results, rows=rows), run_stamp, title=title, notes=notes,
                                     table=[table_row(r) for r in rows])

    try:
        for name in models:
            live: list[dict] = []

            def on_row(row, live=live):  # partial results survive a kill
                live.append(row)
                write(results["rows"] + live)

            try:
                rows = bench_model(name, args, device, dtype, t_start, on_row)
                results["rows"] += rows
            except Exception as error:
                results["rows"].append({"model": name, "variant": "*", "error": f"{type(error).__name__}: {error}"[:2000],
                                        "traceback": traceback.format_exc()[-3000:]})
                print(f"[bench] {name} FAILED: {error!r}", flush=True)
            write(results["rows"])
    finally:
        uninstall_timers()
    results["total_seconds"] = time.perf_counter() - t_start
    path = write(results["rows"], notes=[f"total {results['total_seconds']:.0f}s"])
    print(path.with_suffix(".md").read_text(), flush=True)
    return results


if __name__ == "__main__":
    main()
