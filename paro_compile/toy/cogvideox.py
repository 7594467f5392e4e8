"""The trained toy video DiT fixture (a diffusers ``CogVideoXTransformer3DModel``) and what it needs to run.

The fixture is trained by ``benchmarks/train_video_dit.py`` on procedurally generated "latent" videos
(`paro_compile.toy.videos`: shapes that move, rotate, grow or change colour; C=4 channels, 8 frames × 32×32)
with a rectified-flow objective: ``x_t = (1 − t)·x0 + t·ε``, the model predicts ``v = ε − x0``. Its weights live
in ``paro_compile/toy/fixtures/toy_cogvideox/`` (config.json + diffusion_pytorch_model.safetensors, fp16) and
are loaded with diffusers' own ``from_pretrained``: the same loading code a user's CogVideoX goes through.

Import-light: diffusers is imported inside the functions that need it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch

from paro_compile.toy.videos import CHANNELS, FRAMES, LATENT_SIZE, TEXT_TOKENS

FIXTURE_DIR = Path(__file__).resolve().parent / "fixtures" / "toy_cogvideox"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# ---- the fixture model's shape ------------------------------------------------------------------------
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



