"""Tiny diffusers transformers (random weights, CPU; CUDA on the device machine) through backend="paro"."""
import pytest
import torch

import paro_compile
from tests.conftest import rel_l2

diffusers = pytest.importorskip("diffusers")

EXACT = {"allow_fp32": True, "qk_bits": 16, "pv_dtype": "fp16"}
QUANT = {"allow_fp32": True, "qk_bits": 8, "pv_dtype": "fp8"}


def tiny_cogvideox(device):
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8, use_rotary_positional_embeddings=True,
    ).eval().to(device)
    cos, sin = get_3d_rotary_pos_embed(64, ((0, 0), (4, 4)), (4, 4), 3, device=device)
    inputs = dict(
        hidden_states=torch.randn(1, 3, 4, 8, 8, device=device), encoder_hidden_states=torch.randn(1, 8, 32, device=device),
        timestep=torch.tensor([500], device=device), image_rotary_emb=(cos, sin), return_dict=False,
    )
    return model, inputs


def pack_flux_latents(latent: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, H/2·W/2, 4C]: the 2×2 packing Flux pipelines do (importing them needs transformers)."""
    b, c, h, w = latent.shape
    return latent.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def flux_image_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def tiny_flux(device):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=64,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(16, 24, 24),
    ).eval().to(device)
    packed = pack_flux_latents(torch.randn(1, 16, 8, 8)).to(device)
    inputs = dict(
        hidden_states=packed, encoder_hidden_states=torch.randn(1, 8, 32, device=device),
        pooled_projections=torch.randn(1, 32, device=device), timestep=torch.tensor([0.5], device=device),
        img_ids=flux_image_ids(4, 4).to(device),
        txt_ids=torch.zeros(8, 3, device=device), return_dict=False,
    )
    return model, inputs


def tiny_wan(device):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64,
    ).eval().to(device)
    inputs = dict(
        hidden_states=torch.randn(1, 4, 2, 8, 8, device=device), timestep=torch.tensor([500], device=device),
        encoder_hidden_states=torch.randn(1, 8, 32, device=device), return_dict=False,
    )
    return model, inputs


MODELS = {"cogvideox": tiny_cogvideox, "flux": tiny_flux, "wan": tiny_wan}


def attention_module_count(model) -> int:
    return sum(1 for _, m in model.named_modules() if type(m).__name__.endswith("Attention") and hasattr(m, "to_q"))


@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_every_site_found_and_output_matches(name, device):
    model, inputs = MODELS[name](device)
    ref = model(**inputs)[0]
    torch._dynamo.utils.counters.clear()
    out = torch.compile(model, backend="paro", options=EXACT)(**inputs)[0]
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0, dict(torch._dynamo.utils.counters["graph_break"])
    report = paro_compile.last_report()
    self_attention = [s for s in report.sites if "cross-attention" not in " ".join(s.reasons)]
    # Wan's blocks also hold cross-attention to the text (kept as SDPA, with its reason).
    assert len(report.sites) == attention_module_count(model), report.summary()
    assert all(s.lowered for s in self_attention), report.summary()
    assert len(self_attention) > 0
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", MODELS)
@torch.no_grad()
def test_quantized_output_close(name, device):
    model, inputs = MODELS[name](device)
    ref = model(**inputs)[0]
    out = torch.compile(model, backend="paro", options=QUANT)(**inputs)[0]
    err = rel_l2(out, ref)
    assert 0 < err < 5e-2, f"{name}: rel-L2 {err:.3e}"
