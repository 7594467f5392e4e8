import threading
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from paro_compile import autocalib
from paro_compile.autocalib import (
    graph_fingerprint,
    make_auto_calibrating_callable,
    weights_fingerprint,
    write_plan_atomically,
)
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


# ---- cache robustness ---------------------------------------------------------------------------------
@pytest.fixture
def fresh_memory_cache(monkeypatch):
    monkeypatch.setattr(autocalib, "_PLANS_IN_MEMORY", {})
    monkeypatch.setattr(autocalib, "_UNWRITABLE_DIRS_WARNED", set())


def test_unwritable_cache_warns_once_and_keeps_the_plan_in_memory(graph, tmp_path, fresh_memory_cache):
    gm, example_inputs = graph
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("a regular file where the cache directory should be")
    config = ParoConfig(auto_calibrate=True, calibration_calls=1, block_size=16, cache_dir=str(blocker))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stub = StubCompiler(gm)
        fn = make_auto_calibrating_callable(gm, example_inputs, config, stub)
        with torch.no_grad():
            expected = gm(*example_inputs)
            torch.testing.assert_close(fn(*example_inputs), expected)  # the calibration call still answers
            assert fn(*example_inputs)[0] == "compiled" and len(stub.plans) == 1
        # Another compile of the same graph in this process: the plan comes from memory, no second warning.
        stub2 = StubCompiler(gm)
        fn2 = make_auto_calibrating_callable(gm, example_inputs, config, stub2)
        assert fn2.loaded_from_cache and fn2.state == "compiled" and stub2.plans[0] is stub.plans[0]
        # Another graph under the same directory calibrates, and the directory is not warned about again.
        other = ParoConfig(auto_calibrate=True, calibration_calls=1, density=0.5, block_size=16, cache_dir=str(blocker))
        fn3 = make_auto_calibrating_callable(gm, example_inputs, other, StubCompiler(gm))
        with torch.no_grad():
            fn3(*example_inputs)
        assert fn3.state == "compiled"
    messages = [str(w.message) for w in caught if "cannot write auto-calibrated plans" in str(w.message)]
    assert len(messages) == 1, messages
    assert str(blocker / "plans") in messages[0] and "cache_dir" in messages[0] and "PARO_CACHE_DIR" in messages[0]
    assert blocker.read_text().startswith("a regular file")


def test_other_weights_get_another_cache_key(tmp_path, fresh_memory_cache):
    torch.manual_seed(1)
    first = TinyVideoDiT()
    torch.manual_seed(2)
    second = TinyVideoDiT()
    twin = TinyVideoDiT()
    twin.load_state_dict(first.state_dict())
    config = ParoConfig(auto_calibrate=True, calibration_calls=1, block_size=16, cache_dir=str(tmp_path))
    (gm1, in1), (gm2, in2), (gm_twin, in_twin) = capture(first), capture(second), capture(twin)
    assert gm1.code == gm2.code  # same architecture, same graph: only the weights differ
    key1 = graph_fingerprint(gm1, in1, config)
    assert graph_fingerprint(gm2, in2, config) != key1
    assert graph_fingerprint(gm_twin, in_twin, config) == key1
    with torch.no_grad():
        twin.out.bias[0] += 1e-3  # one changed value is enough
    assert graph_fingerprint(gm_twin, in_twin, config) != key1
    # The second model calibrates its own plan instead of loading the first one's.
    fn1 = make_auto_calibrating_callable(gm1, in1, config, StubCompiler(gm1))
    with torch.no_grad():
        fn1(*in1)
    fn2 = make_auto_calibrating_callable(gm2, in2, config, StubCompiler(gm2))
    assert fn2.state == "calibrating" and fn2.path != fn1.path


def test_weights_fingerprint_reads_statistics_not_copies(graph):
    """Only per-tensor statistics are materialised (3 numbers each): the weights are never copied."""
    gm, example_inputs = graph
    weights = [v for v in example_inputs if isinstance(v, torch.nn.Parameter)]
    assert weights and max(w.numel() for w in weights) > 3 * len(weights)
    mode = CountingMode()
    with mode:
        weights_fingerprint(gm, example_inputs)
    assert mode.max_numel <= 3 * len(weights)


class CountingMode(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


@pytest.fixture(scope="module")
def two_plans():
    model = TinyVideoDiT()
    hidden, text = inputs()
    call = [{"hidden_states": hidden, "encoder_hidden_states": text}]
    return [calibrate(model, call, density=d, grid=GRID, block_size=16, progress=False) for d in (0.3, 1.0)]


def test_a_plan_being_written_is_never_visible_half_written(tmp_path, two_plans, monkeypatch):
    """A writer stopped half-way through its file: readers of the cache path see the previous complete plan."""
    old, new = two_plans
    path = tmp_path / "plans" / "key.safetensors"
    write_plan_atomically(old, path)
    halfway, resume = threading.Event(), threading.Event()
    original_save = Plan.save

    def interrupted_save(plan, target):
        original_save(plan, target)
        data = Path(target).read_bytes()
        Path(target).write_bytes(data[: len(data) // 2])
        halfway.set()
        resume.wait(60)
        Path(target).write_bytes(data)
        return Path(target)

    monkeypatch.setattr(Plan, "save", interrupted_save)
    writer = threading.Thread(target=write_plan_atomically, args=(new, path))
    writer.start()
    try:
        assert halfway.wait(60)
        assert Plan.load(path).density == old.density  # not the torn new file
    finally:
        resume.set()
        writer.join(60)
    assert Plan.load(path).density == new.density
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left


def test_concurrent_writers_use_their_own_temporary_files(tmp_path, two_plans, monkeypatch):
    path = tmp_path / "plans" / "key.safetensors"
    both_halfway = threading.Barrier(2, timeout=60)
    targets = []
    original_save = Plan.save

    def slow_save(plan, target):
        targets.append(str(target))
        original_save(plan, target)
        both_halfway.wait()  # both writers hold a finished temporary file at the same time
        return Path(target)

    monkeypatch.setattr(Plan, "save", slow_save)
    errors = []

    def write(plan):
        try:
            write_plan_atomically(plan, path)
        except Exception as error:  # collected: an exception in a thread would not fail the test
            errors.append(error)

    threads = [threading.Thread(target=write, args=(plan,)) for plan in two_plans]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert len(set(targets)) == 2 and str(path) not in targets
    assert Plan.load(path).density in {plan.density for plan in two_plans}
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_many_concurrent_writers_and_a_reader(tmp_path, two_plans):
    path = tmp_path / "plans" / "key.safetensors"
    stop, errors = threading.Event(), []

    def write(plan):
        try:
            for _ in range(10):
                write_plan_atomically(plan, path)
        except Exception as error:
            errors.append(error)

    def read():
        while not stop.is_set():
            try:
                if path.exists():
                    Plan.load(path)
            except Exception as error:
                errors.append(error)

    reader = threading.Thread(target=read)
    writers = [threading.Thread(target=write, args=(two_plans[i % 2],)) for i in range(4)]
    reader.start()
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join(120)
    stop.set()
    reader.join(60)
    assert not errors, errors[:3]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
