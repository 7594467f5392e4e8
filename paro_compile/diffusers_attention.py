"""Attention processors for diffusers models whose stock processor keeps attention out of the compiled graph.

Mochi (``MochiTransformer3DModel``): diffusers' ``MochiAttnProcessor2_0`` gathers each sample's valid text tokens with
``torch.nonzero`` and runs one SDPA per sample over [video tokens; valid text tokens]. The number of valid tokens
depends on the mask's values, so Dynamo cannot trace the call (a graph break inside the per-sample loop, which makes
it skip the whole processor): the joint attention then runs eagerly, outside every compiled graph, and paro never sees
it. `use_key_padding_attention(model)` swaps in `MochiKeyPaddingAttnProcessor`, which computes the same outputs over
the padded length with one SDPA call and a key-padding mask, so the attention is a site of the compiled graph.

The other way, with no processor swap, is ``torch._dynamo.config.capture_dynamic_output_shape_ops = True``: Dynamo then
traces ``torch.nonzero`` and the per-sample attention has a data-dependent length, so those sites run dense (no plan's
static masks apply) and there is one attention call per sample.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on interleaved channel pairs (x[..., 2i], x[..., 2i+1]), computed in float32 as Mochi does."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2).to(x.dtype)


class MochiKeyPaddingAttnProcessor:
    """Mochi's joint attention with the text padding as a key-padding mask: a drop-in for ``MochiAttnProcessor2_0``.

    One SDPA call for the whole batch over [video tokens; all text tokens] with a boolean mask [B, 1, 1, N + T] that
    hides padded text keys. The outputs equal the stock processor's for any text mask: padded text queries give zeros
    and the valid text tokens' outputs come first, in order (the stock processor packs them so; with right-padded
    prompts, as Mochi's pipeline makes them, this is the identity). With the mask the attention is one static-shape
    site of the compiled graph; paro lowers it once the op takes key-padding masks, and until then the report says
    why it stays on SDPA.
    """

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: Optional[torch.Tensor], image_rotary_emb: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        def split_heads(projected: torch.Tensor) -> torch.Tensor:  # [B, N, H·D] → [B, N, H, D]
            return projected.unflatten(2, (attn.heads, -1))

        query, key, value = (split_heads(p(hidden_states)) for p in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text_query, text_key, text_value = (split_heads(p(encoder_hidden_states))
                                            for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            text_query = attn.norm_added_q(text_query)
        if attn.norm_added_k is not None:
            text_key = attn.norm_added_k(text_key)
        if image_rotary_emb is not None:
            query, key = (rotate_pairs(t, *image_rotary_emb) for t in (query, key))

        batch, video_tokens, text_tokens = query.shape[0], query.shape[1], text_query.shape[1]
        if attention_mask is None:
            text_valid = torch.ones(batch, text_tokens, dtype=torch.bool, device=query.device)
        else:
            text_valid = attention_mask.reshape(batch, text_tokens).bool()
        keys_kept = torch.cat([text_valid.new_ones(batch, video_tokens), text_valid], dim=1)

        def joint(video: torch.Tensor, text: torch.Tensor) -> torch.Tensor:  # → [B, H, N + T, D]
            return torch.cat([video, text], dim=1).transpose(1, 2)

        out = F.scaled_dot_product_attention(joint(query, text_query), joint(key, text_key), joint(value, text_value),
                                             attn_mask=keys_kept[:, None, None, :])
        video_out, text_out = out.transpose(1, 2).split([video_tokens, text_tokens], dim=1)
        text_out = text_out * text_valid[:, :, None, None].to(text_out.dtype)
        # Valid tokens first, in order; padded ones (now zeros) after: the stock processor's packing.
        packing = torch.argsort((~text_valid).to(torch.uint8), dim=1, stable=True)
        text_out = text_out.gather(1, packing[:, :, None, None].expand_as(text_out))

        hidden_states = attn.to_out[1](attn.to_out[0](video_out.flatten(2)))
        encoder_hidden_states = text_out.flatten(2)
        if hasattr(attn, "to_add_out"):
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


def use_key_padding_attention(model: torch.nn.Module) -> int:
    """Give every attention module of ``model`` that runs diffusers' ``MochiAttnProcessor2_0`` a
    `MochiKeyPaddingAttnProcessor`; returns how many.

    Call it before ``torch.compile``; a model that is already compiled recompiles on its next call. Models without
    Mochi processors are left as they are (returns 0)."""
    try:
        from diffusers.models.attention_processor import MochiAttnProcessor2_0
    except ImportError as error:
        raise ImportError(f"use_key_padding_attention needs diffusers with Mochi support: {error}") from error
    model = getattr(model, "_orig_mod", model)
    swapped = 0
    for module in model.modules():
        if isinstance(getattr(module, "processor", None), MochiAttnProcessor2_0):
            set_processor = getattr(module, "set_processor", None)
            if callable(set_processor):
                set_processor(MochiKeyPaddingAttnProcessor())
            else:  # MochiAttention keeps its processor as a plain attribute
                module.processor = MochiKeyPaddingAttnProcessor()
            swapped += 1
    return swapped
