"""benchmarks/calibrate_720p.py --tiny (the CPU mode of the calibrate-720p spec): it runs both sites, writes its
results, and its structured inputs and plan sizes are what it says."""
import json

import torch

from paro_compile.grid import TokenGrid
from tests.bench_helpers import load_benchmark

bench = load_benchmark("calibrate_720p")


def test_tiny_mode_measures_both_sites_and_writes_results(tmp_path):
    results = bench.main(["--tiny", "--out", str(tmp_path)])
    rows = results["rows"]
    assert [(r["site"].split(" ")[0], r["density"]) for r in rows] == [
        ("wan2.1-720p", 0.2), ("wan2.1-720p", 0.3), ("hunyuanvideo-720p", 0.2), ("hunyuanvideo-720p", 0.3)]
    for row in rows:
        assert row["update_s"] > 0 and row["first_call_s"] > 0 and row["meets_targets"] is None  # no GPU: no verdict
        assert row["achieved_density"] >= row["density"] - 0.01
        assert row["csr_gib_model_2b"] == 2 * row["csr_gib_model_1b"] > 0
    wan, hunyuan = rows[0], rows[2]
    assert wan["shape"] == [1, 2, 120, 128] and hunyuan["shape"] == [1, 2, 128, 128] and hunyuan["layers"] == 60
    written = json.loads((tmp_path / "calibrate_720p.json").read_text())
    assert written["stamp"]["command"].endswith("--tiny --out " + str(tmp_path)) and len(written["rows"]) == 4
    assert (tmp_path / "calibrate_720p.md").read_text().count("\n| ") >= 5


def test_full_size_sites_are_the_720p_shapes():
    wan, hunyuan = bench.SITES
    assert (wan.heads, wan.head_dim, wan.grid.num_tokens, wan.layers) == (40, 128, 75600, 40)
    assert (wan.grid.frames, wan.grid.height, wan.grid.width) == (21, 45, 80)
    assert (hunyuan.heads, hunyuan.grid.visual_tokens, hunyuan.grid.text_position, hunyuan.layers) == (
        24, 118800, "suffix", 60)


def test_structured_inputs_make_local_heads_and_plan_sizes_scale_with_layers():
    grid = TokenGrid(frames=2, height=4, width=8, text_tokens=4, text_position="suffix")
    q, k = bench.structured_qk(grid, 3, 64, torch.device("cpu"), torch.float64, noise=0.0)
    assert q.shape == k.shape == (1, 3, 68, 64)
    scores = torch.softmax(q[0] @ k[0].transpose(-1, -2), -1)
    visual = grid.visual_slice
    # Without noise every visual token attends most to itself (scores −|x_i − x_j|² + a row constant) and hardly to
    # the far-away text tokens.
    assert torch.equal(scores[:, visual, visual].argmax(-1), torch.arange(64).expand(3, -1))
    assert float(scores[:, visual, grid.text_slice].sum(-1).max()) < 1e-3
    masks = torch.zeros(1, 3, 5, 5, dtype=torch.bool)
    masks[..., torch.arange(5), torch.arange(5)] = True
    one, ten = bench.plan_sizes(masks, 16, 1), bench.plan_sizes(masks, 16, 10)
    assert ten["csr_gib_model_1b"] == 10 * one["csr_gib_model_1b"]
    assert one["file_mib_model_1b"] * 2**20 == (3 * 25 + 7) // 8  # bit-packed: one bit per block
