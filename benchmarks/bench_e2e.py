"""End-to-end transformer forward speed at real sizes: eager vs torch.compile (Inductor + SDPA) vs backend="paro",
each optionally with FP8 linears from torchao.

Models (diffusers classes, random weights, bf16, inference; --layers reduces the depth):
- cog: CogVideoXTransformer3DModel with CogVideoX-5B dims: 48 heads × 64, 42 layers, text 226 tokens × 4096, latent
  13×16×60×90 → patch 2: 13·30·45 = 17,550 video tokens + 226 = 17,776; B = 2 (CFG).
- flux: FluxTransformer2DModel with FLUX.1-dev dims: 24 heads × 128, 19 double + 38 single blocks (--flux-layers D,S),
  1024² image → 4096 image tokens + 512 text = 4608; B = 1.
- wan: WanTransformer3DModel with Wan2.1-T2V-14B dims (diffusers' defaults): 40 heads × 128 (dim 5120), FFN 13824,
  40 layers, patch (1, 2, 2), text 512 tokens × 4096 by cross-attention (--cross-attention: dense on the paro op, the
  backend's default, or SDPA); 720p, 81 frames → latent 21×90×160 → 21·45·80 = 75,600 video tokens; B = 1
  (--batch 1,2 adds the CFG batch).
- hunyuan: HunyuanVideoTransformer3DModel with HunyuanVideo dims (diffusers' defaults): 24 heads × 128 (dim 3072),
  20 dual-stream + 40 single-stream blocks (--layers D,S), 2 token-refiner blocks, patch 2 / temporal 1, text 256
  tokens × 4096 (LLaMA) passed with its key-padding mask (--text-valid tokens valid), pooled CLIP 768, guidance embedding,
  RoPE axes (16, 56, 56); 720p, 129 frames → latent 33×90×160 → 33·45·80 = 118,800 video tokens + 256 text = 119,056.
Variants (--variants, comma list; default all):
  eager | compile (Inductor, default SDPA) | compile-flash | compile-cudnn | compile-efficient (sdpa_kernel around
  compile and every run) | compile-fa4 (SDPA's flash backend routed to FlashAttention-4 through torch's
  activate_flash_attention_impl("FA4"), where flash-attn-4 is installed; process-wide, so these variants run last) |
  paro-<density> (backend="paro" with a synthetic plan: per site and head the diagonal, text blocks, --local-blocks
  neighbours of the diagonal and random blocks up to the density, the PARO order drawn per head among the candidates;
  INT8/FP8), each optionally followed by +comp (paro: compensate_skipped), +fp8 (FP8 linears:
  paro_compile.fp8.quantize_linears) or +fp8cd (the same with torchao's Inductor settings, coordinate-descent tuning
  included, restored afterwards), +cg (CUDA graphs). Variants without FP8 run first, then the model's linears are
  quantized once, in place, and the FP8 variants run. --batch 1,2 runs every variant at each batch size.
Per variant and batch: median forward time (`harness.time_calls`; triton.testing.do_bench on the GPU), the first call
and where its time went (Dynamo, our passes = paro_compile.backend.rewrite_graph, Inductor's compile_fx, Inductor's
run-time autotuning and coordinate-descent tuning, the rest of the first run), torchao's quantization time, peak
memory, the paro report's lowered / fallback counts and reasons, ratios vs eager and vs the fastest compiled SDPA
variant of the same batch, the time per block and the full-depth time extrapolated from the measured depth.

Outputs under --out: results.json (every variant, the stamp), results.md (the table, also on stdout).
GPU:  python benchmarks/bench_e2e.py --out OUT --model wan --layers 2 --batch 1,2     (--max-minutes bounds the run)
      python benchmarks/bench_e2e.py --out OUT --model hunyuan --layers 1,2
      python benchmarks/bench_e2e.py --out OUT --model cog | flux
CI:   python benchmarks/bench_e2e.py --out OUT --tiny [--model wan|hunyuan|video]   (CPU, tiny configs, reference kernels)
"""
from __future__ import annotations

import argparse
import gc
import math
import re
import sys
import time
import traceback
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import paro_compile  # noqa: E402
from paro_compile.backend import registered_backend  # noqa: E402
import paro_compile.backend as paro_backend_module  # noqa: E402
from paro_compile.grid import TokenGrid, candidate_orders, orders_permutation  # noqa: E402
from paro_compile.plan import Plan, SitePlan  # noqa: E402

MODELS = ("cog", "flux", "wan", "hunyuan")
MODEL_GROUPS = {"both": ("cog", "flux"), "video": ("wan", "hunyuan")}
SDPA_VARIANTS = ("compile", "compile-flash", "compile-cudnn", "compile-efficient", "compile-fa4")
DEFAULT_DENSITIES = (0.5, 0.3, 0.2)
VARIANT_NAME = re.compile(r"^(?P<base>eager|compile|compile-flash|compile-cudnn|compile-efficient|compile-fa4"
                          r"|paro-(?P<density>\d+\.?\d*|\.\d+)(?P<comp>\+comp)?)(?P<fp8>\+fp8(?:cd)?)?(?P<cg>\+cg)?$")
# Depth of the full models: blocks, or (dual/double, single) blocks.
FULL_DEPTH = {"cog": (42,), "flux": (19, 38), "wan": (40,), "hunyuan": (20, 40)}
DEFAULT_BATCH = {"cog": 2, "flux": 1, "wan": 1, "hunyuan": 1}
# Synthetic plans of the 720p models keep the diagonal's neighbours too, as calibrated PARO masks do.
DEFAULT_LOCAL_BLOCKS = {"cog": 0, "flux": 0, "wan": 2, "hunyuan": 2}


@dataclass(frozen=True)
class Variant:
    """One entry of --variants, parsed: ``paro-0.2+comp+fp8+cg`` → base "paro-0.2", compensate, fp8, CUDA graphs."""

    name: str
    base: str
    density: Optional[float]
    compensate: bool
    fp8: Optional[str]
    """None, "fp8" (the recipe's defaults) or "fp8cd" (torchao's Inductor settings too)."""
    graphs: bool

    @classmethod
    def parse(cls, name: str) -> "Variant":
        m = VARIANT_NAME.match(name)
        if m is None or (m["base"] == "eager" and m["cg"]):
            raise ValueError(f"unknown variant {name!r} (see --help)")
        return cls(name=name, base=m["base"].removesuffix("+comp"), density=float(m["density"]) if m["density"] else None,
                   compensate=bool(m["comp"]), fp8=m["fp8"][1:] if m["fp8"] else None, graphs=bool(m["cg"]))

    @property
    def is_paro(self) -> bool:
        return self.density is not None

    @property
    def sdpa_only(self) -> bool:
        return self.base in SDPA_VARIANTS


def split_variant(variant: str) -> tuple[str, bool]:
    """``compile-cudnn+cg`` → ("compile-cudnn", True): a ``+cg`` suffix runs the variant with CUDA graphs
    (Inductor's ``mode="reduce-overhead"``), which removes per-kernel launch and Python overhead."""
    return (variant.removesuffix("+cg"), True) if variant.endswith("+cg") else (variant, False)


def paro_density(variant: str) -> float:
    """``paro-0.2`` / ``paro-0.2+comp`` (with skipped-block compensation) / ``paro-0.2+comp+fp8+cg`` -> 0.2."""
    density = Variant.parse(variant).density
    if density is None:
        raise ValueError(f"{variant!r} is not a paro variant")
    return density


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--model", default="cog", choices=MODELS + tuple(MODEL_GROUPS),
                   help="both = cog and flux; video = wan and hunyuan")
    p.add_argument("--layers", default=None,
                   help="depth: blocks (cog 42, wan 40), or for hunyuan dual,single blocks (20,40; a single N means N dual "
                        "and 2N single, the full model's ratio). Default: the full model")
    p.add_argument("--flux-layers", default="19,38", help="Flux double,single blocks (dev: 19,38)")
    p.add_argument("--batch", default=None,
                   help="comma list of batch sizes, every variant runs at each (default: cog 2, flux / wan / hunyuan 1; "
                        "2 = the CFG batch)")
    p.add_argument("--text-valid", type=int, default=128,
                   help="hunyuan: valid text tokens of the 256 (the rest is key padding; default 128)")
    p.add_argument("--variants", default="all",
                   help="comma list of eager, compile, compile-flash, compile-cudnn, compile-efficient, paro-<d>, "
                        "paro-<d>+comp (compensate_skipped=True); any may end in +fp8 / +fp8cd (FP8 linears; +fp8cd with "
                        "torchao's Inductor settings) and any compiled variant in +cg (CUDA graphs) "
                        "(default: all SDPA backends and paro at --densities)")
    p.add_argument("--densities", default=",".join(str(d) for d in DEFAULT_DENSITIES))
    p.add_argument("--block", type=int, default=None, help="mask block of the synthetic plans (default 64; 16 with --tiny)")
    p.add_argument("--local-blocks", type=int, default=None,
                   help="synthetic plans: neighbours of the diagonal kept before the random blocks (default: wan / "
                        "hunyuan 2, cog / flux 0)")
    p.add_argument("--coherent", action="store_true",
                   help="blocks under 64: masks drawn per 64-token block and refined (neighbouring query blocks agree, "
                        "as calibrated masks tend to); default: drawn per block")
    p.add_argument("--cross-attention", default="paro", choices=("paro", "sdpa"),
                   help="paro variants: cross-attention sites (Wan's text keys) dense on the paro op (the backend's "
                        "default, lower_cross_attention=True) or kept on SDPA")
    p.add_argument("--qk-bits", type=int, default=8)
    p.add_argument("--pv-dtype", default="fp8")
    p.add_argument("--impl", default="auto")
    p.add_argument("--iters", type=int, default=5, help="timed calls per variant (about)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before them (about)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=8.0, help="skip remaining variants past this wall time")
    p.add_argument("--tiny", action="store_true",
                   help="CPU, tiny configs (--model both / video for two models), density 0.5 (CI)")
    p.add_argument("--device", default=None)
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile 2 calls per variant (torch.profiler) and write the top GPU kernels "
                        "to OUT/profile_<model>_<variant>.txt")
    args = p.parse_args(argv)
    if args.variants != "all":
        bad = []
        for v in (v.strip() for v in args.variants.split(",")):
            try:
                if v:
                    Variant.parse(v)
            except ValueError:
                bad.append(v)
        if bad:
            p.error(f"unknown variants {bad} (see --help)")
    try:
        for model in MODEL_GROUPS.get(args.model, (args.model,)):
            model_depth(model, args)
        batch_sizes(args, "cog")
    except ValueError as error:
        p.error(str(error))
    return args


def model_depth(name: str, args) -> tuple[int, ...]:
    """Blocks of the benchmarked model: (n,) or (dual/double, single)."""
    if name == "flux":
        spec = args.flux_layers
    elif args.layers is None:
        return FULL_DEPTH[name]
    else:
        spec = args.layers
    parts = [p for p in str(spec).split(",") if p.strip()]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--layers / --flux-layers: expected integers, got {spec!r}") from None
    if name in ("flux", "hunyuan"):
        if len(values) == 1:
            values = (values[0], 2 * values[0])
        if len(values) != 2 or min(values) < 0 or sum(values) < 1:
            raise ValueError(f"{name}: depth takes D,S (dual/double and single blocks), got {spec!r}")
        return values
    if len(values) != 1 or values[0] < 1:
        raise ValueError(f"{name}: --layers takes one number of blocks, got {spec!r}")
    return values


def batch_sizes(args, name: str) -> list[int]:
    if args.batch is None:
        return [DEFAULT_BATCH[name]]
    try:
        sizes = [int(b) for b in str(args.batch).split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--batch: expected a comma list of integers, got {args.batch!r}") from None
    if not sizes or min(sizes) < 1:
        raise ValueError(f"--batch: batch sizes must be >= 1, got {args.batch!r}")
    return sizes


def full_depth_factor(name: str, depth: tuple[int, ...]) -> Optional[float]:
    """Full-depth time / measured time, assuming the time is per block (None where the mix of block kinds differs from
    the full model's, so one measurement cannot be scaled)."""
    full = FULL_DEPTH[name]
    if len(full) == 1:
        return full[0] / depth[0]
    if depth[0] and depth[1] and depth[0] * full[1] == depth[1] * full[0]:
        return full[0] / depth[0]
    return None


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
# torch's own compile timers (`torch._dynamo.utils.compilation_time_metrics`, seconds per event) the breakdown reads.
DYNAMO_FRAME = "_compile.compile_inner"
RUNTIME_AUTOTUNE = "CachingAutotuner.benchmark_all_configs"
COORDINATE_DESCENT = "CachingAutotuner.coordinate_descent_tuning"


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


def compile_metrics() -> dict[str, float]:
    """Seconds per torch compile event since the last `reset_compile_metrics` (summed over graphs)."""
    return {k: float(sum(v)) for k, v in torch._dynamo.utils.compilation_time_metrics.items()}


def reset_compile_metrics() -> None:
    torch._dynamo.utils.compilation_time_metrics.clear()


def first_call_breakdown(first_call_s: float, median_ms: float, metrics: dict[str, float]) -> dict[str, Optional[float]]:
    """Where the first call's time went, in seconds: Dynamo's tracing (its frame compile less our passes and Inductor),
    our passes, Inductor's compile_fx (AOT autograd, lowering, codegen, kernel compiles), Inductor's autotuning at the
    first run (config benchmarks, coordinate descent), and the rest of the first run (our kernel's compile and autotune,
    lazily compiled kernels) less one steady-state call."""
    passes, inductor = TIMERS["paro_passes"], TIMERS["inductor"]
    frame = metrics.get(DYNAMO_FRAME)
    autotune = metrics.get(RUNTIME_AUTOTUNE, 0.0)
    coordesc = metrics.get(COORDINATE_DESCENT, 0.0)
    dynamo = None if frame is None else max(0.0, frame - passes - inductor)
    compiled = frame if frame is not None else passes + inductor
    rest = max(0.0, first_call_s - compiled - autotune - coordesc - median_ms / 1e3)
    return {"dynamo_s": dynamo, "paro_passes_s": passes, "inductor_compile_fx_s": inductor,
            "inductor_autotune_s": autotune, "coordinate_descent_s": coordesc, "first_run_rest_s": rest}


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


def wan_config(layers: int, tiny: bool) -> dict:
    """Wan2.1-T2V-14B (diffusers' WanTransformer3DModel defaults, spelled out)."""
    if tiny:
        return dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4,
                    text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64)
    return dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=layers, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024)


def hunyuan_config(dual: int, single: int, tiny: bool) -> dict:
    """HunyuanVideo (diffusers' HunyuanVideoTransformer3DModel defaults, spelled out)."""
    if tiny:
        return dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=64, num_layers=1,
                    num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
                    pooled_projection_dim=32, rope_axes_dim=(16, 24, 24), guidance_embeds=True)
    return dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=dual,
                num_single_layers=single, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
                qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
                rope_theta=256.0, rope_axes_dim=(16, 56, 56))


def model_config(name: str, depth: tuple[int, ...], tiny: bool) -> dict:
    if name == "cog":
        return cog_config(depth[0], tiny)
    if name == "flux":
        return flux_config(*depth, tiny)
    if name == "wan":
        return wan_config(depth[0], tiny)
    return hunyuan_config(*depth, tiny)


def config_depth(name: str, config: dict) -> tuple[int, ...]:
    """The blocks a model config builds: (n,) or (dual/double, single)."""
    if name in ("flux", "hunyuan"):
        return int(config["num_layers"]), int(config["num_single_layers"])
    return (int(config["num_layers"]),)


def benchmarked_depth(name: str, args) -> tuple[int, ...]:
    return config_depth(name, model_config(name, model_depth(name, args), args.tiny))


def one_block_config(name: str, config: dict) -> dict:
    """The same model with one block of each kind (site ids are traced on it and extrapolated over the blocks)."""
    if name in ("flux", "hunyuan"):
        return dict(config, num_layers=1, num_single_layers=1)
    return dict(config, num_layers=1)


def model_class(name: str):
    import diffusers

    return {"cog": diffusers.CogVideoXTransformer3DModel, "flux": diffusers.FluxTransformer2DModel,
            "wan": diffusers.WanTransformer3DModel, "hunyuan": diffusers.HunyuanVideoTransformer3DModel}[name]


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


def cog_inputs(model, device, dtype, tiny: bool, batch: int = 2, **_: Any) -> tuple[dict, TokenGrid]:
    from paro_compile.toy.cogvideox import rotary_embeddings

    cfg = model.config
    frames = (int(cfg.sample_frames) - 1) // int(cfg.temporal_compression_ratio) + 1
    h, w, c, p = int(cfg.sample_height), int(cfg.sample_width), int(cfg.in_channels), int(cfg.patch_size)
    text = int(cfg.max_text_seq_length)
    g = torch.Generator(device="cpu").manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(batch, frames, c, h, w, generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(batch, text, int(cfg.text_embed_dim), generator=g).to(device, dtype),
        timestep=torch.full((batch,), 500, device=device, dtype=torch.long),
        image_rotary_emb=rotary_embeddings(model, frames, h, w, device=device),
        return_dict=False,
    )
    return inputs, TokenGrid(frames=frames, height=h // p, width=w // p, text_tokens=text)


def flux_inputs(model, device, dtype, tiny: bool, batch: int = 1, **_: Any) -> tuple[dict, TokenGrid]:
    cfg = model.config
    side = 8 if tiny else 64  # 1024² image → 128² latent → 2×2 packing → 64×64 tokens
    text = 8 if tiny else 512
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    inputs = dict(
        hidden_states=torch.randn(batch, side * side, int(cfg.in_channels), generator=g).to(device, dtype),
        encoder_hidden_states=torch.randn(batch, text, int(cfg.joint_attention_dim), generator=g).to(device, dtype),
        pooled_projections=torch.randn(batch, int(cfg.pooled_projection_dim), generator=g).to(device, dtype),
        timestep=torch.full((batch,), 1.0, device=device, dtype=dtype),
        img_ids=ids.reshape(-1, 3).to(device, dtype),
        txt_ids=torch.zeros(text, 3, device=device, dtype=dtype),
        return_dict=False,
    )
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
    return inputs, TokenGrid(frames=None, height=side, width=side, text_tokens=text)


def video_latent_shape(tiny: bool, frames_720p: int) -> tuple[int, int, int]:
    """(latent frames, latent height, latent width): 720p = 1280×720 pixels, 8× spatial / 4× temporal VAE compression."""
    if tiny:
        return 2, 8, 8
    return (frames_720p - 1) // 4 + 1, 720 // 8, 1280 // 8


def wan_inputs(model, device, dtype, tiny: bool, batch: int = 1, **_: Any) -> tuple[dict, TokenGrid]:
    cfg = model.config
    frames, h, w = video_latent_shape(tiny, 81)
    _, ph, pw = (int(x) for x in cfg.patch_size)
    text = 8 if tiny else 512
    g = torch.Generator(device="cpu").manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(batch, int(cfg.in_channels), frames, h, w, generator=g).to(device, dtype),
        timestep=torch.full((batch,), 500, device=device, dtype=torch.long),
        encoder_hidden_states=torch.randn(batch, text, int(cfg.text_dim), generator=g).to(device, dtype),
        return_dict=False,
    )
    return inputs, TokenGrid(frames=frames, height=h // ph, width=w // pw)


def hunyuan_inputs(model, device, dtype, tiny: bool, batch: int = 1, text_valid: int = 128,
                   **_: Any) -> tuple[dict, TokenGrid]:
    cfg = model.config
    frames, h, w = video_latent_shape(tiny, 129)
    p, pt = int(cfg.patch_size), int(cfg.patch_size_t)
    text = 8 if tiny else 256
    valid = min(text, max(1, text_valid if not tiny else 5))
    g = torch.Generator(device="cpu").manual_seed(1)
    mask = torch.zeros(batch, text, dtype=torch.long)
    mask[:, :valid] = 1  # tokenizer padding after the prompt
    inputs = dict(
        hidden_states=torch.randn(batch, int(cfg.in_channels), frames, h, w, generator=g).to(device, dtype),
        timestep=torch.full((batch,), 500.0, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(batch, text, int(cfg.text_embed_dim), generator=g).to(device, dtype),
        encoder_attention_mask=mask.to(device),
        pooled_projections=torch.randn(batch, int(cfg.pooled_projection_dim), generator=g).to(device, dtype),
        guidance=torch.full((batch,), 6000.0, device=device, dtype=dtype),  # embedded guidance 6.0 × 1000
        return_dict=False,
    )
    return inputs, TokenGrid(frames=frames // pt, height=h // p, width=w // p, text_tokens=text, text_position="suffix")


MODEL_INPUTS = {"cog": cog_inputs, "flux": flux_inputs, "wan": wan_inputs, "hunyuan": hunyuan_inputs}


# ---------------------------------------------------------------------------------------------------
# site ids and synthetic plans
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FoundSite:
    site_id: str
    heads: Any
    seq_len: Any
    kv_seq_len: Any
    reasons: tuple[str, ...]

    @property
    def self_attention(self) -> bool:
        """Queries and keys are the same tokens: a site a plan can cover (it may still fall back, e.g. for a mask)."""
        return isinstance(self.seq_len, int) and self.seq_len == self.kv_seq_len and isinstance(self.heads, int)


def discover_sites(model, inputs: dict, allow_fp32: bool) -> list[FoundSite]:
    """Every SDPA site of a Dynamo trace of ``model`` with a backend that only runs paro's discovery pass (the report's
    site ids and verdicts, without Inductor)."""
    from paro_compile.config import ParoConfig
    from paro_compile.passes.discover import find_attention_sites

    found: list[FoundSite] = []

    def backend(gm, example_inputs):
        for site in find_attention_sites(gm, ParoConfig(allow_fp32=allow_fp32)):
            found.append(FoundSite(site.site_id, site.heads, site.seq_len, site.kv_seq_len, tuple(site.reasons)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=False)(**inputs)
    torch._dynamo.reset()
    return found


BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks")


def extrapolate_site_ids(found: list[FoundSite], counts: dict[str, int]) -> list[FoundSite]:
    """Sites traced on the one-block model, repeated over every block of each block list (``blocks.0.attn1#0`` →
    ``blocks.<i>.attn1#0``); sites outside the block lists (e.g. HunyuanVideo's token refiner) stay as they are."""
    out = []
    for site in found:
        m = re.match(rf"^({'|'.join(BLOCK_LISTS)})\.0\.(.*)$", site.site_id)
        if m and m.group(1) in counts:
            out += [FoundSite(f"{m.group(1)}.{i}.{m.group(2)}", site.heads, site.seq_len, site.kv_seq_len, site.reasons)
                    for i in range(counts[m.group(1)])]
        else:
            out.append(site)
    return out


def synthetic_plan(site_ids: list[str], heads: int, grid: TokenGrid, density: float, block: int, seed: int,
                   coherent: bool = False, local_blocks: int = 0, dense_sites: Optional[dict[str, tuple[int, int]]] = None,
                   device=None) -> Plan:
    """A calibrated-like plan: per site and head an order drawn among the candidates and a block mask at ``density``
    keeping, in this order, the mandatory blocks (diagonal, text rows and columns), the ``local_blocks`` neighbours of
    the diagonal on each side, then random blocks. ``coherent`` (blocks under 64): the random scores are drawn per
    64-token block and refined, so neighbouring query blocks keep the same KV blocks, as calibrated masks tend to;
    otherwise every block is drawn on its own (the worst case for the kernel's shared 64-row tiles).
    ``dense_sites`` (site id → (heads, tokens)): self-attention sites off the video grid (e.g. a text refiner), covered
    with a dense mask in model order. ``device``: where the scores are drawn and sorted (masks are kept on the CPU, as
    a loaded plan file's are)."""
    from paro_compile.calibration.masks import mandatory_blocks, select_blocks
    from paro_compile.kernels.tuning import refine_block_mask

    g = torch.Generator().manual_seed(seed)
    cands = candidate_orders(grid)
    nb = math.ceil(grid.num_tokens / block)
    mandatory = mandatory_blocks(grid, block)
    local = None
    if local_blocks > 0:
        idx = torch.arange(nb)
        local = ((idx[:, None] - idx[None, :]).abs() <= local_blocks).float()
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
        if local is not None:
            scores = scores + local  # random scores lie in [0, 1): local blocks sort first
        masks = select_blocks(scores.to(device), density, mandatory).cpu()
        sites[sid] = SitePlan(site_id=sid, heads=heads, seq_len=grid.num_tokens, block_size=block, perm=perm_cache[key],
                              block_masks=masks[None], orders=orders, grid=grid)
    for sid, (site_heads, tokens) in (dense_sites or {}).items():
        n = math.ceil(tokens / block)
        sites[sid] = SitePlan(site_id=sid, heads=site_heads, seq_len=tokens, block_size=block, perm=None,
                              block_masks=torch.ones(1, site_heads, n, n, dtype=torch.bool))
    return Plan(sites=sites, step_boundaries=[], density=density,
                meta={"synthetic": True, "seed": seed, "local_blocks": local_blocks})


def sdpa_context(base: str):
    """The context every call of an SDPA variant runs in (``base``: `Variant.base`)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"compile-flash": SDPBackend.FLASH_ATTENTION, "compile-cudnn": SDPBackend.CUDNN_ATTENTION,
                "compile-efficient": SDPBackend.EFFICIENT_ATTENTION}
    if base in backends:
        return lambda: sdpa_kernel([backends[base]])
    if base == "compile-fa4":
        activate_fa4()
        return lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])
    return nullcontext


FA4_CALLS = {"forward": 0}
"""Calls of FlashAttention-4's forward since `activate_fa4` (counted, so that a variant proves it ran it)."""


def activate_fa4() -> None:
    """Route SDPA's flash backend to FlashAttention-4 (``flash_attn.cute``), count its forward calls, and check on a
    small eager call that the route works. Torch keeps it for the rest of the process (there is no deactivation), so
    `order_runs` puts the variants that need it last."""
    import importlib

    import torch.nn.functional as F
    from torch.nn.attention import (SDPBackend, activate_flash_attention_impl, current_flash_attention_impl,
                                    sdpa_kernel)

    if current_flash_attention_impl() != "FA4":
        activate_flash_attention_impl("FA4")
        from torch.nn.attention import _fa4

        module = importlib.import_module(getattr(_fa4, "_FA4_MODULE_PATH", "flash_attn.cute.interface"))
        forward = module._flash_attn_fwd

        def counted_forward(*args, **kwargs):
            FA4_CALLS["forward"] += 1
            return forward(*args, **kwargs)

        module._flash_attn_fwd = counted_forward
    q, k, v = (torch.randn(1, 2, 256, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            out = F.scaled_dot_product_attention(q, k, v)
    except Exception as error:
        raise RuntimeError(f"FlashAttention-4 is active but torch {torch.__version__}'s route to it fails on this "
                           f"install ({type(error).__name__}: {error}): the installed flash-attn-4 does not match "
                           "the interface this torch calls") from error
    with sdpa_kernel([SDPBackend.MATH]):
        expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    if not torch.allclose(out.float(), expected, atol=2e-2, rtol=2e-2):
        raise RuntimeError("FlashAttention-4 through SDPA disagrees with the math backend on a small call")


def check_fa4_ran(calls_before: int) -> None:
    """Raise unless FlashAttention-4's forward ran since ``calls_before`` (SDPA may have chosen another kernel)."""
    if FA4_CALLS["forward"] == calls_before:
        raise RuntimeError("compile-fa4: FlashAttention-4 never ran in the compiled model (SDPA chose another "
                           "kernel), so the time would not be its")


class torchao_inductor_settings:
    """torchao's recommended Inductor settings (its ``set_inductor_config=True``: coordinate-descent tuning and more)
    for one variant; Inductor's whole configuration is restored afterwards."""

    def __enter__(self):
        from torchao.quantization.utils import recommended_inductor_config_setter

        self.saved = torch._inductor.config.save_config()
        recommended_inductor_config_setter()
        return self

    def __exit__(self, *exc):
        torch._inductor.config.load_config(self.saved)
        return False


def report_counts(reports: list) -> dict[str, Any]:
    """Lowered / fallback counts of every graph the variant compiled, and each fallback reason with its count."""
    sites = [s for r in reports for s in r.sites]
    lowered = [s for s in sites if s.lowered]
    reasons: dict[str, int] = {}
    for s in sites:
        if not s.lowered:
            for reason in s.reasons:
                reasons[reason] = reasons.get(reason, 0) + 1
    return {"graphs": len(reports), "sites_lowered": f"{len(lowered)}/{len(sites)}", "lowered_count": len(lowered),
            "fallback_count": len(sites) - len(lowered), "fallback_reasons": reasons,
            "cross_attention_lowered": sum(bool(getattr(s, "cross_attention", False)) for s in lowered),
            "key_padding_lowered": sum(bool(getattr(s, "key_padding", False)) for s in lowered),
            "compensated_sites": sum(bool(s.compensated) for s in lowered),
            "gathers_left": sum(r.gathers_left for r in reports),
            "permutation": sorted({s.permutation for s in lowered})}


def run_variant(model, inputs: dict, variant: str, device, args, plans: dict, allow_fp32: bool) -> dict:
    entry: dict[str, Any] = {"variant": variant}
    spec = Variant.parse(variant)
    TIMERS["paro_passes"] = TIMERS["inductor"] = 0.0
    torch._dynamo.reset()
    paro_compile.clear_reports()
    reset_compile_metrics()
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    ctx = sdpa_context(spec.base)
    torch._dynamo.utils.counters.clear()
    mode = "reduce-overhead" if spec.graphs else None
    if spec.base == "eager":
        fn_model = model
    elif spec.sdpa_only:
        fn_model = torch.compile(model, dynamic=False, mode=mode)
    else:
        plan = plans[spec.density]
        entry["density"] = spec.density
        entry["achieved_density"] = plan.overall_density()
        options = {"plan": plan, "qk_bits": args.qk_bits, "pv_dtype": args.pv_dtype, "impl": args.impl,
                   "allow_fp32": allow_fp32, "compensate_skipped": spec.compensate,
                   "lower_cross_attention": args.cross_attention == "paro"}
        if mode:
            options["mode"] = mode
        fn_model = torch.compile(model, backend=registered_backend(), dynamic=False, options=options)

    def call():
        with torch.no_grad(), ctx():
            return fn_model(**inputs)

    fa4_calls = FA4_CALLS["forward"]
    t = time.perf_counter()
    out = call()
    harness.synchronize(device)
    entry["first_call_s"] = time.perf_counter() - t
    if spec.base == "compile-fa4":
        check_fa4_ran(fa4_calls)
    metrics = compile_metrics()
    first = out[0] if isinstance(out, (tuple, list)) else out
    entry["output_finite"] = bool(torch.isfinite(first).all())
    del out, first
    if spec.graphs:  # cudagraph trees record on the 2nd-3rd call: keep that out of the timed calls
        for _ in range(2):
            call()
        harness.synchronize(device)
        skips = dict(torch._dynamo.utils.counters.get("inductor", {}))
        entry["cudagraph_skips"] = int(skips.get("cudagraph_skips", 0))
    timing = harness.time_calls(call, device, calls=args.iters, warmup_calls=args.warmup)
    entry["times_ms"] = [round(t, 4) for t in timing.samples_ms]
    entry["median_ms"] = timing.median_ms
    entry["timer"] = timing.timer
    entry["compile_s"] = max(0.0, entry["first_call_s"] - entry["median_ms"] / 1e3) if spec.base != "eager" else 0.0
    entry.update(first_call_breakdown(entry["first_call_s"], entry["median_ms"], metrics))
    entry["compile_metrics_top"] = dict(sorted(metrics.items(), key=lambda kv: -kv[1])[:12])
    entry["graph_breaks"] = int(sum(torch._dynamo.utils.counters["graph_break"].values()))
    if getattr(args, "profile", False) and getattr(args, "profile_dir", None) is not None:
        profile_calls(call, device, Path(args.profile_dir) / f"profile_{args.profile_model}_{variant}.txt")
    if torch.device(device).type == "cuda":
        entry["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    from paro_compile.report import compile_reports

    if spec.is_paro and compile_reports:
        entry.update(report_counts(list(compile_reports)))
    del fn_model
    torch._dynamo.reset()
    return entry


def apply_fp8(model, name: str) -> dict[str, Any]:
    """Quantize ``model``'s linears in place (paro_compile.fp8.quantize_linears, the recipe's defaults): what was done,
    or why FP8 is unavailable here."""
    from paro_compile.fp8 import Fp8UnavailableWarning, quantize_linears

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Fp8UnavailableWarning)  # the reason goes into the results instead
        result = quantize_linears(model)
    print(f"[bench] {name}: {result.summary()}", flush=True)
    return {"applied": result.applied, "reason": result.reason, "quantized": len(result.quantized),
            "kept": len(result.skipped), "seconds": result.seconds}


def order_runs(variants: list[str], batches: list[int]) -> list[tuple[str, int]]:
    """(variant, batch) in run order: variants without FP8 first (the model is quantized in place once, between the
    two groups), each variant at every batch size before the next variant."""
    def fa4_last(variant: str) -> bool:  # FlashAttention-4 stays SDPA's flash backend once a variant turns it on
        return Variant.parse(variant).base == "compile-fa4"

    plain = sorted((v for v in variants if Variant.parse(v).fp8 is None), key=fa4_last)
    quantized = sorted((v for v in variants if Variant.parse(v).fp8 is not None), key=fa4_last)
    return [(v, b) for v in plain + quantized for b in batches]


def default_variants(densities: list[float]) -> list[str]:
    """Priority order (a time-out drops the tail): baselines, then paro nearest 0.3 first, then the other backends."""
    paro = [f"paro-{d:g}" for d in sorted(densities, key=lambda d: abs(d - 0.3))]
    return ["eager", "compile", "compile-cudnn"] + paro + ["compile-flash", "compile-efficient"]


def bench_model(name: str, args, device, dtype, t_start: float, on_row: Callable[[dict], None] = lambda row: None) -> list[dict]:
    tiny = args.tiny
    block = args.block or (16 if tiny else 64)
    local_blocks = DEFAULT_LOCAL_BLOCKS[name] if args.local_blocks is None else args.local_blocks
    allow_fp32 = dtype == torch.float32
    batches = batch_sizes(args, name)
    t_build = time.perf_counter()
    cls, cfg = model_class(name), model_config(name, model_depth(name, args), tiny)
    depth = config_depth(name, cfg)
    make_inputs = MODEL_INPUTS[name]
    input_options = {"text_valid": args.text_valid}
    # site ids: trace a one-block model of the same class and shapes, extrapolate over the block index
    small = build(cls, one_block_config(name, cfg), device, dtype, args.seed)
    small_inputs, grid = make_inputs(small, device, dtype, tiny, batch=batches[0], **input_options)
    found = discover_sites(small, small_inputs, allow_fp32)
    del small, small_inputs
    model = build(cls, cfg, device, dtype, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    heads = int(cfg["num_attention_heads"])
    counts = {"transformer_blocks": int(cfg["num_layers"]), "single_transformer_blocks": int(cfg.get("num_single_layers", 0)),
              "blocks": int(cfg["num_layers"])}
    sites = extrapolate_site_ids(found, counts)
    modules = dict(model.named_modules())
    missing = [s.site_id for s in sites if s.site_id.split("#")[0] not in modules]
    if missing:
        print(f"[bench] warning: extrapolated site ids not in the model: {missing[:3]}")
    # The plan covers every self-attention site, also those that stay on SDPA (e.g. for a mask that varies over queries),
    # so a plan never misses a site that lowers; grid-sized sites get the synthetic sparse masks, the others a dense mask.
    grid_sites = [s.site_id for s in sites if s.self_attention and s.seq_len == grid.num_tokens and s.heads == heads]
    other_sites = {s.site_id: (s.heads, s.seq_len) for s in sites if s.self_attention and s.site_id not in grid_sites}
    uncovered = sorted({f"{s.site_id.split('.')[0]}…: {'; '.join(s.reasons)}" for s in sites if not s.self_attention})
    for line in uncovered:
        print(f"[bench] {name}: not in the plan (stays SDPA): {line}")
    site_summary = {"sites": len(sites), "plan_sites_sparse": len(grid_sites), "plan_sites_dense": len(other_sites),
                    "sites_not_self_attention": len(sites) - len(grid_sites) - len(other_sites),
                    "site_reasons": sorted({r for s in sites for r in s.reasons})}
    print(f"[bench] {name}: {n_params / 1e9:.2f}B params, depth {depth}, {len(sites)} sites ({len(grid_sites)} on the grid, "
          f"{len(other_sites)} other self-attention), grid {grid}, built in {time.perf_counter() - t_build:.1f}s", flush=True)

    densities = [float(d) for d in args.densities.split(",") if d]
    if args.variants == "all":
        variants = default_variants(densities)
    else:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if torch.device(device).type != "cuda":
        variants = [v for v in variants if Variant.parse(v).base not in SDPA_VARIANTS[1:]]
        variants = [v for v in variants if not Variant.parse(v).graphs]  # CUDA graphs need a GPU
    plan_device = device if torch.device(device).type == "cuda" else None
    plans = {}
    for d in sorted({Variant.parse(v).density for v in variants if Variant.parse(v).is_paro}):
        t = time.perf_counter()
        plans[d] = synthetic_plan(grid_sites, heads, grid, d, block, args.seed, coherent=args.coherent,
                                  local_blocks=local_blocks, dense_sites=other_sites, device=plan_device)
        print(f"[bench] synthetic plan d={d}: achieved {plans[d].overall_density():.3f} ({time.perf_counter() - t:.1f}s)",
              flush=True)

    factor = None if tiny else full_depth_factor(name, depth)
    blocks = sum(depth)
    meta = dict(model=name, tokens=grid.num_tokens, heads=heads, depth=list(depth), layers=cfg.get("num_layers"),
                params_b=n_params / 1e9, local_blocks=local_blocks, block=block, **site_summary)
    rows = []
    longest_compile = 0.0
    fp8_state: Optional[dict] = None
    inputs_cache: dict[int, dict] = {}
    for variant, batch in order_runs(variants, batches):
        spec = Variant.parse(variant)
        elapsed = time.perf_counter() - t_start
        needed = 0.0 if spec.base == "eager" else longest_compile
        base_row = dict(meta, variant=variant, batch=batch)
        if elapsed + needed > args.max_minutes * 60:
            rows.append(dict(base_row, skipped=f"time budget ({args.max_minutes} min; {elapsed:.0f}s used, ~{needed:.0f}s needed)"))
            print(f"[bench] skip {variant} B={batch}: time budget", flush=True)
            on_row(rows[-1])
            continue
        if spec.fp8 is not None and fp8_state is None:
            fp8_state = apply_fp8(model, name)
        if spec.fp8 is not None and not fp8_state["applied"]:
            rows.append(dict(base_row, skipped=f"FP8 linears unavailable: {fp8_state['reason']}"))
            on_row(rows[-1])
            continue
        if batch not in inputs_cache:
            inputs_cache.clear()
            inputs_cache[batch] = make_inputs(model, device, dtype, tiny, batch=batch, **input_options)[0]
        try:
            args.profile_dir, args.profile_model = args.out, f"{name}_b{batch}"
            with (torchao_inductor_settings() if spec.fp8 == "fp8cd" else nullcontext()):
                entry = run_variant(model, inputs_cache[batch], variant, device, args, plans, allow_fp32)
        except Exception as error:
            entry = {"variant": variant, "error": f"{type(error).__name__}: {error}"[:2000], "traceback": traceback.format_exc()[-3000:]}
            print(f"[bench] {name} {variant} B={batch} FAILED: {entry['error'][:400]}", flush=True)
            torch._dynamo.reset()
            gc.collect()
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
        entry = dict(base_row, **entry)
        if spec.fp8 is not None:
            entry["fp8_quantize_s"] = fp8_state["seconds"]
            entry["fp8_linears"] = f"{fp8_state['quantized']} quantized, {fp8_state['kept']} kept"
        if "median_ms" in entry:
            entry["per_block_ms"] = entry["median_ms"] / blocks
            entry["full_depth_ms_extrapolated"] = entry["median_ms"] * factor if factor is not None else None
        rows.append(entry)
        if spec.base != "eager" and "first_call_s" in entry:
            calls = args.iters + args.warmup + harness.UNTIMED_CALLS
            longest_compile = max(longest_compile, entry["first_call_s"] + entry["median_ms"] * calls / 1e3)
        on_row(entry)
        if "median_ms" in entry:
            print(f"[bench] {name:7s} {variant:22s} B={batch} median {entry['median_ms']:9.2f} ms  first call "
                  f"{entry['first_call_s']:6.1f}s{'  sites ' + entry['sites_lowered'] if 'sites_lowered' in entry else ''}",
                  flush=True)
            print("[bench]     first call: " + breakdown_line(entry), flush=True)
    add_ratios(rows)
    del model
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return rows


def breakdown_line(entry: dict) -> str:
    parts = [("torchao quantization", entry.get("fp8_quantize_s")), ("Dynamo", entry.get("dynamo_s")),
             ("our passes", entry.get("paro_passes_s")), ("Inductor compile_fx", entry.get("inductor_compile_fx_s")),
             ("Inductor autotune", entry.get("inductor_autotune_s")),
             ("coordinate descent", entry.get("coordinate_descent_s")), ("rest of the first run", entry.get("first_run_rest_s"))]
    return ", ".join(f"{label} {value:.2f}s" for label, value in parts if value is not None)


def add_ratios(rows: list[dict]) -> None:
    """Per batch size: ratios vs eager and vs the fastest compiled SDPA variant (without FP8) of the same batch."""
    for batch in sorted({r.get("batch") for r in rows}):
        ok = {r["variant"]: r for r in rows if "median_ms" in r and r.get("batch") == batch}
        eager = ok.get("eager")
        compiled = [r for v, r in ok.items() if Variant.parse(v).sdpa_only and Variant.parse(v).fp8 is None]
        best = min(compiled, key=lambda r: r["median_ms"]) if compiled else None
        for r in ok.values():
            r["speedup_vs_eager"] = eager["median_ms"] / r["median_ms"] if eager else None
            r["speedup_vs_best_compile"] = best["median_ms"] / r["median_ms"] if best else None
            r["best_compile_variant"] = best["variant"] if best else None


def table_row(r: dict) -> dict:
    """The markdown row of one variant (the JSON keeps everything)."""
    row = {"model": r.get("model"), "variant": r.get("variant"), "B": r.get("batch")}
    if "median_ms" not in r:
        row["status"] = r.get("skipped") or "ERROR " + str(r.get("error", ""))[:150]
        return row
    row.update({"median ms": r["median_ms"], "× eager": r.get("speedup_vs_eager"),
                "× best compile": r.get("speedup_vs_best_compile"), "ms/block": r.get("per_block_ms"),
                "full depth ms (extrap.)": r.get("full_depth_ms_extrapolated"), "first call s": r["first_call_s"],
                "dynamo s": r.get("dynamo_s"), "paro passes s": r["paro_passes_s"],
                "inductor s": r["inductor_compile_fx_s"],
                "autotune s": (r.get("inductor_autotune_s") or 0.0) + (r.get("coordinate_descent_s") or 0.0),
                "torchao s": r.get("fp8_quantize_s"), "peak GB": r.get("peak_gb"), "sites": r.get("sites_lowered"),
                "fallbacks": r.get("fallback_count")})
    return row


def extrapolation_note(name: str, depth: tuple[int, ...], tiny: bool = False) -> str:
    factor = full_depth_factor(name, depth)
    full = "/".join(map(str, FULL_DEPTH[name]))
    if tiny:
        return f"{name}: tiny configuration (depth {'/'.join(map(str, depth))}), no full-depth extrapolation."
    if factor is None:
        return (f"{name}: measured at depth {depth}; no full-depth extrapolation (the mix of block kinds differs from the "
                f"full model's {full}).")
    return (f"{name}: measured at depth {'/'.join(map(str, depth))} of {full}; 'full depth ms (extrap.)' = median × "
            f"{factor:g}, an extrapolation that assumes the time is per block (the embedders and the head, run once per "
            "forward, are scaled with the blocks); the ratios at reduced depth stand for the per-block ratios.")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on the GPU; fp32 on the CPU, where paro sites lower with the reference numerics (``allow_fp32``)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def main(argv=None) -> dict:
    args = parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    dtype = default_dtype(device)
    if args.tiny:
        args.densities = args.densities if args.densities != ",".join(str(d) for d in DEFAULT_DENSITIES) else "0.5"
        args.iters, args.warmup = min(args.iters, 2), min(args.warmup, 1)
        if args.variants == "all":
            args.variants = "eager,compile," + ",".join(f"paro-{float(d):g}" for d in args.densities.split(","))
    install_timers()
    run_stamp = harness.stamp(__file__, argv)
    models = list(MODEL_GROUPS.get(args.model, (args.model,)))
    results: dict[str, Any] = {"config": {"device": str(device), "dtype": str(dtype),
                                          "args": {k: str(v) for k, v in vars(args).items()}}, "rows": []}
    title = f"end-to-end forward, {torch.cuda.get_device_name() if device.type == 'cuda' else device} ({dtype})"
    notes = [extrapolation_note(m, benchmarked_depth(m, args), args.tiny) for m in models]
    notes.append("first call s = Dynamo + paro passes + inductor (compile_fx) + autotune (Inductor's run-time config "
                 "benchmarks and coordinate descent) + the rest of the first run; torchao s = quantize_linears, once, "
                 "before the first FP8 variant.")

    def write(rows: list[dict], extra=()) -> Path:
        return harness.write_results(out / "results.json", dict(results, rows=rows), run_stamp, title=title,
                                     notes=[*notes, *extra], table=[table_row(r) for r in rows])

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
    path = write(results["rows"], extra=[f"total {results['total_seconds']:.0f}s"])
    print(path.with_suffix(".md").read_text(), flush=True)
    return results


if __name__ == "__main__":
    main()
