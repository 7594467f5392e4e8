"""Kernel wrappers launch on their tensors' GPU (`kernels.device_guard`): Triton launches on the current device, so a
model on ``cuda:1`` with the current device 0 would otherwise run its kernels on the wrong GPU."""
import contextlib
from types import SimpleNamespace

import pytest
import torch

from paro_compile.kernels import device_guard
from paro_compile.kernels.block_mask import BlockMask


def test_the_guard_switches_only_to_another_gpu(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", fake_device)
    seen = []

    @device_guard.runs_on_device_of(device_guard.first_tensor_device)
    def wrapper(first, *, value=1):
        seen.append((list(entered), value))
        return value

    other_gpu = SimpleNamespace(device=torch.device("cuda", 1))
    assert wrapper(SimpleNamespace(q=other_gpu), value=7) == 7 and seen[-1] == ([other_gpu.device], 7)
    entered.clear()
    wrapper(SimpleNamespace(q=SimpleNamespace(device=torch.device("cuda", 0))))  # the current GPU: no switch
    wrapper(torch.zeros(1))  # the CPU (the interpreter): no switch
    assert entered == [] and wrapper.__name__ == "wrapper"


def test_the_device_of_masks_and_prologues():
    mask = BlockMask.from_dense(torch.rand(1, 3, 3) < 0.5, encoding="bitmap")
    assert device_guard.first_tensor_device(mask) == mask.kept_bits.device
    assert device_guard.first_tensor_device(BlockMask.from_dense(torch.ones(1, 3, 3, dtype=torch.bool))) == torch.device("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs (the nvidia-h200-x2 machine)")
@pytest.mark.parametrize("encoding", ["csr", "bitmap"])
def test_a_call_on_the_second_gpu_runs_there(encoding):
    """Tensors on cuda:1, current device 0: the same output as on cuda:0, bit for bit, and the current device is
    left as it was."""
    from paro_compile.ops import paro_attention

    torch.cuda.set_device(0)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 300, 64, generator=gen).to(torch.bfloat16) for _ in range(3))
    perm = torch.stack([torch.randperm(300, generator=gen) for _ in range(4)])
    dense = torch.rand(4, 5, 5, generator=gen) < 0.5
    dense[:, torch.arange(5), torch.arange(5)] = True
    outs = []
    for device in ("cuda:0", "cuda:1"):
        mask = BlockMask.from_dense(dense, 64, 64, encoding=encoding).to(device)
        outs.append(paro_attention(q.to(device), k.to(device), v.to(device), perm=perm.to(device), mask=mask,
                                   impl="triton").cpu())
        assert torch.cuda.current_device() == 0
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
