"""CI smoke run of benchmarks/quality.py --tiny and benchmarks/train_video_dit.py --tiny (CPU, seconds)."""
import json
import math

import pytest

from bench_helpers import load_benchmark

pytest.importorskip("diffusers")


def test_train_tiny(tmp_path):
    summary = load_benchmark("train_video_dit").main(["--tiny", "--out", str(tmp_path)])
    assert summary["steps"] == 3
    assert math.isfinite(summary["final_loss_ema"])
    assert summary["sample_stats"]["finite"]
    saved = tmp_path / "toy_cogvideox"
    assert (saved / "config.json").exists() and (saved / "diffusion_pytorch_model.safetensors").exists()
    for name in ("train_summary.json", "train_summary.md", "samples.png", "attention_orders.png"):
        assert (tmp_path / name).exists(), name
    written = json.loads((tmp_path / "train_summary.json").read_text())
    assert [row["step"] for row in written["log"]] == [1, 2, 3]
    orders = written["attention_maps"]
    assert len(orders["heads"]) == 2 and all(h["best_order"] for h in orders["heads"])
    from paro_compile.toy.cogvideox import load_toy_cogvideox

    assert load_toy_cogvideox(path=saved).config.num_layers == 2


def test_quality_tiny(tmp_path):
    results = load_benchmark("quality").main(["--tiny", "--out", str(tmp_path), "--compensate", "both"])
    for name in ("results.json", "results.md", "samples.png"):
        assert (tmp_path / name).exists(), name
    assert list((tmp_path / "plans").glob("*.paro.safetensors"))
    done = [v for v in results["variants"] if "psnr" in v]
    assert {v["kind"] for v in done} == {"paro", "natural", "dynamic"}, [v.get("error") for v in results["variants"]]
    for v in done:
        for key in ("psnr", "ssim", "cosine", "attn_rel_l2_mean"):
            assert math.isfinite(v[key]), (v["name"], key)
        assert v["finite"]
    compiled = [v for v in done if v.get("exec") == "compile"]
    assert compiled and compiled[0]["sites_lowered"] == "2/2"
    by_name = {v["name"]: v for v in done}
    plain, comp = by_name["paro d=0.5 int8/fp8"], by_name["paro d=0.5 int8/fp8 +comp"]
    assert comp["compensate"] and not plain["compensate"]
    assert comp["attn_rel_l2_mean"] != plain["attn_rel_l2_mean"]  # the flag reached the op
    assert 0.5 <= plain["avg_density"] <= 1.0
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["per_layer"] and written["stamp"]["command"].startswith("python benchmarks/quality.py --tiny")
    assert "| paro d=0.5 int8/fp8 +comp |" in (tmp_path / "results.md").read_text()


def test_quality_tiny_calibration_options(tmp_path):
    quality = load_benchmark("quality")
    results = quality.main(["--tiny", "--out", str(tmp_path), "--variants", "paro", "--calib-prompts", "3",
                            "--allocation", "site"])
    config = results["config"]
    assert config["allocation"] == "site"
    assert config["calib_prompts"] == [quality.toy_videos.prompt_name(p) for p in quality.CALIB_PROMPTS[:3]]
    assert not set(config["calib_prompts"]) & set(config["eval_prompts"])
    done = [v for v in results["variants"] if "psnr" in v]
    assert done, [v.get("error") for v in results["variants"]]
    for v in done:  # per-video PSNR, so runs with other seeds can be pooled
        assert len(v["psnr_per_video"]) == len(config["eval_prompts"])
        assert v["psnr"] == pytest.approx(sum(v["psnr_per_video"]) / len(v["psnr_per_video"]))
    with pytest.raises(SystemExit):
        quality.parse_args(["--out", str(tmp_path), "--calib-prompts", str(len(quality.CALIB_PROMPTS) + 1)])


def test_quality_tiny_pooled_seeds(tmp_path):
    """--seeds runs every seed into its own folder and pools the variants over all their videos."""
    pooled = load_benchmark("quality").main(["--tiny", "--out", str(tmp_path), "--seeds", "5,6"])
    assert pooled["seeds"] == [5, 6]
    runs = {seed: json.loads((tmp_path / f"seed_{seed}" / "results.json").read_text()) for seed in (5, 6)}
    assert [r["config"]["seed"] for r in runs.values()] == [5, 6]
    assert (tmp_path / "pooled.json").exists() and "PSNR dB" in (tmp_path / "pooled.md").read_text()
    assert pooled["variants"]
    for v in pooled["variants"]:
        per_seed = [next(x for x in runs[s]["variants"] if x["name"] == v["name"]) for s in (5, 6)]
        videos = per_seed[0]["psnr_per_video"] + per_seed[1]["psnr_per_video"]
        assert v["videos"] == len(videos)
        assert v["psnr"] == pytest.approx(sum(videos) / len(videos))
        assert v["cosine"] == pytest.approx((per_seed[0]["cosine"] + per_seed[1]["cosine"]) / 2)
        assert v["psnr_sem"] >= 0 and set(v["per_seed"]) == {"5", "6"}
    names = {v["name"] for v in pooled["variants"]}
    if {"paro d=0.5 int8/fp8", "natural d=0.5 int8/fp8"} <= names:
        assert "paro_beats_natural_d0.5" in pooled["targets"]


def test_quality_sweep_tiny(tmp_path):
    load_benchmark("quality_sweep").main(["--tiny", "--out", str(tmp_path)])
    for name in ("sweep.json", "sweep.md"):
        assert (tmp_path / name).exists(), name
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert all(math.isfinite(v["psnr"]) for v in data["variants"] if "psnr" in v)
    assert any("dense_steps" in v["name"] for v in data["variants"])
    # The derived plans must equal a direct calibrate() call on the same inputs.
    assert all(data["check_direct"].values()), data["check_direct"]


def test_quality_tiny_fp8_linears_variant(tmp_path):
    """The fp8-linears rows compare the same plan with and without FP8 linears; on a machine without an FP8 GPU they
    are skipped with the reason, and the plan's row without FP8 still runs."""
    quality = load_benchmark("quality")
    results = quality.main(["--tiny", "--out", str(tmp_path), "--variants", "paro,fp8-linears"])
    by_name = {v["name"]: v for v in results["variants"]}
    assert set(by_name) == {"paro d=0.5 int8/fp8", "paro d=0.5 int8/fp8 +fp8-linears", "fp8-linears SDPA"}
    assert "psnr" in by_name["paro d=0.5 int8/fp8"], by_name["paro d=0.5 int8/fp8"].get("error")
    import torch

    for name in ("paro d=0.5 int8/fp8 +fp8-linears", "fp8-linears SDPA"):
        v = by_name[name]
        assert v["fp8_linears"] and "psnr" not in v
        if not torch.cuda.is_available():
            assert v["skipped"].startswith("FP8 linears unavailable: no CUDA device"), v
    targets = quality.quality_targets([dict(name="paro d=0.5 int8/fp8", kind="paro", psnr=20.0),
                                       dict(name="paro d=0.5 int8/fp8 +fp8-linears", kind="paro", psnr=19.2)], [0.5])
    assert targets == {"fp8_linears_cost_le_1dB_paro d=0.5 int8/fp8": True}
    targets = quality.quality_targets([dict(name="paro d=0.5 int8/fp8", kind="paro", psnr=20.0),
                                       dict(name="paro d=0.5 int8/fp8 +fp8-linears", kind="paro", psnr=18.9)], [0.5])
    assert targets == {"fp8_linears_cost_le_1dB_paro d=0.5 int8/fp8": False}
    rows = [dict(name="paro d=0.3 int8/fp8", psnr=20.0), dict(name="paro d=0.3 int8/fp8 +fp8-linears", psnr=18.5)]
    quality.fp8_psnr_cost(rows)
    assert rows[1]["fp8_psnr_cost_db"] == pytest.approx(1.5) and "fp8_psnr_cost_db" not in rows[0]
