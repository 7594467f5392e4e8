"""One plan, several token grids, through torch.compile: each grid compiles its own graph with its own entries and
stays sparse (going back to a grid reuses its graph), with automatic dynamic shapes and with dynamic=False; a grid
the plan lacks follows ``on_missing_shape``; ``paro calibrate --add-to`` adds a grid to a plan file."""
import warnings

import pytest
import torch

import paro_compile
from paro_compile.plan import Plan, PlanMismatchError
from paro_compile.toy.dit import toy_inputs, toy_model

EXACT = {"allow_fp32": True, "qk_bits": 16, "pv_dtype": "fp16", "impl": "reference"}
LARGE, SMALL = 16, 8  # toy DiT latents: 2×8×8 + 8 text = 136 tokens, 2×4×4 + 8 text = 40 tokens


def toy_call(size: int, seed: int = 0) -> dict:
    return toy_inputs(frames=2, height=size, width=size, seed=seed)


def small_calibration_inputs() -> list[dict]:
    """`paro calibrate --inputs tests.test_multi_shape:small_calibration_inputs`: the toy DiT at 2×4×4 latents."""
    from paro_compile.toy.dit import toy_calibration_inputs

    return toy_calibration_inputs(size=SMALL)


@pytest.fixture(scope="module")
def toy():
    return toy_model()


@pytest.fixture(scope="module")
def toy_plans(toy, tmp_path_factory):
    """(large-grid plan, small-grid plan, merged plan file)."""
    large = paro_compile.calibrate(toy, [toy_call(LARGE, s) for s in range(2)], density=0.5, block_size=16, progress=False)
    small = paro_compile.calibrate(toy, [toy_call(SMALL, s) for s in range(2)], density=0.5, block_size=16, progress=False)
    path = large.merge(small).save(tmp_path_factory.mktemp("plans") / "toy.paro.safetensors")
    return large, small, path


def graphs():
    return list(paro_compile.report.compile_reports)


def sparse_everywhere(report) -> bool:
    return bool(report.sites) and all(s.lowered and s.density < 1.0 and not s.reasons for s in report.sites)


# ---- the scenario: a CogVideoX calibrated at two resolutions ---------------------------------------------------------
@pytest.mark.parametrize("dynamic", [None, False], ids=["automatic-dynamic", "dynamic-False"])
@torch.no_grad()
def test_cogvideox_two_resolutions_one_plan_stay_sparse(tmp_path, dynamic):
    """A CogVideoX plan calibrated at 12×12 and 8×8 latents: the compiled model runs sparse at 12×12, at 8×8 (with
    automatic dynamic shapes Dynamo hands the backend a symbolic token count, which it keeps static), and at 12×12
    again on its first graph, not on a dense symbolic one."""
    pytest.importorskip("diffusers")
    from paro_compile.toy import cogvideox as cog

    model = cog.new_toy_cogvideox(cog.TINY_CONFIG, seed=0).eval()

    def call(size: int, seed: int = 0) -> dict:
        generator = torch.Generator().manual_seed(seed)
        latents = torch.randn(1, cog.TINY_FRAMES, 4, size, size, generator=generator)
        text = torch.randn(1, 16, int(model.config.text_embed_dim), generator=generator)
        return cog.model_inputs(latents, text, 0.5, cog.rotary_embeddings(model, cog.TINY_FRAMES, size, size))

    first, second = 12, 8  # 4×6×6 + 16 text = 160 tokens, 4×4×4 + 16 text = 80 tokens
    plans = [paro_compile.calibrate(model, [call(size, s) for s in range(2)], density=0.5, block_size=16, progress=False)
             for size in (first, second)]
    path = plans[0].merge(plans[1]).save(tmp_path / "cogvideox.paro.safetensors")
    compiled = torch.compile(model, backend="paro", dynamic=dynamic, options={**EXACT, "plan": str(path)})
    out_first = compiled(**call(first))[0]
    out_second = compiled(**call(second))[0]
    again = compiled(**call(first))[0]
    reports = graphs()
    assert len(reports) == 2, [r.title() for r in reports]
    assert all(sparse_everywhere(r) for r in reports), [r.summary() for r in reports]
    assert [r.sites[0].shape[2] for r in reports] == [160, 80]
    assert torch.equal(again, out_first), "back at the first resolution the first (sparse) graph must run"
    dense = model(**call(first))[0]
    assert not torch.allclose(out_first, dense, atol=1e-4), "the first resolution ran dense"
    assert torch.isfinite(out_second).all()
    if dynamic is None:
        assert any("token axis kept static" in note for note in reports[1].notes), reports[1].notes


# ---- the toy DiT: what each grid's graph computes ------------------------------------------------------------------
@torch.no_grad()
def test_the_graph_kept_static_computes_what_a_static_compile_does(toy, toy_plans):
    """The second grid's graph, traced symbolically by Dynamo and specialized by the backend, computes exactly what a
    dynamic=False compile with that grid's single-shape plan computes."""
    large, small, path = toy_plans
    compiled = torch.compile(toy, backend="paro", options={**EXACT, "plan": str(path)})
    compiled(**toy_call(LARGE))
    out = compiled(**toy_call(SMALL, seed=3))
    assert sparse_everywhere(paro_compile.last_report())
    torch._dynamo.reset()
    static = torch.compile(toy, backend="paro", dynamic=False, options={**EXACT, "plan": small})(**toy_call(SMALL, seed=3))
    torch.testing.assert_close(out, static, rtol=0, atol=0)


@torch.no_grad()
def test_batch_sizes_share_a_grids_graph(toy, toy_plans):
    """Only the token axis is kept static: a batch size that changes reuses the grid's graph (symbolic batch)."""
    _, _, path = toy_plans
    compiled = torch.compile(toy, backend="paro", options={**EXACT, "plan": str(path)})
    for size in (LARGE, SMALL):
        for batch in (2, 3, 4):
            compiled(**toy_inputs(batch=batch, frames=2, height=size, width=size))
    per_grid = {}
    for report in graphs():
        per_grid.setdefault(report.sites[0].shape[2], []).append(report)
    assert sorted(per_grid) == [40, 136]
    assert all(len(reports) <= 2 for reports in per_grid.values()), [r.title() for r in graphs()]  # batch 2, then symbolic
    assert all(sparse_everywhere(r) for r in graphs())


@torch.no_grad()
def test_dynamic_true_keeps_one_symbolic_graph(toy, toy_plans):
    """dynamic=True asks for one graph for every grid: the plan's orders apply to the symbolic grid, masks are dense
    (the order-plan path), nothing is specialized."""
    _, _, path = toy_plans
    compiled = torch.compile(toy, backend="paro", dynamic=True, options={**EXACT, "plan": str(path)})
    for size in (LARGE, SMALL, LARGE):
        torch.testing.assert_close(compiled(**toy_call(size)), toy(**toy_call(size)), rtol=1e-5, atol=1e-5)
    report = paro_compile.last_report()
    assert all(not isinstance(s.shape[2], int) for s in report.sites)
    assert all("block masks need static shapes; dense at this site" in s.reasons for s in report.sites)
    assert not any("token axis kept static" in note for r in graphs() for note in r.notes)


# ---- a grid the plan lacks -----------------------------------------------------------------------------------------
@torch.no_grad()
def test_missing_grid_runs_dense_with_a_warning_and_a_reason(toy, toy_plans, tmp_path):
    large, _, _ = toy_plans
    path = large.save(tmp_path / "large.paro.safetensors")
    compiled = torch.compile(toy, backend="paro", options={**EXACT, "plan": str(path)})
    out_large = compiled(**toy_call(LARGE))
    with pytest.warns(UserWarning, match=r"does not match this graph's token grid at site 'blocks.0.attn#0'") as caught:
        out_small = compiled(**toy_call(SMALL))
    message = next(str(w.message) for w in caught if "token grid" in str(w.message))
    assert str(path) in message and "--add-to" in message and "on_missing_shape" in message
    report = paro_compile.last_report()
    assert all(s.lowered and s.density == 1.0 for s in report.sites)
    assert all("no plan entry for this shape (graph has seq_len 40 (2×4×4 + 8 text), plan has seq_len 136 "
               "(2×8×8 + 8 text) only); dense at this site" in s.reasons[0] for s in report.sites)
    assert report.degraded == report.sites
    torch.testing.assert_close(out_small, toy(**toy_call(SMALL)), rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the large grid's graph is reused: no new compile, no warning
        assert torch.equal(compiled(**toy_call(LARGE)), out_large)
    assert len(graphs()) == 2 and sparse_everywhere(graphs()[0])


def test_missing_grid_with_on_missing_shape_error_names_file_site_and_fix(toy, toy_plans, tmp_path):
    from torch._dynamo.exc import BackendCompilerFailed

    large, _, _ = toy_plans
    path = large.save(tmp_path / "large.paro.safetensors")
    compiled = torch.compile(toy, backend="paro", options={**EXACT, "plan": str(path), "on_missing_shape": "error"})
    with torch.no_grad():
        compiled(**toy_call(LARGE))
        with pytest.raises(PlanMismatchError) as info:
            compiled(**toy_call(SMALL))
    assert not isinstance(info.value, BackendCompilerFailed)
    message = str(info.value)
    assert message.startswith(f"plan file {path} does not match this graph's token grid at site 'blocks.0.attn#0' "
                              "(and 1 more site): graph has seq_len 40 (2×4×4 + 8 text), plan has seq_len 136 "
                              "(2×8×8 + 8 text) only. Fix: add this shape to the plan (`paro calibrate MODEL --inputs "
                              f"INPUTS_AT_THIS_SHAPE --add-to {path}`"), message
    assert "The plan covers: seq_len 136 (2×8×8 + 8 text) at 2 sites." in message
    assert "TORCHDYNAMO_VERBOSE" not in message and "BackendCompilerFailed" not in message
    assert paro_compile.last_report().error.startswith("PlanMismatchError")


@torch.no_grad()
def test_missing_grid_with_on_missing_shape_calibrate(toy, toy_plans, tmp_path):
    """The small grid is calibrated on its first call (dense, observed), cached, and sparse from the second call;
    the large grid keeps the plan's entries; a new compile finds the calibrated grid in the cache."""
    large, _, _ = toy_plans
    options = {**EXACT, "plan": large, "on_missing_shape": "calibrate", "cache_dir": str(tmp_path)}
    compiled = torch.compile(toy, backend="paro", options=options)
    out_large = compiled(**toy_call(LARGE))
    observed = compiled(**toy_call(SMALL))
    torch.testing.assert_close(observed, toy(**toy_call(SMALL)), rtol=1e-5, atol=1e-5)
    sparse = compiled(**toy_call(SMALL))
    report = paro_compile.last_report()
    assert sparse_everywhere(report) and all(s.shape[2] == 40 for s in report.sites)
    assert any("auto-calibrated (on_missing_shape='calibrate', density 0.5, block 16" in n for n in report.notes)
    assert not torch.equal(sparse, observed)
    assert torch.equal(compiled(**toy_call(LARGE)), out_large)
    assert len(list((tmp_path / "plans").glob("*.safetensors"))) == 1
    torch._dynamo.reset()
    again = torch.compile(toy, backend="paro", options=options)
    again(**toy_call(LARGE))
    assert torch.equal(again(**toy_call(SMALL)), sparse), "the cached calibration must serve the first call"


# ---- paro calibrate --add-to ---------------------------------------------------------------------------------------
def test_paro_calibrate_add_to_adds_a_grid(tmp_path, capsys):
    from paro_compile import cli

    plan_path = tmp_path / "toy.paro.safetensors"
    base = ["calibrate", "paro_compile.toy:toy_model", "-q"]
    assert cli.main(base + ["--inputs", "paro_compile.toy:toy_calibration_inputs", "--density", "0.5",
                            "--block-size", "16", "--out", str(plan_path)]) == 0
    small = base + ["--inputs", "tests.test_multi_shape:small_calibration_inputs"]
    capsys.readouterr()
    assert cli.main(small + ["--add-to", str(plan_path)]) == 0
    err = capsys.readouterr().err
    assert "adding a token grid to" in err and "from the plan: density 0.5" in err and "block_size 16" in err
    plan = Plan.load(plan_path)
    assert [e.seq_len for e in plan.entries("blocks.0.attn#0")] == [136, 40]
    assert {e.block_size for e in plan.all_entries()} == {16} and plan.density == 0.5

    assert cli.main(small + ["--add-to", str(plan_path)]) == 3
    assert "already has an entry for seq_len 40" in capsys.readouterr().err
    elsewhere = tmp_path / "replaced.paro.safetensors"
    assert cli.main(small + ["--add-to", str(plan_path), "--replace", "--out", str(elsewhere)]) == 0
    assert Plan.load(elsewhere).describe_shapes() == plan.describe_shapes()
    assert cli.main(small + ["--add-to", str(plan_path), "--replace", "--density", "0.7", "--out",
                             str(tmp_path / "x.paro.safetensors")]) == 3
    assert "their density differs (0.5 vs 0.7)" in capsys.readouterr().err
    assert cli.main(small + ["--add-to", str(tmp_path / "missing.paro.safetensors")]) == 2
    assert "no such plan file" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
@torch.no_grad()
def test_two_grids_with_the_gpu_kernel(tmp_path):
    """The same on CUDA in bf16 with the Triton kernel, and the missing-grid error raised as itself by this torch."""
    from torch._dynamo.exc import BackendCompilerFailed

    model = toy_model().to("cuda", torch.bfloat16)

    def call(size: int, seed: int = 0) -> dict:
        return toy_inputs(frames=2, height=size, width=size, seed=seed, device="cuda", dtype=torch.bfloat16)

    large, small = (paro_compile.calibrate(model, [call(size, s) for s in range(2)], density=0.5, block_size=16,
                                           progress=False) for size in (LARGE, SMALL))
    path = large.merge(small).save(tmp_path / "toy.paro.safetensors")
    compiled = torch.compile(model, backend="paro", options={"plan": str(path)})
    first = compiled(**call(LARGE)).clone()
    compiled(**call(SMALL))
    assert torch.equal(compiled(**call(LARGE)), first)
    assert len(graphs()) == 2 and all(sparse_everywhere(r) for r in graphs()), [r.summary() for r in graphs()]

    torch._dynamo.reset()
    only_large = large.save(tmp_path / "large.paro.safetensors")
    strict = torch.compile(model, backend="paro", options={"plan": str(only_large), "on_missing_shape": "error"})
    strict(**call(LARGE))
    with pytest.raises(PlanMismatchError) as info:
        strict(**call(SMALL))
    assert not isinstance(info.value, BackendCompilerFailed)
    assert str(info.value).startswith(f"plan file {only_large} does not match this graph's token grid")
