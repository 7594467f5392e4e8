"""paro_compile.toy: the toy CogVideoX fixture loader, prompts, data and sampler."""
import json

import pytest
import torch

pytest.importorskip("diffusers")

from paro_compile.toy import cogvideox as toy_cog, videos as toy_videos  # noqa: E402
from paro_compile.grid import TokenGrid  # noqa: E402


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """A random tiny CogVideoX saved like the training script saves the fixture (fp16 safetensors)."""
    path = tmp_path_factory.mktemp("fixture") / "toy_cogvideox"
    model = toy_cog.new_toy_cogvideox(toy_cog.TINY_CONFIG, seed=3)
    model.to(torch.float16).save_pretrained(path, safe_serialization=True)
    return path, {k: v.clone() for k, v in model.state_dict().items()}


def test_loader_reads_save_pretrained_folder(saved_tiny):
    path, state = saved_tiny
    assert toy_cog.fixture_available(path)
    model = toy_cog.load_toy_cogvideox(device="cpu", dtype=torch.float32, path=path)
    assert not model.training
    assert type(model).__name__ == "CogVideoXTransformer3DModel"
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for name, value in state.items():
        assert loaded[name].dtype == torch.float32
        torch.testing.assert_close(loaded[name], value.float(), rtol=0, atol=0, msg=name)
    assert json.loads((path / "config.json").read_text())["use_rotary_positional_embeddings"] is True


def test_loader_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_video_dit.py"):
        toy_cog.load_toy_cogvideox(path=tmp_path / "nope")


def test_sampler_deterministic_and_finite(saved_tiny):
    path, _ = saved_tiny
    model = toy_cog.load_toy_cogvideox(path=path)
    prompts = [dict(shape="circle", colour="red", motion="right"), dict(shape="cross", colour="blue", motion="rotate")]
    cond = toy_videos.encode_prompts(prompts, int(model.config.text_embed_dim))
    assert cond.shape == (2, toy_videos.TEXT_TOKENS, int(model.config.text_embed_dim))
    a = toy_cog.sample_video(model, cond, steps=2, seed=5, guidance=2.0)
    b = toy_cog.sample_video(model, cond, steps=2, seed=5, guidance=2.0)
    c = toy_cog.sample_video(model, cond, steps=2, seed=6, guidance=2.0)
    frames, channels, h, w = toy_cog.video_shape(model)
    assert a.shape == (2, frames, channels, h, w)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_rotary_and_grid_match_token_count(saved_tiny):
    path, _ = saved_tiny
    model = toy_cog.load_toy_cogvideox(path=path)
    frames, _, h, w = toy_cog.video_shape(model)
    cos, sin = toy_cog.rotary_embeddings(model, frames, h, w)
    grid = toy_cog.token_grid(model)
    assert cos.shape == sin.shape == (grid.visual_tokens, int(model.config.attention_head_dim))
    assert grid == TokenGrid(frames=frames, height=h // 2, width=w // 2, text_tokens=toy_videos.TEXT_TOKENS)
    # calibration can infer the same layout from the model inputs
    from paro_compile.calibration.grids import _patch_sizes_from_model, infer_grid

    cond = toy_videos.encode_prompts([dict(shape="ring", colour="green", motion="up")], int(model.config.text_embed_dim))
    inputs = toy_cog.model_inputs(torch.zeros(1, frames, toy_videos.CHANNELS, h, w), cond, 0.5, (cos, sin))
    spatial, temporal = _patch_sizes_from_model(model)
    assert infer_grid(grid.num_tokens, inputs, patch_sizes=spatial, temporal_patch_sizes=temporal) == grid


def test_procedural_videos():
    g = torch.Generator().manual_seed(0)
    videos, s, c, m = toy_videos.random_batch(6, generator=g)
    assert videos.shape == (6, toy_videos.FRAMES, toy_videos.CHANNELS, toy_videos.LATENT_SIZE, toy_videos.LATENT_SIZE)
    assert torch.isfinite(videos).all() and videos.abs().max() <= 1.0 + 1e-5
    # a moving shape changes between frames, a static one does not
    idx = torch.tensor([0, 0])
    motion = torch.tensor([toy_videos.MOTIONS.index("static"), toy_videos.MOTIONS.index("right")])
    v = toy_videos.render_videos(idx, idx, motion, generator=torch.Generator().manual_seed(1))
    assert (v[0, 0] - v[0, -1]).abs().max() < 1e-5
    assert (v[1, 0] - v[1, -1]).abs().max() > 0.5
    # same seed, same data
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    torch.testing.assert_close(toy_videos.random_batch(2, generator=g1)[0], toy_videos.random_batch(2, generator=g2)[0])


def test_toy_config_fits_the_size_budget():
    model = toy_cog.new_toy_cogvideox(toy_cog.TOY_CONFIG)
    params = sum(p.numel() for p in model.parameters())
    assert params * 2 <= 20e6, f"{params * 2 / 1e6:.1f} MB in fp16"
    assert model.config.num_attention_heads == 4 and model.config.attention_head_dim == 64
    assert toy_cog.token_grid(model).num_tokens == 8 * 16 * 16 + 16


@pytest.mark.skipif(not toy_cog.fixture_available(), reason="trained fixture weights not yet in paro_compile/toy/fixtures/toy_cogvideox "
                    "(produced by benchmarks/train_video_dit.py on a GPU)")
def test_packaged_fixture_loads_and_samples():
    model = toy_cog.load_toy_cogvideox()
    assert (toy_cog.FIXTURE_DIR / toy_cog.WEIGHTS_NAME).stat().st_size <= 20e6
    for key, value in toy_cog.TOY_CONFIG.items():
        assert model.config[key] == value, key
    cond = toy_videos.encode_prompts([dict(shape="circle", colour="red", motion="right")], int(model.config.text_embed_dim))
    x = toy_cog.sample_video(model, cond, steps=2, seed=0)
    assert torch.isfinite(x).all()
