"""`watch_qk_outliers`: Q/K outliers measured at run time on the calls of compiled graphs, per site, with calibration's
measure and fix; nothing installed outside the block."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import paro_compile
from paro_compile import ops
from paro_compile.calibration.outliers import block_incoherence, smooth_keys
from paro_compile.kernels.block_mask import BlockMask
from paro_compile.kernels.reference import permute_tokens
from paro_compile.qk_outlier_watch import DIRECT_CALLS, watch_qk_outliers
from paro_compile.toy.dit import ToyVideoDiT, toy_inputs
from tests.test_lower import SITES, random_plan

HEADS, TOKENS, HEAD_DIM = 2, 256, 32
INT8 = {"allow_fp32": True, "qk_bits": 8, "pv_dtype": "fp16", "impl": "reference"}


class OneSite(nn.Module):
    """One self-attention site; ``q_gain`` [N] scales the queries per token, so a call can carry a query outlier that
    the keys and values do not share."""

    def __init__(self) -> None:
        super().__init__()
        self.to_qkv = nn.Linear(HEADS * HEAD_DIM, 3 * HEADS * HEAD_DIM)

    def forward(self, x: torch.Tensor, q_gain: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).reshape(b, n, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q * q_gain[:, None], k, v).transpose(1, 2).reshape(b, n, -1)


def one_site_inputs(outlier: bool) -> dict:
    gain = torch.ones(TOKENS)
    if outlier:
        gain[100] = 100.0
    return {"x": torch.randn(1, TOKENS, HEADS * HEAD_DIM, generator=torch.Generator().manual_seed(0)), "q_gain": gain}


@pytest.fixture(scope="module")
def compiled_one_site():
    torch.manual_seed(0)
    model = OneSite().eval()
    compiled = torch.compile(model, backend="paro", options=INT8)
    with torch.no_grad():
        compiled(**one_site_inputs(False))  # compile outside the watches
    (site,) = paro_compile.last_report().sites
    assert site.lowered
    return compiled, site.site_id


@torch.no_grad()
def test_a_query_token_outlier_at_run_time_is_flagged_with_calibrations_fix(compiled_one_site):
    compiled, site_id = compiled_one_site
    with paro_compile.watch_qk_outliers() as watch:
        compiled(**one_site_inputs(True))
    assert set(watch.report()) == {site_id}  # the compiled graph's call carried its site id
    report = watch.flagged()[site_id]
    assert report["calls"] == 1 and report["block_size"] == 64 and report["flagged_heads"] == [0, 1]
    assert min(report["q_incoherence_max"]) > 50 and max(report["k_incoherence_max"]) < 20
    assert min(report["int8_error"]) > 0.15  # several times the threshold (clean calls score ~0.01)
    assert report["suggested_qk_bits"] == 16 and "suggested_block_size" not in report
    assert "from Q outliers" in report["summary"] and "use qk_bits=16 for this site" in report["summary"]
    summary = watch.summary()
    assert "1 flagged" in summary and f"{site_id} (1 call(s)): head(s) [0, 1]" in summary


@torch.no_grad()
def test_clean_inputs_are_not_flagged_and_the_watch_changes_no_result(compiled_one_site):
    compiled, site_id = compiled_one_site
    for outlier in (False, True):
        unwatched = compiled(**one_site_inputs(outlier))
        with watch_qk_outliers() as watch:
            watched = compiled(**one_site_inputs(outlier))
            watched_again = compiled(**one_site_inputs(outlier))
        assert torch.equal(watched, unwatched) and torch.equal(watched_again, unwatched)
        assert watch.report()[site_id]["calls"] == 2
        assert bool(watch.flagged()) == outlier
    with watch_qk_outliers() as watch_clean:
        compiled(**one_site_inputs(False))
    report = watch_clean.report()[site_id]
    assert not report["flagged"] and "suggestion" not in report and max(report["int8_error"]) < 0.05
    assert "0 flagged" in watch_clean.summary() and "worst INT8 error" in watch_clean.summary()


@torch.no_grad()
def test_nothing_is_installed_outside_the_block(compiled_one_site):
    compiled, site_id = compiled_one_site
    assert ops.ACTIVE_QK_WATCHES == ()
    with watch_qk_outliers() as outer:
        with watch_qk_outliers(threshold=0.5) as inner:
            compiled(**one_site_inputs(True))
        assert ops.ACTIVE_QK_WATCHES == (outer,)
        compiled(**one_site_inputs(True))
    assert ops.ACTIVE_QK_WATCHES == ()
    assert inner.report()[site_id]["calls"] == 1 and outer.report()[site_id]["calls"] == 2
    assert outer.flagged() and not inner.flagged() and inner.report()[site_id]["threshold"] == 0.5
    compiled(**one_site_inputs(True))
    assert outer.calls == 2  # calls after the block are not seen
    with pytest.raises(RuntimeError, match="inside"):
        with watch_qk_outliers():
            raise RuntimeError("inside")
    assert ops.ACTIVE_QK_WATCHES == ()


@torch.no_grad()
def test_each_site_of_a_planned_graph_is_measured_in_the_kernels_token_order_and_blocks():
    torch.manual_seed(0)
    model = ToyVideoDiT().eval()
    inputs = toy_inputs()
    options = {**INT8, "plan": random_plan(), "fold_permutations": False}
    compiled = torch.compile(model, backend="paro", options=options)
    expected = compiled(**inputs)
    with watch_qk_outliers() as watch:
        out = compiled(**inputs)
    assert torch.equal(out, expected)
    report = watch.report()
    assert sorted(report) == SITES
    assert all(r["calls"] == 1 and r["block_size"] == 16 and len(r["int8_error"]) == 2 for r in report.values())


@torch.no_grad()
def test_a_call_is_measured_on_the_tokens_the_kernel_quantizes_together():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 128, 32, generator=gen) for _ in range(3))
    q[:, :, 5] *= 30
    perm = torch.stack([torch.randperm(128, generator=gen) for _ in range(2)])
    tensors, sizes = BlockMask.dense(128, 16, 16).as_op_args()
    with watch_qk_outliers() as watch:
        ops.paro_attention_op(q, k, v, perm, None, tensors, sizes, 1 / math.sqrt(32), 8, "fp16", False, 1.0,
                              "reference", "blocks.3.attn#0")
        paro_compile.paro_attention(q, k, v, impl="reference", qk_bits=16)
    stats = watch.sites["blocks.3.attn#0"]
    expected_q = block_incoherence(permute_tokens(q, perm), 16).amax(-1)[0].double()
    expected_k = block_incoherence(smooth_keys(permute_tokens(k, perm)), 16).amax(-1)[0].double()
    torch.testing.assert_close(stats.worst["q_incoherence_max"], expected_q)
    torch.testing.assert_close(stats.worst["k_incoherence_max"], expected_k)
    assert watch.full_precision_calls == {DIRECT_CALLS: 1}
    assert f"{DIRECT_CALLS}: 1 call(s) at qk_bits=16, nothing quantized" in watch.summary()


def test_an_empty_watch_says_why_and_bad_options_are_refused():
    with watch_qk_outliers() as watch:
        pass
    assert "no paro attention call ran inside the block" in watch.summary() and watch.report() == {}
    with pytest.raises(ValueError, match="threshold must be > 0"):
        with watch_qk_outliers(threshold=0):
            pass
    with pytest.raises(ValueError, match="max_elements must be a positive int"):
        with watch_qk_outliers(max_elements=1.5):
            pass
    assert ops.ACTIVE_QK_WATCHES == ()
