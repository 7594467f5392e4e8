"""Folding rules for patch embeddings: apply the common order to a patch conv's *input* latent.

A conv whose kernel equals its stride emits one token per patch; rearranging the small C-channel latent
makes it emit the tokens already in the common order, instead of permuting its wide C'-channel output in a
scattered token order (uncoalesced on the GPU; docs/folding.md has the measurements). Two rules:

- `fold_into_patch_conv`: the per-frame Conv2d chain of CogVideoX-style models;
- `fold_into_conv3d_input`: the Conv3d patch embed of Wan and the toy DiT.

Each returns the new token node, or None when the graph does not have its pattern; the rewrite then puts
a layout permute on the tokens instead. Both need static shapes.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx as fx

from paro_compile.passes.fx_utils import propagate_fake_values, shape_of, static_int

CONV2D_TARGETS = {torch.conv2d, torch.nn.functional.conv2d}
CONV3D_TARGETS = {torch.conv3d, torch.nn.functional.conv3d}


def _static_shape(node: Any) -> Optional[tuple[int, ...]]:
    shape = shape_of(node)
    if shape is None:
        return None
    sizes = tuple(static_int(s) for s in shape)
    return None if None in sizes else sizes


def sole_conv_arguments(conv: Any, targets: set, spatial: int) -> Optional[tuple]:
    """(x, weight, bias, stride, padding, dilation, groups) of a positional conv call whose only user is
    the patchify chain, with stride / padding / dilation as ``spatial``-tuples and groups an int, whichever
    way the call spelled them (``F.conv2d(x, w, b, 2)`` passes ints); None for anything else (another op,
    keyword arguments, several users, string padding "same" / "valid", which neither patch rule folds)."""
    if not (isinstance(conv, fx.Node) and conv.op == "call_function" and conv.target in targets
            and len(conv.users) == 1 and not conv.kwargs and len(conv.args) <= 7):
        return None
    x, weight, bias, stride, padding, dilation, groups = list(conv.args) + [None] * (7 - len(conv.args))

    def per_dim(value: Any, default: int) -> tuple:
        value = default if value is None else value
        return tuple(value) if isinstance(value, (tuple, list)) else (value,) * spatial

    if isinstance(padding, str):
        return None
    return x, weight, bias, per_dim(stride, 1), per_dim(padding, 0), per_dim(dilation, 1), 1 if groups is None else groups


def _conv2d_patch_chain(source: fx.Node, dim: int) -> Optional[dict]:
    """Match the per-frame patch embedding of CogVideoX-style models, ending at ``source``:
    ``conv2d(x [B·F, C, H, W], kernel = stride, no padding)`` → ``view(B, F, C', H', W')`` →
    ``flatten(3)`` → ``transpose(2, 3)`` → ``flatten(1, 2)`` = tokens [B, F·H'·W', C'] (dim 1).
    Every intermediate must have one user, and all shapes must be static."""
    def method(node: Any, name: str) -> bool:
        return isinstance(node, fx.Node) and node.op == "call_method" and node.target == name and len(node.users) == 1

    if dim != 1 or not (source.op == "call_method" and source.target == "flatten"):
        return None
    if tuple(source.args[1:3]) != (1, 2) and (len(source.args) < 2 or source.args[1] != 1 or source.kwargs.get("end_dim", 2) != 2):
        return None
    transpose = source.args[0]
    if not method(transpose, "transpose") or tuple(transpose.args[1:]) != (2, 3):
        return None
    flat = transpose.args[0]
    if not method(flat, "flatten") or tuple(flat.args[1:]) not in ((3,), (3, -1), (3, 4)):
        return None
    view = flat.args[0]
    if not (isinstance(view, fx.Node) and view.op == "call_method" and view.target in ("view", "reshape")
            and len(view.users) == 1):
        return None
    conv = view.args[0]
    args = sole_conv_arguments(conv, CONV2D_TARGETS, 2)
    if args is None:
        return None
    x, weight, bias, stride, padding, dilation, groups = args
    x_shape, w_shape, v_shape = _static_shape(x), _static_shape(weight), _static_shape(view)
    if x_shape is None or w_shape is None or v_shape is None or len(v_shape) != 5 or len(x_shape) != 4:
        return None
    if any(p != 0 for p in padding) or any(d != 1 for d in dilation):
        return None
    if tuple(w_shape[2:]) != stride:
        return None  # patches must not overlap: each output pixel reads its own kernel-sized patch
    b, f, c_out, h_out, w_out = v_shape
    if x_shape[0] != b * f or x_shape[2] != h_out * stride[0] or x_shape[3] != w_out * stride[1]:
        return None
    return {"x": x, "weight": weight, "bias": bias, "stride": stride, "groups": groups,
            "conv": conv, "chain": [source, transpose, flat, view, conv], "b": b, "f": f, "c_in": x_shape[1],
            "c_out": c_out, "sizes": {"F": f, "H": h_out, "W": w_out}}


def fold_into_patch_conv(gm: fx.GraphModule, source: fx.Node, dim: int, axes: str, order: str) -> Optional[fx.Node]:
    """Apply ``order`` to the *input* of a per-frame patch conv instead of to its output tokens.

    The conv's output pixels are (conv batch, row, column); rearranging the latent so that these are the
    three grid axes in ``order`` makes the conv emit the tokens already in that order:
    ``x.reshape(B, F, C, H', p, W', q).permute(B, A1, C, A2, p, A3, q).reshape(B·A1, C, A2·p, A3·q)``."""
    if axes != "FHW" or sorted(order) != sorted(axes):
        return None
    match = _conv2d_patch_chain(source, dim)
    if match is None:
        return None
    graph = gm.graph
    b, f, c_in, c_out = match["b"], match["f"], match["c_in"], match["c_out"]
    sizes = match["sizes"]
    p, q = match["stride"]
    x5_dim = {"F": 1, "H": 3, "W": 5}  # in x.view(B, F, C, H', p, W', q)
    a1, a2, a3 = order
    with graph.inserting_before(match["conv"]):
        # reshape, not view: the conv input or output may come in another memory format (channels-last)
        x5 = graph.call_method("reshape", (match["x"], b, f, c_in, sizes["H"], p, sizes["W"], q))
        xp = graph.call_method("permute", (x5, 0, x5_dim[a1], 2, x5_dim[a2], 4, x5_dim[a3], 6))
        x4 = graph.call_method("reshape", (xp, b * sizes[a1], c_in, sizes[a2] * p, sizes[a3] * q))
        conv = graph.call_function(match["conv"].target, (x4, match["weight"], match["bias"], (p, q), (0, 0), (1, 1),
                                                         match["groups"]))
        y3 = graph.call_method("reshape", (conv, b, sizes[a1], c_out, sizes[a2] * sizes[a3]))
        y = graph.call_method("transpose", (y3, 2, 3))
        tokens = graph.call_method("flatten", (y, 1, 2))
    source.replace_all_uses_with(tokens)
    for node in match["chain"]:
        if not node.users:
            graph.erase_node(node)
    propagate_fake_values(gm, [x5, xp, x4, conv, y3, y, tokens])
    return tokens


def fold_into_conv3d_input(gm: fx.GraphModule, source: fx.Node, dim: int, axes: str, order: str) -> Optional[fx.Node]:
    """Wan / toy-DiT patch embed: ``conv3d(x [B, C, F, H, W]) → flatten(2)`` with tokens on dim 2.

    A 3-D convolution commutes with permuting the input's spatial dims together with the kernel's
    (and stride, padding, dilation), so permuting both into ``order`` makes the conv emit its tokens in
    that order."""
    if axes != "FHW" or sorted(order) != sorted(axes) or dim != 2:
        return None
    if not (source.op == "call_method" and source.target == "flatten" and not source.kwargs):
        return None
    if tuple(source.args[1:]) not in ((2,), (2, -1), (2, 4)):
        return None
    conv = source.args[0]
    args = sole_conv_arguments(conv, CONV3D_TARGETS, 3)
    if args is None:
        return None
    x, weight, bias, stride, padding, dilation, groups = args
    x_shape = _static_shape(x)
    if x_shape is None or len(x_shape) != 5:
        return None
    spatial = [axes.index(a) for a in order]
    dims = (0, 1, *(2 + i for i in spatial))
    graph = gm.graph
    with graph.inserting_before(conv):
        xp = graph.call_method("permute", (x, *dims))
        wp = graph.call_method("permute", (weight, *dims))
        new_conv = graph.call_function(conv.target, (
            xp, wp, bias, tuple(stride[i] for i in spatial), tuple(padding[i] for i in spatial),
            tuple(dilation[i] for i in spatial), groups))
        tokens = graph.call_method("flatten", (new_conv, 2))
    source.replace_all_uses_with(tokens)
    graph.erase_node(source)
    graph.erase_node(conv)
    propagate_fake_values(gm, [xp, wp, new_conv, tokens])
    return tokens


def fold_into_patch_embed(gm: fx.GraphModule, source: fx.Node, dim: int, axes: str,
                          order: str) -> Optional[tuple[str, fx.Node]]:
    """The first patch-embed rule that applies to ``source``: (its label, the new token node), else None."""
    for label, rule in (("conv2d", fold_into_patch_conv), ("conv3d", fold_into_conv3d_input)):
        tokens = rule(gm, source, dim, axes, order)
        if tokens is not None:
            return label, tokens
    return None
