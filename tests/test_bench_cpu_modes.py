"""The CPU modes of the GPU benchmarks run and write their stamped results (benchmarks/kernel_variants.py --tiny,
calibrate_cog_site.py --device cpu, bench_fold.py --tiny); the numbers themselves only mean something on a GPU."""
import json
import math

import pytest

from bench_helpers import load_benchmark


def test_kernel_variants_tiny(tmp_path):
    out = tmp_path / "variants.json"
    results = load_benchmark("kernel_variants").main(["--tiny", "--variants", "fp8,bf16", "--densities", "1.0,0.3",
                                                      "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["rows"] == json.loads(json.dumps(results["rows"]))
    ours = [r for r in written["rows"] if r["method"].startswith("ours")]
    assert {(r["variant"], r["density"]) for r in ours} == {(v, d) for v in ("fp8", "bf16") for d in (1.0, 0.3)}
    assert all(math.isfinite(r["ms"]) and r["ms"] > 0 for r in ours)
    # bf16 PV is more accurate than FP8 PV against the same peer
    fp8, bf16 = ([r["rel_l2_vs_peer"] for r in ours if r["variant"] == v and r["density"] == 1.0][0] for v in ("fp8", "bf16"))
    assert bf16 < fp8
    for first_vs_reference in results["tiny_first_vs_reference"].values():
        assert first_vs_reference < 2e-2
    assert "| ours fp8 " in out.with_suffix(".md").read_text()
    assert written["stamp"]["command"].startswith("python benchmarks/kernel_variants.py --tiny")


def test_calibrate_site_on_the_cpu(tmp_path):
    result = load_benchmark("calibrate_cog_site").main(["--device", "cpu", "--heads", "2", "--frames", "2",
                                                        "--height", "4", "--width", "6", "--text", "8", "--repeats", "2",
                                                        "--out", str(tmp_path)])
    assert result["shape"] == [1, 2, 2 * 4 * 6 + 8, 64] and result["orders_evaluated"] == 6
    assert result["update_s"] > 0 and len(result["update_samples_s"]) >= 1
    written = json.loads((tmp_path / "calibrate_cog_site.json").read_text())
    assert written["update_s"] == result["update_s"] and written["stamp"]["gpu"] is None


@pytest.mark.slow
def test_bench_fold_tiny(tmp_path):
    out = tmp_path / "fold.json"
    results = load_benchmark("bench_fold").main(["--tiny", "--iters", "1", "--json", str(out)])
    assert results["identity_sites"] == ["identity"] * 2 and results["identity_gathers"] == results["paro_gathers"] == 0
    assert all(p.startswith("folded") for p in results["paro_sites"])  # both tiny heads take the shared order
    assert len(results["identity_samples_ms"]) == len(results["paro_samples_ms"]) == 1
    written = json.loads(out.read_text())
    assert written["overhead_pct_of_attention"] == results["overhead_pct_of_attention"]
    assert "| paro |" in out.with_suffix(".md").read_text()
