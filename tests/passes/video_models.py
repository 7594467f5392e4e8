"""Tiny diffusers video transformers at a chosen resolution, for the dynamic-shape folding tests.

Each factory builds the model once (seeded) and returns ``(model, inputs_at)``, where ``inputs_at(frames, height,
width)`` gives the call's keyword arguments for a latent of that size (rotary tables and grid sizes included, as the
pipelines pass them), and ``grid_at(frames, height, width, text)`` the token grid the attention sites see. Dims are
tiny (2 heads of 64, 1-2 layers) so one compile plus a few calls stays cheap on a CPU.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from paro_compile.grid import TokenGrid

TEXT = 5
"""Text tokens: differs from every grid size used, so Dynamo keeps the text length its own symbol."""


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def channels_first_video_inputs(dtype: torch.dtype):
    """``inputs_at(frames, height, width)`` of models taking [B, C, F, H, W] latents (4 channels) and TEXT text tokens
    of width 32 (Wan, EasyAnimate), drawn from a seed of the size."""

    def inputs_at(frames: int, height: int, width: int) -> dict:
        gen = _generator(frames * 1000 + height * 10 + width)
        return dict(
            hidden_states=torch.randn(1, 4, frames, height, width, generator=gen).to(dtype),
            timestep=torch.tensor([500]), encoder_hidden_states=torch.randn(1, TEXT, 32, generator=gen).to(dtype),
            return_dict=False,
        )

    return inputs_at


def cogvideox(version: str = "1.0", dtype: torch.dtype = torch.float32):
    """CogVideoX 1.0 (Conv2d patch embed, per-frame) or 1.5 (``patch_size_t=2``: Linear patch embed over
    2×2×2 patches, ofs embedding, no learned positional embedding)."""
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    torch.manual_seed(0)
    v15 = version == "1.5"
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        patch_size_t=2 if v15 else None, ofs_embed_dim=32 if v15 else None,
        temporal_compression_ratio=4, max_text_seq_length=TEXT, use_rotary_positional_embeddings=True,
        use_learned_positional_embeddings=False,
    ).eval().to(dtype)
    p_t = 2 if v15 else 1

    def inputs_at(frames: int, height: int, width: int) -> dict:
        gen = _generator(frames * 1000 + height * 10 + width)
        grid_f, grid_h, grid_w = frames // p_t, height // 2, width // 2
        cos, sin = get_3d_rotary_pos_embed(64, ((0, 0), (grid_h, grid_w)), (grid_h, grid_w), grid_f)
        inputs = dict(
            hidden_states=torch.randn(1, frames, 4, height, width, generator=gen).to(dtype),
            encoder_hidden_states=torch.randn(1, TEXT, 32, generator=gen).to(dtype),
            timestep=torch.tensor([500]), return_dict=False,
            # own storage: a view of a larger table would put its base's strides in Dynamo's guards
            image_rotary_emb=(cos.to(dtype).clone(), sin.to(dtype).clone()),
        )
        if v15:
            inputs["ofs"] = torch.tensor([2.0])
        return inputs

    def grid_at(frames: int, height: int, width: int) -> TokenGrid:
        return TokenGrid(frames // p_t, height // 2, width // 2, TEXT, "prefix")

    return model, inputs_at, grid_at


def ltx(dtype: torch.dtype = torch.float32):
    """LTX-Video: the latent arrives packed ``[B, F·H·W, C]`` and the grid sizes as int arguments."""
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=64, cross_attention_dim=128,
        num_layers=1, caption_channels=32,
    ).eval().to(dtype)

    def inputs_at(frames: int, height: int, width: int) -> dict:
        gen = _generator(frames * 1000 + height * 10 + width)
        return dict(
            hidden_states=torch.randn(1, frames * height * width, 8, generator=gen).to(dtype),
            encoder_hidden_states=torch.randn(1, TEXT, 32, generator=gen).to(dtype),
            timestep=torch.tensor([500]), encoder_attention_mask=torch.ones(1, TEXT, dtype=torch.bool),
            num_frames=frames, height=height, width=width, return_dict=False,
        )

    def grid_at(frames: int, height: int, width: int) -> TokenGrid:
        return TokenGrid(frames, height, width, 0)

    return model, inputs_at, grid_at


def wan(dtype: torch.dtype = torch.float32):
    """Wan 2.1: Conv3d patch embed (1, 2, 2), rotary table computed in the graph, text cross-attention."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=1, rope_max_seq_len=64,
    ).eval().to(dtype)

    inputs_at = channels_first_video_inputs(dtype)

    def grid_at(frames: int, height: int, width: int) -> TokenGrid:
        return TokenGrid(frames, height // 2, width // 2, 0)

    return model, inputs_at, grid_at


def easyanimate(dtype: torch.dtype = torch.float32):
    """EasyAnimate V5: per-frame Conv2d patch embed, joint text + video attention with text first."""
    from diffusers import EasyAnimateTransformer3DModel

    torch.manual_seed(0)
    model = EasyAnimateTransformer3DModel(
        num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4, patch_size=2,
        sample_width=8, sample_height=8, time_embed_dim=32, num_layers=1, mmdit_layers=1, text_embed_dim=32,
        enable_text_attention_mask=False,
    ).eval().to(dtype)

    inputs_at = channels_first_video_inputs(dtype)

    def grid_at(frames: int, height: int, width: int) -> TokenGrid:
        return TokenGrid(frames, height // 2, width // 2, TEXT, "prefix")

    return model, inputs_at, grid_at


def toy(dtype: torch.dtype = torch.float32, model: Optional[torch.nn.Module] = None):
    """The built-in toy video DiT (Conv3d patch embed, text prefix), or ``model`` taking its inputs."""
    from paro_compile.toy.dit import ToyVideoDiT, toy_inputs

    torch.manual_seed(0)
    model = (model or ToyVideoDiT()).eval().to(dtype)

    def inputs_at(frames: int, height: int, width: int) -> dict:
        return toy_inputs(frames=frames, height=height, width=width, text_tokens=TEXT, dtype=dtype,
                          seed=frames * 1000 + height * 10 + width)

    def grid_at(frames: int, height: int, width: int) -> TokenGrid:
        return TokenGrid(frames, height // 2, width // 2, TEXT, "prefix")

    return model, inputs_at, grid_at


VIDEO_MODELS: dict[str, Callable] = {
    "cogvideox": lambda dtype=torch.float32: cogvideox("1.0", dtype),
    "cogvideox1.5": lambda dtype=torch.float32: cogvideox("1.5", dtype),
    "ltx": ltx,
    "wan": wan,
    "easyanimate": easyanimate,
}
