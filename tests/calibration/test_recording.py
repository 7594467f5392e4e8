"""Recording: supported SDPA sites are instrumented (dense output, statistics), unsupported ones listed."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from paro_compile.calibration import CalibrationError, CalibrationOptions
from paro_compile.calibration.grids import GridResolver
from paro_compile.calibration.recording import _RECORDERS, Recorder
from paro_compile.grid import TokenGrid

GRID = TokenGrid(frames=2, height=4, width=4)


class MaskedAndPlain(nn.Module):
    def forward(self, q, k, v):
        mask = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril()
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return F.scaled_dot_product_attention(q, k, masked)


def capture(model, *args):
    captured = {}

    def backend(gm, example_inputs):
        captured["gm"] = gm
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=False)(*args)
    return captured["gm"]


def test_instrumented_graph_keeps_its_output_and_records_supported_sites():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, GRID.num_tokens, 64, generator=gen) for _ in range(3))
    model = MaskedAndPlain()
    gm = capture(model, q, k, v)
    expected = model(q, k, v)
    recorder = Recorder(CalibrationOptions(block_size=8), GridResolver(GRID, use_layout_pass=False))
    try:
        assert _RECORDERS[recorder.id] is recorder
        recorder.instrument(gm)
        (skipped, reasons), = recorder.skipped.items()
        assert reasons and list(recorder.grids) != [skipped]
        (site_id,) = recorder.grids
        assert recorder.grids[site_id] == GRID
        with torch.no_grad():
            out = gm(q, k, v)
        torch.testing.assert_close(out[0] if isinstance(out, (tuple, list)) else out, expected)
        stats = recorder.sites[site_id]
        assert stats.calls == 1 and stats.heads == 2
        plan = recorder.build_plan(step_boundaries=[])
        assert set(plan.sites) == {site_id} and plan.meta["skipped_sites"] == {skipped: reasons}
        assert plan.density == 0.3 and plan.alpha == CalibrationOptions().alpha
    finally:
        recorder.close()
    assert recorder.id not in _RECORDERS


def test_recorder_without_observed_sites_is_a_clear_error():
    recorder = Recorder(CalibrationOptions(), GridResolver(GRID))
    try:
        with pytest.raises(CalibrationError, match="no supported attention site"):
            recorder.build_plan(step_boundaries=[])
    finally:
        recorder.close()
    with pytest.raises(CalibrationError, match="average_density"):
        Recorder(CalibrationOptions(average_density=0.3), GridResolver(GRID))


class KeyPaddedAndCross(nn.Module):
    """A self-attention site with a key-padding mask, then a cross-attention site to a short context."""

    def forward(self, q, k, v, keep, context):
        padded = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        return F.scaled_dot_product_attention(padded, context, context)


def test_key_padded_sites_calibrate_under_their_mask_and_cross_attention_is_left_alone():
    """A site whose SDPA masks keys is supported (the op applies the mask): calibration must run it with the mask
    (the model's output stays the same) and take statistics of the masked attention (no mass on masked keys).
    Cross-attention sites have no token order: not observed, not listed as skipped."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, GRID.num_tokens, 64, generator=gen) for _ in range(3))
    keep = torch.ones(1, GRID.num_tokens, dtype=torch.bool)
    keep[:, 16:] = False  # the second frame's tokens are padding
    context = torch.randn(1, 2, 5, 64, generator=gen)
    model = KeyPaddedAndCross()
    gm = capture(model, q, k, v, keep, context)
    recorder = Recorder(CalibrationOptions(density=0.5, block_size=16), GridResolver(GRID))
    try:
        observed = recorder.instrument(gm)
        with torch.no_grad():
            out = observed(keep, q, k, v, context)  # the graph takes its inputs in the order Dynamo met them
        torch.testing.assert_close(out[0] if isinstance(out, (tuple, list)) else out, model(q, k, v, keep, context))
        assert list(recorder.sites) == ["<root>#0"] and recorder.skipped == {}
        mass = recorder.sites["<root>#0"].mass[0]  # [orders, H, nb, nb] in each order's blocks
        natural = recorder.sites["<root>#0"].orders.index("FHW")
        assert float(mass[natural][:, :, 1].abs().max()) == 0.0  # key block 1 = the masked frame
    finally:
        recorder.close()


class JointPadded(nn.Module):
    """Self-attention under an ``m_i ∧ m_j`` mask (HunyuanVideo 1.5's form) whose first tokens are the padding."""

    def forward(self, q, k, v, keep):
        b, n = keep.shape
        rows = keep.view(b, 1, 1, n).repeat(1, 1, n, 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=rows & rows.transpose(2, 3))


def test_padded_queries_and_keys_calibrate_with_the_key_part_of_the_mask():
    """Statistics see the mask's key part, not its first row (which is all False when the first token is padding)."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, GRID.num_tokens, 64, generator=gen) for _ in range(3))
    keep = torch.ones(1, GRID.num_tokens, dtype=torch.bool)
    keep[:, :16] = False  # the first frame's tokens are padding, the first query row among them
    model = JointPadded()
    gm = capture(model, q, k, v, keep)
    recorder = Recorder(CalibrationOptions(density=0.5, block_size=16), GridResolver(GRID))
    try:
        observed = recorder.instrument(gm)
        with torch.no_grad():
            out = observed(keep, q, k, v)
        torch.testing.assert_close(out[0] if isinstance(out, (tuple, list)) else out, model(q, k, v, keep))
        stats = recorder.sites["<root>#0"]
        mass = stats.mass[0][stats.orders.index("FHW")]  # [H, nb, nb]
        assert float(mass[:, :, 0].abs().max()) == 0.0  # key block 0 = the padded frame: no mass
        torch.testing.assert_close(mass.sum((1, 2)), torch.full((2,), float(GRID.num_tokens)))  # every row sums to 1
    finally:
        recorder.close()
