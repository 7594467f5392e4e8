"""More diffusers transformers through backend="paro": tiny random configs (2 heads, 1-2 layers, a few hundred tokens
at most), every attention site found and lowered or kept on SDPA with its reason, the output equal to eager with exact
numerics and close with INT8/FP8 numerics, and random order + block-mask plans on video models against an eager oracle
that runs the reference numerics with the same plan.

Each case names the sites that stay on SDPA (a mask that varies over query rows) and the Dynamo graph breaks that are
diffusers' own (HunyuanVideo 1.5 branches on its image embedding and selects valid text tokens by boolean indexing);
every other site must lower, every graph must be free of breaks, and every attention module that calls SDPA must hold
a site.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from torch.utils._pytree import tree_map_only
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import paro_compile
from paro_compile.grid import TokenGrid
from paro_compile.kernels.block_mask import BlockMask
from paro_compile.kernels.reference import paro_attention_reference
from paro_compile.model_inspection import linear_attention_modules
from paro_compile.plan import Plan, SitePlan
from tests.conftest import rel_l2
from tests.test_diffusers_models import EXACT, QUANT, attention_module_count

diffusers = pytest.importorskip("diffusers")

TEXT = 8


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def text_mask(valid: int = 5) -> torch.Tensor:
    """One prompt of TEXT tokens whose last ones are padding."""
    mask = torch.ones(1, TEXT, dtype=torch.long)
    mask[0, valid:] = 0
    return mask


# ---- tiny models --------------------------------------------------------------------------------------------
def tiny_sd3():
    """SD3.5-style MMDiT: joint text + image attention (text appended), a dual-attention layer, RMS qk-norm; the last
    block's context is pre-only."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=128, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
    ).eval()
    gen = _generator()
    return model, dict(hidden_states=torch.randn(1, 4, 8, 8, generator=gen),
                       encoder_hidden_states=torch.randn(1, TEXT, 32, generator=gen),
                       pooled_projections=torch.randn(1, 32, generator=gen), timestep=torch.tensor([500]),
                       return_dict=False)


def tiny_skyreels_v2(diffusion_forcing: bool = False, size: tuple[int, int, int] = (4, 8, 8)):
    """SkyReels-V2 (Wan-like: Conv3d patch embed, text cross-attention). With ``diffusion_forcing`` two frames per
    block and a timestep per frame: the self-attention gets a block-causal [1, 1, N, N] mask."""
    from diffusers import SkyReelsV2Transformer3DModel

    torch.manual_seed(0)
    model = SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4, text_dim=32,
        freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64, num_frame_per_block=2 if diffusion_forcing else 1,
    ).eval()
    gen = _generator()
    frames, height, width = size
    inputs = dict(hidden_states=torch.randn(1, 4, frames, height, width, generator=gen),
                  encoder_hidden_states=torch.randn(1, TEXT, 32, generator=gen), timestep=torch.tensor([500]),
                  return_dict=False)
    if diffusion_forcing:
        inputs.update(timestep=torch.tensor([[500, 500, 300, 300]]), enable_diffusion_forcing=True)
    return model, inputs


def tiny_pixart():
    """PixArt-α/Σ: self-attention, then cross-attention to the text with its padding as an additive -10000 bias."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=2, norm_num_groups=1,
        cross_attention_dim=128, sample_size=8, patch_size=2, caption_channels=32, use_additional_conditions=False,
    ).eval()
    gen = _generator()
    return model, dict(hidden_states=torch.randn(1, 4, 8, 8, generator=gen),
                       encoder_hidden_states=torch.randn(1, TEXT, 32, generator=gen), timestep=torch.tensor([500]),
                       encoder_attention_mask=text_mask().float(),
                       added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)


def allegro_rotary(frames: int, height: int, width: int):
    """The rotary tables and positions AllegroPipeline passes for a (frames, height, width) token grid."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

    freqs_t, freqs_h, freqs_w, grid_t, grid_h, grid_w = get_3d_rotary_pos_embed_allegro(
        embed_dim=48, crops_coords=((0, 0), (height, width)), grid_size=(height, width), temporal_size=frames,
        interpolation_scale=(2.2, 2.0, 2.0))
    pos = torch.cartesian_prod(grid_t.long(), grid_h.long(), grid_w.long())
    pos = pos.reshape(-1, 3).transpose(0, 1).reshape(3, 1, -1).contiguous()
    return (freqs_t, freqs_h, freqs_w), tuple(pos)


def tiny_allegro(size: tuple[int, int, int] = (2, 8, 8)):
    """Allegro: per-frame Conv2d patch embed, then (F, H·W) flattened; 3-axis rotary (head dim 48 = 3 × 16)."""
    from diffusers import AllegroTransformer3DModel

    torch.manual_seed(0)
    model = AllegroTransformer3DModel(
        patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=48, in_channels=4, out_channels=4,
        num_layers=2, cross_attention_dim=96, sample_height=8, sample_width=8, sample_frames=2, caption_channels=32,
    ).eval()
    gen = _generator()
    frames, height, width = size
    return model, dict(hidden_states=torch.randn(1, 4, frames, height, width, generator=gen),
                       encoder_hidden_states=torch.randn(1, TEXT, 32, generator=gen), timestep=torch.tensor([500]),
                       encoder_attention_mask=text_mask(6).float(),
                       image_rotary_emb=allegro_rotary(frames, height // 2, width // 2), return_dict=False)


def tiny_cogview4(masked: bool = False):
    """CogView4: joint attention with the text first. With a text mask its processor builds a [B, 1, N, N] mask
    (the outer product of the padding), which varies over query rows."""
    from diffusers import CogView4Transformer2DModel

    torch.manual_seed(0)
    model = CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=64, num_attention_heads=2,
        text_embed_dim=32, time_embed_dim=32, condition_dim=16, pos_embed_max_size=16, sample_size=8,
        rope_axes_dim=(16, 16),
    ).eval()
    gen = _generator()
    inputs = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=gen),
                  encoder_hidden_states=torch.randn(1, TEXT, 32, generator=gen), timestep=torch.tensor([500]),
                  original_size=torch.tensor([[64.0, 64.0]]), target_size=torch.tensor([[64.0, 64.0]]),
                  crop_coords=torch.tensor([[0.0, 0.0]]), return_dict=False)
    if masked:
        inputs["attention_mask"] = text_mask().float()
    return model, inputs


def tiny_hunyuan_video15():
    """HunyuanVideo 1.5: a token refiner over the text, then joint attention whose [B, 1, N, N] mask is the outer
    product of the (reordered) text padding. One layer each: Dynamo compiles the blocks in frames of their own (the
    model's forward breaks), and a second block would reuse the first one's graph."""
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=64, num_layers=1, num_refiner_layers=1,
        patch_size=2, patch_size_t=1, text_embed_dim=32, text_embed_2_dim=16, image_embed_dim=16,
        rope_axes_dim=(16, 24, 24),
    ).eval()
    gen = _generator()
    byt5_mask = torch.ones(1, 4, dtype=torch.long)
    byt5_mask[0, 3:] = 0
    return model, dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=gen), timestep=torch.tensor([500.0]),
                       encoder_hidden_states=torch.randn(1, TEXT, 32, generator=gen), encoder_attention_mask=text_mask(),
                       encoder_hidden_states_2=torch.randn(1, 4, 16, generator=gen), encoder_attention_mask_2=byt5_mask,
                       image_embeds=torch.zeros(1, 4, 16), return_dict=False)


def tiny_qwenimage():
    """Qwen-Image: joint attention with the text first and its padding as a [B, 1, 1, N] key mask; complex rotary."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(16, 24, 24),
    ).eval()
    gen = _generator()
    return model, dict(hidden_states=torch.randn(1, 16, 16, generator=gen),
                       encoder_hidden_states=torch.randn(1, TEXT, 32, generator=gen),
                       encoder_hidden_states_mask=text_mask(), timestep=torch.tensor([0.5]), img_shapes=[[(1, 4, 4)]],
                       return_dict=False)


def tiny_ltx2(audio_frames: int = 6):
    """LTX-2: video and audio streams, each with self-attention and text cross-attention, plus audio-to-video and
    video-to-audio cross-attention; packed [B, N, C] latents."""
    from diffusers import LTX2VideoTransformer3DModel

    torch.manual_seed(0)
    model = LTX2VideoTransformer3DModel(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=64, cross_attention_dim=128,
        audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=2, audio_attention_head_dim=32,
        audio_cross_attention_dim=64, num_layers=1, caption_channels=32,
    ).eval()
    gen = _generator()
    return model, dict(hidden_states=torch.randn(1, 2 * 4 * 4, 8, generator=gen),
                       audio_hidden_states=torch.randn(1, audio_frames, 8, generator=gen),
                       encoder_hidden_states=torch.randn(1, TEXT, 32, generator=gen),
                       audio_encoder_hidden_states=torch.randn(1, TEXT, 32, generator=gen),
                       timestep=torch.tensor([500.0]), encoder_attention_mask=text_mask(),
                       audio_encoder_attention_mask=text_mask(), num_frames=2, height=4, width=4,
                       audio_num_frames=audio_frames, return_dict=False)


def tiny_wan_vace(size: tuple[int, int, int] = (2, 8, 8)):
    """Wan VACE: a control stream (its own Conv3d patch embed and blocks) added into the main blocks."""
    from diffusers import WanVACETransformer3DModel

    torch.manual_seed(0)
    model = WanVACETransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4, text_dim=32,
        freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64, vace_layers=[0], vace_in_channels=8,
    ).eval()
    gen = _generator()
    return model, dict(hidden_states=torch.randn(1, 4, *size, generator=gen), timestep=torch.tensor([500]),
                       encoder_hidden_states=torch.randn(1, TEXT, 32, generator=gen),
                       control_hidden_states=torch.randn(1, 8, *size, generator=gen), return_dict=False)


def tiny_auraflow():
    """AuraFlow: MMDiT joint blocks then single-stream blocks (register tokens); the pipeline's timestep is t/1000."""
    from diffusers import AuraFlowTransformer2DModel

    torch.manual_seed(0)
    model = AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1, attention_head_dim=64,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=128, out_channels=4,
        pos_embed_max_size=64,
    ).eval()
    gen = _generator()
    return model, dict(hidden_states=torch.randn(1, 4, 8, 8, generator=gen),
                       encoder_hidden_states=torch.randn(1, TEXT, 32, generator=gen), timestep=torch.tensor([0.5]),
                       return_dict=False)


def tiny_sana():
    """Sana: ReLU linear self-attention (no softmax, no SDPA) and SDPA cross-attention to the padded text."""
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(0)
    model = SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=64, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=64, cross_attention_dim=128, caption_channels=32,
        sample_size=8, patch_size=2,
    ).eval()
    gen = _generator()
    return model, dict(hidden_states=torch.randn(1, 4, 8, 8, generator=gen),
                       encoder_hidden_states=torch.randn(1, TEXT, 32, generator=gen), encoder_attention_mask=text_mask(),
                       timestep=torch.tensor([500]), return_dict=False)


def tiny_cosmos(size: tuple[int, int, int] = (2, 8, 8)):
    """Cosmos-1.0: patchify by reshape/permute then a Linear, learnable positional embedding, text cross-attention
    with a key mask. ``concat_padding_mask=False``: resizing the padding mask needs torchvision."""
    from diffusers import CosmosTransformer3DModel

    torch.manual_seed(0)
    model = CosmosTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=64, num_layers=2, mlp_ratio=2.0,
        text_embed_dim=32, adaln_lora_dim=16, max_size=(4, 16, 16), patch_size=(1, 2, 2), concat_padding_mask=False,
    ).eval()
    gen = _generator()
    return model, dict(hidden_states=torch.randn(1, 4, *size, generator=gen), timestep=torch.tensor([0.5]),
                       encoder_hidden_states=torch.randn(1, TEXT, 32, generator=gen),
                       attention_mask=text_mask().bool(), fps=24, return_dict=False)


def tiny_hunyuanimage():
    """HunyuanImage 2.1: a token refiner over the text whose ``m_i ∧ m_j`` mask is then written in place
    (``mask[:, :, :, 0] = True``), joint and single-stream blocks with the text padding as a key mask."""
    from diffusers import HunyuanImageTransformer2DModel

    torch.manual_seed(0)
    model = HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=64, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=32, rope_axes_dim=(32, 32),
    ).eval()
    gen = _generator()
    return model, dict(hidden_states=torch.randn(1, 4, 4, 4, generator=gen), timestep=torch.tensor([500.0]),
                       encoder_hidden_states=torch.randn(1, TEXT, 32, generator=gen),
                       encoder_attention_mask=text_mask(), return_dict=False)


# ---- what each model must show --------------------------------------------------------------------------------
QUERY_ROW_MASK = "varies over query rows"
DIFFUSERS_BREAKS = ("Data-dependent branching", "Dynamic shape operator", "graph break in loop")


@dataclass(frozen=True)
class Case:
    build: Callable[[], tuple[torch.nn.Module, dict]]
    kept_on_sdpa: dict[str, str] = field(default_factory=dict)
    """site-id pattern → a phrase of its reason; every other site lowers."""
    cross_attention: str = r"(?!)"
    """site-id pattern of the sites whose keys come from another sequence (text, image, the other modality)."""
    graph_breaks: tuple[str, ...] = ()
    """phrases of Dynamo's graph-break reasons that come from diffusers' code (none: one graph, no break)."""
    fast: bool = False
    """in the default (not slow) selection."""
    known_failure: str = ""
    """why the site checks fail today (the case is a strict xfail of the site test)."""


LTX2_CROSS = r"\.(attn2|audio_attn2|audio_to_video_attn|video_to_audio_attn)#"
CASES: dict[str, Case] = {
    "sd3": Case(tiny_sd3),
    "skyreels_v2": Case(tiny_skyreels_v2, cross_attention=r"\.attn2#"),
    "skyreels_v2_diffusion_forcing": Case(lambda: tiny_skyreels_v2(diffusion_forcing=True),
                                          kept_on_sdpa={r"\.attn1#": QUERY_ROW_MASK}, cross_attention=r"\.attn2#"),
    "pixart": Case(tiny_pixart, cross_attention=r"\.attn2#", fast=True),
    "allegro": Case(tiny_allegro, cross_attention=r"\.attn2#"),
    "cogview4": Case(tiny_cogview4),
    "cogview4_text_mask": Case(lambda: tiny_cogview4(masked=True), kept_on_sdpa={r".": QUERY_ROW_MASK}, fast=True),
    "hunyuan_video15": Case(tiny_hunyuan_video15, graph_breaks=DIFFUSERS_BREAKS),
    "qwenimage": Case(tiny_qwenimage),
    "ltx2": Case(tiny_ltx2, cross_attention=LTX2_CROSS),
    "ltx2_audio_as_long_as_text": Case(
        lambda: tiny_ltx2(audio_frames=TEXT), cross_attention=LTX2_CROSS,
        known_failure="as many audio frames as text tokens: the audio-text cross-attention (audio_attn2) is reported as "
                      "self-attention. LTX-2 takes packed [B, N, C] latents, so the audio queries' tokens are a graph "
                      "input as the text keys are, and passes/layout.keys_from_other_tokens proves keys foreign only "
                      "when the query's tokens are formed in the graph (a patchify merge): two inputs may hold the "
                      "same tokens. The output is exact; a plan or calibration would treat the site as self-attention"),
    "wan_vace": Case(tiny_wan_vace, cross_attention=r"\.attn2#"),
    "auraflow": Case(tiny_auraflow),
    "sana": Case(tiny_sana, cross_attention=r"\.attn2#", fast=True),
    "cosmos": Case(tiny_cosmos, cross_attention=r"\.attn2#"),
    "hunyuanimage": Case(tiny_hunyuanimage, kept_on_sdpa={r"token_refiner": "an in-place op"}),
}


def case_params(with_known_failures: bool = False) -> list:
    params = []
    for name, case in CASES.items():
        marks = [] if case.fast else [pytest.mark.slow]
        if case.known_failure and with_known_failures:
            marks.append(pytest.mark.xfail(strict=True, reason=case.known_failure))
        params.append(pytest.param(name, marks=marks))
    return params


def on_device(value, device: str):
    """``value`` (tensors in tuples, lists and dicts) with every tensor moved to ``device``."""
    return tree_map_only(torch.Tensor, lambda t: t.to(device), value)


def build(name: str, device: str) -> tuple[torch.nn.Module, dict]:
    model, inputs = CASES[name].build()
    return model.to(device), on_device(inputs, device)


def dynamo_breaks() -> dict[str, int]:
    """Every graph break of this process since the counters were cleared: torch 2.13 counts a frame skipped on a
    break inside a loop under "unimplemented" only."""
    counters = torch._dynamo.utils.counters
    return {**dict(counters["graph_break"]), **dict(counters["unimplemented"])}


# ---- every site, exact numerics ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", case_params(with_known_failures=True))
@torch.no_grad()
def test_every_site_found_and_output_matches(name, device):
    case = CASES[name]
    model, inputs = build(name, device)
    ref = model(**inputs)[0]
    torch._dynamo.utils.counters.clear()
    out = torch.compile(model, backend="paro", options=EXACT)(**inputs)[0]
    breaks = dynamo_breaks()
    report = paro_compile.model_report(model)
    summary = report.summary()
    if case.graph_breaks:
        assert breaks, "expected diffusers' own graph breaks"
        assert all(any(phrase in reason for phrase in case.graph_breaks) for reason in breaks), list(breaks)
    else:
        assert breaks == {} and len(report.reports) == 1, (list(breaks), summary)
    # every attention module that calls SDPA holds a site; linear attention is named in a note, not as uncovered
    linear = linear_attention_modules(model)
    assert report.linear_attention_modules == linear
    assert not report.uncovered_attention_modules and not report.warnings, summary
    assert len(report.sites) == attention_module_count(model) - len(linear) > 0, summary
    for site in report.sites:
        expected = [reason for pattern, reason in case.kept_on_sdpa.items() if re.search(pattern, site.site_id)]
        if expected:
            assert not site.lowered and any(expected[0] in r for r in site.reasons), (site.site_id, site.reasons)
        else:
            assert site.lowered, (site.site_id, site.reasons)
            assert site.cross_attention == bool(re.search(case.cross_attention, site.site_id)), site.site_id
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", case_params())
@torch.no_grad()
def test_quantized_output_close(name, device):
    model, inputs = build(name, device)
    ref = model(**inputs)[0]
    out = torch.compile(model, backend="paro", options=QUANT)(**inputs)[0]
    lowered = [s for s in paro_compile.model_report(model).sites if s.lowered]
    err = rel_l2(out, ref)
    assert err < 5e-2, f"{name}: rel-L2 {err:.3e}"
    assert err > 0 or not lowered, f"{name}: the quantized numerics changed nothing"


def test_sana_linear_attention_is_a_note_in_every_view():
    """Sana's self-attention is linear (no SDPA): the report names those modules in a note (text, HTML, JSON), never in
    the warning about attention outside the compiled graphs, whose other checks are unchanged."""
    model, inputs = tiny_sana()
    report = paro_compile.inspect(model, inputs, count_eager_attention=False, **EXACT)
    names = ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert report.linear_attention_modules == names and report.uncovered_attention_modules == []
    assert report.warnings == []
    note = "2 attention module(s) compute linear attention (no softmax, no SDPA)"
    assert f"note: {note}" in report.summary() and all(n in report.summary() for n in names)
    assert note in report.to_text() and note in report.to_html()
    assert report.to_dict()["linear_attention_modules"] == names


# ---- random plans on video models against an eager oracle --------------------------------------------------------
SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
ORDERS = ["".join(p) for p in itertools.permutations("FHW")]


class PlannedAttention(TorchFunctionMode):
    """Eager oracle: the i-th SDPA call is the i-th site of the graph; a planned site computes the reference numerics
    (exact: 16-bit QK, fp16 PV) with its plan's permutation and block mask, any other site stays SDPA."""

    def __init__(self, site_ids: list[str], plan: Plan):
        super().__init__()
        self.site_ids, self.plan, self.calls = site_ids, plan, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            site = self.plan.sites.get(self.site_ids[self.calls])
            self.calls += 1
            if site is not None:
                given = {**dict(zip(SDPA_PARAMETERS, args)), **kwargs}
                assert given.get("attn_mask") is None, site.site_id
                mask = BlockMask.from_csr(*site.csr(0), site.seq_len, site.block_size, site.block_size)
                return paro_attention_reference(given["query"], given["key"], given["value"], perm=site.perm, mask=mask,
                                                scale=given.get("scale"), qk_bits=16, pv_dtype="fp16")
        return func(*args, **kwargs)


def random_plan(sites: list, grid: TokenGrid, seed: int, block: int = 16, density: float = 0.5) -> Plan:
    """Per head a random order of the grid and a random block mask (diagonal kept) for every self-attention site."""
    gen = torch.Generator().manual_seed(seed)
    nb = -(-grid.num_tokens // block)
    planned = {}
    for site in sites:
        if not site.supported or site.is_cross:
            continue
        heads = int(site.heads)
        orders = [ORDERS[int(i)] for i in torch.randint(len(ORDERS), (heads,), generator=gen)]
        masks = (torch.rand(1, heads, nb, nb, generator=gen) < density) | torch.eye(nb, dtype=torch.bool)
        planned[site.site_id] = SitePlan.from_orders(site.site_id, orders, grid, block_size=block, block_masks=masks)
    return Plan(planned)


PLANNED = {
    # latent sizes of 2 × 16 × 16 (Allegro: 2 × 16 × 16 pixels of latent too): 2 × 8 × 8 = 128 visual tokens
    "skyreels_v2": (lambda: tiny_skyreels_v2(size=(2, 16, 16)), TokenGrid(2, 8, 8, 0)),
    "allegro": (lambda: tiny_allegro(size=(2, 16, 16)), TokenGrid(2, 8, 8, 0)),
    "wan_vace": (lambda: tiny_wan_vace(size=(2, 16, 16)), TokenGrid(2, 8, 8, 0)),
    "cosmos": (lambda: tiny_cosmos(size=(2, 16, 16)), TokenGrid(2, 8, 8, 0)),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", PLANNED)
@torch.no_grad()
def test_random_plan_matches_the_reference_oracle(name):
    """Per-head random orders (folded where the layout allows, the rest in the kernel) and random block masks: the
    compiled model equals the eager model whose attention runs the reference numerics with the same plan."""
    from tests.passes.fold_helpers import capture, compile_and_run

    make, grid = PLANNED[name]
    model, inputs = make()
    _, sites = capture(model, inputs)
    plan = random_plan(sites, grid, seed=sum(map(ord, name)))
    assert plan.sites
    dense = model(**inputs)[0]
    with PlannedAttention([s.site_id for s in sites], plan) as oracle:
        expected = model(**inputs)[0]
    assert oracle.calls == len(sites)
    out, _, report = compile_and_run(model, inputs, plan)
    planned = [s for s in report.sites if s.site_id in plan.sites]
    assert len(planned) == len(plan.sites) and all(s.lowered and 0 < s.density < 1 for s in planned), report.summary()
    assert all(s.permutation != "identity" for s in planned) and report.gathers_left == 0, report.summary()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert (out - dense).abs().max() > 1e-3, "the plan had no effect"


def wan_with_as_many_text_tokens_as_video_tokens():
    """Wan at a grid of as many tokens as its text (512 padded text tokens and one 256×512 frame have 512 each)."""
    from tests.test_diffusers_models import tiny_wan

    model, inputs = tiny_wan("cpu")  # 2 × 4 × 4 = 32 video tokens
    inputs["encoder_hidden_states"] = torch.randn(1, 32, 32, generator=_generator())
    return model, inputs


def test_cross_attention_as_long_as_the_video_is_told_apart_by_its_keys():
    """The text cross-attention's keys trace back to the text input only, never meeting the video tokens: it is
    cross-attention although its keys are as many as its queries; the self-attention stays self-attention."""
    from tests.passes.fold_helpers import capture

    _, sites = capture(*wan_with_as_many_text_tokens_as_video_tokens())
    assert [(s.site_id, s.seq_len, s.kv_seq_len, s.is_cross) for s in sites] == [
        ("blocks.0.attn1#0", 32, 32, False), ("blocks.0.attn2#0", 32, 32, True),
        ("blocks.1.attn1#0", 32, 32, False), ("blocks.1.attn2#0", 32, 32, True)]


@pytest.mark.slow
@torch.no_grad()
def test_cross_attention_as_long_as_the_video_runs_dense_beside_a_planned_self_attention():
    """Reported as cross-attention and run dense in model order while the self-attention takes the plan's orders and
    masks; the output is the reference oracle's."""
    from tests.passes.fold_helpers import capture, compile_and_run

    model, inputs = wan_with_as_many_text_tokens_as_video_tokens()
    _, sites = capture(model, inputs)
    plan = random_plan(sites, TokenGrid(2, 4, 4, 0), seed=3)
    assert sorted(plan.sites) == ["blocks.0.attn1#0", "blocks.1.attn1#0"]
    with PlannedAttention([s.site_id for s in sites], plan):
        expected = model(**inputs)[0]
    out, _, report = compile_and_run(model, inputs, plan)
    cross = [s for s in report.sites if s.cross_attention]
    assert [s.site_id for s in cross] == ["blocks.0.attn2#0", "blocks.1.attn2#0"], report.summary()
    assert all(s.lowered and s.permutation == "identity" and s.density == 1.0 for s in cross), report.summary()
    assert all(s.density < 1 for s in report.sites if not s.cross_attention), report.summary()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
