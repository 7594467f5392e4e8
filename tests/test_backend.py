"""The paro backend end to end on the built-in toy video DiT."""
import importlib.metadata

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import paro_compile
from paro_compile.config import ParoConfig
from paro_compile.toy.dit import ToyVideoDiT, toy_inputs
from tests.conftest import rel_l2

EXACT = {"allow_fp32": True, "qk_bits": 16, "pv_dtype": "fp16"}


def make_model(device, dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    return ToyVideoDiT(**kwargs).eval().to(device, dtype)


def test_entry_point_registers_backend_once():
    names = [ep.name for ep in importlib.metadata.entry_points(group="torch_dynamo_backends") if ep.name == "paro"]
    assert names == ["paro"]
    assert "paro" in torch._dynamo.list_backends()


@torch.no_grad()
def test_toy_dit_no_quant_matches_eager_exactly(device):
    model = make_model(device)
    inputs = toy_inputs(device=device)
    ref = model(**inputs)
    out = torch.compile(model, backend="paro", options=EXACT)(**inputs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    report = paro_compile.last_report()
    assert [s.site_id for s in report.sites] == ["blocks.0.attn#0", "blocks.1.attn#0"]
    assert all(s.lowered for s in report.sites)


@pytest.mark.parametrize("qk_bits,pv_dtype,bound", [(8, "fp8", 3e-2), (8, "int8", 3e-2), (4, "fp8", 0.15)])
@torch.no_grad()
def test_toy_dit_quantized_close_to_eager(device, qk_bits, pv_dtype, bound):
    model = make_model(device)
    inputs = toy_inputs(device=device)
    ref = model(**inputs)
    out = torch.compile(model, backend="paro", options={"allow_fp32": True, "qk_bits": qk_bits, "pv_dtype": pv_dtype})(**inputs)
    err = rel_l2(out, ref)
    assert err < bound, f"rel-L2 {err:.3e}"
    assert err > 0, "quantization had no effect: the site was not lowered"


@torch.no_grad()
def test_toy_dit_bf16_default_options(device):
    model = make_model(device, torch.bfloat16)
    inputs = toy_inputs(device=device, dtype=torch.bfloat16)
    ref = model(**inputs)
    out = torch.compile(model, backend="paro")(**inputs)
    assert rel_l2(out, ref) < 5e-2
    assert all(s.lowered and s.qk_bits == 8 and s.pv_dtype == "fp8" for s in paro_compile.last_report().sites)


@torch.no_grad()
def test_same_shapes_compile_once():
    model = make_model("cpu")
    compiled = torch.compile(model, backend="paro", options=EXACT)
    compiled(**toy_inputs(seed=1))
    compiled(**toy_inputs(seed=2))
    assert len(paro_compile.report.compile_reports) == 1


class SingleAttention(nn.Module):
    def __init__(self, head_dim=64, heads=2, kv_heads=2, kv_len=None, **sdpa_kwargs):
        super().__init__()
        self.head_dim, self.heads, self.kv_heads, self.kv_len, self.sdpa_kwargs = head_dim, heads, kv_heads, kv_len, sdpa_kwargs
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.proj(x)[..., :1].expand(b, n, self.heads * self.head_dim).reshape(b, n, self.heads, self.head_dim).transpose(1, 2) * x.sum()
        m = self.kv_len or n
        k = torch.sin(torch.arange(b * self.kv_heads * m * self.head_dim, dtype=x.dtype, device=x.device)).view(b, self.kv_heads, m, self.head_dim)
        v = torch.cos(k)
        kwargs = dict(self.sdpa_kwargs)
        if kwargs.pop("with_mask", False):
            kwargs["attn_mask"] = torch.ones(n, m, dtype=torch.bool, device=x.device)
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


FALLBACKS = [
    ("attn_mask", dict(with_mask=True), {}),
    ("dropout_p", dict(dropout_p=0.5), {}),
    ("is_causal", dict(is_causal=True), {}),
    ("head_dim", dict(head_dim=256), {}),
    ("grouped-query", dict(heads=4, kv_heads=2, enable_gqa=True), {}),
    ("cross-attention", dict(kv_len=24), {"lower_cross_attention": False}),
    ("dtype torch.float32", {}, {"allow_fp32": False}),
]


@pytest.mark.parametrize("reason,module_kwargs,options", FALLBACKS, ids=[f[0] for f in FALLBACKS])
def test_unsupported_sites_fall_back_with_reason(reason, module_kwargs, options):
    model = SingleAttention(**module_kwargs).eval()
    x = torch.randn(1, 40, 16)
    with torch.no_grad():
        if reason == "dropout_p":
            torch.manual_seed(0)
        ref = model(x)
        if reason == "dropout_p":
            torch.manual_seed(0)
        out = torch.compile(model, backend="paro", options={"allow_fp32": True, **options})(x)
    site = paro_compile.last_report().sites[0]
    assert not site.lowered
    assert any(reason in r for r in site.reasons), site.reasons
    if reason != "dropout_p":  # dropout draws different random numbers once compiled
        torch.testing.assert_close(out, ref)


def test_needs_grad_falls_back():
    model = SingleAttention()
    x = torch.randn(1, 40, 16)
    out = torch.compile(model, backend="paro", options={"allow_fp32": True})(x)
    site = paro_compile.last_report().sites[0]
    assert not site.lowered and any("require grad" in r for r in site.reasons)
    torch.testing.assert_close(out, model(x))


def test_fallback_error_policy_names_site_and_fix():
    model = SingleAttention(head_dim=256).eval()
    with torch.no_grad(), pytest.raises(Exception, match=r"(?s)<root>#0: head_dim 256.*fallback"):
        torch.compile(model, backend="paro", options={"allow_fp32": True, "fallback": "error"})(torch.randn(1, 40, 16))


def test_options_split_between_paro_and_inductor():
    config = ParoConfig.from_options({"density": 0.3, "qk_bits": 4, "max_autotune": True}, mode="max-autotune-no-cudagraphs")
    assert config.density == 0.3 and config.qk_bits == 4
    assert config.inductor["max_autotune"] is True
    assert config.inductor["coordinate_descent_tuning"] is True
    assert ParoConfig.from_options({"mode": "reduce-overhead"}).inductor["triton.cudagraphs"] is True
    with pytest.raises(ValueError, match="unknown paro/Inductor option"):
        ParoConfig.from_options({"densty": 0.3})
    with pytest.raises(ValueError, match="qk_bits"):
        ParoConfig.from_options({"qk_bits": 3})


@torch.no_grad()
def test_mode_reaches_inductor(monkeypatch):
    seen = {}
    import torch._inductor.compile_fx as compile_fx_module

    original = compile_fx_module.compile_fx

    def spy(gm, example_inputs, config_patches=None, **kwargs):
        seen.setdefault("patches", config_patches)  # compile_fx re-enters itself without patches
        return original(gm, example_inputs, config_patches=config_patches, **kwargs)

    monkeypatch.setattr(compile_fx_module, "compile_fx", spy)
    model = SingleAttention().eval()
    torch.compile(model, backend="paro", mode="max-autotune-no-cudagraphs")(torch.randn(1, 40, 16))
    assert seen["patches"]["max_autotune"] is True
    torch._dynamo.reset()
    seen.clear()
    torch.compile(model, backend="paro", options={"mode": "max-autotune-no-cudagraphs", "allow_fp32": True})(torch.randn(1, 40, 16))
    assert seen["patches"]["max_autotune"] is True
    assert paro_compile.last_report().sites[0].lowered


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
@torch.no_grad()
def test_cuda_graphs_through_the_backend():
    """mode="reduce-overhead" (Inductor's CUDA graphs) records the paro op and replays it: no cudagraph skip, and
    replays give the result of the op's first (eager, autotuning) call on new inputs."""
    from torch._dynamo.utils import counters

    from paro_compile.kernels import prologue

    prologue._DUMMIES.clear()  # so that the op's cached argument tensors are first made inside the graph pool
    model = make_model("cuda", torch.bfloat16)
    counters.clear()
    compiled = torch.compile(model, backend="paro", options={"mode": "reduce-overhead"})
    plain = torch.compile(make_model("cuda", torch.bfloat16), backend="paro")
    for seed in range(4):  # warm-up, record, replays
        inputs = toy_inputs(device="cuda", dtype=torch.bfloat16, seed=seed)
        out = compiled(**inputs).clone()
        ref = plain(**inputs)
        assert rel_l2(out, ref) < 1e-2, f"call {seed}: CUDA-graph replay differs from the plain compile"
    assert counters["inductor"].get("cudagraph_skips", 0) == 0, dict(counters["inductor"])
    assert all(s.lowered for s in paro_compile.last_report().sites)


def test_custom_op_passes_opcheck():
    q, k, v = (torch.randn(1, 2, 70, 64) for _ in range(3))
    perm = torch.stack([torch.randperm(70) for _ in range(2)])
    from paro_compile.kernels.block_mask import BlockMask

    mask = torch.rand(2, 2, 2) < 0.5
    mask[:, [0, 1], [0, 1]] = True
    tensors, sizes = BlockMask.from_dense(mask, kept_bits=True).as_op_args()
    op = torch.ops.paro.attention.default
    bias = torch.zeros(1, 1, 70).masked_fill(torch.rand(1, 1, 70) < 0.2, float("-inf"))
    torch.library.opcheck(op, (q, k, v, perm, None, [None] * 4, [64, 64, 1, 0, 0, 0], 0.125, 8, "fp8", False, 1.0,
                               "reference"))
    torch.library.opcheck(op, (q, k, v, None, bias, [None] * 4, [64, 64, 1, 0, 0, 0], 0.125, 16, "fp16", False, 1.0,
                               "reference"))
    torch.library.opcheck(op, (q, k, v, perm, None, tensors, sizes, 0.125, 8, "fp8", True, 0.7, "reference"))
    kv = torch.randn(1, 2, 33, 64)
    torch.library.opcheck(op, (q, kv, kv, None, None, [None] * 4, [64, 64, 1, 0, 0, 0], 0.125, 8, "fp8", False, 1.0,
                               "reference"))


@torch.no_grad()
def test_auto_calibration_through_the_backend_builds_plan_once(tmp_path):
    model = make_model("cpu")
    options = {**EXACT, "auto_calibrate": True, "density": 0.5, "block_size": 16, "cache_dir": str(tmp_path)}
    compiled = torch.compile(model, backend="paro", options=options)
    outputs = [compiled(**toy_inputs(seed=s)) for s in range(3)]
    lowered_reports = [r for r in paro_compile.report.compile_reports if r.sites]
    assert len(lowered_reports) == 1, "the plan must be built and compiled exactly once"
    assert all(s.lowered and s.density < 1.0 for s in lowered_reports[0].sites)
    plans = list((tmp_path / "plans").glob("*.safetensors"))
    assert len(plans) == 1
    # The first (observed) call is dense SDPA; later calls use the sparse plan.
    torch.testing.assert_close(outputs[0], model(**toy_inputs(seed=0)), rtol=1e-5, atol=1e-5)
    assert (outputs[2] - model(**toy_inputs(seed=2))).abs().max() > 0

    # A new process-level compile of the same model and shapes reuses the cached plan: no calibration.
    torch._dynamo.reset()
    paro_compile.clear_reports()
    torch.compile(model, backend="paro", options=options)(**toy_inputs(seed=3))
    assert len(paro_compile.report.compile_reports) == 1


# ---- plan errors at compile time ---------------------------------------------------------------------------------
def toy_plan(depth: int = 2):
    from paro_compile.toy.dit import toy_calibration_inputs, toy_model

    return paro_compile.calibrate(toy_model(depth=depth), toy_calibration_inputs(count=1), density=0.5, block_size=16,
                                  progress=False)


def test_invalid_plan_file_raises_plan_error_unwrapped(tmp_path):
    """Not BackendCompilerFailed with torch's hints for reporting a PyTorch bug: the PlanError itself, naming the file,
    the site and the fix at the top, and the failed compile in the report."""
    import json

    from safetensors.torch import safe_open, save_file
    from torch._dynamo.exc import BackendCompilerFailed

    from paro_compile.plan import PlanError
    from paro_compile.toy.dit import toy_calibration_inputs, toy_model

    path = toy_plan().save(tmp_path / "toy.paro.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["paro_plan"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    header["sites"][0]["block_size"] = 48
    bad = tmp_path / "bad.paro.safetensors"
    save_file(tensors, str(bad), metadata={"paro_plan": json.dumps(header)})
    compiled = torch.compile(toy_model(), backend="paro", options={**EXACT, "plan": str(bad)})
    with torch.no_grad(), pytest.raises(PlanError) as info:
        compiled(**toy_calibration_inputs(count=1)[0])
    message = str(info.value)
    assert not isinstance(info.value, BackendCompilerFailed)
    assert message.startswith(f"plan file {bad}: site 'blocks.0.attn#0' (sites[0]): field 'block_size' is 48, the "
                              "kernel runs token blocks of 16, 32, 64, 128; re-run calibration with one of them"), message
    assert "TORCHDYNAMO_VERBOSE" not in message and "backend='paro' raised" not in message
    assert paro_compile.last_report().error.startswith("PlanError: plan file")


def test_plan_of_another_model_says_so(tmp_path):
    from paro_compile.plan import PlanMismatchError
    from paro_compile.toy.dit import toy_calibration_inputs, toy_model

    path = toy_plan(depth=2).save(tmp_path / "two_blocks.paro.safetensors")
    compiled = torch.compile(toy_model(depth=3), backend="paro", options={**EXACT, "plan": str(path)})
    with torch.no_grad(), pytest.raises(PlanMismatchError) as info:
        compiled(**toy_calibration_inputs(count=1)[0])
    message = str(info.value)
    assert message.startswith(f"plan file {path} is for another model at site 'blocks.2.attn#0': graph has attention "
                              "site(s) the plan does not cover: ['blocks.2.attn#0']. Fix: calibrate this model"), message
    assert "calibrated on a model with fingerprint" in message


def test_paro_compile_checks_the_plan_before_tracing(tmp_path):
    from paro_compile.plan import PlanMismatchError
    from paro_compile.toy.dit import toy_calibration_inputs, toy_model

    path = toy_plan(depth=2).save(tmp_path / "two_blocks.paro.safetensors")
    with pytest.raises(PlanMismatchError) as info:  # raised by the call itself, before any tracing
        paro_compile.compile(toy_model(depth=1), plan=path, options=EXACT)
    assert str(info.value).startswith(f"plan file {path} is for another model: its site 'blocks.1.attn#0' names module "
                                      "'blocks.1.attn', which ToyVideoDiT does not have"), str(info.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        paro_compile.compile(toy_model(), plan=tmp_path / "missing.paro.safetensors")
    with pytest.raises(ValueError, match="qk_bits"):
        paro_compile.compile(toy_model(), plan=path, options={"qk_bits": 3})
    with pytest.raises(ValueError, match="on_missing_shape"):
        paro_compile.compile(toy_model(), plan=path, options={"on_missing_shape": "sparse"})

    adapted = toy_model(depth=2)  # the same modules, one more parameter: another fingerprint, the plan still fits
    adapted.blocks[0].attn.register_parameter("lora_scale", torch.nn.Parameter(torch.ones(1)))
    with pytest.warns(UserWarning, match="calibrated on a model with fingerprint"):
        compiled = paro_compile.compile(adapted, plan=path, options=EXACT)
    with torch.no_grad(), pytest.warns(UserWarning, match="its sites fit this graph, so it is used"):
        compiled(**toy_calibration_inputs(count=1)[0])
    report = paro_compile.last_report()
    assert all(s.lowered and s.density < 1.0 for s in report.sites)
    assert any("calibrated on a model with fingerprint" in note for note in report.notes)
