"""A real diffusers pipeline end to end on the CPU: compile its transformer with backend="paro", capture calibration
inputs from one generation, calibrate, compile with the plan and generate again.

DiTPipeline is built from components made here (tiny DiT transformer, tiny VAE, DDIM scheduler, random weights): it
needs no text encoder, tokenizer or hub download (the pipelines with a text encoder import transformers, which this
environment does not have)."""
import pytest
import torch

import paro_compile
from tests.conftest import rel_l2

diffusers = pytest.importorskip("diffusers")

OPTIONS = {"allow_fp32": True, "block_size": 16}
STEPS = 4


def tiny_dit_pipeline():
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4, num_layers=2, norm_num_groups=32,
        sample_size=32, patch_size=2, num_embeds_ada_norm=1000,
    ).eval()
    vae = AutoencoderKL(block_out_channels=(32,), latent_channels=4, norm_num_groups=32, sample_size=32,
                        mid_block_add_attention=False).eval()
    return DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(num_train_timesteps=1000))


def generate(pipe):
    with torch.no_grad():
        return pipe(class_labels=[3], num_inference_steps=STEPS, guidance_scale=4.0,
                    generator=torch.Generator().manual_seed(7), output_type="pt").images


def test_dit_pipeline_capture_calibrate_compile_generate():
    pipe = tiny_dit_pipeline()
    eager = generate(pipe)

    transformer = pipe.transformer
    pipe.transformer = torch.compile(transformer, backend="paro", options=OPTIONS)
    with paro_compile.capture_calls(pipe.transformer) as calls:
        dense = generate(pipe)
    dense_report = paro_compile.last_report()
    assert len(calls) == STEPS and calls.seen == STEPS
    assert [site.lowered and site.density == 1.0 for site in dense_report.sites] == [True, True]
    (args, kwargs), = calls[:1]
    assert args[0].shape == (2, 4, 32, 32) and kwargs["timestep"].shape == (2,)  # classifier-free guidance batch

    plan = paro_compile.calibrate(pipe.transformer, calls, density=0.5, block_size=16, step_buckets=2, progress=False)
    assert len(plan.sites) == 2 and plan.num_buckets == 2 and plan.meta["calls"] == STEPS
    pipe.transformer = torch.compile(transformer, backend="paro", options={**OPTIONS, "plan": plan})
    sparse = generate(pipe)
    report = paro_compile.last_report()

    assert torch.isfinite(sparse).all() and sparse.shape == eager.shape == (1, 3, 32, 32)
    sites = report.sites
    assert len(sites) == 2 and all(site.lowered for site in sites)
    assert all(site.density == pytest.approx(0.5, abs=0.05) and site.step_buckets == 2 for site in sites)
    assert rel_l2(dense, eager) < 0.02  # INT8 Q/K + FP8 P/V
    assert rel_l2(sparse, dense) < 0.1, rel_l2(sparse, dense)
