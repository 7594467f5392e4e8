"""Head load imbalance of calibrated plans over Ulysses ranks, in the model's head order and balanced.

Calibrates the trained toy CogVideoX fixture (4 heads × 6 layers) on a few sampling calls with ``allocation`` "uniform",
"site" and "global", and reports for every site and ``world`` in --worlds the slowest rank's kept blocks over the
mean rank's (worst step bucket), with rank r holding heads [r·H/U, (r+1)·H/U) (the model's order) and with
`paro_compile.parallel.balanced_head_order`. CPU is enough (minutes); the same code runs on a GPU.

    python benchmarks/head_imbalance.py --out OUT
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from quality import CALIB_PROMPTS  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--density", type=float, default=0.3)
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6, help="sampling steps of the calibration videos")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--worlds", default="2,4")
    ap.add_argument("--out", required=True)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import paro_compile
    from paro_compile.parallel import balanced_head_order, head_costs, imbalance
    from paro_compile.toy import cogvideox as toy_cog
    from paro_compile.toy import videos as toy_videos

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = toy_cog.load_toy_cogvideox(device=device, dtype=torch.float32)
    grid = toy_cog.token_grid(model)
    calls: list[dict] = []
    cond = toy_videos.encode_prompts(CALIB_PROMPTS[: args.prompts], int(model.config.text_embed_dim), device=device)
    toy_cog.sample_video(model, cond, steps=args.steps, seed=1,
                         on_call=lambda inputs: calls.append({k: v.clone() if isinstance(v, torch.Tensor) else v
                                                              for k, v in inputs.items()}))
    worlds = [int(w) for w in args.worlds.split(",")]
    rows = []
    for allocation in ("uniform", "site", "global"):
        plan = paro_compile.calibrate(model, calls, density=args.density, block_size=args.block, grid=grid,
                                      step_buckets=2, allocation=allocation, progress=False)
        for world in worlds:
            model_order, balanced = [], []
            for site in plan.sites.values():
                if site.heads % world:
                    continue
                costs = head_costs(site)
                model_order.append(imbalance(costs, range(site.heads), world))
                balanced.append(imbalance(costs, balanced_head_order(costs, world), world))
            rows.append({"allocation": allocation, "ranks": world, "sites": len(model_order),
                         "model_order_mean": statistics.mean(model_order), "model_order_max": max(model_order),
                         "balanced_mean": statistics.mean(balanced), "balanced_max": max(balanced)})
            print(rows[-1], flush=True)
    results = {"grid": grid.to_dict(), "density": args.density, "block": args.block, "calls": len(calls), "rows": rows}
    harness.write_results(Path(args.out) / "head_imbalance.json", results, harness.stamp(__file__, argv),
                          title="Ulysses head imbalance of calibrated toy CogVideoX plans (slowest rank / mean - 1)")
    return results


if __name__ == "__main__":
    main()
