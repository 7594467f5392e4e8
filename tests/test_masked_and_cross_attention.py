"""Key-padding masks, padding of queries and keys together (``m_i ∧ m_j``), masks that are not provably padding,
cross-attention, head dims that are not a power of two and non-positive scales lower to the
paro op and match SDPA (exactly without quantization, within the quantization error with it)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import paro_compile
from paro_compile.ops import paro_attention


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))

EXACT = {"allow_fp32": True, "qk_bits": 16, "pv_dtype": "fp16"}
QUANT = {"allow_fp32": True, "qk_bits": 8, "pv_dtype": "fp8"}
IMPLS = ["reference", "triton"]  # the Triton kernels run under the interpreter on the CPU
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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
    model = MaskedAttention(head_dim=head_dim).eval().to(DEVICE)
    x = torch.randn(1, 70, 128, device=DEVICE)
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
    q, k, v = (torch.randn(1, 2, 100, 64, device=DEVICE) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, scale=scale)
    for bits, pv, tol in ((16, "fp16", 1e-5), (8, "fp8", 6e-2)):
        out = paro_attention(q, k, v, scale=scale, qk_bits=bits, pv_dtype=pv, impl=impl)
        assert rel_l2(out, ref) < tol, (bits, pv, rel_l2(out, ref))
    with pytest.raises(ValueError, match="scale must be finite"):
        paro_attention(q, k, v, scale=math.inf, impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_op_key_bias_and_cross_shapes_agree_between_paths(impl):
    torch.manual_seed(5)
    q = torch.randn(2, 2, 130, 64, dtype=torch.float16, device=DEVICE)
    k, v = (torch.randn(2, 2, 77, 64, dtype=torch.float16, device=DEVICE) for _ in range(2))
    bias = torch.randn(2, 2, 77, device=DEVICE) * 3
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


class PaddedJointAttention(nn.Module):
    """Self-attention whose mask pads queries and keys together, built the ways models build it: ``repeat`` and its
    transpose (HunyuanVideo 1.5), broadcast indexing, that mask then changed in place (HunyuanVideo's token refiner),
    or forms that are not padding."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.attn = MaskedAttention()

    def forward(self, x, valid):  # valid [B, N] bool
        b, n = valid.shape
        if self.form == "repeat":
            rows = valid.view(b, 1, 1, n).repeat(1, 1, n, 1)
            mask = (rows & rows.transpose(2, 3)).bool()
        elif self.form == "broadcast":
            mask = valid[:, None, :, None] & valid[:, None, None, :]
        elif self.form == "bool-product":  # Chroma's form, on a boolean validity vector
            mask = valid[:, None, None, :] * valid[:, None, :, None]
        elif self.form == "key-repeat":  # key padding repeated over the query rows
            mask = valid.view(b, 1, 1, n).expand(b, 1, n, n)
        elif self.form == "per-head":  # diffusers' prepare_attention_mask: batch·heads planes, viewed as [B, H, N, N]
            rows = valid.view(b, 1, 1, n).repeat(1, 1, n, 1)
            mask = (rows & rows.transpose(2, 3)).bool()
            mask = mask.repeat_interleave(self.attn.heads, dim=0).view(b, self.attn.heads, n, n)
        elif self.form == "per-head-core":  # the AND is per head already, then regrouped as diffusers does
            heads = self.attn.heads
            core = valid[:, None, None, :] & valid[:, None, :, None].expand(b, heads, n, 1)
            mask = core.view(b * heads, n, n).view(b, heads, n, n)
        elif self.form == "mutated-view":  # written through a view of the mask
            mask = valid[:, None, :, None] & valid[:, None, None, :]
            mask.transpose(2, 3)[:, :, 0, :] = True
        elif self.form == "mutated":
            rows = valid.view(b, 1, 1, n).repeat(1, 1, n, 1)
            mask = (rows & rows.transpose(2, 3)).bool()
            mask[:, :, :, 0] = True
        elif self.form == "not-and":  # ¬(¬q ∧ ¬k) = q ∨ k: an AND under a negation is not padding
            mask = ~(~valid[:, None, :, None] & ~valid[:, None, None, :])
        elif self.form == "in-place-and":  # `mask &= causal` after the outer AND
            mask = valid[:, None, :, None] & valid[:, None, None, :]
            mask &= torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        elif self.form == "float-product":  # 0 / 1 floats: SDPA adds them (+1 on valid pairs), not a mask
            mask = valid[:, None, None, :].float() * valid[:, None, :, None].float()
        elif self.form == "outer-or":  # not padding: a row may see keys other rows do not
            mask = valid[:, None, :, None] | valid[:, None, None, :]
        else:  # "causal-and": padding AND a causal mask, which varies over both axes
            causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
            mask = valid[:, None, None, :] & causal
        return self.attn(x, mask=mask)


def _valid(lengths, n):
    return torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]


def _compiled_padded(form: str):
    """(output of the compiled model, eager output, the site's report record) for 2 × 70 tokens, 41 valid in the
    second sample."""
    torch.manual_seed(0)
    model = PaddedJointAttention(form).eval()
    x, valid = torch.randn(2, 70, 128), _valid([70, 41], 70)
    ref = model(x, valid)
    out = torch.compile(model, backend="paro", options=EXACT)(x, valid)
    return out, ref, paro_compile.last_report().sites[0]


@torch.no_grad()
@pytest.mark.parametrize("form", ["repeat", "broadcast", "bool-product", "key-repeat", "per-head", "per-head-core"])
def test_padding_of_queries_and_keys_lowers_and_matches_sdpa(form):
    out, ref, site = _compiled_padded(form)
    assert site.lowered and site.key_padding and site.query_padding == (form != "key-repeat"), site
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    if form != "key-repeat":
        assert torch.equal(out[1, :, 41:], torch.zeros_like(out[1, :, 41:]))  # padded query rows: zeros, as SDPA's


@torch.no_grad()
@pytest.mark.parametrize("form", ["mutated", "mutated-view", "not-and", "in-place-and", "float-product", "outer-or",
                                  "causal-and"])
def test_masks_that_are_not_provably_padding_stay_on_sdpa(form):
    """The reason names the in-place write where the mask is built as padding and then changed (HunyuanVideo's and
    HunyuanImage's token refiners), so the user need not read the model's code to learn why."""
    out, ref, site = _compiled_padded(form)
    assert not site.lowered and any("not provably padding" in r for r in site.reasons), site
    written = any("an in-place op" in r for r in site.reasons)
    assert written == form.startswith("mutated"), (form, site.reasons)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_padded_queries_and_keys_with_quantized_kernels_are_close_to_sdpa():
    torch.manual_seed(0)
    model = PaddedJointAttention("repeat").eval()
    x, valid = torch.randn(2, 150, 128), _valid([150, 77], 150)
    ref = model(x, valid)
    out = torch.compile(model, backend="paro", options={**QUANT, "impl": "triton"})(x, valid)
    assert paro_compile.last_report().sites[0].query_padding
    assert rel_l2(out, ref) < 5e-2
    assert torch.equal(out[1, :, 77:], torch.zeros_like(out[1, :, 77:]))


@torch.no_grad()
def test_padded_queries_and_keys_lower_with_dynamic_shapes():
    """Symbolic lengths: the per-head m_i ∧ m_j mask lowers at both lengths and matches SDPA."""
    torch.manual_seed(0)
    model = PaddedJointAttention("per-head").eval()
    compiled = torch.compile(model, backend="paro", options=EXACT, dynamic=True)
    for n, valid_tokens in ((70, 41), (90, 13)):
        x, valid = torch.randn(2, n, 128), _valid([n, valid_tokens], n)
        out = compiled(x, valid)
        site = paro_compile.last_report().sites[0]
        assert site.lowered and site.query_padding, site
        torch.testing.assert_close(out, model(x, valid), rtol=1e-4, atol=1e-5)
