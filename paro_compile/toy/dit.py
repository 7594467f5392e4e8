"""A small built-in video DiT, shaped like the models users compile (for the demo, docs and tests).

Layout as in diffusers' video transformers: Conv3d patch embed → flatten(2).transpose(1, 2) to
tokens in (F, H, W) order → text tokens concatenated in front → blocks (LayerNorm, fused QKV, SDPA,
MLP, residuals, adaLN-style modulation from the timestep) → drop text → unpatchify.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class ToyAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, c))


class ToyBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = ToyAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))
        self.modulation = nn.Linear(dim, 4 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift1, scale1, shift2, scale2 = self.modulation(F.silu(temb)).unsqueeze(1).chunk(4, dim=-1)
        x = x + self.attn(self.norm1(x) * (1 + scale1) + shift1)
        return x + self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class ToyVideoDiT(nn.Module):
    """Latent video [B, C, F, H, W] + text embeddings [B, T, dim] + timestep [B] → predicted latent."""

    def __init__(self, in_channels: int = 4, dim: int = 128, heads: int = 2, depth: int = 2,
                 patch: int = 2, text_dim: int = 32) -> None:
        super().__init__()
        self.patch = patch
        self.in_channels = in_channels
        self.patch_embed = nn.Conv3d(in_channels, dim, kernel_size=(1, patch, patch), stride=(1, patch, patch))
        self.text_proj = nn.Linear(text_dim, dim)
        self.time_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(ToyBlock(dim, heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, patch * patch * in_channels)

    def timestep_embedding(self, timestep: torch.Tensor, dim: int) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=timestep.device, dtype=torch.float32) / half)
        args = timestep.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, latent: torch.Tensor, text: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = latent.shape
        p = self.patch
        tokens = self.patch_embed(latent).flatten(2).transpose(1, 2)  # [B, F*H/p*W/p, dim], (F, H, W) order
        text_tokens = self.text_proj(text)
        x = torch.cat([text_tokens, tokens], dim=1)
        temb = self.time_embed(self.timestep_embedding(timestep, x.shape[-1]).to(x.dtype))
        for block in self.blocks:
            x = block(x, temb)
        x = self.proj_out(self.norm_out(x[:, text_tokens.shape[1]:]))
        x = x.view(b, f, h // p, w // p, c, p, p).permute(0, 4, 1, 2, 5, 3, 6)
        return x.reshape(b, c, f, h, w)


def toy_inputs(batch: int = 1, frames: int = 2, height: int = 8, width: int = 8, text_tokens: int = 8,
               dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "latent": torch.randn(batch, 4, frames, height, width, generator=generator).to(device, dtype),
        "text": torch.randn(batch, text_tokens, 32, generator=generator).to(device, dtype),
        "timestep": torch.full((batch,), 500.0, device=device),
    }


def toy_model(dim: int = 128, heads: int = 2, depth: int = 2, seed: int = 0) -> ToyVideoDiT:
    """Factory for the CLI and examples (``paro diff paro_compile.toy:toy_model ...``): a small, seeded,
    eval-mode `ToyVideoDiT` (fp32, CPU; ``--dtype`` in the CLI casts it)."""
    torch.manual_seed(seed)
    return ToyVideoDiT(dim=dim, heads=heads, depth=depth).eval()


def toy_calibration_inputs(count: int = 2, frames: int = 2, size: int = 16, text_tokens: int = 8) -> list[dict[str, torch.Tensor]]:
    """Factory for the CLI and examples: ``count`` keyword-argument dicts for `toy_model` (different seeds and
    timesteps; 2 × 8 × 8 video tokens + 8 text tokens by default, i.e. 136 tokens = 3 blocks of 64)."""
    items = []
    for i in range(count):
        item = toy_inputs(frames=frames, height=size, width=size, text_tokens=text_tokens, seed=i)
        item["timestep"] = torch.full((1,), 900.0 - 800.0 * i / max(1, count - 1))
        items.append(item)
    return items
