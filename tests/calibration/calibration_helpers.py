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
