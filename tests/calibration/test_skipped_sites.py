"""Sites calibration cannot read are skipped with their reason: the plan records it, the summary prints it, the backend
runs them dense in model order and its report says why; a model with no readable site is a clear error."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import paro_compile
from paro_compile.calibration import CalibrationError, calibrate
from paro_compile.calibration.summary import calibration_summary
from paro_compile.grid import TokenGrid
from tests.calibration.calibration_helpers import BLOCK, GRID
from tests.conftest import rel_l2

EXACT = {"allow_fp32": True, "qk_bits": 16, "pv_dtype": "fp16"}


class Site(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class MixedSites(nn.Module):
    """One readable site over GRID, one over 8 tokens (fewer than a block), one over 37 tokens of no known layout."""

    def __init__(self):
        super().__init__()
        self.main, self.temporal, self.unknown = Site(), Site(), Site()

    def forward(self, q, k, v, timestep=None):
        return (self.main(q, k, v), self.temporal(q[:, :, :8], k[:, :, :8], v[:, :, :8]),
                self.unknown(q[:, :, :37], k[:, :, :37], v[:, :, :37]))


def mixed_inputs(seed=0, tokens=GRID.num_tokens):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, tokens, 64, generator=gen) for _ in range(3))
    return [((q, k, v), {"timestep": torch.tensor([500.0])})]


def test_unreadable_sites_are_skipped_with_their_reason_in_the_plan_and_summary(capsys):
    plan = calibrate(MixedSites(), mixed_inputs(), density=0.5, block_size=BLOCK, grid={"main#0": GRID},
                     use_layout_pass=False, progress=True)
    assert set(plan.sites) == {"main#0"}
    skipped = plan.meta["skipped_sites"]
    assert set(skipped) == {"temporal#0", "unknown#0"}
    assert "8 tokens fit in one 16-token block" in skipped["temporal#0"][0]
    assert "cannot determine the token layout" in skipped["unknown#0"][0] and "grid=TokenGrid" in skipped["unknown#0"][0]
    summary = calibration_summary(plan)
    assert "skipped 2 site(s)" in summary
    for site_id, reasons in skipped.items():
        assert f"{site_id}: {reasons[0]}" in summary
    assert summary in capsys.readouterr().out  # calibrate(progress=True) prints it


def test_a_model_with_no_readable_site_names_every_reason():
    wrong = TokenGrid(frames=2, height=4, width=4)  # 32 tokens: matches none of the sites
    with pytest.raises(CalibrationError, match="every site was skipped") as error:
        calibrate(MixedSites(), mixed_inputs(), block_size=BLOCK, grid=wrong, use_layout_pass=False, progress=False)
    message = str(error.value)
    assert "main#0: attention site main#0 has 1040 tokens but the grid" in message
    assert "temporal#0: its 8 tokens fit in one 16-token block" in message
    assert "unknown#0: attention site unknown#0 has 37 tokens" in message


def test_symbolic_sizes_and_orders_the_grid_lacks_are_reasons_to_skip():
    from types import SimpleNamespace

    import sympy

    from paro_compile.calibration import CalibrationOptions
    from paro_compile.calibration.grids import GridResolver
    from paro_compile.calibration.recording import Recorder

    recorder = Recorder(CalibrationOptions(block_size=BLOCK), GridResolver(GRID, use_layout_pass=False))
    try:
        symbolic = SimpleNamespace(site_id="s#0", heads=2, seq_len=sympy.Symbol("s0"))
        assert recorder.unreadable_reason(symbolic).startswith("symbolic sizes (2 heads, s0 tokens)")
        readable = SimpleNamespace(site_id="r#0", heads=2, seq_len=GRID.num_tokens)
        assert recorder.unreadable_reason(readable) is None and recorder.grids["r#0"] == GRID
    finally:
        recorder.close()
    images_only = Recorder(CalibrationOptions(block_size=BLOCK, orders=["HW", "WH"]), GridResolver(GRID, use_layout_pass=False))
    try:
        reason = images_only.unreadable_reason(SimpleNamespace(site_id="r#0", heads=2, seq_len=GRID.num_tokens))
        assert "order 'HW' is not a permutation of the grid's axes 'FHW'" in reason
    finally:
        images_only.close()


class GrowingAndFixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.growing, self.fixed = Site(), Site()

    def forward(self, q, k, v, timestep=None):
        return self.growing(q, k, v), self.fixed(q[:, :, :512], k[:, :, :512], v[:, :, :512])


def test_a_site_whose_shape_changes_between_calls_is_skipped_and_the_others_calibrate():
    grids = {GRID.num_tokens: GRID, 512: TokenGrid(frames=2, height=16, width=16),
             1296: TokenGrid(frames=4, height=18, width=18)}
    inputs = mixed_inputs(0) + mixed_inputs(1, tokens=1296)
    plan = calibrate(GrowingAndFixed(), inputs, density=0.5, block_size=BLOCK,
                     grid_for_site=lambda site: grids[int(site.seq_len)], use_layout_pass=False, progress=False)
    assert set(plan.sites) == {"fixed#0"} and plan.sites["fixed#0"].stats["calls"] == 2
    (reason,) = plan.meta["skipped_sites"]["growing#0"]
    assert "shape changed between calibration calls (2 heads x 1040 tokens, then 2 x 1296)" in reason


def test_the_backend_runs_skipped_sites_dense_in_model_order_and_says_why():
    model = MixedSites()
    plan = calibrate(model, mixed_inputs(), density=0.5, block_size=BLOCK, grid={"main#0": GRID},
                     use_layout_pass=False, progress=False)
    (args, kwargs), = mixed_inputs(seed=3)
    with torch.no_grad():
        expected = model(*args, **kwargs)
        out = torch.compile(model, backend="paro", options={**EXACT, "plan": plan})(*args, **kwargs)
    records = {r.site_id: r for r in paro_compile.last_report().sites}
    assert records["main#0"].lowered and records["main#0"].density == pytest.approx(0.5, abs=0.02)
    for index, site_id in ((1, "temporal#0"), (2, "unknown#0")):
        record = records[site_id]
        assert record.lowered and record.density == 1.0 and record.permutation == "identity"
        assert any("calibration skipped this site" in r and plan.meta["skipped_sites"][site_id][0] in r
                   for r in record.reasons)
        assert rel_l2(out[index], expected[index]) < 1e-5  # dense, model order, exact numerics: SDPA's result
    assert torch.isfinite(out[0]).all()


def tiny_latte():
    from diffusers import LatteTransformer3DModel

    torch.manual_seed(0)
    model = LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=1,
        cross_attention_dim=128, sample_size=8, patch_size=2, norm_type="ada_norm_single", caption_channels=32,
        video_length=4, activation_fn="gelu-approximate",
    ).eval()
    gen = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 4, 4, 16, 16, generator=gen), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=gen), return_dict=False)
    return model, inputs


def test_latte_temporal_attention_is_skipped_and_runs_dense():
    """Latte's temporal attention attends over the 4 frames of each patch: calibration skips it, the spatial
    self-attention is calibrated, and the compiled model runs the temporal site dense in model order."""
    pytest.importorskip("diffusers")
    model, inputs = tiny_latte()
    plan = calibrate(model, [inputs], density=0.5, block_size=BLOCK, progress=False)
    assert set(plan.sites) == {"transformer_blocks.0.attn1#0"}
    skipped = plan.meta["skipped_sites"]
    assert "4 tokens fit in one 16-token block" in skipped["temporal_transformer_blocks.0.attn1#0"][0]
    assert "transformer_blocks.0.attn2#0" not in skipped  # cross-attention has no token order: not calibrated
    with torch.no_grad():
        expected = model(**inputs)[0]
        out = torch.compile(model, backend="paro", options={**EXACT, "plan": plan})(**inputs)[0]
    records = {r.site_id: r for r in paro_compile.last_report().sites}
    temporal = records["temporal_transformer_blocks.0.attn1#0"]
    assert temporal.lowered and temporal.density == 1.0 and temporal.permutation == "identity"
    assert any("calibration skipped this site" in r for r in temporal.reasons)
    assert records["transformer_blocks.0.attn1#0"].lowered and records["transformer_blocks.0.attn1#0"].density < 1.0
    cross = records["transformer_blocks.0.attn2#0"]
    assert not cross.lowered or (cross.density == 1.0 and cross.permutation == "identity")
    assert torch.isfinite(out).all() and rel_l2(out, expected) < 0.2
