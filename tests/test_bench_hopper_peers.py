"""The Hopper-kernel benchmark's peer plumbing on the CPU: FlashAttention-4's block-sparse lists and the summary."""
from __future__ import annotations

import torch

from bench_helpers import load_benchmark

hk = load_benchmark("hopper_kernel")


def test_block_sparse_lists_hold_exactly_the_kept_blocks():
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(3, 5, 7, generator=gen) < 0.4
    mask[1, 2] = False  # a query block that keeps nothing
    mask[2, 4] = True  # one that keeps everything
    lists = hk.block_sparse_lists(mask, batch=2)
    assert lists["full_block_cnt"].shape == (2, 3, 5) and lists["full_block_idx"].shape == (2, 3, 5, 7)
    assert all(t.dtype == torch.int32 and t.is_contiguous() for t in lists.values())
    assert int(lists["mask_block_cnt"].abs().sum()) == 0  # nothing goes through a mask_mod
    for b in range(2):
        for h in range(3):
            for m in range(5):
                count = int(lists["full_block_cnt"][b, h, m])
                kept = lists["full_block_idx"][b, h, m, :count].tolist()
                assert kept == torch.nonzero(mask[h, m]).flatten().tolist()  # ascending, no repeats, no others


def test_summary_compares_ours_with_the_fastest_peer():
    rows = [
        {"shape": "s", "density": 1.0, "method": "cudnn", "ms": 10.0},
        {"shape": "s", "density": 1.0, "method": "sage", "ms": 9.0},
        {"shape": "s", "density": 1.0, "method": "fa4", "ms": 8.0},
        {"shape": "s", "density": 1.0, "method": "triton", "ms": 12.0},
        {"shape": "s", "density": 1.0, "method": "triton_lazy", "ms": 11.0},
        {"shape": "s", "density": 0.2, "method": "triton", "ms": 3.0},
        {"shape": "s", "density": 0.2, "method": "flex", "ms": 6.0},
        {"shape": "s", "density": 0.2, "method": "fa4_128", "ms": 4.0},
    ]
    summary = {row["density"]: row for row in hk._summary(rows)}
    assert summary[1.0]["best_ours/best_peer"] == round(11.0 / 8.0, 3)
    assert summary[1.0]["triton_lazy/triton"] == round(11.0 / 12.0, 3)
    # Sparse rows are judged against the sparse peers only (a dense peer does more work).
    assert summary[0.2]["best_ours/best_peer"] == round(3.0 / 4.0, 3)
    assert summary[0.2]["sage_dense_ms"] == 9.0 and summary[0.2]["fa4_ms"] is None


def test_missing_peers_say_why():
    fa4, why = hk.import_fa4()
    if fa4 is None:
        assert why and ":" in why


def test_exp2_under_pv_counts_the_softmax_that_overlaps_the_pv_wgmma():
    # Wait right after the issue (the exp2s follow it): nothing overlaps.
    hoisted = ["IGMMA.64x64x32.S8.S8 R24", "QGMMA.64x64x32.F32.E4M3.E4M3 R56", "WARPGROUP.DEPBAR.LE gsb0, 0x1",
               "FMNMX R1", "WARPGROUP.DEPBAR.LE gsb0, 0x0", "MUFU.EX2 R2", "MUFU.EX2 R3", "BRA L"]
    assert hk.exp2_under_pv(hoisted) == 0
    # Wait at the top of the next step: every exp2 after the issue, round the back edge, counts.
    deferred = ["WARPGROUP.DEPBAR.LE gsb0, 0x0", "FMUL R56", "IGMMA.64x64x32.S8.S8 R24", "MUFU.EX2 R0",
                "QGMMA.64x64x32.F32.E4M3.E4M3 R56", "WARPGROUP.DEPBAR.LE gsb0, 0x1", "MUFU.EX2 R2", "MUFU.EX2 R3",
                "BRA L"]
    assert hk.exp2_under_pv(deferred) == 2
    assert hk.exp2_under_pv(["IGMMA.64x64x32.S8.S8 R24", "MUFU.EX2 R1"]) == 0  # no P·V wgmma in the loop


def test_configs_for_times_the_default_first_and_no_config_twice():
    from paro_compile.kernels import attention_hopper as AH

    for d in (64, 128):
        configs = hk.configs_for(d)
        assert configs[0] == {}
        effective = [tuple(sorted(dict(AH.default_config(d, "fp8"), **cfg).items())) for cfg in configs]
        assert len(set(effective)) == len(effective), d
    assert {"consumer_regs": 232, "maxnreg": 168, "stages": 3} in hk.configs_for(64)
    assert {"consumer_regs": 232, "maxnreg": 168, "stages": 3} not in hk.configs_for(128)
