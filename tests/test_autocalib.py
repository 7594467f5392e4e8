import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from paro_compile.autocalib import graph_fingerprint, make_auto_calibrating_callable
from paro_compile.calibration import calibrate
from paro_compile.config import ParoConfig
from paro_compile.grid import TokenGrid
from paro_compile.passes.discover import is_sdpa
from paro_compile.plan import Plan

# Latent [B, F, C, H, W] = [1, 2, 3, 4, 4], patch 1, plus 4 text tokens first: 36 tokens.
GRID = TokenGrid(frames=2, height=4, width=4, text_tokens=4)


class TinyVideoDiT(nn.Module):
    def __init__(self, dim=128, heads=2):
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(3, dim)
        self.text = nn.Linear(5, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, hidden_states, encoder_hidden_states):
        b = hidden_states.shape[0]
        x = self.embed(hidden_states.permute(0, 1, 3, 4, 2).flatten(1, 3))  # (F, H, W) row-major tokens
        x = torch.cat([self.text(encoder_hidden_states), x], 1)
        q, k, v = self.qkv(x).view(b, x.shape[1], 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out(o.transpose(1, 2).flatten(2))


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, 3, 4, 4, generator=gen), torch.randn(1, 4, 5, generator=gen)


def capture(model):
    captured = {}

    def backend(gm, example_inputs):
        captured["gm"], captured["inputs"] = gm, list(example_inputs)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=False)(*inputs())
    return captured["gm"], captured["inputs"]


class StubCompiler:
    def __init__(self, gm):
        self.gm, self.plans = gm, []

    def __call__(self, plan):
        self.plans.append(plan)

        def run(*args):
            return ("compiled", self.gm(*args))

        return run


@pytest.fixture(scope="module")
def graph():
    torch.manual_seed(0)
    return capture(TinyVideoDiT())


def test_recompiles_exactly_once_and_caches_plan(graph, tmp_path):
    gm, example_inputs = graph
    code_before = gm.code
    config = ParoConfig(auto_calibrate=True, calibration_calls=2, density=0.5, block_size=16, cache_dir=str(tmp_path))
    stub = StubCompiler(gm)
    fn = make_auto_calibrating_callable(gm, example_inputs, config, stub, use_layout_pass=False)
    assert fn.state == "calibrating" and not stub.plans
    with torch.no_grad():
        expected = gm(*example_inputs)
        first = fn(*example_inputs)
        assert not stub.plans  # still calibrating after 1 of 2 calls
        second = fn(*example_inputs)
        assert len(stub.plans) == 1 and fn.state == "compiled"
        third = fn(*example_inputs)
        fn(*example_inputs)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    assert third[0] == "compiled" and len(stub.plans) == 1
    assert gm.code == code_before and any(is_sdpa(n) for n in gm.graph.nodes)  # the backend's graph is untouched

    plan = stub.plans[0]
    (site,) = plan.sites.values()
    assert site.grid == GRID  # inferred from the placeholder shapes
    assert site.stats["calls"] == 2 and site.heads == 2 and site.seq_len == 36
    files = list((tmp_path / "plans").glob("*.safetensors"))
    assert [f.name for f in files] == [f"{graph_fingerprint(gm, example_inputs, config)}.safetensors"]

    # A new callable for the same graph uses the cached plan at once: no calibration call.
    stub2 = StubCompiler(gm)
    fn2 = make_auto_calibrating_callable(gm, example_inputs, config, stub2)
    assert fn2.loaded_from_cache and fn2.state == "compiled" and len(stub2.plans) == 1
    assert stub2.plans[0].sites[site.site_id].orders == site.orders
    assert torch.equal(stub2.plans[0].sites[site.site_id].block_masks, site.block_masks)
    with torch.no_grad():
        assert fn2(*example_inputs)[0] == "compiled"
    assert len(stub2.plans) == 1

    # A config that shapes the plan differently does not reuse it.
    other = ParoConfig(auto_calibrate=True, calibration_calls=1, density=0.3, block_size=16, cache_dir=str(tmp_path))
    stub3 = StubCompiler(gm)
    fn3 = make_auto_calibrating_callable(gm, example_inputs, other, stub3)
    assert fn3.state == "calibrating"
    with torch.no_grad():
        fn3(*example_inputs)
    assert len(stub3.plans) == 1 and len(list((tmp_path / "plans").glob("*.safetensors"))) == 2


def test_corrupt_cache_recalibrates(graph, tmp_path):
    gm, example_inputs = graph
    config = ParoConfig(auto_calibrate=True, calibration_calls=1, block_size=16, cache_dir=str(tmp_path))
    fn = make_auto_calibrating_callable(gm, example_inputs, config, StubCompiler(gm))
    fn.path.parent.mkdir(parents=True, exist_ok=True)
    fn.path.write_bytes(b"garbage")
    stub = StubCompiler(gm)
    with pytest.warns(UserWarning, match="ignoring cached plan"):
        fn2 = make_auto_calibrating_callable(gm, example_inputs, config, stub)
    assert fn2.state == "calibrating"
    with torch.no_grad():
        fn2(*example_inputs)
    assert len(stub.plans) == 1 and Plan.load(fn2.path).sites


@pytest.mark.parametrize("use_layout_pass", [False, True])
def test_calibrate_infers_grid(use_layout_pass):
    """From the input names/shapes (heuristic) or from the graph (layout-inference pass)."""
    model = TinyVideoDiT()
    hidden, text = inputs()
    plan = calibrate(model, [{"hidden_states": hidden, "encoder_hidden_states": text}], block_size=16,
                     use_layout_pass=use_layout_pass, progress=False)
    (site,) = plan.sites.values()
    assert site.grid == GRID and site.perm.shape == (2, 36)
