"""Layout inference (`passes/layout.py`): the token grid of every site, recovered from the graph."""
import pytest
import torch
import torch.nn.functional as F
import sympy

from paro_compile.passes.layout import infer_layouts, infer_token_grids
from tests.passes.fold_helpers import GRIDS, capture, make


@pytest.mark.parametrize("name", ["toy", "cogvideox", "wan"])
def test_grid_from_patchify(name):
    model, inputs = make(name)
    gm, sites = capture(model, inputs)
    grids = infer_token_grids(gm, sites)
    self_attn = [s for s in sites if s.supported]
    assert self_attn
    for site in self_attn:
        assert grids[site.site_id] == GRIDS[name], (site.site_id, grids[site.site_id])


def test_flux_tokens_arrive_flat():
    model, inputs = make("flux")
    gm, sites = capture(model, inputs)
    grids = infer_token_grids(gm, sites)
    layouts = infer_layouts(gm, sites)
    for site in sites:
        assert grids[site.site_id] is None  # no layout op: the grid comes from the plan / the user
        leaves = [(src.node.name, int(off), int(src.length)) for src, off in layouts[site.site_id].flat_leaves]
        assert ("l_kwargs_hidden_states_", 8, 16) in leaves  # the packed latents: visual tokens after 8 text tokens


def test_symbolic_grid_dynamic():
    model, inputs = make("toy")
    gm, sites = capture(model, inputs, dynamic=True)
    layouts = infer_layouts(gm, sites)
    for site in sites:
        grid = layouts[site.site_id].symbolic_grid()
        assert grid["axes"] == "FHW" and grid["text_position"] == "prefix"
        assert any(not sympy.sympify(s).is_number for s in grid["sizes"])
        total = grid["text_tokens"] + grid["sizes"][0] * grid["sizes"][1] * grid["sizes"][2]
        assert sympy.simplify(total - layouts[site.site_id].seq_len) == 0
    assert all(g is None for g in infer_token_grids(gm, sites).values())  # TokenGrid holds ints only


def test_cogvideox_1_5_linear_patch_embed_forms_a_symbolic_grid():
    """CogVideoX 1.5 patchifies with reshape → permute → flatten(4, 7) → flatten(1, 3) and a Linear (patch_size_t=2):
    the (F/2, H/2, W/2) grid is found through it with symbolic sizes, text before the video tokens. The blocks take
    the video tokens as ``hidden_states[:, text_len:]``, whose bound is a SymInt node with dynamic=True: read as its
    size, not as an opaque index (which made the slice a flat leaf and hid the patchify: "no visual token source")."""
    from tests.passes.video_models import cogvideox

    model, inputs_at, _ = cogvideox("1.5")
    gm, sites = capture(model, inputs_at(6, 12, 8), dynamic=True)
    layouts = infer_layouts(gm, [s for s in sites if s.supported])
    assert len(layouts) == 2
    for layout in layouts.values():
        grid = layout.symbolic_grid()
        assert grid["axes"] == "FHW" and grid["text_position"] == "prefix"
        assert all(not sympy.sympify(s).is_number for s in grid["sizes"] + [grid["text_tokens"]])
        assert [f.size.node.hint for f in layout.factors] == [3, 6, 4]  # this call's (6/2, 12/2, 8/2)


class CastBetweenMerges(torch.nn.Module):
    """Allegro's patchify: a Conv2d per frame, ``flatten(2).transpose(1, 2)`` (merges H, W), a dtype cast
    (``latent.to(latent.dtype)`` in diffusers' PatchEmbed), then ``unflatten(0, (B, -1)).flatten(1, 2)`` (merges F, HW)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(4, 128, 2, stride=2)
        self.qkv = torch.nn.Linear(128, 3 * 128)

    def forward(self, latent):
        b, c, f, h, w = latent.shape
        tokens = self.proj(latent.permute(0, 2, 1, 3, 4).flatten(0, 1)).flatten(2).transpose(1, 2)
        tokens = tokens.to(latent.dtype).unflatten(0, (b, -1)).flatten(1, 2)
        q, k, v = self.qkv(tokens).unflatten(-1, (3, 2, 64)).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v)


def test_grid_found_through_a_cast_between_two_merges():
    from paro_compile.grid import TokenGrid

    torch.manual_seed(0)
    gm, sites = capture(CastBetweenMerges().eval(), {"latent": torch.randn(1, 4, 3, 8, 12)})
    assert infer_token_grids(gm, sites) == {sites[0].site_id: TokenGrid(3, 4, 6, 0)}
