"""Token grids: inferred from input names and shapes, from the layout pass, or given; clear errors otherwise."""
import pytest
import torch

from paro_compile.calibration import CalibrationError, calibrate
from paro_compile.calibration.grids import infer_grid, named_inputs, placeholder_inputs
from paro_compile.grid import TokenGrid
from tests.calibration.calibration_helpers import BLOCK, GRID, TinyModel, model_inputs


def test_infer_grid():
    meta = dict(device="meta")
    cog = {"hidden_states": torch.empty(1, 13, 16, 60, 90, **meta), "encoder_hidden_states": torch.empty(1, 226, 4096, **meta)}
    assert infer_grid(17776, cog, patch_sizes=[2], temporal_patch_sizes=[1]) == TokenGrid(13, 30, 45, 226)
    wan = {"hidden_states": torch.empty(1, 16, 21, 60, 104, **meta), "encoder_hidden_states": torch.empty(1, 512, 4096, **meta)}
    assert infer_grid(21 * 30 * 52, wan) == TokenGrid(21, 30, 52, 0)
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(6.0), indexing="ij"), -1).reshape(-1, 3)
    flux = {"hidden_states": torch.empty(1, 24, 64), "img_ids": ids, "txt_ids": torch.zeros(7, 3)}
    assert infer_grid(31, flux) == TokenGrid(None, 4, 6, 7)
    assert infer_grid(1000, cog) is None


def test_named_and_placeholder_inputs():
    model = TinyModel()
    q = torch.zeros(1)
    named = named_inputs(model, (q, q), {"v": q, "timestep": 5})
    assert list(named) == ["q", "k", "v", "timestep"]
    assert list(named_inputs(None, (q,), {"x": 1})) == ["arg0", "x"]

    captured = {}

    def backend(gm, example_inputs):
        captured["named"] = placeholder_inputs(gm, example_inputs)
        return gm.forward

    torch._dynamo.reset()
    (args, kwargs), = model_inputs((torch.randn(1, 1, 8, 64), torch.randn(1, 1, 8, 64)))
    torch.compile(model, backend=backend, dynamic=False)(*args, **kwargs)
    assert {"q", "k", "v"} <= set(captured["named"])
    assert not any("parameters" in name for name in captured["named"])  # lifted weights are left out


def test_calibrate_output_unchanged_and_grid_sources(qk):
    model = TinyModel()
    (args, kwargs), = model_inputs(qk)
    expected = model(*args, **kwargs)
    calls = []

    def hook(site):
        calls.append(site.site_id)
        return GRID if site.site_id == "blocks.1#0" else None

    plan = calibrate(model, [(args, kwargs)], density=0.3, grid={"blocks.0#0": GRID}, grid_for_site=hook,
                     block_size=BLOCK, progress=False)
    assert calls == ["blocks.1#0"] and set(plan.sites) == {"blocks.0#0", "blocks.1#0"}
    torch.testing.assert_close(model(*args, **kwargs), expected)


def test_calibrate_unknown_layout_is_a_clear_error(qk):
    with pytest.raises(CalibrationError, match=r"pass grid=TokenGrid"):
        calibrate(TinyModel(), model_inputs(qk), progress=False)
    wrong = TokenGrid(frames=2, height=2, width=2)
    with pytest.raises(CalibrationError, match="has 1040 tokens but the grid"):
        calibrate(TinyModel(), model_inputs(qk), grid=wrong, progress=False)
    with pytest.raises(CalibrationError, match="timestep"):
        calibrate(TinyModel(), [((qk[0], qk[1], qk[1]), {})], grid=GRID, step_buckets=2, progress=False)
    with pytest.raises(CalibrationError, match="expected a TokenGrid"):
        calibrate(TinyModel(), model_inputs(qk), grid_for_site=lambda site: (2, 4, 8), progress=False)
