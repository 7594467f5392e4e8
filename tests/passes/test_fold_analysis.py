"""Folding, analysis phase (`passes/fold_analysis.py`): which nodes carry the tokens and where the boundaries are."""
import torch

from tests.passes.fold_helpers import (GRIDS, EditedTokensDiT, PartialStore, capture, compile_and_run, make_plan,
                                      token_gathers)


class TokenMixing(EditedTokensDiT):
    """The toy DiT plus ops that read token positions (a flip and a cumulative sum over tokens)."""

    def edit_tokens(self, tokens):
        return tokens + 0.1 * tokens.flip(1) + 0.01 * tokens.cumsum(1)

    def forward(self, latent, text, timestep):
        return self.blocks_output(latent, text, timestep).mean(1)


def test_token_position_ops_get_inverse_layout_ops():
    from paro_compile.toy.dit import toy_inputs

    model, inputs = TokenMixing().eval(), toy_inputs()
    gm, sites = capture(model, inputs)
    plan = make_plan(sites, GRIDS["toy"], ["WHF"])
    with torch.no_grad():
        ref = model(**inputs)
    out, code, report = compile_and_run(model, inputs, plan)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert report.gathers_left == 0
    token_gathers(code)




def test_tokens_leave_the_region_before_ops_that_read_positions():
    """Flip and cumsum over tokens, and the final mean over tokens, read the natural order: each gets an inverse
    boundary on its input; the flipped and summed tokens come back as visual sources of their own."""
    from paro_compile.passes.fold_analysis import analyse_region
    from paro_compile.passes.fx_utils import op_name
    from paro_compile.toy.dit import toy_inputs

    gm, sites = capture(TokenMixing().eval(), toy_inputs())
    code = gm.code
    region = analyse_region(gm, sites)
    assert gm.code == code  # the analysis does not touch the graph
    assert region.axes == "FHW" and not region.symbolic
    assert {op_name(node) for node, _ in region.sources} == {"flatten", "flip", "cumsum"}
    boundaries = {(op_name(b.user), b.direction) for b in region.analysis.boundaries}
    assert boundaries == {("flip", "inv"), ("cumsum", "inv"), ("mean", "inv")}
    to_mean = next(b for b in region.analysis.boundaries if op_name(b.user) == "mean")
    assert [s.kind for s in to_mean.state.segs] == ["txt", "vis"] and to_mean.state.dim == 1
    assert all(site.node in region.analysis.state for site in sites if site.supported)


def test_a_store_into_part_of_a_segment_stops_folding_before_any_rewrite():
    import pytest

    from paro_compile.passes.fold import fold_order
    from paro_compile.passes.fold_analysis import FoldError, analyse_region
    from paro_compile.toy.dit import toy_inputs

    gm, sites = capture(PartialStore().eval(), toy_inputs())
    code = gm.code
    with pytest.raises(FoldError, match="not whole segments"):
        analyse_region(gm, sites)
    result = fold_order(gm, sites, "HWF")
    assert result.order is None and "not whole segments" in result.reason
    assert gm.code == code


def test_whole_segments():
    from paro_compile.passes.fold_analysis import Seg, whole_segments

    text, visual = Seg("txt", 8), Seg("vis", 32)
    segs = (text, visual)
    assert whole_segments(segs, 0, 40) == segs
    assert whole_segments(segs, 8, 40) == (visual,) and whole_segments(segs, 0, 8) == (text,)
    assert whole_segments(segs, 0, 0) == ()
    assert whole_segments(segs, 4, 40) is None and whole_segments(segs, 8, 20) is None


def test_store_at_a_symbolic_text_offset_stays_in_the_region():
    """CogVideoX applies RoPE in place past the text, ``query[:, :, text_len:] = rope(...)``; with dynamic=True
    ``text_len`` is a SymInt node in the index. The store covers the whole visual segment, so it stays in the
    region (it used to abort folding as a tensor-indexed store)."""
    from paro_compile.passes.fold_analysis import analyse_region
    from paro_compile.passes.fx_utils import op_name
    from tests.passes.video_models import cogvideox

    model, inputs_at, _ = cogvideox("1.0")
    gm, sites = capture(model, inputs_at(3, 12, 8), dynamic=True)
    stores = [n for n in gm.graph.nodes if op_name(n) == "setitem"]
    assert len(stores) == 4 and all(len(n.all_input_nodes) == 3 for n in stores)  # target, value, the SymInt bound
    region = analyse_region(gm, sites)
    assert region.symbolic and region.axes == "FHW"
    for store in stores:
        target = store.args[0]
        assert target in region.analysis.state and store.args[2] in region.analysis.state
        assert not any(b.user is store for b in region.analysis.boundaries)


def test_a_store_into_part_of_a_segment_stops_the_analysis_with_symbolic_shapes_too():
    import pytest

    from paro_compile.passes.fold_analysis import FoldError, analyse_region
    from tests.passes.video_models import toy

    model, inputs_at, _ = toy(model=PartialStore())
    gm, sites = capture(model, inputs_at(3, 12, 8), dynamic=True)
    with pytest.raises(FoldError, match="not whole segments"):
        analyse_region(gm, sites)
