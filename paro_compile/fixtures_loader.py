"""The trained toy video DiT fixture (a diffusers ``CogVideoXTransformer3DModel``) and what it needs to run.

The fixture is trained by ``benchmarks/train_video_dit.py`` on procedurally generated "latent" videos
(shapes that move, rotate, grow or change colour; drawn directly into C=4 channels, 8 frames × 32×32) with
a rectified-flow objective: ``x_t = (1 − t)·x0 + t·ε``, the model predicts ``v = ε − x0``. Its weights live
in ``paro_compile/fixtures/toy_cogvideox/`` (config.json + diffusion_pytorch_model.safetensors, fp16) and
are loaded with diffusers' own ``from_pretrained``: the same loading code a user's CogVideoX goes through.

A *prompt* is a dict ``{"shape": ..., "colour": ..., "motion": ...}`` over `SHAPES`, `COLOURS`, `MOTIONS`.
It is encoded (`encode_prompts`) into 16 "text" tokens from fixed random vectors (no learned text encoder):
4 tokens per attribute plus 4 constant tokens; the unconditional prompt (classifier-free guidance) is all
zeros. Everything here is deterministic (fixed seeds), so the training script, the quality benchmark and
the tests agree on the vocabulary.

Import-light: diffusers is imported inside the functions that need it.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch

FIXTURE_DIR = Path(__file__).resolve().parent / "fixtures" / "toy_cogvideox"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# ---- the toy "language" ------------------------------------------------------------------------------
SHAPES = ("circle", "square", "triangle", "ring", "cross")
COLOURS = ("red", "green", "blue", "yellow", "cyan", "magenta")
MOTIONS = ("static", "right", "left", "down", "up", "rotate", "grow", "colour_shift")
# 4-channel "latent colours" (values in [-1, 1]; channel 3 is a brightness-like channel).
PALETTE = {
    "red": (1.0, -0.6, -0.6, 0.6),
    "green": (-0.6, 1.0, -0.6, 0.2),
    "blue": (-0.6, -0.6, 1.0, -0.2),
    "yellow": (0.9, 0.9, -0.7, 0.9),
    "cyan": (-0.7, 0.9, 0.9, 0.4),
    "magenta": (0.9, -0.7, 0.9, -0.6),
}
BACKGROUND = (-0.55, -0.45, -0.35, -0.8)
TOKENS_PER_ATTRIBUTE = 4
TEXT_TOKENS = 4 * TOKENS_PER_ATTRIBUTE  # shape, colour, motion, constant
VOCAB_SEED = 20261123

# ---- the fixture model's shape ------------------------------------------------------------------------
FRAMES = 8
LATENT_SIZE = 32
CHANNELS = 4
PATCH = 2
TOY_CONFIG: dict[str, Any] = dict(
    num_attention_heads=4, attention_head_dim=64, in_channels=CHANNELS, out_channels=CHANNELS,
    time_embed_dim=128, text_embed_dim=64, num_layers=6, sample_width=LATENT_SIZE, sample_height=LATENT_SIZE,
    sample_frames=(FRAMES - 1) * 4 + 1, patch_size=PATCH, temporal_compression_ratio=4,
    max_text_seq_length=TEXT_TOKENS, use_rotary_positional_embeddings=True,
)
# A small random-init variant for CPU tests (same class, same code paths).
TINY_CONFIG: dict[str, Any] = dict(
    TOY_CONFIG, num_attention_heads=2, num_layers=2, time_embed_dim=32, text_embed_dim=64,
    sample_width=8, sample_height=8, sample_frames=(4 - 1) * 4 + 1,
)
TINY_FRAMES, TINY_SIZE = 4, 8


def paro_backend_arg():
    """``"paro"`` when the entry point is registered (pip install), else the backend function itself (a source
    checkout on a machine where the package is not installed); torch.compile takes either, with ``options``."""
    import torch._dynamo

    if "paro" in torch._dynamo.list_backends():
        return "paro"
    from paro_compile.backend import paro_backend

    return paro_backend


def fixture_available(path: Union[str, Path, None] = None) -> bool:
    path = Path(path) if path is not None else FIXTURE_DIR
    return (path / "config.json").exists() and (path / WEIGHTS_NAME).exists()


def load_toy_cogvideox(device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
                       path: Union[str, Path, None] = None):
    """The trained toy CogVideoX transformer (eval mode) from ``path`` (default: the packaged fixture)."""
    path = Path(path) if path is not None else FIXTURE_DIR
    if not fixture_available(path):
        raise FileNotFoundError(
            f"toy CogVideoX weights not found in {path} (need config.json and {WEIGHTS_NAME}); train them with "
            "`python benchmarks/train_video_dit.py --out OUT` and copy OUT/toy_cogvideox/ there"
        )
    from diffusers import CogVideoXTransformer3DModel

    model = CogVideoXTransformer3DModel.from_pretrained(str(path), torch_dtype=dtype)
    return model.to(device).eval()


def new_toy_cogvideox(config: Optional[Mapping[str, Any]] = None, seed: int = 0, device="cpu",
                      dtype: torch.dtype = torch.float32):
    """A freshly initialised CogVideoX transformer with ``config`` (default `TOY_CONFIG`)."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(**dict(config or TOY_CONFIG))
    return model.to(device=device, dtype=dtype)


def video_shape(model) -> tuple[int, int, int, int]:
    """(frames, channels, height, width) of the latent video the model was built for (fixture conventions)."""
    cfg = model.config
    frames = (int(cfg.sample_frames) - 1) // int(cfg.temporal_compression_ratio) + 1
    return frames, int(cfg.in_channels), int(cfg.sample_height), int(cfg.sample_width)


def token_grid(model):
    """The `TokenGrid` of the model's attention sites for its native video size (text prefix)."""
    from paro_compile.grid import TokenGrid

    frames, _, h, w = video_shape(model)
    p = int(model.config.patch_size)
    return TokenGrid(frames=frames, height=h // p, width=w // p, text_tokens=int(model.config.max_text_seq_length))


# ---- prompts -------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _tables(text_dim: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(VOCAB_SEED + text_dim)
    scale = 1.0
    return {
        "shape": torch.randn(len(SHAPES), TOKENS_PER_ATTRIBUTE, text_dim, generator=g) * scale,
        "colour": torch.randn(len(COLOURS), TOKENS_PER_ATTRIBUTE, text_dim, generator=g) * scale,
        "motion": torch.randn(len(MOTIONS), TOKENS_PER_ATTRIBUTE, text_dim, generator=g) * scale,
        "constant": torch.randn(TOKENS_PER_ATTRIBUTE, text_dim, generator=g) * scale,
    }


def prompt_indices(prompt: Mapping[str, str]) -> tuple[int, int, int]:
    return SHAPES.index(prompt["shape"]), COLOURS.index(prompt["colour"]), MOTIONS.index(prompt["motion"])


def encode_indices(shape_idx: torch.Tensor, colour_idx: torch.Tensor, motion_idx: torch.Tensor, text_dim: int,
                   device=None, dtype=torch.float32) -> torch.Tensor:
    """[B] index tensors → [B, 16, text_dim] condition tokens."""
    t = {k: v.to(device) for k, v in _tables(text_dim).items()}
    b = shape_idx.shape[0]
    tokens = torch.cat([
        t["shape"][shape_idx.to(device)], t["colour"][colour_idx.to(device)], t["motion"][motion_idx.to(device)],
        t["constant"].expand(b, -1, -1),
    ], dim=1)
    return tokens.to(dtype)


def encode_prompts(prompts: Sequence[Mapping[str, str]], text_dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    idx = torch.tensor([prompt_indices(p) for p in prompts], dtype=torch.long).view(-1, 3)
    return encode_indices(idx[:, 0], idx[:, 1], idx[:, 2], text_dim, device=device, dtype=dtype)


def prompt_name(prompt: Mapping[str, str]) -> str:
    return f"{prompt['colour']} {prompt['shape']} {prompt['motion']}"


# ---- procedural videos ---------------------------------------------------------------------------------
def render_videos(shape_idx: torch.Tensor, colour_idx: torch.Tensor, motion_idx: torch.Tensor, *,
                  frames: int = FRAMES, size: int = LATENT_SIZE, channels: int = CHANNELS,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Draw one shape per video → [B, frames, channels, size, size] (the CogVideoX latent layout), on the
    index tensors' device. Continuous nuisances (start position, size, speed, angle, second colour) are
    drawn from ``generator`` (must live on the same device)."""
    device = shape_idx.device
    b = shape_idx.shape[0]

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=device)

    s = float(size)
    t = torch.arange(frames, device=device, dtype=torch.float32).view(1, frames) / max(frames - 1, 1)  # [1, F] in [0, 1]
    radius0 = s * (0.12 + 0.08 * rand(b, 1))
    travel = s * (0.25 + 0.2 * rand(b, 1))
    cx0 = s * (0.3 + 0.4 * rand(b, 1))
    cy0 = s * (0.3 + 0.4 * rand(b, 1))
    angle0 = rand(b, 1) * 2 * math.pi
    m = motion_idx.view(b, 1)
    dx = torch.zeros(b, 1, device=device)
    dy = torch.zeros(b, 1, device=device)
    dx = torch.where(m == MOTIONS.index("right"), travel, dx)
    dx = torch.where(m == MOTIONS.index("left"), -travel, dx)
    dy = torch.where(m == MOTIONS.index("down"), travel, dy)
    dy = torch.where(m == MOTIONS.index("up"), -travel, dy)
    # moving shapes start so that they end inside the frame
    cx = (cx0 - dx / 2) + dx * t
    cy = (cy0 - dy / 2) + dy * t
    spin = torch.where(m == MOTIONS.index("rotate"), (0.5 + 0.5 * rand(b, 1)) * math.pi, torch.zeros(b, 1, device=device))
    angle = angle0 + spin * t
    grow = torch.where(m == MOTIONS.index("grow"), 1.0 + 0.9 * t, torch.ones_like(t))
    radius = radius0 * grow
    palette = torch.tensor([PALETTE[c] for c in COLOURS], device=device)[:, :channels]
    colour_a = palette[colour_idx]  # [B, C]
    other = (colour_idx + 1 + (rand(b) * (len(COLOURS) - 1)).long()) % len(COLOURS)
    colour_b = palette[other]
    shift = (m == MOTIONS.index("colour_shift")).float() * t  # [B, F]
    colour = colour_a[:, None] * (1 - shift[..., None]) + colour_b[:, None] * shift[..., None]  # [B, F, C]
    bg = torch.tensor(BACKGROUND[:channels], device=device)

    coords = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    yy, xx = coords.view(1, 1, size, 1), coords.view(1, 1, 1, size)
    px, py = xx - cx[..., None, None], yy - cy[..., None, None]  # [B, F, S, S]
    ca, sa = torch.cos(angle)[..., None, None], torch.sin(angle)[..., None, None]
    u, v = px * ca + py * sa, -px * sa + py * ca
    r = radius[..., None, None]
    rho = torch.sqrt(u * u + v * v + 1e-6)
    metrics = [
        rho - r,  # circle
        torch.maximum(u.abs(), v.abs()) - 0.85 * r,  # square
        torch.stack([u * math.cos(a) + v * math.sin(a) for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]).amax(0) - 0.55 * r,
        (rho - 0.7 * r).abs() - 0.3 * r,  # ring
        torch.minimum(torch.maximum(u.abs() * 3, v.abs()), torch.maximum(u.abs(), v.abs() * 3)) - r,  # cross
    ]
    metric = torch.stack(metrics)  # [5, B, F, S, S]
    chosen = metric.gather(0, shape_idx.view(1, b, 1, 1, 1).expand(1, *metric.shape[1:]))[0]
    alpha = torch.sigmoid(-chosen * 2.5)  # soft edge ~ 1 px
    video = bg.view(1, 1, channels, 1, 1) + alpha[:, :, None] * (colour[..., None, None] - bg.view(1, 1, channels, 1, 1))
    return video  # [B, F, C, S, S]


def random_batch(batch: int, *, frames: int = FRAMES, size: int = LATENT_SIZE, channels: int = CHANNELS,
                 generator: Optional[torch.Generator] = None, device=None):
    """(videos [B, F, C, S, S], shape_idx, colour_idx, motion_idx) with uniformly drawn classes."""
    device = generator.device if generator is not None else device
    shape_idx = torch.randint(len(SHAPES), (batch,), generator=generator, device=device)
    colour_idx = torch.randint(len(COLOURS), (batch,), generator=generator, device=device)
    motion_idx = torch.randint(len(MOTIONS), (batch,), generator=generator, device=device)
    videos = render_videos(shape_idx, colour_idx, motion_idx, frames=frames, size=size, channels=channels, generator=generator)
    return videos, shape_idx, colour_idx, motion_idx


# ---- model inputs ---------------------------------------------------------------------------------------
def rotary_embeddings(model, frames: int, height: int, width: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [frames·(height/p)·(width/p), head_dim] as the CogVideoX pipeline builds them."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    cfg = model.config
    p = int(cfg.patch_size)
    gh, gw = height // p, width // p
    base_h, base_w = int(cfg.sample_height) // p, int(cfg.sample_width) // p
    # get_resize_crop_region_for_grid((gh, gw), base_w, base_h), as in the CogVideoX pipeline
    tw, th = base_w, base_h
    r = gh / gw
    if r > (th / tw):
        resize_height, resize_width = th, int(round(th / gh * gw))
    else:
        resize_width, resize_height = tw, int(round(tw / gw * gh))
    top, left = int(round((th - resize_height) / 2.0)), int(round((tw - resize_width) / 2.0))
    crops = ((top, left), (top + resize_height, left + resize_width))
    cos, sin = get_3d_rotary_pos_embed(
        embed_dim=int(cfg.attention_head_dim), crops_coords=crops, grid_size=(gh, gw), temporal_size=frames, device=device,
    )
    return cos, sin


def model_inputs(latents: torch.Tensor, cond: torch.Tensor, t: Union[float, torch.Tensor],
                 rotary: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """Keyword inputs of ``CogVideoXTransformer3DModel.forward`` for latents [B, F, C, H, W] at flow time t ∈ [0, 1]
    (the model's timestep is 1000·t)."""
    b = latents.shape[0]
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(float(t))
    timestep = (t.float() * 1000.0).reshape(-1).expand(b).to(latents.device).contiguous()
    return dict(hidden_states=latents, encoder_hidden_states=cond.to(latents.dtype), timestep=timestep,
                image_rotary_emb=rotary, return_dict=False)


def flow_times(steps: int, shift: float = 1.0) -> list[float]:
    """Descending flow times 1 → 0 (steps + 1 values), optionally shifted (SD3-style shift > 1 spends more steps at high noise)."""
    ts = [1.0 - i / steps for i in range(steps + 1)]
    return [shift * t / (1 + (shift - 1) * t) for t in ts]


@torch.no_grad()
def sample_video(model: Callable, cond: torch.Tensor, steps: int = 20, seed: int = 0, *, guidance: float = 1.0,
                 frames: Optional[int] = None, channels: Optional[int] = None, height: Optional[int] = None,
                 width: Optional[int] = None, config_model=None, dtype: Optional[torch.dtype] = None,
                 shift: float = 1.0, noise: Optional[torch.Tensor] = None,
                 on_call: Optional[Callable[[dict[str, Any]], None]] = None) -> torch.Tensor:
    """Euler flow-matching sampler: x_1 = noise (from ``seed``), x_{t−dt} = x_t − dt·v(x_t, t); returns x_0
    [B, F, C, H, W] in float32.

    ``model`` may be a compiled module; ``config_model`` (default ``model``) supplies the config (sizes,
    rotary). ``guidance`` > 1 enables classifier-free guidance with an all-zero unconditional prompt; the
    unconditional and conditional halves run as one batch of 2B (as CogVideoX pipelines do). ``on_call``
    sees every model input dict (calibration recording).
    """
    base = config_model if config_model is not None else getattr(model, "_orig_mod", model)
    f0, c0, h0, w0 = video_shape(base)
    frames, channels, height, width = frames or f0, channels or c0, height or h0, width or w0
    param = next(base.parameters())
    device = param.device
    dtype = dtype or param.dtype
    b = cond.shape[0]
    if noise is None:
        g = torch.Generator().manual_seed(int(seed))
        noise = torch.randn(b, frames, channels, height, width, generator=g)
    x = noise.to(device=device, dtype=torch.float32)
    rotary = rotary_embeddings(base, frames, height, width, device=device)
    cond = cond.to(device=device, dtype=dtype)
    use_cfg = guidance != 1.0
    if use_cfg:
        cond_in = torch.cat([torch.zeros_like(cond), cond])
    else:
        cond_in = cond
    ts = flow_times(steps, shift)
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        x_in = torch.cat([x, x]) if use_cfg else x
        inputs = model_inputs(x_in.to(dtype), cond_in, t_cur, rotary)
        if on_call is not None:
            on_call(inputs)
        v = model(**inputs)[0].float()
        if use_cfg:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + guidance * (v_cond - v_uncond)
        x = x + (t_next - t_cur) * v
    return x


def to_pixels(latents: torch.Tensor) -> torch.Tensor:
    """Latents (values ≈ [−1, 1]) → "pixels" in [0, 1] (clamped), same shape: what PSNR/SSIM are computed on."""
    return ((latents.float().clamp(-1, 1) + 1) / 2)


def to_rgb_frames(latents: torch.Tensor) -> torch.Tensor:
    """[F, C, H, W] latents → [F, H, W, 3] displayable RGB in [0, 1] (channels 0..2)."""
    return to_pixels(latents[:, :3]).permute(0, 2, 3, 1).cpu()


__all__ = [
    "FIXTURE_DIR", "TOY_CONFIG", "TINY_CONFIG", "SHAPES", "COLOURS", "MOTIONS", "fixture_available",
    "load_toy_cogvideox", "new_toy_cogvideox", "video_shape", "token_grid", "encode_prompts", "encode_indices",
    "prompt_name", "render_videos", "random_batch", "rotary_embeddings", "model_inputs", "flow_times",
    "sample_video", "to_pixels", "to_rgb_frames",
]
