"""`benchmarks/bench_cp_model.py`: the whole Wan transformer under diffusers' Ulysses against one GPU."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_cp_model  # noqa: E402


def test_variants_parse_and_bad_ones_are_refused():
    assert bench_cp_model.parse_variant("paro-0.2+overlap") == ("paro-0.2", True)
    assert bench_cp_model.parse_variant("compile-cudnn") == ("compile-cudnn", False)
    for bad in ("paro-0.2+fp8", "compile-flash", "paro-0.2+cg", "eager"):
        with pytest.raises(ValueError):
            bench_cp_model.parse_variant(bad)
    with pytest.raises(SystemExit):
        bench_cp_model.parse_args(["--variants", "paro-0.2+comp", "--out", "unused"])


def test_combine_takes_the_slowest_rank_and_ratios_against_one_gpu():
    one = [{"variant": "paro-0.2", "gpus": 1, "median_ms": 100.0, "first_call_s": 3.0},
           {"variant": "compile-cudnn", "gpus": 1, "median_ms": 300.0, "first_call_s": 2.0}]
    several = [{"variant": "paro-0.2", "gpus": 2, "median_ms": ms, "first_call_s": 4.0, "rel_l2_vs_one_gpu": err}
               for ms, err in ((50.0, 1e-3), (55.0, 2e-3))]
    several += [{"variant": "paro-0.2+overlap", "gpus": 2, "median_ms": 52.0, "first_call_s": 4.0,
                 "rel_l2_vs_one_gpu": 1e-3},
                {"variant": "paro-0.2+overlap", "gpus": 2, "error": "RuntimeError: boom"}]
    rows = {(r["variant"], r["gpus"]): r for r in bench_cp_model.combine([one + several[:1] + several[2:3],
                                                                         one + several[1:2] + several[3:]], 2)}
    paro2 = rows[("paro-0.2", 2)]
    assert paro2["median_ms"] == 55.0 and paro2["rel_l2_vs_one_gpu"] == 2e-3
    assert paro2["x_one_gpu_paro"] == pytest.approx(100 / 55) == paro2["x_same_variant_one_gpu"]
    assert "median_ms" not in rows[("paro-0.2+overlap", 2)] and "boom" in rows[("paro-0.2+overlap", 2)]["error"]
    assert rows[("paro-0.2", 1)]["median_ms"] == 100.0


@pytest.mark.slow
def test_runs_on_two_cpu_processes_and_matches_one_process(tmp_path):
    pytest.importorskip("diffusers")
    results = bench_cp_model.main(["--world", "2", "--tiny", "--device", "cpu", "--variants", "paro-0.5",
                                   "--iters", "1", "--out", str(tmp_path)])
    rows = {(r["variant"], r["gpus"]): r for r in results["rows"]}
    assert set(rows) == {("paro-0.5", 1), ("paro-0.5", 2)}, results["rows"]
    several = rows[("paro-0.5", 2)]
    assert "error" not in several, several
    assert several["graph_breaks"] == 0 and several["sites_lowered"] == "4/4"
    assert several["heads_per_site"] == [1]  # the tiny model's 2 heads, one per rank
    assert several["rel_l2_vs_one_gpu"] < 2e-2  # quantized numerics; the GEMMs see N/2 tokens
    assert (tmp_path / "cp_wan720_model.md").exists()
