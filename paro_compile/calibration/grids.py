"""Token grids: the (frames, height, width, text) layout of every attention site's sequence.

`GridResolver` asks, per site, and the first source that answers wins: ``grid[site_id]`` (a dict), the
``grid_for_site`` hook, a single ``grid``, the layout-inference pass on the site's graph (`layout_pass_grid`), and
last the model inputs' names and shapes (`infer_grid`). A layout none of them determines, or a grid whose token
count differs from the site's sequence length, is a `CalibrationError` that says how to pass the grid.
"""
from __future__ import annotations

import inspect
import itertools
import re
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
import torch.fx as fx

from paro_compile.calibration.options import CalibrationError
from paro_compile.grid import TokenGrid

LATENT_NAMES = ("hidden_states", "sample", "latent", "video", "image")

GridSpec = Union[None, TokenGrid, Mapping[str, TokenGrid]]
GridHook = Callable[[Any], Optional[TokenGrid]]


def _patch_sizes_from_model(model: Optional[torch.nn.Module]) -> tuple[Optional[list[int]], Optional[list[int]]]:
    config = getattr(model, "config", None)
    if config is None:
        return None, None
    get = config.get if isinstance(config, Mapping) else lambda key, default=None: getattr(config, key, default)
    patch = get("patch_size", None)
    patch_t = get("patch_size_t", None)
    spatial = temporal = None
    if isinstance(patch, (list, tuple)) and len(patch) == 3:
        temporal, spatial = [int(patch[0])], [int(patch[1])]
    elif isinstance(patch, (list, tuple)) and len(patch) == 2:
        spatial = [int(patch[0])]
    elif isinstance(patch, int):
        spatial = [patch]
    if isinstance(patch_t, int):
        temporal = [patch_t]
    elif patch is not None and temporal is None and "patch_size_t" in (config if isinstance(config, Mapping) else vars(config)):
        temporal = [1]  # CogVideoX 1.0: patch_size_t=None means no temporal patching
    return spatial, temporal


def infer_grid(
    seq_len: int,
    tensors: Mapping[str, Any],
    *,
    patch_sizes: Optional[Iterable[int]] = None,
    temporal_patch_sizes: Optional[Iterable[int]] = None,
    text_position: str = "prefix",
) -> Optional[TokenGrid]:
    """Guess the layout of a length-``seq_len`` sequence from the model's input tensors; None if not unique.

    Candidates: 5-D latents [B, F, C, H, W] or [B, C, F, H, W] and 4-D [B, C, H, W] among the inputs named
    like a latent (``LATENT_NAMES``: hidden_states, sample, latent, video, image), divided by the patch
    sizes (default 1, 2, 4, 8 spatial and 1, 2, 4 temporal), Flux-style ``img_ids`` [n, 3] (row and column
    ids); the text length must be 0 or the sequence length of a 3-D input (e.g. encoder_hidden_states).
    """
    spatial = list(patch_sizes or (1, 2, 4, 8))
    temporal = list(temporal_patch_sizes or (1, 2, 4))
    shaped = {name: tuple(t.shape) for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    text_lengths = {0} | {s[1] for s in shaped.values() if len(s) == 3}
    visual: set[tuple[Optional[int], int, int]] = set()
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        shape = tuple(tensor.shape)
        if "img_ids" in name and tensor.dim() in (2, 3) and shape[-1] == 3 and tensor.numel():
            ids = tensor.reshape(-1, 3)
            if not ids.is_floating_point() or bool((ids == ids.round()).all()):
                h, w = int(ids[:, 1].max().item()) + 1, int(ids[:, 2].max().item()) + 1
                if h * w == ids.shape[0]:
                    visual.add((None, h, w))
                    text_lengths |= {s[0] for n2, s in shaped.items() if "txt_ids" in n2 and len(s) >= 1}
                    text_lengths |= {s[-2] for n2, s in shaped.items() if "txt_ids" in n2 and len(s) >= 2}
        if not any(word in name.lower() for word in LATENT_NAMES) or "encoder" in name.lower():
            continue  # only latent-like inputs: a 4-D q/k/v or conv weight would give false layouts
        if len(shape) == 5:
            for f, h, w in ((shape[1], shape[3], shape[4]), (shape[2], shape[3], shape[4])):
                for pt, p in itertools.product(temporal, spatial):
                    if f % pt == 0 and h % p == 0 and w % p == 0:
                        visual.add((f // pt, h // p, w // p))
        elif len(shape) == 4:
            for p in spatial:
                if shape[2] % p == 0 and shape[3] % p == 0:
                    visual.add((None, shape[2] // p, shape[3] // p))
    grids = set()
    for f, h, w in visual:
        text = seq_len - (f or 1) * h * w
        if text in text_lengths:
            grids.add(TokenGrid(frames=f, height=h, width=w, text_tokens=text, text_position=text_position))
    return grids.pop() if len(grids) == 1 else None


def named_inputs(model: Optional[torch.nn.Module], args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Model inputs by parameter name (positional ones bound through the forward signature when possible)."""
    named: dict[str, Any] = {}
    if args and model is not None:
        try:
            bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
            named.update(bound.arguments)
            for key, value in list(named.items()):
                if isinstance(value, dict) and key not in kwargs:  # **kwargs collector
                    named.pop(key)
                    named.update(value)
        except (TypeError, ValueError):
            named.update({f"arg{i}": a for i, a in enumerate(args)})
    elif args:
        named.update({f"arg{i}": a for i, a in enumerate(args)})
    named.update(kwargs)
    return named


def placeholder_inputs(gm: fx.GraphModule, example_inputs: Iterable[Any]) -> dict[str, Any]:
    """Graph inputs by (cleaned) placeholder name, leaving out lifted parameters and buffers."""
    named = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        name = node.name
        if "_parameters_" in name or "_buffers_" in name:
            continue
        clean = re.sub(r"^l_", "", name.lower()).strip("_")
        named[clean] = value
    return named


def layout_pass_grid(site: Any) -> Optional[TokenGrid]:
    """The grid the layout-inference pass (`passes.layout`) finds for ``site`` in its graph; None if it cannot."""
    try:
        from paro_compile.passes.layout import infer_site_layout

        grid = infer_site_layout(site).token_grid()
    except Exception:  # the pass must never break calibration: fall back to the input-shape heuristics
        return None
    return grid if isinstance(grid, TokenGrid) else None


class GridResolver:
    """Picks each site's `TokenGrid`, first found wins: the per-site dict, the ``grid_for_site`` hook, the one
    grid for all sites, the layout-inference pass on the site's graph, the input-shape heuristics (`infer_grid`)."""

    def __init__(
        self,
        grid: GridSpec = None,
        grid_for_site: Optional[GridHook] = None,
        *,
        model: Optional[torch.nn.Module] = None,
        text_position: str = "prefix",
        use_layout_pass: bool = True,
    ) -> None:
        self.grid = grid
        self.hook = grid_for_site
        self.text_position = text_position
        self.use_layout_pass = use_layout_pass
        self.patch_sizes, self.temporal_patch_sizes = _patch_sizes_from_model(model)
        self.inputs: dict[str, Any] = {}

    def __call__(self, site: Any) -> TokenGrid:
        seq_len = int(site.seq_len)
        found: Optional[TokenGrid] = None
        how = ""
        if isinstance(self.grid, Mapping) and site.site_id in self.grid:
            found, how = self.grid[site.site_id], f"grid[{site.site_id!r}]"
        if found is None and self.hook is not None:
            found, how = self.hook(site), "grid_for_site"
        if found is None and isinstance(self.grid, TokenGrid):
            found, how = self.grid, "grid"
        if found is None and self.use_layout_pass:
            found, how = layout_pass_grid(site), "the layout pass"
        if found is None:
            found = infer_grid(seq_len, self.inputs, patch_sizes=self.patch_sizes,
                               temporal_patch_sizes=self.temporal_patch_sizes, text_position=self.text_position)
            how = "inferred from the inputs"
        if found is None:
            shapes = {name: tuple(t.shape) for name, t in self.inputs.items() if isinstance(t, torch.Tensor)}
            raise CalibrationError(
                f"cannot determine the token layout of attention site {site.site_id} (sequence length {seq_len}, "
                f"inputs {shapes}): pass grid=TokenGrid(frames=F, height=H, width=W, text_tokens=T) so that "
                f"T + F*H*W == {seq_len} (or a dict {{site_id: TokenGrid}}, or grid_for_site=...)"
            )
        if not isinstance(found, TokenGrid):
            raise CalibrationError(f"{how} gave {found!r} for site {site.site_id}, expected a TokenGrid")
        if found.num_tokens != seq_len:
            raise CalibrationError(
                f"attention site {site.site_id} has {seq_len} tokens but the grid ({how}) {found} has "
                f"{found.num_tokens}: pass a per-site dict grid={{site_id: TokenGrid(...)}}"
            )
        return found
