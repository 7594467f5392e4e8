"""Train the toy video DiT fixture: a diffusers CogVideoXTransformer3DModel on procedural latent videos.

Data (generated on the device on the fly, `paro_compile.toy.videos.render_videos`): one shape
(circle/square/triangle/ring/cross) of one of 6 colours that is static, moves right/left/down/up, rotates,
grows or changes colour over 8 frames, drawn directly into a 4-channel 32×32 "latent". With patch 2 the
token grid is 8×16×16 = 2048 video tokens + 16 condition tokens (fixed random vectors per attribute).
Objective: rectified flow, x_t = (1 − t)·x0 + t·ε, the model predicts v = ε − x0 (t ~ logit-normal);
10 % of the conditions are dropped (all-zero tokens) for classifier-free guidance. bf16 autocast, AdamW.

Outputs under --out:
  toy_cogvideox/ (config.json + diffusion_pytorch_model.safetensors, fp16)  ← copy to paro_compile/toy/fixtures/
  train_summary.json (+ .md; with the loss log), samples.png (FP samples of a few prompts), data.png (training videos),
  attention_orders.png (per head: natural vs best PARO order of one layer's map; the numbers are in the summary)

GPU:  python benchmarks/train_video_dit.py --out OUT --minutes 4
CI:   python benchmarks/train_video_dit.py --out OUT --tiny      (3 steps, tiny model, CPU, seconds)
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from paro_compile.toy import cogvideox as toy_cog, videos as toy_videos  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--minutes", type=float, default=4.0, help="wall-clock training budget (ends on time)")
    p.add_argument("--steps", type=int, default=0, help="end after this many steps (0 = only the time budget)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--layers", type=int, default=None, help="override num_layers (default 6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cond-drop", type=float, default=0.1)
    p.add_argument("--device", default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the training step (faster steps after a compile)")
    p.add_argument("--tiny", action="store_true", help="3 steps of a tiny model on the CPU (CI)")
    p.add_argument("--no-plots", action="store_true")
    return p.parse_args(argv)


def attention_order_maps(model, cond, out: Path, layer: int, grid, block: int, device, dtype, seed: int = 0,
                         density: float = 0.3) -> dict:
    """One layer's post-softmax maps (FP model, a noised training video at t = 0.5), per head in the natural
    order and in the candidate order with the most block-concentrated mass (share of mass in the top
    ``density`` of blocks). Saves attention_orders.png and returns the kept masses per head and order."""
    from paro_compile.grid import candidate_orders, order_permutation

    captured = {}
    site_calls = [0]
    orig = F.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):
        if site_calls[0] == layer:
            captured["q"], captured["k"] = query.detach(), key.detach()
            captured["scale"] = kwargs.get("scale")
        site_calls[0] += 1
        return orig(query, key, value, *args, **kwargs)

    frames, channels, h, w = toy_cog.video_shape(model)
    g = torch.Generator(device=device).manual_seed(seed + 7)
    x0, *_ = toy_videos.random_batch(1, frames=frames, size=h, channels=channels, generator=g)
    noise = torch.randn(x0.shape, generator=g, device=device)
    xt = 0.5 * x0 + 0.5 * noise
    rotary = toy_cog.rotary_embeddings(model, frames, h, w, device=device)
    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            model(**toy_cog.model_inputs(xt.to(dtype), cond[:1].to(device), 0.5, rotary))
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig
    q, k = captured["q"][0].float(), captured["k"][0].float()  # [H, N, D]
    scale = captured["scale"] or 1.0 / math.sqrt(q.shape[-1])
    probs = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)  # [H, N, N]
    n = probs.shape[-1]
    nb = math.ceil(n / block)
    pad = nb * block - n
    orders = candidate_orders(grid)
    results = {"layer": layer, "block": block, "density": density, "heads": []}
    display = []
    for head in range(probs.shape[0]):
        scores = {}
        maps = {}
        for order in orders:
            perm = order_permutation(grid, order, device=probs.device)
            pm = probs[head][perm][:, perm]
            pooled = F.pad(pm, (0, pad, 0, pad)).view(nb, block, nb, block).sum((1, 3))
            flat = pooled.flatten().sort(descending=True).values
            kept = flat[: max(1, math.ceil(density * flat.numel()))].sum() / flat.sum()
            scores[order] = float(kept)
            maps[order] = pm
        best = max(orders, key=lambda o: (scores[o], o == grid.natural_order))
        results["heads"].append({"head": head, "best_order": best, "kept_mass": scores})
        display.append((head, maps[grid.natural_order], scores[grid.natural_order], maps[best], best, scores[best]))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        heads = len(display)
        fig, axes = plt.subplots(2, heads, figsize=(3.2 * heads, 6.6), squeeze=False)
        pool = max(1, n // 256)
        for col, (head, nat, nat_s, best_map, best, best_s) in enumerate(display):
            for row, (m, title) in enumerate(((nat, f"head {head}: natural {grid.natural_order}\nkept@{density:.0%}: {nat_s:.2f}"),
                                              (best_map, f"head {head}: PARO {best}\nkept@{density:.0%}: {best_s:.2f}"))):
                small = F.avg_pool2d(m[None, None], pool)[0, 0] if pool > 1 else m
                logm = torch.log10(small.clamp_min(1e-8)).cpu()
                axes[row][col].imshow(logm.numpy(), cmap="magma", vmin=float(logm.max()) - 4, vmax=float(logm.max()))
                axes[row][col].set_title(title, fontsize=8)
                axes[row][col].axis("off")
        fig.suptitle(f"layer {layer} attention (log10 P, {pool}×{pool} pooled), {grid}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "attention_orders.png", dpi=110)
        plt.close(fig)
    except Exception as error:  # plots are a convenience; never fail the run for them
        print(f"[train] attention plot failed: {error!r}")
    return results


def save_video_grid(videos: torch.Tensor, titles, path: Path, frames_to_show: int = 8) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = videos.shape[0]
        cols = min(frames_to_show, videos.shape[1])
        fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.4 * rows), squeeze=False)
        for r in range(rows):
            rgb = toy_videos.to_rgb_frames(videos[r])
            for c in range(cols):
                axes[r][c].imshow(rgb[c * videos.shape[1] // cols].numpy())
                axes[r][c].axis("off")
            axes[r][0].set_title(titles[r], fontsize=6, loc="left")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
    except Exception as error:
        print(f"[train] plot {path.name} failed: {error!r}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    run_stamp = harness.stamp(__file__, argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    config = dict(toy_cog.TINY_CONFIG if args.tiny else toy_cog.TOY_CONFIG)
    if args.layers:
        config["num_layers"] = args.layers
    max_steps = 3 if args.tiny else args.steps
    batch = 2 if args.tiny else args.batch
    model = toy_cog.new_toy_cogvideox(config, seed=args.seed, device=device, dtype=torch.float32).train()
    n_params = sum(p.numel() for p in model.parameters())
    frames, channels, h, w = toy_cog.video_shape(model)
    text_dim = int(config["text_embed_dim"])
    print(f"[train] device={device} params={n_params / 1e6:.2f}M (fp16 {n_params * 2 / 1e6:.1f} MB) video {frames}x{channels}x{h}x{w} "
          f"tokens {toy_cog.token_grid(model)} batch {batch}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01, fused=device.type == "cuda")
    rotary = toy_cog.rotary_embeddings(model, frames, h, w, device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    use_amp = device.type == "cuda"

    def loss_fn(x0, cond, noise, t, drop):
        cond = torch.where(drop[:, None, None], torch.zeros_like(cond), cond)
        tt = t.view(-1, 1, 1, 1, 1)
        xt = (1 - tt) * x0 + tt * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            pred = model(hidden_states=xt, encoder_hidden_states=cond, timestep=t * 1000.0, image_rotary_emb=rotary,
                         return_dict=False)[0]
        return F.mse_loss(pred.float(), noise - x0)

    step_fn = torch.compile(loss_fn) if args.compile else loss_fn
    log_rows = []
    start = time.perf_counter()
    budget = args.minutes * 60.0
    step = 0
    ema_loss = None
    while True:
        elapsed = time.perf_counter() - start
        if (max_steps and step >= max_steps) or (not args.tiny and elapsed >= budget):
            break
        x0, si, ci, mi = toy_videos.random_batch(batch, frames=frames, size=h, channels=channels, generator=gen)
        cond = toy_videos.encode_indices(si, ci, mi, text_dim, device=device)
        noise = torch.randn(x0.shape, generator=gen, device=device)
        t = torch.sigmoid(torch.randn(batch, generator=gen, device=device))
        drop = torch.rand(batch, generator=gen, device=device) < args.cond_drop
        lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
        if not args.tiny and budget > 0:  # cosine decay over the time budget (to 10 %)
            frac = min(1.0, elapsed / budget)
            lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
        for group in opt.param_groups:
            group["lr"] = lr
        loss = step_fn(x0, cond, noise, t, drop)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0 or step <= 3 or args.tiny:
            lv = float(loss.item())
            ema_loss = lv if ema_loss is None else 0.9 * ema_loss + 0.1 * lv
            row = {"step": step, "seconds": round(time.perf_counter() - start, 2), "loss": lv, "loss_ema": ema_loss,
                   "lr": lr, "grad_norm": float(grad_norm)}
            log_rows.append(row)
            if step % 500 == 0 or step <= 3:
                print(f"[train] step {step:6d} {row['seconds']:7.1f}s loss {lv:.4f} (ema {ema_loss:.4f}) lr {lr:.2e}", flush=True)
    train_seconds = time.perf_counter() - start
    print(f"[train] done: {step} steps in {train_seconds:.1f}s", flush=True)

    model.eval()
    save_dir = out / "toy_cogvideox"
    model_fp16 = toy_cog.new_toy_cogvideox(config, device="cpu", dtype=torch.float32)
    model_fp16.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    model_fp16 = model_fp16.to(torch.float16)
    model_fp16.save_pretrained(save_dir, safe_serialization=True)
    weights = save_dir / toy_cog.WEIGHTS_NAME
    size_mb = weights.stat().st_size / 1e6
    print(f"[train] saved {save_dir} ({size_mb:.1f} MB)", flush=True)

    # Reload through the project's loader (what users of the fixture get) and sample a few prompts.
    eval_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    loaded = toy_cog.load_toy_cogvideox(device=device, dtype=eval_dtype, path=save_dir)
    prompts = [dict(shape="circle", colour="red", motion="right"), dict(shape="square", colour="blue", motion="rotate"),
               dict(shape="ring", colour="yellow", motion="down"), dict(shape="cross", colour="green", motion="colour_shift")]
    cond = toy_videos.encode_prompts(prompts, text_dim, device=device)
    steps = 2 if args.tiny else 20
    samples = toy_cog.sample_video(loaded, cond, steps=steps, seed=123, guidance=1.0 if args.tiny else 3.0)
    sample_stats = {"mean": float(samples.mean()), "std": float(samples.std()), "finite": bool(torch.isfinite(samples).all())}
    # How close is a sample to its class's data distribution? (mean abs error to a rendering of the same
    # prompt is not defined: nuisances differ; report per-channel means vs data instead.)
    gd = torch.Generator(device=device).manual_seed(99)
    data, *_ = toy_videos.random_batch(4, frames=frames, size=h, channels=channels, generator=gd)
    summary = {
        "device": str(device), "params": n_params, "weights_mb": size_mb, "steps": step,
        "train_seconds": train_seconds, "final_loss_ema": ema_loss, "config": config, "batch": batch,
        "lr": args.lr, "seed": args.seed, "sample_stats": sample_stats,
        "data_stats": {"mean": float(data.mean()), "std": float(data.std())},
    }
    if not args.no_plots:
        save_video_grid(samples.cpu(), [toy_videos.prompt_name(p) for p in prompts], out / "samples.png")
        save_video_grid(data.cpu(), ["training video"] * data.shape[0], out / "data.png")
        try:
            grid = toy_cog.token_grid(loaded)
            block = 16 if args.tiny else 64
            layer = int(config["num_layers"]) // 2
            res = attention_order_maps(loaded, cond, out, layer, grid, block, device, eval_dtype, seed=args.seed)
            summary["attention_orders"] = {f"head{hd['head']}": hd["best_order"] for hd in res["heads"]}
            summary["attention_maps"] = res
        except Exception as error:
            print(f"[train] attention maps failed: {error!r}")
            summary["attention_orders_error"] = repr(error)
    harness.write_results(out / "train_summary.json", {**summary, "log": log_rows}, run_stamp,
                          title="toy CogVideoX training", table=[{"metric": key, "value": summary[key]} for key in
                                                                 ("steps", "train_seconds", "final_loss_ema", "params",
                                                                  "weights_mb")])
    print("\n| metric | value |\n| --- | --- |")
    for key in ("steps", "train_seconds", "final_loss_ema", "params", "weights_mb"):
        print(f"| {key} | {summary[key]} |")
    print(f"| sample mean/std | {sample_stats['mean']:.3f} / {sample_stats['std']:.3f} (data {summary['data_stats']['mean']:.3f} / "
          f"{summary['data_stats']['std']:.3f}) |")
    if "attention_orders" in summary:
        print(f"| best orders (layer {int(config['num_layers']) // 2}) | {summary['attention_orders']} |")
    return summary


if __name__ == "__main__":
    main()
