"""Site discovery (`passes/discover.py`): site ids and support verdicts, also on symbolic shapes."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from paro_compile.config import ParoConfig
from paro_compile.passes.discover import find_attention_sites
from paro_compile.passes.fx_utils import fake_value
from tests.passes.fold_helpers import capture


class SelfAndCross(nn.Module):
    """Self-attention over the tokens, then cross-attention to a context of another length."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 64)

    def forward(self, x, context):
        b, n, _ = x.shape
        q = self.proj(x).view(b, n, 1, 64).transpose(1, 2)
        kv = context.view(b, context.shape[1], 1, 64).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, q, q)
        return F.scaled_dot_product_attention(y, kv, kv)


def test_verdicts_on_symbolic_lengths_specialize_nothing():
    """Self- and cross-attention are told apart on symbolic lengths (the query and context lengths are independent
    symbols), and discovery adds no guard to the graph's ShapeEnv."""
    gm, _ = capture(SelfAndCross().eval(), {"x": torch.randn(1, 12, 64), "context": torch.randn(1, 7, 64)}, dynamic=True)
    shape_env = next(fake_value(n) for n in gm.graph.find_nodes(op="placeholder") if fake_value(n) is not None).fake_mode.shape_env
    guards = len(shape_env.guards)
    self_attention, cross_attention = find_attention_sites(gm, ParoConfig(allow_fp32=True))
    assert (self_attention.site_id, cross_attention.site_id) == ("<root>#0", "<root>#1")
    assert self_attention.supported and not isinstance(self_attention.seq_len, int)
    assert not self_attention.is_cross and cross_attention.is_cross and cross_attention.supported
    _, kept_on_sdpa = find_attention_sites(gm, ParoConfig(allow_fp32=True, lower_cross_attention=False))
    assert any(reason.startswith("cross-attention") for reason in kept_on_sdpa.reasons)
    assert len(shape_env.guards) == guards
