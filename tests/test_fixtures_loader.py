"""paro_compile.fixtures_loader: the toy CogVideoX fixture loader, prompts, data and sampler."""
import json

import pytest
import torch

pytest.importorskip("diffusers")

from paro_compile import fixtures_loader as fl  # noqa: E402
from paro_compile.grid import TokenGrid  # noqa: E402


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """A random tiny CogVideoX saved like the training script saves the fixture (fp16 safetensors)."""
    path = tmp_path_factory.mktemp("fixture") / "toy_cogvideox"
    model = fl.new_toy_cogvideox(fl.TINY_CONFIG, seed=3)
    model.to(torch.float16).save_pretrained(path, safe_serialization=True)
    return path, {k: v.clone() for k, v in model.state_dict().items()}


def test_loader_reads_save_pretrained_folder(saved_tiny):
    path, state = saved_tiny
    assert fl.fixture_available(path)
    model = fl.load_toy_cogvideox(device="cpu", dtype=torch.float32, path=path)
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
        fl.load_toy_cogvideox(path=tmp_path / "nope")


def test_sampler_deterministic_and_finite(saved_tiny):
    path, _ = saved_tiny
    model = fl.load_toy_cogvideox(path=path)
    prompts = [dict(shape="circle", colour="red", motion="right"), dict(shape="cross", colour="blue", motion="rotate")]
    cond = fl.encode_prompts(prompts, int(model.config.text_embed_dim))
    assert cond.shape == (2, fl.TEXT_TOKENS, int(model.config.text_embed_dim))
    a = fl.sample_video(model, cond, steps=2, seed=5, guidance=2.0)
    b = fl.sample_video(model, cond, steps=2, seed=5, guidance=2.0)
    c = fl.sample_video(model, cond, steps=2, seed=6, guidance=2.0)
    frames, channels, h, w = fl.video_shape(model)
    assert a.shape == (2, frames, channels, h, w)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_rotary_and_grid_match_token_count(saved_tiny):
    path, _ = saved_tiny
    model = fl.load_toy_cogvideox(path=path)
    frames, _, h, w = fl.video_shape(model)
    cos, sin = fl.rotary_embeddings(model, frames, h, w)
    grid = fl.token_grid(model)
    assert cos.shape == sin.shape == (grid.visual_tokens, int(model.config.attention_head_dim))
    assert grid == TokenGrid(frames=frames, height=h // 2, width=w // 2, text_tokens=fl.TEXT_TOKENS)
    # calibration can infer the same layout from the model inputs
    from paro_compile.calibration import _patch_sizes_from_model, infer_grid

    cond = fl.encode_prompts([dict(shape="ring", colour="green", motion="up")], int(model.config.text_embed_dim))
    inputs = fl.model_inputs(torch.zeros(1, frames, fl.CHANNELS, h, w), cond, 0.5, (cos, sin))
    spatial, temporal = _patch_sizes_from_model(model)
    assert infer_grid(grid.num_tokens, inputs, patch_sizes=spatial, temporal_patch_sizes=temporal) == grid


def test_procedural_videos():
    g = torch.Generator().manual_seed(0)
    videos, s, c, m = fl.random_batch(6, generator=g)
    assert videos.shape == (6, fl.FRAMES, fl.CHANNELS, fl.LATENT_SIZE, fl.LATENT_SIZE)
    assert torch.isfinite(videos).all() and videos.abs().max() <= 1.0 + 1e-5
    # a moving shape changes between frames, a static one does not
    idx = torch.tensor([0, 0])
    motion = torch.tensor([fl.MOTIONS.index("static"), fl.MOTIONS.index("right")])
    v = fl.render_videos(idx, idx, motion, generator=torch.Generator().manual_seed(1))
    assert (v[0, 0] - v[0, -1]).abs().max() < 1e-5
    assert (v[1, 0] - v[1, -1]).abs().max() > 0.5
    # same seed, same data
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    torch.testing.assert_close(fl.random_batch(2, generator=g1)[0], fl.random_batch(2, generator=g2)[0])


def test_toy_config_fits_the_size_budget():
    model = fl.new_toy_cogvideox(fl.TOY_CONFIG)
    params = sum(p.numel() for p in model.parameters())
    assert params * 2 <= 20e6, f"{params * 2 / 1e6:.1f} MB in fp16"
    assert model.config.num_attention_heads == 4 and model.config.attention_head_dim == 64
    assert fl.token_grid(model).num_tokens == 8 * 16 * 16 + 16


@pytest.mark.skipif(not fl.fixture_available(), reason="trained fixture weights not yet in paro_compile/fixtures/toy_cogvideox "
                    "(produced by benchmarks/train_video_dit.py on a GPU)")
def test_packaged_fixture_loads_and_samples():
    model = fl.load_toy_cogvideox()
    assert (fl.FIXTURE_DIR / fl.WEIGHTS_NAME).stat().st_size <= 20e6
    for key, value in fl.TOY_CONFIG.items():
        assert model.config[key] == value, key
    cond = fl.encode_prompts([dict(shape="circle", colour="red", motion="right")], int(model.config.text_embed_dim))
    x = fl.sample_video(model, cond, steps=2, seed=0)
    assert torch.isfinite(x).all()
