"""Folding, patch-embed rules (`passes/fold_patch_embed.py`): the order applied to a patch conv's input."""
import itertools
import re

import pytest
import torch

from paro_compile.grid import TokenGrid
from tests.passes.fold_helpers import bench_fold_stack, capture, compile_and_run, make_plan, token_gathers


@pytest.mark.parametrize("order", ["".join(p) for p in itertools.permutations("FHW") if "".join(p) != "FHW"])
def test_order_folds_into_the_patch_conv_input(order):
    """The common order is applied to the conv's input latent (B = 2, so the batch/axis reshuffle is
    exercised), the conv emits tokens already in the PARO order: exact output, no layout permute on the
    conv output, zero gathers."""
    torch.manual_seed(0)
    model = bench_fold_stack()(128, 2, 2, channels=4, text_dim=16).eval()
    inputs = {"latent": torch.randn(2, 3, 4, 8, 6), "text": torch.randn(2, 5, 16)}
    grid = TokenGrid(3, 4, 3, 5)
    gm, sites = capture(model, inputs)
    plan = make_plan(sites, grid, [order])
    with torch.no_grad():
        ref = model(**inputs)
    out, code, report = compile_and_run(model, inputs, plan)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    lowered = [s for s in report.sites if s.lowered]
    assert len(lowered) == 2 and report.gathers_left == 0
    assert all(s.permutation.startswith("folded:conv2d input") for s in lowered), report.summary()
    token_gathers(code)
    folded = next(p["after"] for p in report.passes if p["name"] == "fold_permutations")
    # the conv reads the rearranged latent; the only token-axis layout permute left is the unpatchify's inverse
    assert re.search(r"conv2d\((reshape\w*)", folded), folded
    assert folded.count("torch.unflatten(") == 1, folded


def test_conv_arguments_are_normalised_however_they_are_spelled():
    """``F.conv2d(x, w, b, 2)`` passes the stride as an int; the patch-conv rules read it as (2, 2)."""
    import torch.fx as fx

    from paro_compile.passes.fold_patch_embed import CONV2D_TARGETS, CONV3D_TARGETS, sole_conv_arguments

    def patchify(x, w):
        return torch.conv2d(x, w, None, 2) + 0

    conv = next(n for n in fx.symbolic_trace(patchify).graph.nodes if n.target is torch.conv2d)
    _, _, bias, stride, padding, dilation, groups = sole_conv_arguments(conv, CONV2D_TARGETS, 2)
    assert (bias, stride, padding, dilation, groups) == (None, (2, 2), (0, 0), (1, 1), 1)
    assert sole_conv_arguments(conv, CONV3D_TARGETS, 3) is None  # another op


def test_patch_embed_rules_rewrite_the_conv_and_keep_fake_values():
    """Each rule matches its own patch embed only, and the nodes it inserts carry fake values of the shapes the
    replaced nodes had (later passes read shapes from them)."""
    from paro_compile.passes.fold_analysis import analyse_region
    from paro_compile.passes.fold_patch_embed import fold_into_conv3d_input, fold_into_patch_conv, fold_into_patch_embed
    from paro_compile.passes.fx_utils import fake_value, op_name
    from paro_compile.toy.dit import ToyVideoDiT, toy_inputs

    torch.manual_seed(0)
    conv2d_model = bench_fold_stack()(128, 2, 2, channels=4, text_dim=16).eval()
    cases = [
        (ToyVideoDiT().eval(), toy_inputs(), "conv3d", fold_into_patch_conv),
        (conv2d_model, {"latent": torch.randn(2, 3, 4, 8, 6), "text": torch.randn(2, 5, 16)}, "conv2d", fold_into_conv3d_input),
    ]
    for model, inputs, kind, other_rule in cases:
        gm, sites = capture(model, inputs)
        (source, dim), = [(n, d) for n, d in analyse_region(gm, sites).sources]
        shape = fake_value(source).shape
        assert other_rule(gm, source, dim, "FHW", "HWF") is None
        assert fold_into_patch_embed(gm, source, dim, "HW", "WH") is None  # image grids have no patch conv rule
        label, tokens = fold_into_patch_embed(gm, source, dim, "FHW", "WHF")
        assert label == kind and fake_value(tokens).shape == shape
        conv = next(n for n in gm.graph.nodes if op_name(n) == kind)
        assert all(fake_value(n) is not None for n in [conv, *conv.all_input_nodes])
        gm.graph.lint()
