"""benchmarks/plan_memory.py: compact plan constants vs padded int32 CSRs (small synthetic sites, CPU)."""
import json

import torch

from paro_compile.kernels.block_mask import BlockMask

from bench_helpers import load_benchmark


def test_compact_constants_are_smaller_and_stand_for_the_same_masks(tmp_path):
    bench = load_benchmark("plan_memory")
    rows = bench.main(["--heads", "2", "--n", "1100", "--blocks", "64,16", "--densities", "0.2",
                       "--layers", "3", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "plan_memory.json").read_text())
    assert written["rows"] == json.loads(json.dumps(rows)) and written["stamp"]["command"].endswith(f"--out {tmp_path}")
    assert "| block | density | masks |" in (tmp_path / "plan_memory.md").read_text()
    assert {(r["block"], r["masks"]) for r in rows} == {(64, "any"), (16, "coherent"), (16, "random")}
    for r in rows:
        assert r["slots"] < r["kv_blocks"] and r["ratio"] > 2.0, r
    coherent, random = (next(r for r in rows if r["block"] == 16 and r["masks"] == kind) for kind in ("coherent", "random"))
    assert coherent["slots"] <= random["slots"]  # coherent neighbours share kept blocks: narrower unions
    for block in (64, 16):
        masks = bench.synthetic_masks("random", 2, 1100, block, 0.2, 2, seed=1)
        constants = BlockMask.from_dense(masks, block, block)
        assert constants.group == (1 if block == 64 else 4)
        assert torch.equal(constants.to_dense(), masks)


def test_model_measurement_counts_the_constants_the_lowering_stores():
    """`measure_model` sizes what `lower.site_constants` builds (the constants the lowering registers and counts in
    ``plan_bytes``, see tests/test_lower.py): an int32 permutation and the compact CSR of every step bucket, times
    the model's sites, against its bf16 weights; "previous" is the same shapes at int64 / int32 widths."""
    from paro_compile.grid import TokenGrid

    bench = load_benchmark("plan_memory")
    grid = TokenGrid(frames=2, height=4, width=6, text_tokens=5, text_position="suffix")
    model = bench.ModelShape("tiny", 2, grid, 3, 1.0e6)
    masks = bench.calibrated_like_masks(grid, 2, 0.3, 2, 16, torch.Generator().manual_seed(0))
    row = bench.measure_model(model, 0.3, 2, block=16, masks=masks)
    stored = BlockMask.from_dense(masks, 16, 16)
    perm_bytes = 2 * grid.num_tokens * 4
    site = perm_bytes + stored.nbytes
    assert row["dtypes"] == {"perm": "int32", "counts": "int16", "indices": "int16", "slot_bits": "int8"}
    assert not row["perm_shared"]  # a small permutation stays per site (`lower.SHARED_PERMUTATION_MIN_BYTES`)
    assert round(row["site_mb"] * 2**20) == site and round(row["perm_mb"] * 2**20) == perm_bytes
    assert abs(row["model_gb"] * 2**30 - 3 * site) < 1e-3 and abs(row["share"] - 3 * site / 2.0e6) < 1e-12
    assert abs(row["folded_share"] - 3 * stored.nbytes / 2.0e6) < 1e-12
    previous = 2 * grid.num_tokens * 8 + stored.counts.numel() * 4 + stored.indices.numel() * 2 + stored.slot_bits.numel()
    assert abs(row["previous_share"] - 3 * previous / 2.0e6) < 1e-12
    # the text rows keep every block (mandatory), so the widest row spans every KV block
    assert row["slots"] == row["kv_blocks"] == row["max_count"]
    one = bench.measure_model(model, 0.3, 1, block=16, masks=masks[:1])
    assert one["step_buckets"] == 1 and one["mask_mb"] < row["mask_mb"]


def test_model_measurement_shares_large_permutations(monkeypatch):
    """From `lower.SHARED_PERMUTATION_MIN_BYTES` per site the model's permutations count as the lowering stores them:
    one table of distinct rows (at most one per candidate order) and int64 row ids per site and head."""
    import paro_compile.passes.lower as lower_module
    from paro_compile.grid import TokenGrid, candidate_orders

    monkeypatch.setattr(lower_module, "SHARED_PERMUTATION_MIN_BYTES", 0)
    bench = load_benchmark("plan_memory")
    grid = TokenGrid(frames=2, height=4, width=6, text_tokens=5, text_position="suffix")
    model = bench.ModelShape("tiny", 2, grid, 3, 1.0e6)
    masks = bench.calibrated_like_masks(grid, 2, 0.3, 1, 16, torch.Generator().manual_seed(0))
    row = bench.measure_model(model, 0.3, 1, block=16, masks=masks, encoding="csr")
    rows = min(len(candidate_orders(grid)), 3 * 2)
    perm_model = rows * grid.num_tokens * 4 + 3 * 2 * 8
    stored = BlockMask.from_dense(masks, 16, 16)
    assert row["perm_shared"] and row["perm_rows"] == rows
    assert round(row["perm_model_mb"] * 2**20) == perm_model
    assert abs(row["share"] - (3 * stored.nbytes + perm_model) / 2.0e6) < 1e-12
    assert abs(row["unshared_perm_share"] - 3 * (2 * grid.num_tokens * 4 + stored.nbytes) / 2.0e6) < 1e-12


def test_model_measurement_counts_the_bitmap_encoding():
    """With the bitmap encoding (what "auto" takes at video sizes, where it saves megabytes per site) the measurement
    counts kept-bit words of every step bucket, whatever the density, with the compact CSR beside it for comparison."""
    from paro_compile.grid import TokenGrid

    bench = load_benchmark("plan_memory")
    grid = TokenGrid(frames=4, height=8, width=16, text_tokens=16, text_position="suffix")
    model = bench.ModelShape("small", 2, grid, 3, 1.0e6)
    masks = bench.calibrated_like_masks(grid, 2, 0.3, 2, 16, torch.Generator().manual_seed(0))
    row = bench.measure_model(model, 0.3, 2, block=16, masks=masks, encoding="bitmap")
    nb = masks.shape[-1]
    bits = 2 * 2 * nb * (-(-nb // 32)) * 4
    perm_bytes = 2 * grid.num_tokens * 4
    assert row["encoding"] == "bitmap" and row["dtypes"] == {"perm": "int32", "kept_bits": "int32"}
    assert round(row["mask_mb"] * 2**20) == bits and round(row["site_mb"] * 2**20) == perm_bytes + bits
    csr = BlockMask.from_dense(masks, 16, 16)
    assert round(row["csr_site_mb"] * 2**20) == perm_bytes + csr.nbytes > perm_bytes + bits
    assert abs(row["csr_share"] - 3 * (perm_bytes + csr.nbytes) / 2.0e6) < 1e-12
    assert row["slots"] == csr.row_width  # the walk the decode rebuilds is the CSR's
    forced = bench.measure_model(model, 0.3, 2, block=16, masks=masks, encoding="csr")
    assert forced["encoding"] == "csr" and forced["share"] == forced["csr_share"] == row["csr_share"]
