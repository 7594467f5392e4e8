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
