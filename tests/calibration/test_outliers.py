"""Q/K outliers at calibration: block incoherence and the INT8 error it implies per site and head, flagged with the
suggested fix; clean inputs are not flagged."""
import math

import pytest
import torch

from paro_compile.calibration import CalibrationOptionError, CalibrationOptions, calibrate, calibrate_site
from paro_compile.calibration.outliers import OutlierStatistics, block_incoherence, fake_quantize
from paro_compile.calibration.summary import calibration_summary
from paro_compile.grid import TokenGrid
from paro_compile.kernels.reference import quantize_blockwise
from tests.calibration.test_skipped_sites import Site

GRID_1024 = TokenGrid(frames=4, height=16, width=16)


def gaussian_qkv(seed=0, heads=2, tokens=GRID_1024.num_tokens, dim=64):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, heads, tokens, dim, generator=gen) for _ in range(3))


def outlier_report(q, k, v, threshold=0.05, block=64):
    stats = OutlierStatistics(q.shape[1], block, threshold)
    stats.update(q, k, v, scale=1 / math.sqrt(q.shape[-1]), max_elements=2**22)
    return stats.report()


def test_block_incoherence_and_fake_quantization_follow_the_kernel_numerics():
    x = torch.ones(1, 1, 40, 4)
    x[0, 0, 3, 1] = 9.0  # one large entry in the first 16-token block
    psi = block_incoherence(x, 16)
    assert psi.shape == (1, 1, 3)
    assert psi[0, 0, 0] == pytest.approx(9.0 / ((63 + 9) / 64)) and psi[0, 0, 1:].tolist() == [1.0, 1.0]
    q, _, _ = gaussian_qkv(heads=1, tokens=100)
    values, scale = quantize_blockwise(q, 64, 8)
    torch.testing.assert_close(fake_quantize(q, 64), values * scale.repeat_interleave(64, -1)[..., :100, None])


def test_clean_inputs_are_not_flagged():
    report = outlier_report(*gaussian_qkv())
    assert not report["flagged"] and report["flagged_heads"] == [] and "suggestion" not in report
    assert max(report["int8_error"]) < 0.03 and max(report["q_incoherence_max"]) < 10
    assert report["calls"] == 1 and len(report["int8_error"]) == 2


def test_one_query_token_x100_is_flagged_as_a_q_outlier_with_qk_bits_16():
    q, k, v = gaussian_qkv()
    q[:, :, 100] *= 100
    report = outlier_report(q, k, v)
    assert report["flagged"] and report["flagged_heads"] == [0, 1]
    assert min(report["q_incoherence_max"]) > 50 and max(report["k_incoherence_max"]) < 10
    assert min(report["int8_error_q_only"]) > 0.3 and min(report["int8_error"]) > 0.3
    assert report["suggested_qk_bits"] == 16 and "suggested_block_size" not in report
    assert "from Q outliers" in report["summary"] and "use qk_bits=16 for this site" in report["summary"]


def test_one_key_channel_x100_is_flagged_as_a_k_outlier():
    q, k, v = gaussian_qkv()
    k[..., 5] *= 100  # zero-mean channel: smoothing does not remove it
    report = outlier_report(q, k, v)
    assert report["flagged"] and min(report["k_incoherence_max"]) > 50
    assert min(report["int8_error_k_only"]) > 0.15 and max(report["int8_error_q_only"]) < 0.05
    assert "from K outliers" in report["summary"] and "qk_bits=16" in report["suggestion"]
    # Finer token groups do nothing against a channel outlier: every group holds the channel.
    assert min(report["int8_error_fine"]) > 0.15 and "block_size=16 still gives" in report["suggestion"]


def test_finer_groups_are_suggested_when_they_bring_the_error_under_the_threshold():
    q, k, v = gaussian_qkv()
    k[..., 0] = 0
    q[:, :, 100, 0] = 30.0  # a moderate outlier in a channel no key reads: it only coarsens its block's step
    report = outlier_report(q, k, v)
    assert report["flagged"] and report["suggested_block_size"] == 16
    assert max(report["int8_error_fine"]) <= 0.05 < min(report["int8_error"])
    assert report["suggestion"].startswith("finer quantization groups: block_size=16 brings it to")
    assert outlier_report(q, k, v, threshold=0.1)["flagged"] is False  # the threshold is the option's value


def test_calibration_records_outliers_per_site_and_the_summary_names_the_fix():
    q, k, v = gaussian_qkv()
    q[:, :, 7] *= 100

    class TwoSites(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.clean, self.spiky = Site(), Site()

        def forward(self, q, q_spiky, k, v):
            return self.clean(q, k, v) + self.spiky(q_spiky, k, v)

    clean_q = gaussian_qkv(seed=1)[0]
    plan = calibrate(TwoSites(), [((clean_q, q, k, v), {})], density=0.5, block_size=16, grid=GRID_1024,
                     use_layout_pass=False, progress=False)
    clean, spiky = plan.sites["clean#0"].stats["qk_outliers"], plan.sites["spiky#0"].stats["qk_outliers"]
    assert not clean["flagged"] and spiky["flagged"] and spiky["block_size"] == 16
    summary = calibration_summary(plan)
    assert "Q/K outliers at 1 site(s)" in summary and f"spiky#0: {spiky['summary']}" in summary
    assert "clean#0:" not in summary.split("Q/K outliers", 1)[1]


def test_non_contiguous_inputs_measure_like_contiguous_ones():
    q, k, v = gaussian_qkv()
    q[:, :, 100] *= 100
    as_strided = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)]  # [B, N, H, D] memory, as diffusers
    assert not as_strided[0].is_contiguous()
    assert outlier_report(*as_strided) == outlier_report(q, k, v)


def test_outlier_measurement_can_be_switched_off_and_validates_its_threshold():
    q, k, _ = gaussian_qkv()
    site = calibrate_site(q, k, GRID_1024, qk_outlier_error=None)
    assert "qk_outliers" not in site.stats
    assert "qk_outliers" in calibrate_site(q, k, GRID_1024).stats  # on by default, v or not
    with pytest.raises(CalibrationOptionError, match="qk_outlier_error must be > 0"):
        CalibrationOptions(qk_outlier_error=0.0)
