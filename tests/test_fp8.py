"""paro_compile.fp8: FP8 linears from torchao, then backend="paro".

CPU: the refusal where FP8 cannot run (no import of torchao needed), the choice of linears, and — with torchao's hardware
check stubbed, since its float8 tensor also runs on the CPU — that the Dynamo graph the paro passes see is unchanged by
FP8 linears and that a paro compile of an FP8 model lowers the same sites with the same report. GPU: the real recipe on
an FP8-capable GPU, output against eager within a stated tolerance.
"""
from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.nn as nn

import paro_compile
from paro_compile import fp8
from tests.conftest import CPU_ROWWISE_FP8, rel_l2

diffusers = pytest.importorskip("diffusers")

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
FP8_GPU = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < fp8.FP8_MIN_CAPABILITY,
    reason="needs a CUDA GPU of compute capability >= 8.9 (run on the device machine)")]
# Tolerances of the GPU test, rel-L2 of the model output (random weights, 2 layers): FP8 linears alone cost ~4e-2 (each
# row-wise e4m3 matmul ~2-3e-2), paro's dense INT8 QK / FP8 PV attention ~3e-2 against SDPA on the same model.
TOL_VS_EAGER_FP8 = 6e-2
TOL_VS_EAGER_BF16 = 1.2e-1


def tiny_wan(layers: int = 2, device="cpu", dtype=torch.bfloat16):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=layers, rope_max_seq_len=64,
    ).eval().requires_grad_(False).to(device, dtype)
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 4, 2, 8, 8, generator=g).to(device, dtype),
                  timestep=torch.tensor([500], device=device),
                  encoder_hidden_states=torch.randn(1, 8, 32, generator=g).to(device, dtype), return_dict=False)
    return model, inputs


def tiny_hunyuan(dtype=torch.bfloat16):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=64, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=32, pooled_projection_dim=32,
        rope_axes_dim=(16, 24, 24), guidance_embeds=True,
    ).eval().requires_grad_(False).to(dtype)


def snapshot(model: nn.Module) -> dict[str, tuple[type, torch.Tensor]]:
    return {k: (type(v), v.detach().clone()) for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, (cls, value) in before.items():
        assert type(after[k]) is cls and torch.equal(after[k], value), k


# ---------------------------------------------------------------------------------------------------------------------
# refusal: no CUDA, old GPU, weights off the GPU, torchao missing
# ---------------------------------------------------------------------------------------------------------------------
@NO_CUDA
def test_without_cuda_warns_and_leaves_the_model_as_it_is(monkeypatch):
    model, _ = tiny_wan(layers=1)
    before = snapshot(model)
    monkeypatch.setitem(sys.modules, "torchao", None)  # the refusal must not need torchao at all
    with pytest.warns(fp8.Fp8UnavailableWarning, match="no CUDA device"):
        result = fp8.quantize_linears(model)
    assert not result.applied and "compute capability >= 8.9" in result.reason
    assert result.quantized == [] and "not applied" in result.summary()
    assert_unchanged(model, before)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fp8.Fp8UnavailableWarning)  # the documented way to make it an error
        with pytest.raises(fp8.Fp8UnavailableWarning):
            fp8.quantize_linears(model)
    assert_unchanged(model, before)


def test_gpu_below_compute_capability_8_9_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    reason = fp8.fp8_unavailable_reason()
    assert reason is not None and "A100 has compute capability 8.0" in reason and ">= 8.9" in reason
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8.fp8_unavailable_reason() is None


def test_weights_off_the_gpu_are_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    model, _ = tiny_wan(layers=1)
    before = snapshot(model)
    with pytest.warns(fp8.Fp8UnavailableWarning, match=r"linear weights on cpu: move the model to the GPU first"):
        result = fp8.quantize_linears(model)
    assert not result.applied
    assert_unchanged(model, before)


def test_missing_torchao_on_an_fp8_gpu_is_an_import_error_naming_the_extra(monkeypatch):
    model, _ = tiny_wan(layers=1)
    before = snapshot(model)
    monkeypatch.setattr(fp8, "fp8_unavailable_reason", lambda model=None: None)
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(ImportError, match=r'paro-compile\[fp8\]'):
        fp8.quantize_linears(model)
    assert_unchanged(model, before)


# ---------------------------------------------------------------------------------------------------------------------
# which linears
# ---------------------------------------------------------------------------------------------------------------------
def test_default_choice_on_wan_keeps_embedders_head_and_quantizes_the_blocks():
    model, _ = tiny_wan(layers=2)
    chosen, skipped = fp8.choose_linears(model)
    assert chosen == [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]
    assert {"blocks.0.attn1.to_q", "blocks.1.attn2.to_v", "blocks.1.ffn.net.2"} <= set(chosen)
    for name in ("condition_embedder.time_proj", "condition_embedder.text_embedder.linear_1", "proj_out"):
        assert skipped[name].startswith("embedder or output head"), name


def test_default_choice_on_hunyuan_skips_modulation_but_not_block_output_projections():
    model = tiny_hunyuan()
    chosen, skipped = fp8.choose_linears(model)
    # a block's own proj_out is a block linear; only the model's top-level proj_out is the head
    assert {"single_transformer_blocks.0.proj_out", "single_transformer_blocks.0.proj_mlp", "transformer_blocks.0.attn.add_q_proj",
            "transformer_blocks.0.ff_context.net.2"} <= set(chosen)
    for name in ("transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear",
                 "single_transformer_blocks.0.norm.linear"):
        assert skipped[name].startswith("adaLN modulation"), name
    for name in ("proj_out", "norm_out.linear", "time_text_embed.guidance_embedder.linear_1",
                 "context_embedder.token_refiner.refiner_blocks.0.attn.to_q"):
        assert skipped[name].startswith("embedder or output head"), name
    assert not [n for n in chosen if n.startswith(("context_embedder", "time_text_embed"))]


def test_layers_torchao_cannot_take_are_skipped_with_their_reason():
    model = nn.Sequential(nn.Linear(64, 24), nn.Linear(24, 64), nn.Linear(64, 64)).to(torch.bfloat16)
    chosen, skipped = fp8.choose_linears(model)
    assert chosen == ["2"]
    assert "24x64" in skipped["0"] and "multiples of 16" in skipped["0"] and "64x24" in skipped["1"]
    chosen, skipped = fp8.choose_linears(nn.Sequential(nn.Linear(64, 64)))  # fp32 weights
    assert chosen == [] and "bfloat16" in skipped["0"]
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).to(torch.bfloat16)
    chosen, skipped = fp8.choose_linears(model, filter=lambda module, name: name == "1")
    assert chosen == ["1"] and skipped == {"0": "excluded by the filter"}


# ---------------------------------------------------------------------------------------------------------------------
# torchao's float8 tensor on the CPU (its hardware check stubbed): the graph, the report, the compile
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def torchao_on_cpu(monkeypatch):
    """quantize_linears as on an FP8 GPU: torchao's own capability assertion and the GPU check stubbed (torchao's
    Float8Tensor computes on the CPU through torch._scaled_mm)."""
    pytest.importorskip("torchao", minversion="0.18")
    import torchao.quantization.quant_api as quant_api

    monkeypatch.setattr(quant_api, "_check_hardware_support", lambda granularity: None)
    monkeypatch.setattr(fp8, "fp8_unavailable_reason", lambda model=None: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)


def dynamo_graphs(model, inputs) -> list[torch.fx.GraphModule]:
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=record, dynamic=False)(**inputs)
    torch._dynamo.reset()
    return graphs


def graph_signature(gm: torch.fx.GraphModule) -> list[tuple[str, str]]:
    return [(n.op, str(n.target)) for n in gm.graph.nodes]


@CPU_ROWWISE_FP8
def test_quantize_linears_quantizes_the_chosen_layers_and_leaves_inductor_config(torchao_on_cpu):
    model, inputs = tiny_wan(layers=1)
    expected, _ = fp8.choose_linears(model)
    with torch.no_grad():
        ref = model(**inputs)[0]
    tuning = torch._inductor.config.coordinate_descent_tuning
    result = fp8.quantize_linears(model)
    assert result.applied and result.quantized == expected and not result.inductor_tuning
    modules = dict(model.named_modules())
    assert all(type(modules[n].weight).__name__ == "Float8Tensor" for n in expected)
    assert all(type(modules[n].weight) is nn.Parameter for n in result.skipped)
    assert torch._inductor.config.coordinate_descent_tuning == tuning  # torchao's process-wide setter not called
    assert "quantized" in result.summary()
    with torch.no_grad():
        out = model(**inputs)[0]
    assert 0 < rel_l2(out, ref) < 8e-2
    again = fp8.quantize_linears(model)  # idempotent: FP8 weights are reported, not quantized twice
    assert again.quantized == [] and all(again.skipped[n] == "already FP8" for n in expected)


def test_inductor_tuning_applies_torchaos_settings(torchao_on_cpu):
    model, _ = tiny_wan(layers=1)
    with torch._inductor.config.patch(coordinate_descent_tuning=False):
        result = fp8.quantize_linears(model, inductor_tuning=True)
        assert result.inductor_tuning and torch._inductor.config.coordinate_descent_tuning


@CPU_ROWWISE_FP8
def test_fp8_linears_leave_the_dynamo_graph_and_the_attention_sites_unchanged(torchao_on_cpu):
    from paro_compile.config import ParoConfig
    from paro_compile.passes.discover import find_attention_sites

    model, inputs = tiny_wan(layers=2)
    (plain,) = dynamo_graphs(model, inputs)
    fp8.quantize_linears(model)
    (quantized,) = dynamo_graphs(model, inputs)
    assert graph_signature(quantized) == graph_signature(plain)
    sites = [[(s.site_id, s.shape, s.reasons) for s in find_attention_sites(gm, ParoConfig())] for gm in (plain, quantized)]
    assert sites[0] == sites[1] and len(sites[0]) == 4


@pytest.mark.slow
@CPU_ROWWISE_FP8
def test_paro_compile_of_an_fp8_model_lowers_every_site_with_the_same_report(torchao_on_cpu):
    """backend="paro" (Inductor included) on FP8 linears: no graph break, the same report as the bf16 model's, output
    close to the eager FP8 model. Inductor's vectorized CPU code for a bf16 amax fused with float8 casts does not
    compile on torch 2.13 (a conflicting declaration in the generated C++): ``cpp.simdlen=1`` (scalar CPU code) here;
    the GPU path is Triton."""
    from paro_compile.backend import rewrite_graph
    from paro_compile.config import ParoConfig
    from paro_compile.grid import TokenGrid
    from paro_compile.plan import SitePlan, Plan
    from paro_compile.report import CompileReport

    model, inputs = tiny_wan(layers=1)
    grid = TokenGrid(frames=2, height=4, width=4)
    mask = torch.ones(1, 2, 2, 2, dtype=torch.bool)
    mask[0, :, 0, 1] = False
    plan = Plan(sites={"blocks.0.attn1#0": SitePlan.from_orders("blocks.0.attn1#0", ["HWF", "FWH"], grid, block_size=16,
                                                                  block_masks=mask)})
    options = {"plan": plan, "compile_threads": 1, "cpp.simdlen": 1}
    (plain,) = dynamo_graphs(model, inputs)
    expected = CompileReport(0)
    rewrite_graph(plain, ParoConfig.from_options(options), plan, expected)
    fp8.quantize_linears(model)
    with torch.no_grad():
        eager = model(**inputs)[0]
    torch._dynamo.reset()
    paro_compile.clear_reports()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        out = torch.compile(model, backend="paro", dynamic=False, options=options)(**inputs)[0]
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    report = paro_compile.last_report()
    assert [s.__dict__ for s in report.sites] == [s.__dict__ for s in expected.sites]
    assert [s.site_id for s in report.sites] == ["blocks.0.attn1#0", "blocks.0.attn2#0"] and not report.fallbacks
    self_attention, cross_attention = report.sites
    assert self_attention.density < 1.0 and self_attention.permutation != "identity"
    assert cross_attention.cross_attention and cross_attention.density == 1.0  # text keys: dense, no order
    assert 0 < rel_l2(out, eager) < 6e-2


# ---------------------------------------------------------------------------------------------------------------------
# GPU: the real recipe
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=FP8_GPU)])
def test_fp8_linears_then_paro_on_the_gpu_match_eager(device):
    """Output of FP8 linears + paro (dense INT8/FP8 attention, the text cross-attention included) against the eager FP8
    model (SDPA: paro's attention error alone) and against the eager bf16 model (both errors): within TOL_VS_EAGER_FP8 /
    TOL_VS_EAGER_BF16."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=16, out_channels=16,
        text_dim=256, freq_dim=256, ffn_dim=1024, num_layers=2, rope_max_seq_len=256,
    ).eval().requires_grad_(False).to(device, torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 16, 4, 32, 32, generator=g).to(device, torch.bfloat16),
                  timestep=torch.tensor([500], device=device),
                  encoder_hidden_states=torch.randn(1, 64, 256, generator=g).to(device, torch.bfloat16),
                  return_dict=False)
    with torch.no_grad():
        ref_bf16 = model(**inputs)[0]
    result = fp8.quantize_linears(model)
    assert result.applied and len(result.quantized) == 20, result.summary()  # 10 per block: attn1, attn2, ffn
    with torch.no_grad():
        ref_fp8 = model(**inputs)[0]
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        out = torch.compile(model, backend="paro", dynamic=False)(**inputs)[0]
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    report = paro_compile.last_report()
    self_attention = [s for s in report.sites if s.site_id.endswith("attn1#0")]
    cross_attention = [s for s in report.sites if s.site_id.endswith("attn2#0")]
    assert len(self_attention) == 2 and all(s.lowered for s in self_attention), report.summary()
    assert len(cross_attention) == 2 and all(s.lowered and s.cross_attention for s in cross_attention), report.summary()
    assert rel_l2(out, ref_fp8) < TOL_VS_EAGER_FP8
    assert rel_l2(out, ref_bf16) < TOL_VS_EAGER_BF16


@CPU_ROWWISE_FP8
def test_quality_benchmark_fp8_on_cpu_quantizes_through_torchao():
    """`benchmarks/quality.py --fp8-on-cpu` measures FP8-linear numerics without an FP8 GPU: inside its bypass
    `quantize_linears` hands the linears to torchao, which computes them through torch._scaled_mm on the CPU; outside
    it the recipe still refuses the CPU."""
    pytest.importorskip("torchao", minversion="0.18")
    from bench_helpers import load_benchmark

    quality = load_benchmark("quality")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).to(torch.bfloat16)
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    expected = model(x)
    with quality.fp8_capability_bypass(True):
        result = fp8.quantize_linears(model, filter=lambda module, name: True)
    assert result.applied and sorted(result.quantized) == ["0", "2"]
    assert all(fp8.is_fp8_weight(model[i].weight) for i in (0, 2))
    with torch.no_grad():
        out = model(x)
    error = float((out.float() - expected.float()).norm() / expected.float().norm())
    assert 0 < error < 0.1  # e4m3 rounding: changed, but close
    with pytest.warns(fp8.Fp8UnavailableWarning):
        assert not fp8.quantize_linears(nn.Sequential(nn.Linear(64, 64)).to(torch.bfloat16)).applied
