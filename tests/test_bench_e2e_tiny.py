"""CI smoke run of benchmarks/bench_e2e.py --tiny (CPU, tiny CogVideoX config, reference kernels)."""
import json
import math

import pytest

from bench_helpers import load_benchmark

pytest.importorskip("diffusers")


def test_bench_e2e_tiny(tmp_path):
    module = load_benchmark("bench_e2e")
    results = module.main(["--tiny", "--variants", "eager,paro-0.5,paro-0.5+comp", "--iters", "1", "--out", str(tmp_path)])
    for name in ("results.json", "results.md"):
        assert (tmp_path / name).exists(), name
    rows = {r["variant"]: r for r in results["rows"]}
    assert set(rows) == {"eager", "paro-0.5", "paro-0.5+comp"}, results["rows"]
    for r in rows.values():
        assert "error" not in r, r.get("error")
        assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0
        assert r["output_finite"]
    paro = rows["paro-0.5"]
    assert paro["sites_lowered"] == "2/2"
    assert paro["paro_passes_s"] > 0 and paro["inductor_compile_fx_s"] > 0
    assert 0.5 <= paro["achieved_density"] <= 1.0
    assert math.isfinite(paro["speedup_vs_eager"])
    assert rows["paro-0.5+comp"]["sites_lowered"] == "2/2" and rows["paro-0.5+comp"]["density"] == 0.5
    assert rows["paro-0.5+comp"]["compensated_sites"] == 2 and paro["compensated_sites"] == 0
    written = json.loads((tmp_path / "results.json").read_text())
    assert [r["variant"] for r in written["rows"]] == [r["variant"] for r in results["rows"]]
    assert written["stamp"]["command"].startswith("python benchmarks/bench_e2e.py --tiny")
    assert "| paro-0.5+comp |" in (tmp_path / "results.md").read_text()
    # the synthetic plan builder covers every layer and keeps the mandatory blocks
    from paro_compile.grid import TokenGrid

    grid = TokenGrid(frames=2, height=4, width=4, text_tokens=8)
    plan = module.synthetic_plan(["a#0", "b#0"], 3, grid, 0.3, 16, seed=0)
    for site in plan.sites.values():
        assert site.block_masks[0].diagonal(dim1=-2, dim2=-1).all()
        assert site.block_masks[0][:, 0, :].all() and site.block_masks[0][:, :, 0].all()  # text blocks
        assert len(site.orders) == 3


def test_coherent_synthetic_masks_share_kept_blocks_between_neighbours():
    """--coherent draws block scores per 64-token block: the query blocks sharing a 64-row kernel tile keep (almost) the
    same KV blocks, so their union is much narrower than with masks drawn per block, at the same density."""
    from paro_compile.grid import TokenGrid
    from paro_compile.kernels.block_mask import grouped_block_csr

    module = load_benchmark("bench_e2e")
    grid = TokenGrid(frames=4, height=8, width=16, text_tokens=8)  # 520 tokens: 33 blocks of 16
    unions = {}
    for coherent in (False, True):
        plan = module.synthetic_plan(["a#0"], 2, grid, 0.3, 16, seed=1, coherent=coherent)
        masks = plan.sites["a#0"].block_masks[0]
        assert abs(float(masks.float().mean()) - 0.3) < 0.1
        counts, _, _ = grouped_block_csr(masks, 4)
        unions[coherent] = float(counts.float().mean()) / float(masks.sum(-1).float().mean())
    assert unions[True] < 0.75 * unions[False], unions


def test_variant_names_with_cuda_graphs():
    module = load_benchmark("bench_e2e")
    assert module.split_variant("compile-cudnn+cg") == ("compile-cudnn", True)
    assert module.split_variant("paro-0.2+comp") == ("paro-0.2+comp", False)
    assert module.paro_density("paro-0.2+comp+cg") == 0.2 and module.paro_density("paro-0.3+cg") == 0.3
