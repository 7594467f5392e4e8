"""Key-padding masks, cross-attention, head dims that are not a power of two and non-positive scales lower to the
paro op and match SDPA (exactly without quantization, within the quantization error with it)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import paro_compile
from paro_compile.ops import paro_attention
from tests.conftest import rel_l2

EXACT = {"allow_fp32": True, "qk_bits": 16, "pv_dtype": "fp16"}
QUANT = {"allow_fp32": True, "qk_bits": 8, "pv_dtype": "fp8"}
IMPLS = ["reference", "triton"]  # the Triton kernels run under the interpreter on the CPU


class MaskedAttention(nn.Module):
    """x [B, N, C] attends to itself or to ``context`` [B, M, C], with an optional SDPA mask."""

    def __init__(self, dim: int = 128, heads: int = 2, head_dim: int = 64, scale=None) -> None:
        super().__init__()
        self.heads, self.head_dim, self.scale = heads, head_dim, scale
        self.q = nn.Linear(dim, heads * head_dim)
        self.kv = nn.Linear(dim, 2 * heads * head_dim)

    def forward(self, x, context=None, mask=None):
        b, n, _ = x.shape
        src = x if context is None else context
        q = self.q(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(src).view(b, src.shape[1], 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)


def key_padding(batch: int, keys: int, valid, *, shape: str = "b11k", additive: bool = False) -> torch.Tensor:
    """Boolean (or -10000 additive) key-padding mask, ``valid[b]`` leading keys of each batch element kept."""
    keep = torch.arange(keys)[None, :] < torch.tensor(valid)[:, None]  # [B, K]
    mask = keep[:, None, None, :] if shape == "b11k" else keep[:, None, :]  # [B, 1, 1, K] or [B, 1, K]
    return (1.0 - mask.float()) * -10000.0 if additive else mask


@torch.no_grad()
@pytest.mark.parametrize("additive", [False, True], ids=["bool", "additive"])
@pytest.mark.parametrize("valid", [[70, 70], [70, 9], [1, 33]], ids=["all-valid", "padded", "heavily-padded"])
def test_key_padding_self_attention_lowers_and_matches_sdpa(additive, valid):
    torch.manual_seed(0)
    model = MaskedAttention().eval()
    x = torch.randn(2, 70, 128)
    mask = key_padding(2, 70, valid, additive=additive)
    ref = model(x, mask=mask)
    out = torch.compile(model, backend="paro", options=EXACT)(x, mask=mask)
    site = paro_compile.last_report().sites[0]
    assert site.lowered and site.key_padding, site
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_key_padding_with_quantized_numerics_is_close_to_sdpa():
    torch.manual_seed(1)
    model = MaskedAttention().eval()
    x = torch.randn(2, 150, 128)
    mask = key_padding(2, 150, [150, 20], shape="b1k")
    ref = model(x, mask=mask)
    out = torch.compile(model, backend="paro", options=QUANT)(x, mask=mask)
    assert paro_compile.last_report().sites[0].lowered
    assert rel_l2(out, ref) < 6e-2


@torch.no_grad()
def test_cross_attention_lowers_dense_with_its_own_key_length():
    torch.manual_seed(2)
    model = MaskedAttention().eval()
    x, context = torch.randn(1, 90, 128), torch.randn(1, 13, 128)
    mask = key_padding(1, 13, [7])
    for kwargs in ({}, {"mask": mask}):
        torch._dynamo.reset()
        ref = model(x, context, **kwargs)
        out = torch.compile(model, backend="paro", options=EXACT)(x, context, **kwargs)
        site = paro_compile.last_report().sites[0]
        assert site.lowered and site.cross_attention and site.permutation == "identity"
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
    torch.compile(model, backend="paro", options={**EXACT, "lower_cross_attention": False})(x, context)
    site = paro_compile.last_report().sites[0]
    assert not site.lowered and any("lower_cross_attention=False" in r for r in site.reasons)


@torch.no_grad()
@pytest.mark.parametrize("head_dim", [96, 40])
def test_head_dims_that_are_not_a_power_of_two_run_padded(head_dim):
    torch.manual_seed(3)
    model = MaskedAttention(head_dim=head_dim).eval()
    x = torch.randn(1, 70, 128)
    ref = model(x)
    out = torch.compile(model, backend="paro", options={**EXACT, "impl": "triton"})(x)
    assert paro_compile.last_report().sites[0].lowered
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("scale", [-0.2, 0.0])
@pytest.mark.parametrize("impl", IMPLS)
def test_non_positive_scales_match_sdpa(scale, impl):
    """The Triton INT8 path folded the scale into Q's positive quantization scale: a negative or zero SDPA scale
    gave rel-L2 1.0 / 4.5e4. The op now runs them as a positive scale on -q (or on zero scores)."""
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 2, 100, 64) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, scale=scale)
    for bits, pv, tol in ((16, "fp16", 1e-5), (8, "fp8", 6e-2)):
        out = paro_attention(q, k, v, scale=scale, qk_bits=bits, pv_dtype=pv, impl=impl)
        assert rel_l2(out, ref) < tol, (bits, pv, rel_l2(out, ref))
    with pytest.raises(ValueError, match="scale must be finite"):
        paro_attention(q, k, v, scale=math.inf, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_op_key_bias_and_cross_shapes_agree_between_paths(impl):
    torch.manual_seed(5)
    q = torch.randn(2, 2, 130, 64, dtype=torch.float16)
    k, v = (torch.randn(2, 2, 77, 64, dtype=torch.float16) for _ in range(2))
    bias = torch.randn(2, 2, 77) * 3
    bias[1, :, 40:] = -math.inf
    out = paro_attention(q.float(), k.float(), v.float(), key_bias=bias, qk_bits=16, pv_dtype="fp16", impl=impl)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias[:, :, None, :])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    quant = paro_attention(q, k, v, key_bias=bias, impl=impl)
    assert rel_l2(quant, paro_attention(q, k, v, key_bias=bias, impl="reference")) < 1e-2
    with pytest.raises(ValueError, match="key_bias must be"):
        paro_attention(q, k, v, key_bias=bias[:, :, :10], impl=impl)


# ---- tiny diffusers models whose sites pass key-padding masks --------------------------------------------
diffusers = pytest.importorskip("diffusers")


def tiny_hunyuan():
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32,
        pooled_projection_dim=16, rope_axes_dim=(8, 12, 12), guidance_embeds=False,
    ).eval()
    text_mask = torch.ones(2, 12, dtype=torch.long)
    text_mask[1, 5:] = 0  # the second prompt is shorter: its padded text keys are masked
    inputs = dict(hidden_states=torch.randn(2, 4, 2, 8, 8), timestep=torch.tensor([500, 500]),
                  encoder_hidden_states=torch.randn(2, 12, 32), encoder_attention_mask=text_mask,
                  pooled_projections=torch.randn(2, 16), return_dict=False)
    return model, inputs


def tiny_ltx():
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=32,
        cross_attention_dim=64, num_layers=1, caption_channels=16,
    ).eval()
    text_mask = torch.ones(2, 10, dtype=torch.long)
    text_mask[0, 6:] = 0
    inputs = dict(hidden_states=torch.randn(2, 2 * 4 * 4, 8), encoder_hidden_states=torch.randn(2, 10, 16),
                  timestep=torch.tensor([500, 500]), encoder_attention_mask=text_mask, num_frames=2, height=4,
                  width=4, return_dict=False)
    return model, inputs


@torch.no_grad()
@pytest.mark.parametrize("make", [tiny_hunyuan, tiny_ltx], ids=["hunyuan-video", "ltx-video"])
def test_diffusers_masked_sites_lower_and_match_sdpa(make):
    model, inputs = make()
    ref = model(**inputs)[0]
    out = torch.compile(model, backend="paro", options=EXACT)(**inputs)[0]
    sites = [s for report in paro_compile.report.compile_reports for s in report.sites]
    masked = [s for s in sites if s.key_padding]
    assert masked and all(s.lowered for s in masked), [(s.site_id, s.lowered, s.reasons) for s in sites]
    assert rel_l2(out, ref) < 1e-4
