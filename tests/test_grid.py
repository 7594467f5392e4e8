import pytest
import torch
from hypothesis import given, settings, strategies as st

from paro_compile.grid import TokenGrid, candidate_orders, inverse_permutation, order_permutation, orders_permutation


@st.composite
def grids(draw):
    video = draw(st.booleans())
    return TokenGrid(
        frames=draw(st.integers(1, 5)) if video else None,
        height=draw(st.integers(1, 6)),
        width=draw(st.integers(1, 6)),
        text_tokens=draw(st.integers(0, 7)),
        text_position=draw(st.sampled_from(["prefix", "suffix"])),
    )


@st.composite
def grid_and_order(draw):
    grid = draw(grids())
    return grid, draw(st.sampled_from(candidate_orders(grid)))


@settings(max_examples=150, deadline=None)
@given(grid_and_order())
def test_permutation_is_bijection_and_inverse_composes(case):
    grid, order = case
    perm = order_permutation(grid, order)
    assert perm.shape == (grid.num_tokens,) and perm.dtype == torch.long
    assert torch.equal(perm.sort().values, torch.arange(grid.num_tokens))
    inv = inverse_permutation(perm)
    assert torch.equal(perm[inv], torch.arange(grid.num_tokens))
    assert torch.equal(inv[perm], torch.arange(grid.num_tokens))


@settings(max_examples=150, deadline=None)
@given(grid_and_order())
def test_text_tokens_never_move(case):
    grid, order = case
    perm = order_permutation(grid, order)
    text = torch.arange(grid.num_tokens)[grid.text_slice]
    assert torch.equal(perm[grid.text_slice], text)
    assert grid.text_mask()[perm].equal(grid.text_mask())


@settings(max_examples=100, deadline=None)
@given(grid_and_order())
def test_visual_tokens_follow_axis_order(case):
    grid, order = case
    perm = order_permutation(grid, order)
    sizes = [grid.sizes[a] for a in grid.axes]
    coords = torch.stack(torch.meshgrid(*[torch.arange(s) for s in sizes], indexing="ij"), -1).reshape(-1, len(sizes))
    visual = perm[grid.visual_slice] - grid.visual_offset
    c = coords[visual]  # coordinates (natural axes) at each position
    # Re-flattening in `order` is lexicographic in the order's axes: positions sorted by those coordinates.
    key = torch.zeros(len(visual), dtype=torch.long)
    for a in order:
        key = key * grid.sizes[a] + c[:, grid.axes.index(a)]
    assert torch.equal(key, torch.arange(len(visual)))


def test_candidates_and_examples():
    video = TokenGrid(frames=2, height=3, width=4, text_tokens=2)
    image = TokenGrid(frames=None, height=3, width=4)
    assert candidate_orders(video) == ["FHW", "FWH", "HFW", "HWF", "WFH", "WHF"]
    assert candidate_orders(image) == ["HW", "WH"]
    assert torch.equal(order_permutation(video, "FHW"), torch.arange(26))
    perm = order_permutation(video, "HWF")  # F fastest: (h0,w0,f0), (h0,w0,f1), ...
    assert perm[:4].tolist() == [0, 1, 2, 2 + 12]
    assert order_permutation(image, "WH")[:4].tolist() == [0, 4, 8, 1]
    suffix = TokenGrid(frames=None, height=2, width=2, text_tokens=3, text_position="suffix")
    assert order_permutation(suffix, "WH").tolist() == [0, 2, 1, 3, 4, 5, 6]
    stacked = orders_permutation(video, ["FHW", "HWF", "FHW"])
    assert stacked.shape == (3, 26) and torch.equal(stacked[0], stacked[2])


def test_grid_validation_and_roundtrip():
    with pytest.raises(ValueError):
        TokenGrid(frames=0, height=2, width=2)
    with pytest.raises(ValueError):
        TokenGrid(frames=None, height=2, width=2, text_position="middle")
    with pytest.raises(ValueError):
        order_permutation(TokenGrid(frames=None, height=2, width=2), "FHW")
    grid = TokenGrid(frames=3, height=2, width=5, text_tokens=4, text_position="suffix")
    assert TokenGrid.from_dict(grid.to_dict()) == grid
    assert grid.num_tokens == 34 and grid.text_slice == slice(30, 34) and grid.visual_slice == slice(0, 30)
