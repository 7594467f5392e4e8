"""Direct launches of compiled Triton kernels (`kernels.launch`): the first launch of a combination goes through
Triton, later ones reuse its compiled kernel only when every argument would specialise the same way, with the
arguments in signature order; on the GPU the direct path gives the same output bit for bit as Triton's own."""
import inspect

import pytest
import torch

from paro_compile.kernels import launch as launch_module
from paro_compile.kernels.block_mask import BlockMask
from paro_compile.kernels.launch import launch, launch_cached, specialisation_key


class FakeCompiled:
    def __init__(self, usable=True):
        self.function = "fn" if usable else None
        self.packed_metadata = ("meta",)
        self.direct_calls = []

    def run(self, *args):
        self.direct_calls.append(args)

    def launch_metadata(self, grid, stream, *args):
        return ("launch metadata", grid, stream, args)


class FakeKernel:
    """Stands in for a `JITFunction`: `kernel[grid](*args, **meta)` records the call and returns its compiled kernel."""

    def __init__(self, usable=True):
        def signature(x, n, scale, BLOCK, FLAG=True):
            pass

        self.signature = inspect.signature(signature)
        self.arg_names = list(self.signature.parameters)
        self.triton_calls = []
        self.compiled = []
        self.usable = usable

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.triton_calls.append((grid, args, meta))
            self.compiled.append(FakeCompiled(self.usable))
            return self.compiled[-1]

        return run


@pytest.fixture(autouse=True)
def empty_cache():
    launch_module.clear_launch_cache()
    yield
    launch_module.clear_launch_cache()


def streams(index):
    return 1000 + index


def test_the_installed_triton_has_the_launch_contract_the_direct_path_assumes():
    assert launch_module._launch_contract_ok()


def test_second_launch_goes_direct_with_every_parameter_in_signature_order():
    kernel, x = FakeKernel(), torch.zeros(8)
    meta = (("BLOCK", 64), ("num_warps", 4))
    launch_cached(kernel, (3, 2), (x, 5, 0.5), meta, 0, streams)
    assert len(kernel.triton_calls) == 1 and kernel.triton_calls[0][2] == {"BLOCK": 64, "num_warps": 4}
    launch_cached(kernel, (3, 2), (x, 5, 0.5), meta, 0, streams)
    assert len(kernel.triton_calls) == 1
    (call,) = kernel.compiled[0].direct_calls
    # grid (padded to 3-D), stream, function, packed metadata, no launch metadata or hooks, then the parameters:
    # the positional ones, the constexpr from meta and the default of the one not passed; options are not parameters.
    assert call[:9] == (3, 2, 1, 1000, "fn", ("meta",), None, None, None)
    assert call[9] is x and call[10:] == (5, 0.5, 64, True)
    assert launch_module.compiled_count() == 1


def test_direct_launches_call_the_launch_hooks_as_triton_does(monkeypatch):
    from triton import knobs

    hook = lambda metadata: None  # noqa: E731
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    if hasattr(enter, "calls"):  # Triton >= 3.4: each hook is a chain, empty by default (then None is passed)
        monkeypatch.setattr(enter, "calls", [hook])
        monkeypatch.setattr(leave, "calls", [hook])
    else:
        monkeypatch.setattr(knobs.runtime, "launch_enter_hook", hook)
        monkeypatch.setattr(knobs.runtime, "launch_exit_hook", hook)
        enter = leave = hook
    kernel, x = FakeKernel(), torch.zeros(8)
    for _ in range(2):
        launch_cached(kernel, (3,), (x, 5, 0.5), (("BLOCK", 64),), 0, streams)
    (call,) = kernel.compiled[0].direct_calls
    assert call[6] == ("launch metadata", (3,), 1000, (x, 5, 0.5, 64, True)) and call[7] is enter and call[8] is leave


@pytest.mark.parametrize("change", ["alignment", "dtype", "int value", "float type", "meta", "device"])
def test_a_launch_that_would_specialise_differently_goes_through_triton(change):
    kernel = FakeKernel()
    base = torch.zeros(16, dtype=torch.float16)
    x, n, scale, meta, device = base[:8], 5, 0.5, (("BLOCK", 64),), 0
    launch_cached(kernel, (1,), (x, n, scale), meta, device, streams)
    if change == "alignment":
        x = base[1:9]  # 2 bytes past a 16-byte boundary
    elif change == "dtype":
        x = torch.zeros(8, dtype=torch.float32)
    elif change == "int value":
        n = 16
    elif change == "float type":
        scale = 1
    elif change == "meta":
        meta = (("BLOCK", 128),)
    else:
        device = 1
    launch_cached(kernel, (1,), (x, n, scale), meta, device, streams)
    assert len(kernel.triton_calls) == 2 and not kernel.compiled[0].direct_calls


def test_arguments_it_does_not_know_and_unusable_kernels_always_go_through_triton():
    kernel = FakeKernel()
    for _ in range(3):
        launch_cached(kernel, (1,), (object(), 5, 0.5), (("BLOCK", 64),), 0, streams)
    assert len(kernel.triton_calls) == 3
    unusable = FakeKernel(usable=False)
    for _ in range(3):
        launch_cached(unusable, (1,), (torch.zeros(4), 5, 0.5), (("BLOCK", 64),), 0, streams)
    assert len(unusable.triton_calls) == 3 and launch_module.compiled_count() == 0


def test_specialisation_key_tells_aligned_from_misaligned_tensors():
    base = torch.zeros(32, dtype=torch.float16)
    assert specialisation_key((base[:8],)) == ((torch.float16, True),)
    assert specialisation_key((base[1:9],)) == ((torch.float16, False),)
    assert specialisation_key((base[8:16],)) == ((torch.float16, True),)  # 16 bytes in
    assert specialisation_key((1, True, None)) == ((int, 1), (bool, True), (type(None), None))
    assert specialisation_key(([1],)) is None


def test_off_the_gpu_and_when_switched_off_every_launch_goes_through_triton(monkeypatch):
    kernel = FakeKernel()
    for _ in range(2):
        launch(kernel, (1,), (torch.zeros(4), 5, 0.5), (("BLOCK", 64),), torch.device("cpu"))
    assert len(kernel.triton_calls) == 2
    monkeypatch.setenv("PARO_FAST_LAUNCH", "0")
    assert not launch_module.fast_launch_enabled()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
@pytest.mark.parametrize("case", ["dense", "sparse", "bitmap", "perm+bias", "compensate", "misaligned q"])
def test_direct_launches_give_the_output_of_tritons_own_path(case, monkeypatch):
    from paro_compile.kernels.attention import paro_attention_triton

    gen = torch.Generator().manual_seed(7)
    b, h, n, d = 1, 2, 333, 64
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to("cuda", torch.bfloat16) for _ in range(3))
    if case == "misaligned q":
        q = torch.cat([torch.zeros(1, device="cuda", dtype=q.dtype), q.flatten()])[1:].view(q.shape)
        assert q.data_ptr() % 16 != 0
    nb = -(-n // 64)
    kept = torch.rand(h, nb, nb, generator=gen) < 0.4
    kept |= torch.eye(nb, dtype=torch.bool)
    mask = None if case == "dense" else BlockMask.from_dense(
        kept, 64, 64, encoding="bitmap" if case == "bitmap" else "csr", kept_bits=case == "compensate").to("cuda")
    perm = torch.stack([torch.randperm(n, generator=gen) for _ in range(h)]).to("cuda", torch.int32) \
        if case == "perm+bias" else None
    bias = torch.where(torch.rand(b, 1, n, generator=gen) < 0.2, float("-inf"), 0.0).to("cuda") \
        if case == "perm+bias" else None
    kwargs = dict(perm=perm, mask=mask, key_bias=bias, compensate=case == "compensate", config={"num_warps": 4})
    monkeypatch.setenv("PARO_FAST_LAUNCH", "0")
    expected = paro_attention_triton(q, k, v, **kwargs)
    monkeypatch.setenv("PARO_FAST_LAUNCH", "1")
    first = paro_attention_triton(q, k, v, **kwargs)
    kept_before = launch_module.compiled_count()
    direct = [paro_attention_triton(q, k, v, **kwargs) for _ in range(3)]
    assert kept_before >= 2 and launch_module.compiled_count() == kept_before  # reused, nothing new kept
    torch.cuda.synchronize()
    for out in (first, *direct):
        assert torch.equal(out, expected)
