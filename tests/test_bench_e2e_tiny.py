"""CI smoke runs of benchmarks/bench_e2e.py --tiny (CPU, tiny CogVideoX / Wan / HunyuanVideo configs, reference kernels)
and its parts: variant names, run order, depth and extrapolation, synthetic plans."""
import json
import math

import pytest
import torch

from bench_helpers import load_benchmark
from tests.conftest import CPU_ROWWISE_FP8

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


# ---------------------------------------------------------------------------------------------------------------------
# 720p video models (Wan2.1, HunyuanVideo), tiny on the CPU
# ---------------------------------------------------------------------------------------------------------------------
def test_bench_e2e_tiny_video_models(tmp_path):
    """Wan and HunyuanVideo through paro: the report's lowered / fallback counts per variant, a plan covering every
    self-attention site, and FP8 variants refused on the CPU with the reason. Wan: self-attention lowered with the plan,
    the text cross-attention dense on the op (the default) or on SDPA with its reason (--cross-attention sdpa).
    HunyuanVideo: the joint sites lowered with their key-padding mask; every site left on SDPA names its mask (the token
    refiner's is changed in place, so it is not provably padding)."""
    module = load_benchmark("bench_e2e")
    results = module.main(["--tiny", "--model", "video", "--variants", "paro-0.5,eager+fp8", "--iters", "1",
                           "--out", str(tmp_path)])
    rows = {(r["model"], r["variant"]): r for r in results["rows"]}
    assert set(rows) == {(m, v) for m in ("wan", "hunyuan") for v in ("paro-0.5", "eager+fp8")}, results["rows"]
    wan, hunyuan = rows["wan", "paro-0.5"], rows["hunyuan", "paro-0.5"]
    for r in (wan, hunyuan):
        assert "error" not in r, r.get("error")
        assert r["output_finite"] and r["graph_breaks"] == 0 and r["batch"] == 1
        assert r["lowered_count"] + r["fallback_count"] == r["sites"]
        assert r["fallback_count"] == sum(r["fallback_reasons"].values())
        assert r["paro_passes_s"] > 0 and r["inductor_compile_fx_s"] > 0 and r["dynamo_s"] is not None
        assert r["full_depth_ms_extrapolated"] is None  # tiny configs are not extrapolated
        assert r["per_block_ms"] == pytest.approx(r["median_ms"] / sum(r["depth"]))
    assert wan["plan_sites_sparse"] == 2 and wan["plan_sites_dense"] == 0 and wan["sites_not_self_attention"] == 2
    assert wan["sites_lowered"] == "4/4" and wan["cross_attention_lowered"] == 2 and wan["permutation"] != ["identity"]
    assert hunyuan["plan_sites_sparse"] == 2 and hunyuan["plan_sites_dense"] == 1 and hunyuan["sites"] == 3
    assert hunyuan["lowered_count"] == 2 and hunyuan["key_padding_lowered"] == 2
    assert all("attn_mask" in reason for reason in hunyuan["fallback_reasons"]) and hunyuan["fallback_count"] == 1
    for m in ("wan", "hunyuan"):
        assert rows[m, "eager+fp8"]["skipped"].startswith("FP8 linears unavailable: no CUDA device")
    md = (tmp_path / "results.md").read_text()
    assert "| hunyuan | paro-0.5 | 1 |" in md and "tiny configuration" in md


def test_bench_e2e_tiny_wan_cross_attention_on_sdpa(tmp_path):
    module = load_benchmark("bench_e2e")
    results = module.main(["--tiny", "--model", "wan", "--variants", "paro-0.5", "--cross-attention", "sdpa",
                           "--iters", "1", "--out", str(tmp_path)])
    (wan,) = results["rows"]
    assert "error" not in wan, wan.get("error")
    assert wan["sites_lowered"] == "2/4" and wan["cross_attention_lowered"] == 0
    assert [r for r in wan["fallback_reasons"] if r.startswith("cross-attention")] == list(wan["fallback_reasons"])


def test_bench_e2e_batches_and_ratios_per_batch(tmp_path):
    module = load_benchmark("bench_e2e")
    results = module.main(["--tiny", "--model", "wan", "--batch", "1,2", "--variants", "eager", "--iters", "1",
                           "--out", str(tmp_path)])
    rows = results["rows"]
    assert [(r["variant"], r["batch"]) for r in rows] == [("eager", 1), ("eager", 2)]
    assert all(r["speedup_vs_eager"] == 1.0 and r["output_finite"] for r in rows)


@pytest.fixture
def torchao_on_cpu(monkeypatch):
    pytest.importorskip("torchao", minversion="0.18")
    import torchao.quantization.quant_api as quant_api
    from paro_compile import fp8

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    monkeypatch.setattr(fp8, "fp8_unavailable_reason", lambda model=None: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)


@CPU_ROWWISE_FP8
def test_fp8_variants_run_after_the_plain_ones_on_one_quantized_model(tmp_path, torchao_on_cpu, monkeypatch):
    module = load_benchmark("bench_e2e")
    monkeypatch.setattr(module, "default_dtype", lambda device: torch.bfloat16)  # row-wise FP8 takes bf16 weights
    results = module.main(["--tiny", "--model", "wan", "--variants", "eager+fp8,eager", "--iters", "1",
                           "--out", str(tmp_path)])
    rows = results["rows"]
    assert [r["variant"] for r in rows] == ["eager", "eager+fp8"]
    fp8_row = rows[1]
    assert "error" not in fp8_row and fp8_row["output_finite"], fp8_row.get("error")
    assert fp8_row["fp8_quantize_s"] > 0 and fp8_row["fp8_linears"].startswith("20 quantized")
    assert "torchao quantization" in module.breakdown_line(fp8_row)


def test_torchao_inductor_settings_are_restored(torchao_on_cpu):
    module = load_benchmark("bench_e2e")
    before = torch._inductor.config.coordinate_descent_tuning
    with module.torchao_inductor_settings():
        assert torch._inductor.config.coordinate_descent_tuning
    assert torch._inductor.config.coordinate_descent_tuning == before


def test_variant_names_with_fp8_and_run_order():
    module = load_benchmark("bench_e2e")
    v = module.Variant.parse("paro-0.2+comp+fp8cd+cg")
    assert (v.base, v.density, v.compensate, v.fp8, v.graphs) == ("paro-0.2", 0.2, True, "fp8cd", True)
    assert module.Variant.parse("compile-efficient+fp8").sdpa_only and module.Variant.parse("eager+fp8").fp8 == "fp8"
    for bad in ("eager+cg", "paro-0.2+fp8+comp", "compile+fp16", "paro-fast"):
        with pytest.raises(ValueError):
            module.Variant.parse(bad)
    with pytest.raises(SystemExit):
        module.parse_args(["--out", "x", "--variants", "paro-0.2+fp8+comp"])
    assert module.order_runs(["paro-0.2+fp8", "compile", "paro-0.2"], [1, 2]) == [
        ("compile", 1), ("compile", 2), ("paro-0.2", 1), ("paro-0.2", 2), ("paro-0.2+fp8", 1), ("paro-0.2+fp8", 2)]
    # FlashAttention-4 stays SDPA's flash backend once on: its variants run last in their group.
    assert module.Variant.parse("compile-fa4+fp8").sdpa_only
    assert module.order_runs(["compile-fa4", "compile-flash", "paro-0.2", "compile-fa4+fp8", "paro-0.2+fp8"], [1]) == [
        ("compile-flash", 1), ("paro-0.2", 1), ("compile-fa4", 1), ("paro-0.2+fp8", 1), ("compile-fa4+fp8", 1)]


def test_depth_parsing_and_full_depth_extrapolation():
    module = load_benchmark("bench_e2e")
    args = module.parse_args(["--out", "x", "--model", "hunyuan", "--layers", "2"])
    assert module.model_depth("hunyuan", args) == (2, 4)
    assert module.full_depth_factor("hunyuan", (2, 4)) == 10 and module.full_depth_factor("hunyuan", (1, 1)) is None
    assert module.full_depth_factor("wan", (2,)) == 20
    assert module.model_depth("wan", module.parse_args(["--out", "x", "--model", "wan"])) == (40,)
    for bad in (["--model", "wan", "--layers", "2,4"], ["--model", "hunyuan", "--layers", "a"], ["--batch", "0"]):
        with pytest.raises(SystemExit):
            module.parse_args(["--out", "x", *bad])


def test_synthetic_plan_keeps_local_blocks_and_covers_other_self_attention_densely():
    from paro_compile.grid import TokenGrid

    module = load_benchmark("bench_e2e")
    grid = TokenGrid(frames=4, height=8, width=16, text_tokens=8, text_position="suffix")  # 520 tokens, 9 blocks of 64
    plan = module.synthetic_plan(["a#0"], 2, grid, 0.5, 64, seed=0, local_blocks=1, dense_sites={"refiner#0": (2, 8)})
    masks = plan.sites["a#0"].block_masks[0]
    nb = masks.shape[-1]
    band = (torch.arange(nb)[:, None] - torch.arange(nb)[None, :]).abs() <= 1
    assert masks[:, band].all()  # diagonal neighbours kept before any random block
    assert masks[:, -1, :].all() and masks[:, :, -1].all()  # the text suffix's rows and columns
    assert abs(float(masks.float().mean()) - 0.5) < 0.05
    refiner = plan.sites["refiner#0"]
    assert refiner.perm is None and refiner.block_masks.all() and refiner.seq_len == 8
    found = [module.FoundSite("blocks.0.attn1#0", 2, 520, 520, ()), module.FoundSite("refiner.0.attn#0", 2, 8, 8, ())]
    ids = [s.site_id for s in module.extrapolate_site_ids(found, {"blocks": 3})]
    assert ids == ["blocks.0.attn1#0", "blocks.1.attn1#0", "blocks.2.attn1#0", "refiner.0.attn#0"]


def test_a_flash_attention_4_variant_that_never_ran_it_is_refused():
    module = load_benchmark("bench_e2e")
    before = module.FA4_CALLS["forward"]
    with pytest.raises(RuntimeError, match="never ran"):
        module.check_fa4_ran(before)
    module.FA4_CALLS["forward"] += 1
    try:
        module.check_fa4_ran(before)
    finally:
        module.FA4_CALLS["forward"] -= 1
