"""Shared pieces of the calibration tests: structured synthetic heads, a tiny two-site model and its inputs."""
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from paro_compile.grid import TokenGrid
from tests.bench_helpers import load_benchmark

synthetic_qk = load_benchmark("alpha_sweep").synthetic_qk

# 32 frames of 4x8 tokens + 16 text tokens; 16-token blocks -> 65 blocks per side.
GRID = TokenGrid(frames=32, height=4, width=8, text_tokens=16)
BLOCK = 16
HEADS = [
    {"F": 30.0, "H": 2.0, "W": 2.0},  # local in (H, W) within a frame
    {"F": 0.0, "H": 30.0, "W": 30.0},  # all frames at a fixed (h, w)
    {"F": 30.0, "W": 30.0, "H": 1.0},  # local in H at fixed (f, w)
    {"F": 30.0, "H": 30.0, "W": 1.0},  # local in W at fixed (f, h)
]
GOOD_ORDERS = [{"FHW", "FWH"}, {"HWF", "WHF"}, {"FWH", "WFH"}, {"FHW", "HFW"}]


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.out = nn.Linear(64, 64)

    def forward(self, q, k, v):
        return self.out(F.scaled_dot_product_attention(q, k, v))


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Attention(), Attention()])

    def forward(self, q, k, v, timestep=None):
        x = v
        for block in self.blocks:
            x = block(q, k, x)
        return x


def model_inputs(qk, timesteps=(999.0,)):
    q, k = qk
    gen = torch.Generator().manual_seed(1)
    return [((q, k, torch.randn(q.shape, generator=gen)), {"timestep": torch.tensor([t])}) for t in timesteps]


def docs_option_defaults(text: str) -> dict[str, str]:
    """{option: default cell} of the options table of docs/calibration.md (rows like | `name` | default | ...)."""
    section = text.split("### Options", 1)[1].split("\n### ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3:
            for name in re.findall(r"`(\w+)`", cells[0]):
                rows[name] = cells[1]
    return rows


# Known-answer heads (tests/calibration/test_known_answers.py): 4 frames of 8x8 tokens, optional prefix text.
KNOWN_GRID = TokenGrid(frames=4, height=8, width=8, text_tokens=16)
SHARP = 60.0  # logit of a token's own group; distinct groups' random directions overlap by < 0.6, so they get < e^-24


def token_coords(grid: TokenGrid) -> torch.Tensor:
    """[N, 3] (frame, height, width) of every token in the model's order; -1 for text tokens."""
    coords = torch.full((grid.num_tokens, 3), -1, dtype=torch.long)
    mesh = torch.meshgrid(torch.arange(grid.frames), torch.arange(grid.height), torch.arange(grid.width), indexing="ij")
    coords[grid.visual_slice] = torch.stack(mesh, -1).reshape(-1, 3)
    return coords


def known_head_qk(grid: TokenGrid, kind: str, *, dim: int = 64, text_logit: float = SHARP,
                  sink_block: int = 1, block_size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [N, dim] of one head whose attention pattern is known exactly.

    ``kind``: "local-F" / "local-H" / "local-W" (a visual query attends uniformly to the visual tokens that share its
    other two coordinates, i.e. all positions along that axis), "self" (each token to itself), "sink" (every query to
    the ``sink_block``-th visual block of ``block_size`` tokens in the model's order), "uniform" (all scores equal).
    Channel 0 carries the text: text queries attend to the text tokens, and every visual query of a non-uniform head
    gives the text keys the logit ``text_logit`` (equal to its own group's at the default).
    """
    gen = torch.Generator().manual_seed(seed)
    n = grid.num_tokens
    q, k = torch.zeros(n, dim), torch.zeros(n, dim)
    if kind == "uniform":
        return q, k
    coords = token_coords(grid)
    visual = coords[:, 0] >= 0
    if kind == "sink":
        sink = torch.zeros(n, dtype=torch.bool)
        start = grid.visual_slice.start + sink_block * block_size
        sink[start: start + block_size] = True
        q[visual, 1] = SHARP
        k[sink, 1] = 1.0
    else:
        if kind == "self":
            keep = [0, 1, 2]
        else:
            axis = "FHW".index(kind.removeprefix("local-"))
            keep = [a for a in range(3) if a != axis]
        sizes = torch.tensor([grid.frames, grid.height, grid.width])
        group = torch.zeros(n, dtype=torch.long)
        for a in keep:
            group = group * sizes[a] + coords[:, a]
        directions = torch.nn.functional.normalize(torch.randn(int(group.max()) + 1, dim - 1, generator=gen), dim=-1)
        q[visual, 1:] = SHARP * directions[group[visual]]
        k[visual, 1:] = directions[group[visual]]
    q[visual, 0] = text_logit
    q[~visual, 0] = SHARP
    k[~visual, 0] = 1.0
    return q, k


def known_qk(grid: TokenGrid, kinds: list[str], **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [1, H, N, dim] of the heads ``kinds`` (`known_head_qk`)."""
    pairs = [known_head_qk(grid, kind, seed=h, **kw) for h, kind in enumerate(kinds)]
    return torch.stack([p[0] for p in pairs])[None], torch.stack([p[1] for p in pairs])[None]


def dense_probabilities(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[..., N, N] softmax(q kᵀ) at scale 1 (the scale `KnownHeadsModel` passes to SDPA)."""
    return torch.softmax(q @ k.transpose(-1, -2), -1)


class KnownHeadsModel(nn.Module):
    """Attention sites whose q, k are known-pattern tables (`known_qk`) and whose v is the input [B, N, H·D]; each site
    returns its attention output [B, N, H·D], so every head's output can be compared on its own."""

    def __init__(self, sites: list[tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        for i, (q, k) in enumerate(sites):
            self.register_buffer(f"q{i}", q.clone())
            self.register_buffer(f"k{i}", k.clone())
        self.sites = len(sites)

    def forward(self, hidden_states: torch.Tensor, timestep=None) -> list[torch.Tensor]:
        b, n, _ = hidden_states.shape
        outs = []
        for i in range(self.sites):
            q, k = getattr(self, f"q{i}"), getattr(self, f"k{i}")
            heads, dim = q.shape[1], q.shape[-1]
            v = hidden_states.view(b, n, heads, dim).transpose(1, 2)
            out = F.scaled_dot_product_attention(q.expand(b, -1, -1, -1), k.expand(b, -1, -1, -1), v, scale=1.0)
            outs.append(out.transpose(1, 2).reshape(b, n, heads * dim))
        return outs
