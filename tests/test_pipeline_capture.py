"""capture_calls: a module's calls as calibration inputs (detached copies, every n-th, a maximum, stored elsewhere),
on plain, torch.compile-wrapped and in-place compiled modules, without recompiling them."""
import pytest
import torch

import paro_compile
from paro_compile.capture import CapturedCalls


class Denoiser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, hidden_states, timestep=None, encoder_hidden_states=None, return_dict=True):
        return self.proj(hidden_states) + timestep.float().mean()


class CountingBackend:
    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@torch.no_grad()
def run_steps(model, steps, text):
    latents = torch.zeros(2, 4)
    for step in range(steps):
        latents += model(latents, timestep=torch.tensor([1000.0 - 100 * step]), encoder_hidden_states=text,
                         return_dict=False)
    return latents


def test_captured_calls_are_detached_copies_in_call_order():
    model = Denoiser()
    text = torch.randn(2, 3, 4, requires_grad=True)
    with paro_compile.capture_calls(model) as calls:
        run_steps(model, 3, text)
    assert isinstance(calls, CapturedCalls) and len(calls) == 3 and calls.seen == 3
    assert repr(calls) == "CapturedCalls(3 of 3 calls)"
    (args, kwargs), = calls[1:2]
    assert [kw["timestep"].item() for _, kw in calls] == [1000.0, 900.0, 800.0]
    assert kwargs["return_dict"] is False and not kwargs["encoder_hidden_states"].requires_grad
    torch.testing.assert_close(kwargs["encoder_hidden_states"], text.detach())
    # The loop updated its latents in place after each call; every call kept what it was called with.
    first, second = calls[0][0][0], calls[1][0][0]
    assert torch.equal(first, torch.zeros(2, 4)) and not torch.equal(second, first)
    # The text embeddings, passed unchanged to every call, are stored once.
    stored = [call[1]["encoder_hidden_states"] for call in calls._calls]
    assert stored[0] is stored[1] is stored[2]
    with torch.no_grad():
        model(torch.zeros(2, 4), timestep=torch.tensor([1.0]))
    assert len(calls) == 3  # the hook is gone after the block
    assert not model._forward_pre_hooks


def test_every_nth_call_and_a_maximum():
    model = Denoiser()
    with paro_compile.capture_calls(model, every=2, max_calls=2) as calls:
        run_steps(model, 7, torch.randn(2, 3, 4))
    assert calls.seen == 7 and [kw["timestep"].item() for _, kw in calls] == [1000.0, 800.0]
    for bad in ({"every": 0}, {"every": 1.5}, {"max_calls": 0}, {"max_calls": True}):
        with pytest.raises(ValueError, match="every|max_calls"):
            with paro_compile.capture_calls(model, **bad):
                pass
    with pytest.raises(TypeError, match="nn.Module"):
        with paro_compile.capture_calls(lambda x: x):
            pass


def test_store_on_keeps_the_copies_there():
    model = Denoiser()
    with paro_compile.capture_calls(model, store_on="cpu") as calls:
        run_steps(model, 2, torch.randn(2, 3, 4))
    stored = calls._calls[0][0][0]
    assert stored.tensor.device.type == "cpu" and stored.device.type == "cpu"


@pytest.mark.parametrize("how", ["wrapper", "in place"])
def test_compiled_modules_are_captured_without_recompiling(how):
    model, backend = Denoiser(), CountingBackend()
    if how == "wrapper":
        compiled = torch.compile(model, backend=backend)
    else:
        model.compile(backend=backend)
        compiled = model
    text = torch.randn(2, 3, 4)
    expected = run_steps(compiled, 2, text)
    assert backend.graphs == 1
    with paro_compile.capture_calls(compiled, every=2) as calls:
        captured_run = run_steps(compiled, 4, text)
    assert backend.graphs == 1  # the recording code is neither traced nor a reason to recompile
    assert [kw["timestep"].item() for _, kw in calls] == [1000.0, 800.0] and calls.seen == 4
    torch.testing.assert_close(run_steps(compiled, 2, text), expected)
    assert not torch.isnan(captured_run).any()
    assert not model._forward_pre_hooks


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
def test_calls_stored_on_the_cpu_come_back_on_their_device():
    model = Denoiser().cuda()
    latents = torch.randn(2, 4, device="cuda")
    with paro_compile.capture_calls(model, store_on="cpu") as calls:
        model(latents, timestep=torch.tensor([3.0], device="cuda"))
    assert calls._calls[0][0][0].tensor.device.type == "cpu"
    (args, kwargs), = calls
    assert args[0].device.type == "cuda" and kwargs["timestep"].device.type == "cuda"
    torch.testing.assert_close(args[0], latents)
