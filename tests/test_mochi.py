"""Mochi's joint attention: outside every compiled graph with diffusers' processor (and the report says so), inside
with `use_key_padding_attention` or with Dynamo tracing data-dependent shapes."""
import pytest
import torch

import paro_compile

diffusers = pytest.importorskip("diffusers")

EXACT = {"allow_fp32": True, "qk_bits": 16, "pv_dtype": "fp16"}


def tiny_mochi(layers: int = 1, batch: int = 1):
    """A random tiny MochiTransformer3DModel and inputs whose text masks pad some prompts (one not as a prefix)."""
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(0)
    model = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=64, num_layers=layers,
                                    pooled_projection_dim=16, in_channels=4, text_embed_dim=32, time_embed_dim=16,
                                    max_sequence_length=8).eval()
    mask = torch.ones(batch, 8, dtype=torch.bool)
    mask[0, 5:] = False
    if batch > 1:
        mask[1, [1, 3, 6, 7]] = False
    inputs = dict(hidden_states=torch.randn(batch, 4, 2, 8, 8), encoder_hidden_states=torch.randn(batch, 8, 32),
                  timestep=torch.tensor([500, 300][:batch]), encoder_attention_mask=mask, return_dict=False)
    return model, inputs


def joint_attention_modules(model) -> list[str]:
    return [name for name, module in model.named_modules() if type(module).__name__ == "MochiAttention"]


@pytest.fixture(autouse=True)
def quiet_autocast_warnings():
    import warnings

    with warnings.catch_warnings():  # Mochi's rope asks CPU autocast for float32, which it does not support
        warnings.filterwarnings("ignore", message=".*CPU Autocast only supports.*")
        warnings.filterwarnings("ignore", message=".*In CPU autocast, but the target dtype is not supported.*")
        yield


def test_stock_processor_attention_is_reported_outside_every_graph():
    """diffusers' MochiAttnProcessor2_0: torch.nonzero breaks the graph inside a loop, Dynamo skips the processor and the
    joint attention runs eagerly; the report names the modules, counts the eager calls and gives the fix."""
    model, inputs = tiny_mochi()
    report = paro_compile.inspect(model, inputs, **EXACT)
    joint = joint_attention_modules(model)
    assert joint == ["transformer_blocks.0.attn1"]
    assert not any(s.site_id.startswith("transformer_blocks") for s in report.sites)
    assert report.uncovered_attention_modules == joint
    assert report.eager_attention.eager_calls == 1  # one layer, one prompt
    [(call_site, calls)] = report.eager_attention.call_sites.items()
    assert call_site.startswith("MochiAttention: ") and "attention_processor.py" in call_site and calls == 1
    assert any("aten.nonzero" in reason for reason in report.graph_breaks)
    summary = report.summary()
    assert "warning: 1 attention module(s) have no site in any compiled graph" in summary
    assert "1 SDPA call(s) ran outside every compiled graph" in summary
    assert "use_key_padding_attention(model)" in summary and "capture_dynamic_output_shape_ops" in summary
    assert report.to_dict()["eager_sdpa_calls"] == 1


@torch.no_grad()
def test_key_padding_processor_equals_the_stock_processor():
    from paro_compile.diffusers_attention import MochiKeyPaddingAttnProcessor, use_key_padding_attention

    model, inputs = tiny_mochi(layers=2, batch=2)  # the second prompt's padding is not a suffix
    reference = model(**inputs)[0]
    assert use_key_padding_attention(model) == 2
    assert all(isinstance(model.get_submodule(name).processor, MochiKeyPaddingAttnProcessor)
               for name in joint_attention_modules(model))
    assert use_key_padding_attention(model) == 0
    torch.testing.assert_close(model(**inputs)[0], reference, rtol=1e-5, atol=1e-5)

    no_padding = dict(inputs, encoder_attention_mask=torch.ones_like(inputs["encoder_attention_mask"]))
    swapped = model(**no_padding)[0]
    model_stock, _ = tiny_mochi(layers=2, batch=2)
    torch.testing.assert_close(swapped, model_stock(**no_padding)[0], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def compiled_with_key_padding():
    from paro_compile.diffusers_attention import use_key_padding_attention

    torch._dynamo.reset()
    paro_compile.clear_reports()
    model, inputs = tiny_mochi(batch=2)
    with torch.no_grad():
        reference = model(**inputs)[0]
        use_key_padding_attention(model)
        torch._dynamo.utils.counters.clear()
        compiled = torch.compile(model, backend="paro", options=EXACT)
        out = compiled(**inputs)[0]
        breaks = dict(torch._dynamo.utils.counters["graph_break"])
        with paro_compile.watch_attention() as watch:
            compiled(**inputs)
    return model, paro_compile.model_report(model), out, reference, breaks, watch


def test_key_padding_processor_puts_the_joint_attention_in_the_graph(compiled_with_key_padding):
    model, report, out, reference, breaks, watch = compiled_with_key_padding
    assert breaks == {}
    assert len(report.reports) == 1 and not report.uncovered_attention_modules and not report.warnings
    joint = [s for s in report.sites if s.site_id.startswith("transformer_blocks")]
    assert [s.site_id for s in joint] == [f"{name}#0" for name in joint_attention_modules(model)]
    assert all(s.shape == (2, 2, 2 * 16 + 8, 64) for s in joint)  # 2 frames × 16 patches and every (padded) text token
    assert all(s.lowered and s.key_padding for s in joint)
    assert watch.eager_calls == 0
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)


def test_key_padding_joint_attention_lowers(compiled_with_key_padding):
    _, report, *_ = compiled_with_key_padding
    joint = [s for s in report.sites if s.site_id.startswith("transformer_blocks")]
    assert joint and all(s.lowered for s in joint)


@torch.no_grad()
def test_capture_dynamic_output_shape_ops_lowers_the_stock_processor_dense():
    """With Dynamo tracing torch.nonzero, the stock processor's per-prompt attention has a data-dependent length:
    lowered, dense, in the one graph."""
    model, inputs = tiny_mochi()
    reference = model(**inputs)[0]
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        out = torch.compile(model, backend="paro", options=EXACT)(**inputs)[0]
    report = paro_compile.model_report(model)
    joint = [s for s in report.sites if s.site_id.startswith("transformer_blocks")]
    assert len(joint) == 1 and joint[0].lowered and joint[0].density == 1.0
    assert isinstance(joint[0].shape[2], str)  # the symbolic length: 16 video tokens + the valid text tokens
    assert not report.uncovered_attention_modules
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
