"""Why ring attention does not take PARO orders: how many ring shards one PARO block's tokens lie in.

Ring attention (diffusers' ``ring_degree``) gives rank r the tokens [r·N/U, (r+1)·N/U) of the model's order for every
head, and attends them against one such KV chunk per step. A PARO order moves each head's tokens across the whole
sequence, so the 64 tokens of one PARO block lie in several shards: a kept (query block, KV block) tile is then
computed in pieces by every (rank, step) pair that holds some of its rows and some of its columns, each piece a full
tile of work on a partly empty tile. The work over all ranks and steps, relative to one process, is the mean over kept
tiles of shards(query block) · shards(KV block), here over all tiles (a dense mask): the squared mean; with the
model's order it is ~1. CPU only (index arithmetic).

    python benchmarks/ring_fragmentation.py --out OUT
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def shards_per_block(perm: torch.Tensor, world: int, block: int) -> torch.Tensor:
    """[nb] number of ring shards (contiguous model-order chunks of N/U tokens) the tokens of each PARO block lie in."""
    n = perm.numel()
    shard = (perm * world) // n  # shard of the model token at every PARO position
    pad = (-n) % block
    if pad:
        shard = torch.cat([shard, shard[-1:].expand(pad)])
    blocks = shard.view(-1, block)
    return torch.stack([(blocks == s).any(-1) for s in range(world)]).sum(0)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", default="21,45,80", help="frames,height,width (Wan2.1 720p: 21,45,80)")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--worlds", default="2,4,8")
    ap.add_argument("--out", required=True)
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from paro_compile.grid import TokenGrid, candidate_orders, order_permutation

    frames, height, width = (int(x) for x in args.grid.split(","))
    grid = TokenGrid(frames=frames, height=height, width=width)
    rows = []
    for world in (int(w) for w in args.worlds.split(",")):
        for order in candidate_orders(grid):
            shards = shards_per_block(order_permutation(grid, order), world, args.block).double()
            rows.append({"ring_degree": world, "order": order, "mean_shards_per_block": float(shards.mean()),
                         "max_shards_per_block": int(shards.max()),
                         "tile_work_vs_one_process": float(shards.mean() ** 2)})
    results = {"grid": grid.to_dict(), "block": args.block, "rows": rows}
    harness.write_results(Path(args.out) / "ring_fragmentation.json", results, harness.stamp(__file__, argv),
                          title=f"PARO blocks across ring shards ({args.grid} grid, {args.block}-token blocks)")
    for row in rows:
        print(row)
    return results


if __name__ == "__main__":
    main()
