"""The function `kernels.block_stats` computes, from the dense softmax in float64 (small inputs only: it holds the
[B, H, N, N] map)."""
from __future__ import annotations

import math
from typing import Optional

import torch


def block_stats_reference(q: torch.Tensor, k: torch.Tensor, perm: torch.Tensor, block_size: int, eps: float,
                          scale: float, key_bias: Optional[torch.Tensor] = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`block_stats` from the dense softmax in float64 (small inputs only: it holds the [B, H, N, N] map)."""
    bsz, heads, n, _ = q.shape
    s = torch.matmul(q.double() * scale, k.double().transpose(-1, -2))
    if key_bias is not None:
        s = s + key_bias.double()[:, :, None, :]
    p = torch.softmax(s, -1)
    index = perm.long().to(p.device)
    p = p.index_select(2, index).index_select(3, index)
    nb = math.ceil(n / block_size)
    pad = nb * block_size - n
    valid = torch.nn.functional.pad(torch.ones(n, n, dtype=torch.bool, device=p.device), (0, pad, 0, pad))
    p = torch.nn.functional.pad(p, (0, pad, 0, pad))
    blocks = p.reshape(bsz, heads, nb, block_size, nb, block_size)
    below = ((p < eps) & valid).reshape(bsz, heads, nb, block_size, nb, block_size)
    mass = blocks.sum((3, 5)).sum(0)
    peak = blocks.amax((3, 5)).amax(0)
    small = below.sum((3, 5)).sum(0)
    return mass.float(), peak.float(), small.float()
