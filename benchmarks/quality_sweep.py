"""Calibration-settings sweep for PARO quality at a *fixed average density* (CPU-sized).

Question: on the trained toy CogVideoX fixture, which `calibrate()` settings raise quality (PSNR / SSIM /
cosine vs the FP model) at an equal step-weighted average density (default 0.3)?

Method (reuses benchmarks/quality.py's machinery: metrics, patched SDPA, `paro_site_attention`, eager paro op):
1. FP reference: the model (fp32 on the CPU) with SDPA, ``--prompts`` evaluation prompts, ``--steps`` Euler
   steps, CFG 3; q/k/v captured at the middle step for the per-layer attention error.
2. ONE calibration run: `paro_compile.calibration.calibrate` on the 2 calibration prompts' own trajectories,
   every sampling step, with one step bucket per calibration timestep (explicit ``step_boundaries``). The
   statistics (`SiteStatistics` of every site) are kept.
   One such calibration per block size used by the selected variants (``block`` option; the default 64, or
   16 with ``--tiny``, as in quality.py), each run when its first variant needs it.
3. Every variant's plan is then derived from those statistics with the library's own code
   (`SiteStatistics.build_site_plan` with the variant's options; per-step bucket masses summed into the
   variant's buckets, boundaries from `derive_step_boundaries`), i.e. the plan `calibrate(step_buckets=…,
   dense_steps=…, alpha=…, mass_threshold=…, orders=…)` would build from the same calls (checked against a
   direct `calibrate()` call for the baseline: ``check_direct`` in the JSON). Only the order-choice scores
   are pooled over all calibration steps (they are per-call means; for the "calib every 2nd step" variant
   they include the skipped steps).
4. Density matching: the *step-weighted* average density over all evaluation steps (dense steps count as
   1.0) is brought to the target by bisection on the variant's free knob (``density`` of the sparse
   buckets, or ``mass_threshold``); the achieved value is reported per variant.
5. Generation with the paro op called in place of SDPA (``quality.py --exec eager`` semantics,
   ``impl="reference"``, INT8/FP8 by default), metrics vs FP.

    python benchmarks/quality_sweep.py --out OUT                 # CPU, 2 prompts, 10 steps; tens of minutes
                                                                 # (--no-check skips the second calibration)
    python benchmarks/quality_sweep.py --out OUT --tiny          # random tiny model, seconds (CI)
    python benchmarks/quality_sweep.py --out OUT --no-check --threads 1 \
        --variants "baseline B=2 (quality.py),block=32 B=2,block=16 B=2,block=32 B=2 dense_steps=1"
                                                                 # block-size variants only (one calibration per block size)
    python benchmarks/quality_sweep.py --out OUT --no-check --threads 1 \
        --variants "block=32 B=2 dense_steps=1,block=32 B=2 dense_steps=1 alloc=site,block=32 B=2 dense_steps=1 alloc=global"
                                                                 # mass-ranked allocation across heads / sites
    python benchmarks/quality_sweep.py --out OUT --no-check --threads 1 \
        --variants "B=2 dense_steps=1 score=output,block=32 B=2 dense_steps=1 score=output,B=2 dense_steps=1"
                                                                 # output-aware block ranking (calibrate(block_score="output"))
Outputs: OUT/sweep.json (every variant, the stamp), OUT/sweep.md (the table, also on stdout).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import quality as Q  # noqa: E402  (benchmarks/quality.py)
from paro_compile.calibration import budget, driver, masks, site_plans  # noqa: E402
from paro_compile.calibration.options import DEFAULT_ALPHA  # noqa: E402
from paro_compile.toy import cogvideox as toy_cog, videos as toy_videos  # noqa: E402
from paro_compile.plan import Plan  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--tiny", action="store_true", help="random tiny CogVideoX, 4 steps, few variants (seconds)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--density", type=float, default=0.3, help="target step-weighted average density")
    p.add_argument("--numerics", default="int8/fp8", choices=sorted(Q.NUMERICS))
    p.add_argument("--impl", default="reference")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default="all", help="comma list of variant names, run in that order (default all)")
    p.add_argument("--no-check", action="store_true", help="skip the derived-vs-direct calibrate() check (a 2nd calibration run)")
    p.add_argument("--max-minutes", type=float, default=38.0, help="skip remaining variants past this wall time")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------
# variants: calibrate() options (+ the bisection knob)
# ---------------------------------------------------------------------------------------------------
BASE = dict(step_buckets=2, dense_steps=0, alpha=DEFAULT_ALPHA, mass_threshold=False, orders="all", calib_every=2,
            block=None, allocation="uniform", block_score="mass", compensate=False)
"""``block``: block_m = block_n of the masks and of the kernel's Q/K quantization blocks (calibrate(block_size=…));
None = the run's default (64; 16 with --tiny). ``allocation``: calibrate(allocation=…): "uniform" (every head at the
same density), "site" (blocks of all heads of a site ranked together by row-normalised mass), "global" (all heads
of all sites ranked together; only the model average is matched). ``compensate``: the paro op's skipped-block
compensation (``compensate_skipped``: skipped blocks enter as pooled keys; variants named "... comp"). ``block_score``: calibrate(block_score=…): "mass"
(blocks ranked by calibrated attention mass) or "output" (by the first-order output change of dropping them); a block
size used by an "output" variant is calibrated with the output statistics (its mass statistics are the same)."""


def variant_list(tiny: bool) -> list[dict]:
    v = [
        dict(name="dense (no plan)", dense=True),
        dict(name="baseline B=2 (quality.py)"),
        dict(name="B=1", step_buckets=1),
        dict(name="B=4", step_buckets=4),
        dict(name="B=per-step", step_buckets="all"),
        dict(name="B=2 calib all steps", calib_every=1),
        dict(name="B=2 natural order", orders="natural"),
        dict(name="B=2 alpha=1.0", alpha=1.0),
        dict(name="B=2 alpha=0.5", alpha=0.5),
        dict(name="B=2 dense_steps=1", dense_steps=1),
        dict(name="B=2 dense_steps=2", dense_steps=2),
        dict(name="B=1 dense_steps=1", step_buckets=1, dense_steps=1),
        dict(name="B=4 dense_steps=1", step_buckets=4, dense_steps=1),
        dict(name="B=2 dense_steps=1 calib all", dense_steps=1, calib_every=1),
        dict(name="B=2 dense_steps=2 calib all", dense_steps=2, calib_every=1),
        dict(name="B=2 mass_threshold", mass_threshold=True),
        dict(name="B=4 mass_threshold", step_buckets=4, mass_threshold=True),
        dict(name="B=1 mass_threshold", step_buckets=1, mass_threshold=True),
        dict(name="B=4 mass_threshold calib all", step_buckets=4, mass_threshold=True, calib_every=1),
        # block size (finer blocks: more kv blocks per query row, so the same density can follow the mass more closely)
        dict(name="block=32 B=2", block=32),
        dict(name="block=32 B=2 dense_steps=1", block=32, dense_steps=1),
        dict(name="block=16 B=2", block=16),
        dict(name="block=16 B=2 dense_steps=1", block=16, dense_steps=1),
        dict(name="dense (no plan) block=32", dense=True, block=32),  # quantization-block effect alone
        dict(name="dense (no plan) block=16", dense=True, block=16),
        dict(name="block=32 B=4 dense_steps=1", block=32, step_buckets=4, dense_steps=1),
        # kept-block budget allocated by calibrated mass across heads (site) or across heads and sites (global)
        dict(name="B=2 alloc=site", allocation="site"),
        dict(name="B=2 alloc=global", allocation="global"),
        dict(name="B=2 dense_steps=1 alloc=site", dense_steps=1, allocation="site"),
        dict(name="B=2 dense_steps=1 alloc=global", dense_steps=1, allocation="global"),
        dict(name="block=32 B=2 alloc=site", block=32, allocation="site"),
        dict(name="block=32 B=2 alloc=global", block=32, allocation="global"),
        dict(name="block=32 B=2 dense_steps=1 alloc=site", block=32, dense_steps=1, allocation="site"),
        dict(name="block=32 B=2 dense_steps=1 alloc=global", block=32, dense_steps=1, allocation="global"),
        # output-aware block ranking (dropped mass × distance of the dropped values from the output)
        dict(name="B=2 dense_steps=1 score=output", dense_steps=1, block_score="output"),
        dict(name="block=32 B=2 dense_steps=1 score=output", block=32, dense_steps=1, block_score="output"),
        dict(name="B=2 score=output", block_score="output"),
        dict(name="block=32 B=2 score=output", block=32, block_score="output"),
    ]
    # skipped-block compensation (the op's ``compensate``): the same plans, skipped blocks as pooled keys
    v += [dict(x, name=x["name"] + " comp", compensate=True) for x in v
          if x["name"] in ("baseline B=2 (quality.py)", "B=2 dense_steps=1", "block=32 B=2", "block=32 B=2 dense_steps=1",
                           "block=16 B=2 dense_steps=1", "B=2 dense_steps=1 calib all", "B=2 alloc=global",
                           "block=32 B=2 dense_steps=1 alloc=global", "B=2 natural order")]
    if tiny:  # tiny runs at block 16 (80 tokens); block=32 there only exercises the per-block calibration path
        keep = {"dense (no plan)", "baseline B=2 (quality.py)", "B=2 dense_steps=1", "B=2 mass_threshold", "block=32 B=2",
                "B=2 alloc=global", "B=2 dense_steps=1 alloc=site", "B=2 dense_steps=1 score=output",
                "B=2 dense_steps=1 comp"}
        v = [x for x in v if x["name"] in keep]
    return [{**BASE, **x} for x in v]


# ---------------------------------------------------------------------------------------------------
# statistics → plans
# ---------------------------------------------------------------------------------------------------
class _KeepRecorder(driver.Recorder):
    last: Optional["driver.Recorder"] = None

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        _KeepRecorder.last = self


def calibrate_per_step(model, calib_inputs: list[dict], grid, block: int, density: float, **kw):
    """calibrate() with one bucket per distinct calibration timestep; returns (plan, recorder, timesteps desc)."""
    ts = sorted({budget.timestep_value(x["timestep"]) for x in calib_inputs}, reverse=True)
    bounds = [(a + b) / 2 for a, b in zip(ts[:-1], ts[1:])]
    original = driver.Recorder
    driver.Recorder = _KeepRecorder
    try:
        torch._dynamo.reset()
        plan = driver.calibrate(model, calib_inputs, density=density, grid=grid, block_size=block, step_boundaries=bounds,
                           progress=False, **kw)
    finally:
        driver.Recorder = original
    return plan, _KeepRecorder.last, ts


def derive_plan(recorder, ts_desc: list[float], *, step_buckets, dense_steps: int, density: float, alpha: float,
                mass_threshold: Optional[float], orders: str, calib_every: int, allocation: str = "uniform",
                block_score: str = "mass") -> Plan:
    """The plan calibrate() would build with these options from the recorder's per-step statistics."""
    used = list(range(0, len(ts_desc), max(1, calib_every)))  # calibration steps seen (quality.py: every n-th call)
    used_ts = [ts_desc[i] for i in used]
    nb = len(used_ts) - (dense_steps or 0) if step_buckets == "all" else int(step_buckets)
    if nb > 1 or dense_steps:
        bounds, dense_buckets = budget.derive_step_boundaries(used_ts, nb, dense_steps)
    else:
        bounds, dense_buckets = [], []
    shell = Plan(sites={}, step_boundaries=bounds)
    groups: list[list[int]] = [[] for _ in range(shell.num_buckets)]
    for i in used:
        groups[shell.bucket_for_timestep(ts_desc[i])].append(i)
    derived, explicit = {}, {}
    for sid, stats in recorder.sites.items():
        s = copy.copy(stats)
        s.options = dataclasses.replace(stats.options, density=float(density), alpha=float(alpha), mass_threshold=mass_threshold,
                                        allocation=allocation, block_score=block_score)
        s.num_buckets = len(groups)
        s.mass = [None if not g else torch.stack([stats.mass[i] for i in g if stats.mass[i] is not None]).sum(0) for g in groups]
        s.output_score = [None if not g or stats.output_score[g[0]] is None
                          else torch.stack([stats.output_score[i] for i in g if stats.output_score[i] is not None]).sum(0)
                          for g in groups]
        s.bucket_calls = [sum(stats.bucket_calls[i] for i in g) for g in groups]
        derived[sid] = s
        if orders == "natural":
            explicit[sid] = [stats.grid.natural_order] * stats.heads
    sites = site_plans.build_site_plans(derived, dense_buckets=dense_buckets, orders=explicit)  # what Recorder.build_plan calls
    return Plan(sites=sites, step_boundaries=bounds, density=float(density), alpha=float(alpha))


def step_weighted(plan: Plan, eval_ts: list[float]) -> tuple[float, float]:
    """(density, kept calibration mass) averaged over the evaluation steps (each step's bucket, all sites)."""
    kept = [sum(s.stats["kept_mass"][plan.bucket_for_timestep(t)] for s in plan.sites.values()) / len(plan.sites)
            for t in eval_ts]
    return Q.step_weighted_density(plan, eval_ts), sum(kept) / len(kept)


def matched_plan(recorder, ts_desc, eval_ts, var: dict, target: float, iters: int = 22) -> tuple[Plan, dict]:
    """Bisection on the variant's knob (sparse-bucket density, or mass_threshold) to hit ``target`` average density."""
    common = dict(step_buckets=var["step_buckets"], dense_steps=var["dense_steps"], alpha=var["alpha"],
                  orders=var["orders"], calib_every=var["calib_every"], allocation=var["allocation"],
                  block_score=var["block_score"])

    def build(x):
        if var["mass_threshold"]:
            return derive_plan(recorder, ts_desc, density=target, mass_threshold=x, **common)
        return derive_plan(recorder, ts_desc, density=x, mass_threshold=None, **common)

    lo, hi = (0.05, 1.0) if var["mass_threshold"] else (1e-3, 1.0)
    best = None
    for _ in range(iters):
        mid = (lo + hi) / 2
        plan = build(mid)
        d, _ = step_weighted(plan, eval_ts)
        if best is None or abs(d - target) < abs(best[1] - target) or (abs(d - target) == abs(best[1] - target) and d <= target):
            best = (mid, d, plan)
        if d > target:
            hi = mid
        else:
            lo = mid
    knob, d, plan = best
    d, kept = step_weighted(plan, eval_ts)
    first = next(iter(plan.sites.values()))
    info = {"knob": "mass_threshold" if var["mass_threshold"] else "density", "knob_value": knob,
            "achieved_density": d, "kept_mass": kept,
            "bucket_densities": [round(plan.overall_density(b), 4) for b in range(plan.num_buckets)],
            "step_boundaries": plan.step_boundaries,
            "orders": sorted({o for s in plan.sites.values() for o in s.orders}),
            "block": first.block_size, "num_blocks": first.num_blocks,  # kv blocks per query block row
            "mandatory_density": float(masks.mandatory_blocks(first.grid, first.block_size).float().mean())}  # diagonal + text floor
    if var["mass_threshold"] or var["allocation"] != "uniform":  # spread of densities: what the threshold / allocation moves
        sparse = [b for b in range(plan.num_buckets) if b not in first.dense_buckets]
        per_head = torch.cat([s.block_masks[sparse].float().mean((-1, -2)).flatten() for s in plan.sites.values()])
        per_site = [round(s.density(b), 4) for s in plan.sites.values() for b in sparse]
        info["per_head_density_min_max"] = [round(float(per_head.min()), 4), round(float(per_head.max()), 4)]
        info["per_site_density_min_max"] = [min(per_site), max(per_site)]
    return plan, info


def write_sweep(out: Path, res: dict, run_stamp: dict, target: float, notes: list[str]) -> Path:
    table = []
    for v in res["variants"]:
        row = {"variant": v["name"], "block": v.get("block")}
        if "psnr" in v:
            row.update({"knob": f"{v['knob']}={v['knob_value']:.4f}" if "knob" in v else None,
                        "achieved density": v["achieved_density"], "bucket densities": v.get("bucket_densities"),
                        "kept mass": v["kept_mass"], "PSNR dB": v["psnr"], "SSIM": v["ssim"], "cosine": v["cosine"],
                        "attn rel-L2": v["attn_rel_l2_mid"]})
        else:
            row["status"] = v.get("skipped") or "ERROR " + v.get("error", "")[:100]
        table.append(row)
    return harness.write_results(out / "sweep.json", res, run_stamp, table=table, notes=notes,
                                 title=f"PARO calibration sweep at fixed average density {target} (CPU, reduced "
                                       "prompts/steps)")


# ---------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    args = parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    run_stamp = harness.stamp(__file__, argv)
    dtype = torch.float32
    if args.tiny:
        model = toy_cog.new_toy_cogvideox(toy_cog.TINY_CONFIG, seed=0, dtype=dtype).eval()
        source, block, steps, n_prompts, target = "random tiny CogVideoX (TINY_CONFIG)", 16, 6, 1, 0.7
    else:
        model = toy_cog.load_toy_cogvideox(dtype=dtype)
        source, block, steps, n_prompts, target = f"trained fixture {toy_cog.FIXTURE_DIR}", 64, args.steps, args.prompts, args.density
    grid = toy_cog.token_grid(model)
    sids = Q.site_ids(model)
    text_dim = int(model.config.text_embed_dim)
    eval_prompts = Q.EVAL_PROMPTS[:n_prompts]
    qk_bits, pv_dtype = Q.NUMERICS[args.numerics]
    print(f"[sweep] {source}; grid {grid}; block {block}; {steps} steps; {n_prompts} prompts; target density {target}; "
          f"{args.numerics} impl={args.impl}; threads {args.threads}", flush=True)
    res: dict[str, Any] = {"config": {"model": source, "grid": str(grid), "block": block, "steps": steps, "guidance": args.guidance,
                                      "eval_prompts": [toy_videos.prompt_name(p) for p in eval_prompts],
                                      "calib_prompts": [toy_videos.prompt_name(p) for p in Q.CALIB_PROMPTS], "target_density": target,
                                      "numerics": args.numerics, "impl": args.impl, "device": "cpu", "dtype": str(dtype)},
           "variants": []}

    # ---- FP reference + mid-step q/k/v ----
    cond, noise, ref, mid, res["fp_seconds"] = Q.fp_reference(model, eval_prompts, text_dim, steps, args.guidance, args.seed)
    print(f"[sweep] FP generation {res['fp_seconds']:.1f}s", flush=True)
    captured = Q.capture_qkv(model, mid)
    fp32_ref = [Q._ORIG_SDPA(q.float(), k.float(), v.float(), scale=s) for q, k, v, s in captured]
    mid_t = float(mid["timestep"].reshape(-1)[0])
    eval_ts = [t * 1000.0 for t in toy_cog.flow_times(steps)[:-1]]

    # ---- one calibration run per block size (per-step buckets), on first use ----
    calib_inputs: list[dict] = []
    toy_cog.sample_video(model, toy_videos.encode_prompts(Q.CALIB_PROMPTS, text_dim), steps=steps, seed=args.seed + 1, guidance=args.guidance,
                    on_call=lambda x: calib_inputs.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in x.items()}))
    wanted = None if args.variants == "all" else [w.strip() for w in args.variants.split(",") if w.strip()]
    known = {v["name"] for v in variant_list(args.tiny)}
    if wanted is not None and set(wanted) - known:
        print(f"[sweep] unknown variants ignored: {sorted(set(wanted) - known)}", flush=True)
    selected = variant_list(args.tiny)
    if wanted is not None:  # in the order given (the time budget skips the last ones first)
        selected = sorted((v for v in selected if v["name"] in wanted), key=lambda v: wanted.index(v["name"]))
    # block sizes whose calibration also collects the output-aware block scores (block_score="output" variants)
    output_blocks = {v["block"] or block for v in selected if v["block_score"] == "output" and not v.get("dense")}
    recorders: dict[int, tuple[Any, list[float]]] = {}
    res["calibration_seconds"] = {}

    def recorder_for(bs: int):
        if bs not in recorders:
            t0 = time.perf_counter()
            _, rec, ts = calibrate_per_step(model, calib_inputs, grid, bs, target,
                                            block_score="output" if bs in output_blocks else "mass")
            recorders[bs] = (rec, ts)
            res["calibration_seconds"][bs] = time.perf_counter() - t0
            print(f"[sweep] calibration block {bs} ({len(calib_inputs)} calls, per-step buckets"
                  f"{', output scores' if bs in output_blocks else ''}) "
                  f"{res['calibration_seconds'][bs]:.1f}s", flush=True)
        return recorders[bs]

    # check: derived plan == direct calibrate(step_buckets=2) on the same (all) calls
    try:
        if args.no_check:
            raise RuntimeError("skipped (--no-check)")
        recorder, ts_desc = recorder_for(block)
        torch._dynamo.reset()
        direct = driver.calibrate(model, calib_inputs, density=target, grid=grid, block_size=block, step_buckets=2, progress=False)
        derived = derive_plan(recorder, ts_desc, step_buckets=2, dense_steps=0, density=target, alpha=DEFAULT_ALPHA,
                              mass_threshold=None, orders="all", calib_every=1)
        same_masks = all(torch.equal(direct.sites[s].block_masks, derived.sites[s].block_masks) for s in direct.sites)
        same_orders = all(direct.sites[s].orders == derived.sites[s].orders for s in direct.sites)
        res["check_direct"] = {"same_masks": same_masks, "same_orders": same_orders,
                               "same_boundaries": direct.step_boundaries == derived.step_boundaries}
    except Exception as error:
        res["check_direct"] = {"error": repr(error)}
    print(f"[sweep] derived-vs-direct calibrate() check: {res['check_direct']}", flush=True)

    longest = 0.0
    for var in selected:
        var = {**var, "block": var["block"] or block}
        entry = dict(var)
        elapsed = time.perf_counter() - t_start
        needs_calibration = not var.get("dense") and var["block"] not in recorders
        expected = longest + (max(res["calibration_seconds"].values(), default=0.0) if needs_calibration else 0.0)
        if elapsed + expected > args.max_minutes * 60:
            entry["skipped"] = f"time budget ({elapsed:.0f}s used)"
            res["variants"].append(entry)
            print(f"[sweep] skip {var['name']}", flush=True)
            continue
        t_var = time.perf_counter()
        try:
            plan = None
            vblock = var["block"]
            if var.get("dense"):
                entry.update(achieved_density=1.0, kept_mass=1.0)
            else:
                recorder, ts_desc = recorder_for(vblock)
                plan, info = matched_plan(recorder, ts_desc, eval_ts, var, target)
                entry.update(info)
            state = {"call": 0, "bucket": 0}

            def on_call(inputs, state=state, plan=plan):
                state["bucket"] = plan.bucket_for_timestep(inputs["timestep"]) if plan is not None else 0

            def eager_paro(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, state=state, plan=plan, **kw):
                sid = sids[state["call"] % len(sids)]
                state["call"] += 1
                site_plan = plan.sites.get(sid) if plan is not None else None
                return Q.paro_site_attention(query, key, value, scale, site_plan, state["bucket"], qk_bits, pv_dtype, args.impl, vblock,
                                             compensate=var["compensate"])

            with Q.patched_sdpa(eager_paro):
                lat = toy_cog.sample_video(model, cond, steps=steps, guidance=args.guidance, noise=noise, on_call=on_call)
            entry.update(psnr=Q.psnr(lat, ref), ssim=Q.ssim(lat, ref), cosine=Q.cosine(lat, ref))
            errs = []
            bucket = plan.bucket_for_timestep(mid_t) if plan is not None else 0
            for i, ((q, k, v, s), r) in enumerate(zip(captured, fp32_ref)):
                sp = plan.sites.get(sids[i]) if plan is not None else None
                errs.append(Q.rel_l2(Q.paro_site_attention(q, k, v, s, sp, bucket, qk_bits, pv_dtype, args.impl, vblock,
                                                     compensate=var["compensate"]).float(), r))
            entry["attn_rel_l2_mid"] = sum(errs) / len(errs)
        except Exception as error:
            entry["error"] = f"{type(error).__name__}: {error}"
            entry["traceback"] = traceback.format_exc()[-2000:]
            print(f"[sweep] {var['name']} FAILED: {entry['error'][:300]}", flush=True)
        entry["seconds"] = time.perf_counter() - t_var
        longest = max(longest, entry["seconds"])
        res["variants"].append(entry)
        if "psnr" in entry:
            print(f"[sweep] {var['name']:32s} block {var['block']} dens {entry['achieved_density']:.4f} kept {entry['kept_mass']:.3f} "
                  f"PSNR {entry['psnr']:6.2f} SSIM {entry['ssim']:.4f} cos {entry['cosine']:.5f} "
                  f"attn {entry['attn_rel_l2_mid']:.4f} ({entry['seconds']:.0f}s)", flush=True)
        write_sweep(out, res, run_stamp, target, [])

    res["total_seconds"] = time.perf_counter() - t_start
    calib_s = ", ".join(f"block {b}: {t:.1f}s" for b, t in res["calibration_seconds"].items()) or "none"
    notes = [f"{source}; {n_prompts} eval prompts × seed {args.seed}, {steps} Euler steps, CFG {args.guidance}, fp32 on the "
             f"CPU, paro op eager, impl={args.impl}, {args.numerics}; calibration: 2 other prompts, their own trajectories. "
             f"Density = step-weighted mean over the {steps} evaluation steps (dense steps count 1.0), matched by "
             "bisection on the knob. kept = calibration attention mass kept by the masks (step-weighted). attn = rel-L2 "
             f"of attention vs fp32 SDPA at step {steps // 2} (mean over layers).",
             f"FP generation {res['fp_seconds']:.1f}s; calibration {calib_s}; total {res['total_seconds']:.0f}s; "
             f"derived-vs-direct check {res.get('check_direct')}"]
    print(write_sweep(out, res, run_stamp, target, notes).with_suffix(".md").read_text(), flush=True)
    return res


if __name__ == "__main__":
    main()
