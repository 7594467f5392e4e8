"""The toy fixture's data: a small "language" of prompts and procedurally drawn latent videos.

A *prompt* is a dict ``{"shape": ..., "colour": ..., "motion": ...}`` over `SHAPES`, `COLOURS`, `MOTIONS`.
It is encoded (`encode_prompts`) into 16 "text" tokens from fixed random vectors (no learned text encoder):
4 tokens per attribute plus 4 constant tokens; the unconditional prompt (classifier-free guidance) is all
zeros. Videos (`render_videos`) are one shape that is static, moves, rotates, grows or shifts colour, drawn
directly into C=4 "latent" channels. Everything here is deterministic (fixed seeds), so the training script,
the quality benchmark and the tests agree on the vocabulary.
"""
from __future__ import annotations

import functools
import math
from typing import Mapping, Optional, Sequence

import torch

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

FRAMES = 8
LATENT_SIZE = 32
CHANNELS = 4


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


def to_pixels(latents: torch.Tensor) -> torch.Tensor:
    """Latents (values ≈ [−1, 1]) → "pixels" in [0, 1] (clamped), same shape: what PSNR/SSIM are computed on."""
    return ((latents.float().clamp(-1, 1) + 1) / 2)


def to_rgb_frames(latents: torch.Tensor) -> torch.Tensor:
    """[F, C, H, W] latents → [F, H, W, 3] displayable RGB in [0, 1] (channels 0..2)."""
    return to_pixels(latents[:, :3]).permute(0, 2, 3, 1).cpu()
