"""Quality of backend="paro" on the trained toy CogVideoX (paro_compile/toy/fixtures/toy_cogvideox) vs the FP model.

For a fixed set of evaluation prompts and seeds, generate latent videos (Euler flow matching, CFG) with
- "fp": the model in bf16 with SDPA (eager; the reference every other variant is compared with);
- "paro d=…": torch.compile(model, backend="paro", options={plan, qk_bits, pv_dtype}) with plans from
  `paro_compile.calibration.calibrate` (2 calibration prompts, different from the evaluation prompts, their
  own sampling trajectories; 2 step buckets as in the paper) at each density;
- "natural d=…": the same, but calibrated with ``orders=[natural order]`` (identity permutation, masks
  chosen in the model's own token order): PARO's reordering vs none at equal density;
- "dense": the paro backend with no plan (INT8/FP8 quantization only);
- "dynamic d=…": a per-call dynamic block mask (top blocks by mean-pooled q·kᵀ, + diagonal + text),
  bf16 SDPA with that mask (eager): a cheap stand-in for dynamic sparse peers;
- numerics INT8/INT8, INT4/FP8 and no quantization (fp16) at one density;
- "fp8-linears": the model's linears in FP8 (`paro_compile.fp8.quantize_linears`, torchao row-wise float8) with the
  "paro" plan of the numerics density (the PSNR it costs against the same plan without them is the target: ≤ 1 dB), and
  with SDPA attention (FP8 linears alone). Where FP8 cannot run (CPU, GPUs below compute capability 8.9) these rows say
  why and are skipped.
Metrics vs "fp" (latents → "pixels" = (clamp(x, −1, 1) + 1) / 2): PSNR, SSIM (gaussian window 11,
σ 1.5, per frame and channel), cosine similarity of the raw latents; per layer, the rel-L2 of the variant's
attention vs fp32 SDPA on the same q/k/v (captured from the FP model at the middle sampling step).

Outputs under --out: results.json (every variant, the per-layer errors, the stamp), results.md (the table),
samples.png, plans/*.paro.safetensors; with --seeds also pooled.json / pooled.md.
GPU:  python benchmarks/quality.py --out OUT                      (--max-minutes bounds the run)
CI:   python benchmarks/quality.py --out OUT --tiny               (CPU, random tiny model, seconds)
CPU FP8-linear numerics: python benchmarks/quality.py --out OUT --exec eager --variants fp8-linears --fp8-on-cpu
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import paro_compile  # noqa: E402
from paro_compile.backend import registered_backend  # noqa: E402
from paro_compile.toy import cogvideox as toy_cog, videos as toy_videos  # noqa: E402

EVAL_PROMPTS = [
    dict(shape="circle", colour="red", motion="right"),
    dict(shape="square", colour="blue", motion="rotate"),
    dict(shape="ring", colour="yellow", motion="down"),
    dict(shape="cross", colour="green", motion="colour_shift"),
    dict(shape="triangle", colour="magenta", motion="left"),
    dict(shape="circle", colour="cyan", motion="grow"),
]
# Calibration prompts differ from the evaluation prompts; --calib-prompts takes the first n (default 2).
CALIB_PROMPTS = [
    dict(shape="square", colour="yellow", motion="up"),
    dict(shape="triangle", colour="cyan", motion="rotate"),
    dict(shape="ring", colour="green", motion="left"),
    dict(shape="cross", colour="red", motion="grow"),
    dict(shape="circle", colour="blue", motion="colour_shift"),
    dict(shape="square", colour="magenta", motion="down"),
]
VARIANT_KINDS = ("paro", "natural", "dense", "dynamic", "numerics", "fp8-linears")
FP8_TAG = " +fp8-linears"
FP8_TARGET_DB = 1.0
NUMERICS = {"int8/fp8": (8, "fp8"), "int8/int8": (8, "int8"), "int4/fp8": (4, "fp8"), "fp16": (16, "fp16")}
_ORIG_SDPA = F.scaled_dot_product_attention


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--fixture", type=Path, default=None, help="model folder (default: the packaged fixture)")
    p.add_argument("--tiny", action="store_true", help="CPU, random-init tiny CogVideoX, 2 steps, few variants (CI)")
    p.add_argument("--device", default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--seeds", default=None,
                   help="comma list: one run per seed (OUT/seed_<s>, each with its own noise and calibration trajectories), "
                        "then the variants pooled over all their videos (OUT/pooled.json, pooled.md)")
    p.add_argument("--prompts", type=int, default=len(EVAL_PROMPTS), help="number of evaluation prompts")
    p.add_argument("--densities", default="0.5,0.3,0.2")
    p.add_argument("--numerics-density", type=float, default=0.3, help="density of the INT8/INT8, INT4/FP8, fp16 variants")
    p.add_argument("--calib-every", type=int, default=2, help="use every n-th sampling step of the calibration prompts")
    p.add_argument("--step-buckets", type=int, default=2)
    p.add_argument("--calib-prompts", type=int, default=2,
                   help=f"number of calibration prompts (1..{len(CALIB_PROMPTS)}; never an evaluation prompt)")
    p.add_argument("--allocation", default="uniform", choices=("uniform", "site", "global"),
                   help="calibrate(allocation=...): how each sparse bucket's block budget is spread over heads / sites")
    p.add_argument("--block", type=int, default=64, help="mask / quantization block (calibrate(block_size=...))")
    p.add_argument("--dense-steps", type=int, default=0,
                   help="calibrate(dense_steps=...): the first calibration timesteps' bucket stays dense; --densities is "
                        "then the sparse buckets' density (the step-weighted average is reported as avg_density)")
    p.add_argument("--compensate", default="off", choices=("off", "on", "both"),
                   help="skipped-block compensation (compensate_skipped) for the paro/natural variants; both = one row each")
    p.add_argument("--impl", default="auto", help="paro kernel impl: auto | triton | reference")
    p.add_argument("--variants", default="all",
                   help="comma list among paro,natural,dense,dynamic,numerics,fp8-linears (default all; with --tiny: "
                        "paro,natural,dynamic)")
    p.add_argument("--exec", dest="exec_mode", default="compile", choices=("compile", "eager"),
                   help="compile: torch.compile(backend='paro') per variant (the product path); eager: the same paro op "
                        "called in place of SDPA without compiling (same numerics, no compile time)")
    p.add_argument("--max-minutes", type=float, default=8.0, help="skip remaining variants past this wall time")
    p.add_argument("--fp8-on-cpu", action="store_true",
                   help="numerics check on a machine without an FP8 GPU: the model runs in bf16 on the CPU and the "
                        "fp8-linears variants use torchao's float8 tensors through torch._scaled_mm's CPU kernel "
                        "(the capability checks are bypassed for this run only; times are meaningless)")
    p.add_argument("--allow-random", action="store_true", help="use a random-init toy model if the fixture is missing")
    args = p.parse_args(argv)
    if not 1 <= args.calib_prompts <= len(CALIB_PROMPTS):
        p.error(f"--calib-prompts must be in 1..{len(CALIB_PROMPTS)}, got {args.calib_prompts}")
    if args.variants != "all" and not set(args.variants.split(",")) <= set(VARIANT_KINDS):
        p.error(f"--variants takes a comma list of {', '.join(VARIANT_KINDS)}, got {args.variants!r}")
    return args


# ---------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------
def psnr_per_video(x: torch.Tensor, ref: torch.Tensor) -> list[float]:
    """10·log10(1 / MSE) on pixels in [0, 1], one value per video (kept so runs with other seeds can be pooled)."""
    a, b = toy_videos.to_pixels(x), toy_videos.to_pixels(ref)
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return (10 * torch.log10(1.0 / mse)).tolist()


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over videos of 10·log10(1 / MSE) on pixels in [0, 1]."""
    per_video = psnr_per_video(x, ref)
    return sum(per_video) / len(per_video)


def gaussian_window(size: int, sigma: float, device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: torch.Tensor, ref: torch.Tensor, window: int = 11, sigma: float = 1.5) -> float:
    """SSIM (Wang et al. 2004; K1 0.01, K2 0.03, data range 1) of pixels, per frame and channel, 'valid' gaussian window."""
    a = toy_videos.to_pixels(x).flatten(0, 1)  # [B*F, C, H, W]
    b = toy_videos.to_pixels(ref).flatten(0, 1)
    c = a.shape[1]
    size = min(window, a.shape[-1], a.shape[-2])
    size -= (size + 1) % 2  # odd
    w = gaussian_window(size, sigma, a.device)[None, None].expand(c, 1, size, size)

    def filt(t):
        return F.conv2d(t, w, groups=c)

    mu_a, mu_b = filt(a), filt(b)
    saa = filt(a * a) - mu_a ** 2
    sbb = filt(b * b) - mu_b ** 2
    sab = filt(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
    return float(s.mean())


def cosine(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(F.cosine_similarity(x.flatten(1).double(), ref.flatten(1).double(), dim=1).mean())


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------------
# attention capture and per-site attention variants
# ---------------------------------------------------------------------------------------------------
class patched_sdpa:
    """Temporarily replace torch.nn.functional.scaled_dot_product_attention (diffusers looks it up per call)."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __enter__(self):
        torch.nn.functional.scaled_dot_product_attention = self.fn
        return self

    def __exit__(self, *exc):
        torch.nn.functional.scaled_dot_product_attention = _ORIG_SDPA
        return False


def capture_qkv(model, inputs: dict) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[float]]]:
    calls = []

    def spy(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        calls.append((query.detach().clone(), key.detach().clone(), value.detach().clone(), scale))
        return _ORIG_SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)

    with torch.no_grad(), patched_sdpa(spy):
        model(**inputs)
    return calls


def dynamic_block_mask(q: torch.Tensor, k: torch.Tensor, density: float, grid, block: int) -> torch.Tensor:
    """bool [B, H, nb, nb]: per call, the top blocks by mean-pooled q·kᵀ (+ diagonal and text blocks)."""
    from paro_compile.calibration.masks import mandatory_blocks, select_blocks

    b, h, n, d = q.shape
    nb = math.ceil(n / block)
    pad = nb * block - n
    counts = torch.full((nb,), float(block), device=q.device)
    counts[-1] = block - pad
    qp = F.pad(q.float(), (0, 0, 0, pad)).view(b, h, nb, block, d).sum(3) / counts[:, None]
    kp = F.pad(k.float(), (0, 0, 0, pad)).view(b, h, nb, block, d).sum(3) / counts[:, None]
    scores = qp @ kp.transpose(-1, -2)
    return select_blocks(scores, density, mandatory_blocks(grid, block, q.device))


def dynamic_attention(q, k, v, scale, density, grid, block):
    n = q.shape[2]
    mask = dynamic_block_mask(q, k, density, grid, block)
    token_mask = mask.repeat_interleave(block, -1).repeat_interleave(block, -2)[..., :n, :n]
    return _ORIG_SDPA(q, k, v, attn_mask=token_mask, scale=scale)


def site_ids(model) -> list[str]:
    return [f"transformer_blocks.{i}.attn1#0" for i in range(int(model.config.num_layers))]


def step_weighted_density(plan, eval_ts: list[float]) -> float:
    """Kept-block share averaged over the evaluation steps (each step's bucket; dense buckets count 1.0)."""
    return sum(plan.overall_density(plan.bucket_for_timestep(t)) for t in eval_ts) / max(1, len(eval_ts))


def paro_site_attention(q, k, v, scale, site_plan, bucket: int, qk_bits: int, pv_dtype: str, impl: str, block: int,
                        compensate: bool = False):
    from paro_compile.kernels.block_mask import BlockMask
    from paro_compile.ops import paro_attention

    perm, mask = None, BlockMask.dense(q.shape[2], block, block)
    if site_plan is not None:
        perm = None if site_plan.perm is None else site_plan.perm.to(q.device)
        mask = BlockMask.from_dense(site_plan.block_masks[bucket], site_plan.block_size, site_plan.block_size,
                                    kept_bits=compensate).to(q.device)
    return paro_attention(q, k, v, perm=perm, mask=mask, scale=scale, qk_bits=qk_bits, pv_dtype=pv_dtype,
                          compensate=compensate, impl=impl)


# ---------------------------------------------------------------------------------------------------
# plotting
# ---------------------------------------------------------------------------------------------------
def fp_reference(model, prompts, text_dim: int, steps: int, guidance: float, seed: int, device=None):
    """Sample the FP model from seeded noise; also keep the model inputs of the middle sampling call.

    Returns (cond, noise, latents, mid-step inputs, seconds)."""
    cond = toy_videos.encode_prompts(prompts, text_dim, device=device)
    f0, c0, h0, w0 = toy_cog.video_shape(model)
    noise = torch.randn(len(prompts), f0, c0, h0, w0, generator=torch.Generator().manual_seed(seed))
    mid_inputs: dict[str, Any] = {}
    calls = [0]

    def record_mid(inputs):
        if calls[0] == steps // 2:
            mid_inputs.update({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()})
        calls[0] += 1

    start = time.perf_counter()
    latents = toy_cog.sample_video(model, cond, steps=steps, guidance=guidance, noise=noise, on_call=record_mid)
    return cond, noise, latents, mid_inputs, time.perf_counter() - start


def save_samples_png(rows: list[tuple[str, torch.Tensor]], path: Path, prompt_index: int = 0, columns: int = 4) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        frames = rows[0][1].shape[1]
        cols = min(columns, frames)
        fig, axes = plt.subplots(len(rows), cols, figsize=(1.6 * cols + 1.5, 1.6 * len(rows)), squeeze=False)
        for r, (name, video) in enumerate(rows):
            rgb = toy_videos.to_rgb_frames(video[prompt_index])
            for c in range(cols):
                f = c * frames // cols
                axes[r][c].imshow(rgb[f].numpy())
                axes[r][c].set_xticks([])
                axes[r][c].set_yticks([])
                if r == 0:
                    axes[r][c].set_title(f"frame {f}", fontsize=7)
            axes[r][0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
    except Exception as error:
        print(f"[quality] samples plot failed: {error!r}")


# ---------------------------------------------------------------------------------------------------
def quality_targets(variants: list[dict], densities: list[float]) -> dict[str, bool]:
    """The quality targets on measured variants: PSNR ≥ 30 dB and cosine ≥ 0.99 at density 0.3 (and at an average density
    of 0.3, dense steps counting 1.0, whatever the recipe); PARO order above natural order at every density."""
    targets: dict[str, bool] = {}
    by_name = {v["name"]: v for v in variants}
    t03 = by_name.get("paro d=0.3 int8/fp8")
    if t03 is not None:
        targets["d0.3_int8fp8_psnr_ge_30"] = t03["psnr"] >= 30.0
        targets["d0.3_int8fp8_cos_ge_0.99"] = t03["cosine"] >= 0.99
    for d in densities:
        for tag in ("", " +comp"):
            a, b = by_name.get(f"paro d={d:g} int8/fp8{tag}"), by_name.get(f"natural d={d:g} int8/fp8{tag}")
            if a is not None and b is not None:
                targets[f"paro_beats_natural_d{d:g}{tag.replace(' +', '_')}"] = a["psnr"] > b["psnr"]
    for v in by_name.values():
        base = by_name.get(v["name"].removesuffix(FP8_TAG)) if v["name"].endswith(FP8_TAG) else None
        if base is not None:
            targets[f"fp8_linears_cost_le_{FP8_TARGET_DB:g}dB_{base['name']}"] = base["psnr"] - v["psnr"] <= FP8_TARGET_DB
    for v in by_name.values():
        if v.get("kind") == "paro" and abs(v.get("avg_density", 0.0) - 0.3) <= 0.01:
            targets[f"{v['name']} (avg {v['avg_density']:.3f}): psnr>=30 and cos>=0.99"] = (
                v["psnr"] >= 30.0 and v["cosine"] >= 0.99)
    return targets


def fp8_psnr_cost(variants: list[dict]) -> None:
    """Adds ``fp8_psnr_cost_db`` (PSNR of the plan without FP8 linears minus with them) to every FP8 paro row."""
    by_name = {v["name"]: v for v in variants if "psnr" in v}
    for v in by_name.values():
        base = by_name.get(v["name"].removesuffix(FP8_TAG)) if v["name"].endswith(FP8_TAG) else None
        if base is not None:
            v["fp8_psnr_cost_db"] = base["psnr"] - v["psnr"]


def variant_table(variants: list[dict]) -> list[dict]:
    """One markdown row per variant; skipped and failed variants say why."""
    rows = []
    for v in variants:
        row = {"variant": v["name"], "density": v["density"], "achieved": v.get("achieved_density"),
               "avg": v.get("avg_density")}
        if "psnr" in v:
            row.update({"PSNR dB": v["psnr"], "SSIM": v["ssim"], "cosine": v["cosine"],
                        "attn rel-L2 mean": v["attn_rel_l2_mean"], "attn rel-L2 max": v["attn_rel_l2_max"],
                        "FP8 linears dB cost": v.get("fp8_psnr_cost_db"), "sites lowered": v.get("sites_lowered"),
                        "s": v.get("seconds")})
        else:
            row["status"] = v.get("skipped") or "ERROR " + v.get("error", "")[:120]
        rows.append(row)
    return rows


def pool_seeds(per_seed: dict[int, dict], densities: list[float]) -> dict:
    """One row per variant measured under every seed: PSNR over all their videos (mean of `psnr_per_video`, with its
    standard error), SSIM / cosine / attention error as the mean of the per-seed means (equal video counts)."""
    seeds = list(per_seed)
    done = {s: {v["name"]: v for v in r["variants"] if "psnr" in v} for s, r in per_seed.items()}
    pooled = []
    for name, first in done[seeds[0]].items():
        if not all(name in done[s] for s in seeds):
            continue
        rows = [done[s][name] for s in seeds]
        videos = [x for r in rows for x in r["psnr_per_video"]]
        mean = sum(videos) / len(videos)
        spread = math.sqrt(sum((x - mean) ** 2 for x in videos) / max(1, len(videos) - 1))
        pooled.append({
            "name": name, "kind": first["kind"], "density": first["density"],
            "avg_density": sum(r.get("avg_density", float("nan")) for r in rows) / len(rows),
            "videos": len(videos), "psnr": mean, "psnr_sem": spread / math.sqrt(len(videos)),
            "ssim": sum(r["ssim"] for r in rows) / len(rows), "cosine": sum(r["cosine"] for r in rows) / len(rows),
            "attn_rel_l2_mean": sum(r["attn_rel_l2_mean"] for r in rows) / len(rows),
            "per_seed": {str(s): {"psnr": done[s][name]["psnr"], "cosine": done[s][name]["cosine"]} for s in seeds},
        })
    fp8_psnr_cost(pooled)
    return {"seeds": seeds, "variants": pooled, "targets": quality_targets(pooled, densities)}


def main(argv=None) -> dict:
    """One seed (``--seed``): results of that run. Several (``--seeds a,b,c``): each seed's run under OUT/seed_<s>,
    pooled over all their videos into OUT/pooled.json and OUT/pooled.md (returned)."""
    args = parse_args(argv)
    args.stamp = harness.stamp(__file__, argv)
    if args.seeds:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
        per_seed = {}
        for seed in seeds:
            run_argv = list(argv if argv is not None else sys.argv[1:])
            run_argv += ["--seed", str(seed), "--out", str(args.out / f"seed_{seed}"), "--seeds", ""]
            per_seed[seed] = main(run_argv)
        densities = [float(d) for d in args.densities.split(",") if d] if not args.tiny else [0.5]
        pooled = pool_seeds(per_seed, densities)
        table = [{"variant": v["name"], "avg density": v["avg_density"], "videos": v["videos"],
                  "PSNR dB": f"{v['psnr']:.2f} ± {v['psnr_sem']:.2f}", "SSIM": v["ssim"], "cosine": v["cosine"],
                  "attn rel-L2": v["attn_rel_l2_mean"], "FP8 linears dB cost": v.get("fp8_psnr_cost_db"),
                  "per seed PSNR / cosine": "; ".join(f"{s}: {x['psnr']:.2f} / {x['cosine']:.4f}"
                                                      for s, x in v["per_seed"].items())}
                 for v in pooled["variants"]]
        targets = "Targets (pooled): " + ", ".join(f"{k}={'PASS' if ok else 'FAIL'}" for k, ok in pooled["targets"].items())
        path = harness.write_results(args.out / "pooled.json", pooled, args.stamp, table=table,
                                     title=f"paro quality pooled over seeds {', '.join(map(str, seeds))}", notes=[targets])
        print(path.with_suffix(".md").read_text(), flush=True)
        return pooled
    return run_one(args)


@contextlib.contextmanager
def fp8_capability_bypass(active: bool) -> Iterator[None]:
    """``--fp8-on-cpu``: let `quantize_linears` and torchao build float8 linears on the CPU. torchao refuses below an
    FP8 GPU, but its float8 tensors compute through ``torch._scaled_mm``, which has a CPU kernel: the e4m3 rounding and
    the row-wise scales are the ones the GPU applies, so the PSNR cost of FP8 linears can be measured without one."""
    if not active:
        yield
        return
    from unittest import mock

    import torchao.quantization.quant_api as torchao_quant_api

    import paro_compile.fp8 as paro_fp8

    with mock.patch.object(paro_fp8, "fp8_unavailable_reason", lambda model=None: None), \
            mock.patch.object(torchao_quant_api, "_check_hardware_support", lambda *args, **kwargs: None):
        yield


def run_one(args: argparse.Namespace) -> dict:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "plans").mkdir(exist_ok=True)
    t_start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    from paro_compile.calibration import calibrate

    # ---- model ----
    if args.tiny:
        model = toy_cog.new_toy_cogvideox(toy_cog.TINY_CONFIG, seed=0, device=device, dtype=torch.float32).eval()
        model_source = "random tiny CogVideoX (TINY_CONFIG)"
        dtype = torch.float32
        block = 16
        steps = 2
        densities = [0.5]
        eval_prompts = EVAL_PROMPTS[:2]
        wanted = {"paro", "natural", "dynamic"} if args.variants == "all" else set(args.variants.split(","))
    else:
        dtype = torch.bfloat16 if device.type == "cuda" or args.fp8_on_cpu else torch.float32
        path = args.fixture or toy_cog.FIXTURE_DIR
        if toy_cog.fixture_available(path):
            model = toy_cog.load_toy_cogvideox(device=device, dtype=dtype, path=path)
            model_source = f"trained fixture {path}"
        elif args.allow_random:
            model = toy_cog.new_toy_cogvideox(toy_cog.TOY_CONFIG, device=device, dtype=dtype).eval()
            model_source = "random-init TOY_CONFIG (fixture missing!)"
        else:
            raise SystemExit(f"fixture weights not found in {path}: pass --fixture OUT/toy_cogvideox or --allow-random")
        block = args.block
        steps = args.steps
        densities = [float(d) for d in args.densities.split(",") if d]
        eval_prompts = EVAL_PROMPTS[: args.prompts]
        wanted = set(VARIANT_KINDS) if args.variants == "all" else set(args.variants.split(","))
    allow_fp32 = dtype == torch.float32
    calib_prompts = CALIB_PROMPTS[: args.calib_prompts]
    grid = toy_cog.token_grid(model)
    text_dim = int(model.config.text_embed_dim)
    print(f"[quality] device={device} dtype={dtype} model: {model_source}; grid {grid}; block {block}; steps {steps}; "
          f"CFG {args.guidance}; {len(eval_prompts)} prompts", flush=True)

    results: dict[str, Any] = {
        "config": {"device": str(device), "dtype": str(dtype), "model": model_source, "grid": str(grid), "block": block,
                   "steps": steps, "guidance": args.guidance, "seed": args.seed, "eval_prompts": [toy_videos.prompt_name(p) for p in eval_prompts],
                   "calib_prompts": [toy_videos.prompt_name(p) for p in calib_prompts],
                   "allocation": args.allocation, "impl": args.impl},
        "variants": [], "per_layer": [], "targets": {},
    }

    def dump(notes=()) -> Path:
        return harness.write_results(out / "results.json", results, args.stamp, table=variant_table(results["variants"]),
                                     title=f"paro quality on the toy CogVideoX ({model_source})", notes=notes)

    # ---- FP reference ----
    cond, noise, ref, mid_inputs, fp_seconds = fp_reference(model, eval_prompts, text_dim, steps, args.guidance,
                                                            args.seed, device=device)
    print(f"[quality] FP sampling {fp_seconds:.1f}s; latents mean {ref.mean():.3f} std {ref.std():.3f}", flush=True)
    mid_t = float(mid_inputs["timestep"].reshape(-1)[0]) / 1000.0
    eval_ts = [t * 1000.0 for t in toy_cog.flow_times(steps)[:-1]]
    captured = capture_qkv(model, mid_inputs)
    sids = site_ids(model)
    if len(captured) != len(sids):
        print(f"[quality] warning: captured {len(captured)} SDPA calls, expected {len(sids)}")
    fp32_ref = [_ORIG_SDPA(q.float(), k.float(), v.float(), scale=s) for q, k, v, s in captured]
    fp_attn = [rel_l2(_ORIG_SDPA(q, k, v, scale=s).float(), r) for (q, k, v, s), r in zip(captured, fp32_ref)]
    results["fp_attention_rel_l2_vs_fp32"] = fp_attn
    rows_png: list[tuple[str, torch.Tensor]] = [("fp", ref.cpu())]

    # ---- calibration inputs (their own trajectories) ----
    calib_inputs: list[dict] = []
    calib_counter = [0]

    def record_calib(inputs):
        if calib_counter[0] % max(1, args.calib_every) == 0:
            calib_inputs.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()})
        calib_counter[0] += 1

    ccond = toy_videos.encode_prompts(calib_prompts, text_dim, device=device)
    toy_cog.sample_video(model, ccond, steps=steps, seed=args.seed + 1, guidance=args.guidance, on_call=record_calib)
    step_buckets = 1 if args.tiny else args.step_buckets
    print(f"[quality] calibration: {len(calib_inputs)} calls from {len(calib_prompts)} prompts, {step_buckets} step bucket(s)", flush=True)

    plans: dict[tuple[str, float], Any] = {}
    calib_seconds: dict[tuple[str, float], float] = {}

    def get_plan(kind: str, density: float):
        key = (kind, density)
        if key not in plans:
            t_cal = time.perf_counter()
            extra = {"orders": [grid.natural_order]} if kind == "natural" else {}
            torch._dynamo.reset()
            plan = calibrate(model, calib_inputs, density=density, grid=grid, block_size=block, step_buckets=step_buckets,
                             dense_steps=0 if args.tiny else args.dense_steps, allocation=args.allocation,
                             progress=False, **extra)
            plans[key] = plan
            calib_seconds[key] = time.perf_counter() - t_cal
            plan.save(out / "plans" / f"{kind}_d{density:g}.paro.safetensors")
            print(f"[quality] calibrated {kind} d={density}: {time.perf_counter() - t_cal:.1f}s, "
                  f"overall density {plan.overall_density():.3f}", flush=True)
        return plans[key]

    # ---- variants, in priority order ----
    variants: list[dict] = []
    nd = args.numerics_density if args.numerics_density in densities else densities[len(densities) // 2]
    comp_modes = {"off": [False], "on": [True], "both": [False, True]}[args.compensate]
    for d in densities:
        for comp in comp_modes:
            tag = " +comp" if comp else ""
            if "paro" in wanted:
                variants.append(dict(name=f"paro d={d:g} int8/fp8{tag}", kind="paro", density=d, numerics="int8/fp8",
                                     compensate=comp))
            if "natural" in wanted:
                variants.append(dict(name=f"natural d={d:g} int8/fp8{tag}", kind="natural", density=d,
                                     numerics="int8/fp8", compensate=comp))
    if "dynamic" in wanted:
        variants += [dict(name=f"dynamic d={d:g} bf16", kind="dynamic", density=d, numerics="bf16") for d in densities]
    if "dense" in wanted:
        variants.append(dict(name="dense int8/fp8", kind="dense", density=1.0, numerics="int8/fp8"))
    if "numerics" in wanted:
        for num in ("int8/int8", "int4/fp8", "fp16"):
            variants.append(dict(name=f"paro d={nd:g} {num}", kind="paro", density=nd, numerics=num))
    if "fp8-linears" in wanted:
        paro_nd = f"paro d={nd:g} int8/fp8"
        if not any(v["name"] == paro_nd for v in variants):  # the same plan without FP8 linears: the comparison
            variants.append(dict(name=paro_nd, kind="paro", density=nd, numerics="int8/fp8"))
        variants.append(dict(name=paro_nd + FP8_TAG, kind="paro", density=nd, numerics="int8/fp8", fp8_linears=True))
        variants.append(dict(name="fp8-linears SDPA", kind="fp8-linears", density=1.0, numerics="bf16",
                             fp8_linears=True))
    # paro-first: all paro/natural pairs before extras, so a time-out keeps the comparison.
    variants.sort(key=lambda v: {"paro": 0, "natural": 0, "fp8-linears": 1, "dynamic": 1, "dense": 2}[v["kind"]]
                  + (3 if v["numerics"] not in ("int8/fp8", "bf16") else 0))

    fp8_models: dict[str, Any] = {}

    def fp8_model():
        """A copy of the model with FP8 linears (built once), or the reason there is none."""
        if not fp8_models:
            from paro_compile.fp8 import Fp8UnavailableWarning, quantize_linears

            quantized = copy.deepcopy(model)
            with warnings.catch_warnings(), fp8_capability_bypass(args.fp8_on_cpu and device.type == "cpu"):
                warnings.simplefilter("ignore", Fp8UnavailableWarning)  # the reason goes into the results
                result = quantize_linears(quantized)
            print(f"[quality] {result.summary()}", flush=True)
            if not result.applied:
                fp8_models["reason"] = f"FP8 linears unavailable: {result.reason}"
            elif not result.quantized:
                fp8_models["reason"] = "FP8 linears: no linear quantized (" + "; ".join(sorted(set(result.skipped.values()))) + ")"
            else:
                fp8_models.update(model=quantized, quantized=len(result.quantized), seconds=result.seconds)
        return fp8_models

    per_layer_rows = []
    longest = {"compile": 0.0, "eager": 0.0}
    for var in variants:
        elapsed = time.perf_counter() - t_start
        entry = dict(var)
        needed = longest["eager" if var["kind"] == "dynamic" or args.exec_mode == "eager" else "compile"]
        if elapsed + needed > args.max_minutes * 60:
            entry["skipped"] = f"time budget ({args.max_minutes} min; {elapsed:.0f}s used, ~{needed:.0f}s needed)"
            results["variants"].append(entry)
            print(f"[quality] skip {var['name']}: time budget", flush=True)
            continue
        run_model = model
        if var.get("fp8_linears"):
            state = fp8_model()
            if "reason" in state:
                entry["skipped"] = state["reason"]
                results["variants"].append(entry)
                print(f"[quality] skip {var['name']}: {state['reason']}", flush=True)
                continue
            run_model = state["model"]
            entry.update(fp8_quantized_linears=state["quantized"], fp8_quantize_s=state["seconds"])
        t_var = time.perf_counter()
        try:
            kind, d = var["kind"], var["density"]
            plan = None
            if kind in ("paro", "natural"):
                fresh = (kind, d) not in plans
                plan = get_plan(kind, d)
                entry["achieved_density"] = plan.overall_density()
                entry["avg_density"] = step_weighted_density(plan, eval_ts)
                entry["orders"] = sorted({o for s in plan.sites.values() for o in s.orders})
                entry["calibration_s"] = calib_seconds.get((kind, d), 0.0)
                if fresh:  # "seconds" = generation + metrics; calibration is reported apart
                    t_var += entry["calibration_s"]
            t_gen = time.perf_counter()
            if kind == "dynamic":
                def dyn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
                    return dynamic_attention(query, key, value, scale, d, grid, block)

                with patched_sdpa(dyn):
                    lat = toy_cog.sample_video(model, cond, steps=steps, guidance=args.guidance, noise=noise)
                masks = [dynamic_block_mask(q, k, d, grid, block) for q, k, _, _ in captured]
                entry["achieved_density"] = float(sum(m.float().mean() for m in masks) / max(1, len(masks)))
            elif kind == "fp8-linears":  # FP8 linears alone: SDPA attention
                lat = toy_cog.sample_video(run_model, cond, steps=steps, guidance=args.guidance, noise=noise)
            elif args.exec_mode == "eager" or (args.tiny and results["variants"]):
                # Same paro op, called in place of SDPA (sites in call order); the tiny CI mode compiles only its
                # first variant to stay fast.
                qk_bits, pv_dtype = NUMERICS[var["numerics"]]
                state = {"call": 0, "bucket": 0}

                def on_call(inputs, state=state, plan=plan):
                    state["bucket"] = plan.bucket_for_timestep(inputs["timestep"]) if plan is not None else 0

                def eager_paro(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
                    sid = sids[state["call"] % len(sids)]
                    state["call"] += 1
                    site_plan = plan.sites.get(sid) if plan is not None else None
                    return paro_site_attention(query, key, value, scale, site_plan, state["bucket"], qk_bits, pv_dtype,
                                               args.impl, block, compensate=var.get("compensate", False))

                with patched_sdpa(eager_paro):
                    lat = toy_cog.sample_video(run_model, cond, steps=steps, guidance=args.guidance, noise=noise,
                                               on_call=on_call)
                entry["exec"] = "eager"
            else:
                qk_bits, pv_dtype = NUMERICS[var["numerics"]]
                entry["exec"] = "compile"
                options = {"qk_bits": qk_bits, "pv_dtype": pv_dtype, "impl": args.impl, "allow_fp32": allow_fp32,
                           "compensate_skipped": var.get("compensate", False),
                           "fallback": "sdpa", **({"compile_threads": 1} if args.tiny else {})}
                if plan is not None:
                    options["plan"] = plan
                torch._dynamo.reset()
                paro_compile.clear_reports()
                compiled = torch.compile(run_model, backend=registered_backend(), options=options, dynamic=False)
                lat = toy_cog.sample_video(compiled, cond, steps=steps, guidance=args.guidance, noise=noise, config_model=model)
                report = paro_compile.last_report()
                if report is not None:
                    entry["sites_lowered"] = f"{len(report.lowered)}/{len(report.sites)}"
                    entry["gathers_left"] = report.gathers_left
                    entry["fallback_reasons"] = sorted({r for s in report.fallbacks for r in s.reasons})
                    entry["permutation"] = sorted({s.permutation for s in report.lowered})
                del compiled
            entry["generate_seconds"] = time.perf_counter() - t_gen
            per_video = psnr_per_video(lat, ref)
            entry.update(psnr=sum(per_video) / len(per_video), psnr_per_video=per_video, ssim=ssim(lat, ref),
                         cosine=cosine(lat, ref),
                         finite=bool(torch.isfinite(lat).all()))
            # per-layer attention error on the FP model's q/k/v at the middle step
            errs = []
            for i, ((q, k, v, s), r) in enumerate(zip(captured, fp32_ref)):
                sid = sids[i] if i < len(sids) else f"call{i}"
                if kind == "dynamic":
                    o = dynamic_attention(q, k, v, s, d, grid, block)
                elif kind == "fp8-linears":
                    o = _ORIG_SDPA(q, k, v, scale=s)
                else:
                    site_plan = plan.sites.get(sid) if plan is not None else None
                    bucket = plan.bucket_for_timestep(mid_t * 1000.0) if plan is not None else 0
                    qk_bits, pv_dtype = NUMERICS[var["numerics"]]
                    o = paro_site_attention(q, k, v, s, site_plan, bucket, qk_bits, pv_dtype, args.impl, block,
                                            compensate=var.get("compensate", False))
                e = rel_l2(o.float(), r)
                errs.append(e)
                per_layer_rows.append({"variant": var["name"], "site": sid, "rel_l2": e, "fp_bf16_rel_l2": fp_attn[i] if i < len(fp_attn) else None})
            entry["attn_rel_l2_mean"] = sum(errs) / max(1, len(errs))
            entry["attn_rel_l2_max"] = max(errs) if errs else None
            rows_png.append((var["name"], lat.cpu()))
        except Exception as error:  # record and go on: one broken variant must not lose the others
            entry["error"] = f"{type(error).__name__}: {error}"
            entry["traceback"] = traceback.format_exc()[-3000:]
            print(f"[quality] {var['name']} FAILED: {entry['error'][:500]}", flush=True)
        entry["seconds"] = time.perf_counter() - t_var
        kind_key = "compile" if entry.get("exec") == "compile" else "eager"
        longest[kind_key] = max(longest[kind_key], entry["seconds"])
        results["variants"].append(entry)
        fp8_psnr_cost(results["variants"])
        if "psnr" in entry:
            print(f"[quality] {var['name']:28s} PSNR {entry['psnr']:6.2f} dB  SSIM {entry['ssim']:.4f}  cos {entry['cosine']:.5f}  "
                  f"attn rel-L2 {entry['attn_rel_l2_mean']:.4f}  ({entry['seconds']:.1f}s)", flush=True)
        results["per_layer"] = per_layer_rows
        dump()

    results["targets"] = quality_targets([v for v in results["variants"] if "psnr" in v], densities)
    results["total_seconds"] = time.perf_counter() - t_start
    save_samples_png(rows_png, out / "samples.png")
    notes = [f"{len(eval_prompts)} prompts × seed {args.seed}, {steps} Euler steps, CFG {args.guidance}, grid {grid}, "
             f"block {block}. Metrics vs the FP model ({dtype}, SDPA); attention rel-L2 vs fp32 SDPA at step {steps // 2} "
             f"(FP bf16 SDPA itself: {sum(fp_attn) / max(1, len(fp_attn)):.4f}).",
             f"Calibration: block {block}, dense_steps {args.dense_steps}, {step_buckets} step bucket(s); avg = kept share "
             "averaged over the sampling steps (dense steps count 1.0).",
             "Targets: " + ", ".join(f"{k}={'PASS' if ok else 'FAIL'}" for k, ok in results["targets"].items())]
    print(dump(notes).with_suffix(".md").read_text(), flush=True)
    return results


if __name__ == "__main__":
    main()
