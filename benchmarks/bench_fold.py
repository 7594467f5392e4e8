"""Permutation overhead of PARO on a CogVideoX-5B-shaped attention stack: folded order vs identity order.

Stack: a few real-dimension transformer blocks shaped like CogVideoX-5B (dim 3072, 48 heads × 64,
226 text + 13×30×45 = 17,550 video tokens = 17,776 tokens, batch 2, bf16, random weights; Conv2d patch
embed per frame → flatten/transpose → cat([text, video]) → LayerNorm/QKV/attention/MLP with residuals →
unpatchify). The same dense mask and bits are used in both runs; only the plan's orders differ:

- identity: every head in the model order (no permutation anywhere);
- paro: mixed per-head orders (most heads share one order, folded into the patchify; the rest go to the
  kernel as residual permutations).

Reports the median time per forward of each, and the overhead (paro - identity) as a % of the attention
time (attention time measured as the identity-order forward minus the same stack with attention removed).
Both variants are compiled first and then timed in alternating rounds (`harness.time_calls` each), so clock or
thermal drift during the run affects both alike; a variant's time is the median of its rounds.

GPU: ``python benchmarks/bench_fold.py --json OUT/fold.json``. CPU smoke run: ``python benchmarks/bench_fold.py --tiny``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_qkv, self.to_out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.skip_attention = False

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.to_qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = v if self.skip_attention else F.scaled_dot_product_attention(q, k, v)
        x = x + self.to_out(a.transpose(1, 2).reshape(b, n, c))
        return x + self.mlp(self.norm2(x))


class Stack(nn.Module):
    def __init__(self, dim, heads, depth, channels=16, patch=2, text_dim=4096):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(channels, dim, patch, patch)
        self.text = nn.Linear(text_dim, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.out = nn.Linear(dim, patch * patch * channels)

    def forward(self, latent, text):
        b, f, c, h, w = latent.shape
        p = self.patch
        v = self.proj(latent.reshape(-1, c, h, w)).view(b, f, -1, h // p, w // p).flatten(3).transpose(2, 3).flatten(1, 2)
        x = torch.cat([self.text(text), v], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.out(x[:, text.shape[1]:])
        x = x.reshape(b, f, h // p, w // p, c, p, p).permute(0, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, f, c, h, w)


def plan_for(model, inputs, grid, orders_for_head):
    from paro_compile.config import ParoConfig
    from paro_compile.grid import orders_permutation
    from paro_compile.passes.discover import find_attention_sites
    from paro_compile.plan import Plan, SitePlan

    seen = {}

    def capture(gm, example_inputs, **kwargs):
        seen["sites"] = find_attention_sites(gm, ParoConfig(allow_fp32=True))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=capture)(*inputs)
    torch._dynamo.reset()
    sites = {}
    for s in seen["sites"]:
        heads = int(s.heads)
        orders = [orders_for_head(h) for h in range(heads)]
        nb = (grid.num_tokens + 63) // 64
        sites[s.site_id] = SitePlan(s.site_id, heads, grid.num_tokens, 64, orders_permutation(grid, orders),
                                    torch.ones(1, heads, nb, nb, dtype=torch.bool), orders=orders, grid=grid)
    return Plan(sites)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU (smoke test)")
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10, help="alternating timing rounds")
    parser.add_argument("--json", default=None, help="write the results here (and a markdown table beside it)")
    parser.add_argument("--profile", default=None,
                        help="folder: write a torch.profiler kernel table of 2 calls per variant there")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import paro_compile
    from paro_compile.backend import registered_backend
    from paro_compile.grid import TokenGrid

    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    if args.tiny:
        dim, heads, frames, h, w, text_len, batch, dtype, text_dim = 128, 2, 2, 8, 8, 8, 2, torch.float32, 32
        options = {"allow_fp32": True, "qk_bits": 8, "pv_dtype": "fp8"}
        rounds = min(args.iters, 3)
    else:  # CogVideoX-5B: 13 latent frames of 60×90, patch 2 → 13×30×45 = 17,550 video + 226 text tokens
        dim, heads, frames, h, w, text_len, batch, dtype, text_dim = 3072, 48, 13, 60, 90, 226, 2, torch.bfloat16, 4096
        options = {"qk_bits": 8, "pv_dtype": "fp8"}
        rounds = args.iters
    run_stamp = harness.stamp(__file__, argv)
    grid = TokenGrid(frames, h // 2, w // 2, text_len)
    torch.manual_seed(0)
    model = Stack(dim, heads, args.depth, text_dim=text_dim).eval().to(device, dtype)
    inputs = (torch.randn(batch, frames, 16, h, w, device=device, dtype=dtype),
              torch.randn(batch, text_len, text_dim, device=device, dtype=dtype))
    mixed = ["HWF", "HWF", "WHF", "HWF", "FWH", "HWF"]  # most heads share HWF (folded), the rest → kernel residuals
    results = {"tokens": grid.num_tokens, "batch": batch, "dtype": str(dtype), "depth": args.depth, "rounds": rounds,
               "options": options}
    calls = {}
    for name, orders_for_head in (("identity", lambda h: "FHW"), ("paro", lambda h: mixed[h % len(mixed)])):
        plan = plan_for(model, inputs, grid, orders_for_head)
        compiled = torch.compile(model, backend=registered_backend(), options={**options, "plan": plan})
        with torch.no_grad():
            compiled(*inputs)
        report = paro_compile.last_report()
        results[name + "_sites"] = [s.permutation for s in report.sites]
        results[name + "_gathers"] = report.gathers_left
        calls[name] = compiled
    samples = {name: [] for name in calls}
    with torch.no_grad():
        for _ in range(rounds):
            for name, compiled in calls.items():
                timing = harness.time_calls(lambda compiled=compiled: compiled(*inputs), device, calls=3, warmup_calls=0)
                samples[name].append(timing.median_ms)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        Path(args.profile).mkdir(parents=True, exist_ok=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        for name, compiled in calls.items():
            with torch.no_grad(), profile(activities=activities) as prof:
                for _ in range(2):
                    compiled(*inputs)
                harness.synchronize(device)
            sort = "cuda_time_total" if cuda else "cpu_time_total"
            table = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=80)
            (Path(args.profile) / f"fold_profile_{name}.txt").write_text(table)
    for name, values in samples.items():
        results[name + "_ms"] = statistics.median(values)
        results[name + "_samples_ms"] = [round(v, 4) for v in values]
    del calls
    torch._dynamo.reset()
    for block in model.blocks:
        block.skip_attention = True
    compiled = torch.compile(model, backend="inductor")
    with torch.no_grad():
        compiled(*inputs)
        results["no_attention_ms"] = harness.time_calls(lambda: compiled(*inputs), device, calls=rounds).median_ms
    attention_ms = max(results["identity_ms"] - results["no_attention_ms"], 1e-9)
    results["attention_ms"] = attention_ms
    results["overhead_pct_of_attention"] = 100.0 * (results["paro_ms"] - results["identity_ms"]) / attention_ms
    print(json.dumps(results, indent=2))
    if args.json:
        table = [{"variant": name, "median_ms": results[name + "_ms"]} for name in ("identity", "paro", "no_attention")]
        table.append({"variant": "overhead, % of attention", "median_ms": results["overhead_pct_of_attention"]})
        harness.write_results(args.json, results, run_stamp, table=table,
                              title=f"permutation overhead, {args.depth} CogVideoX-5B-shaped blocks")
    return results


if __name__ == "__main__":
    main()
