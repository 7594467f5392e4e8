"""Launch on the tensors' GPU, not on the current one.

Triton launches a kernel on the current CUDA device and stream, whatever device its tensors live on. A model placed
on ``cuda:1`` while the current device is 0 (a pipeline spread over GPUs with ``device_map``, a direct call in a
multi-GPU process) would have every kernel run on GPU 0 against another GPU's memory: a fault, or peer reads that are
silently slow. Inductor guards the graphs it generates; direct calls of the kernel wrappers are guarded here, for
about a microsecond per call.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.cuda.device(device)`` when ``device`` is a GPU other than the current one; else nothing."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def runs_on_device_of(device_of: Callable[..., torch.device]) -> Callable[[F], F]:
    """Decorate a kernel wrapper so that it runs with the current device set to ``device_of(*args, **kwargs)``."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            with on_device(device_of(*args, **kwargs)):
                return fn(*args, **kwargs)

        return guarded  # type: ignore[return-value]

    return decorate


def first_tensor_device(first: Any, *args: Any, **kwargs: Any) -> torch.device:
    """The device of a wrapper's first argument: a tensor (q), or a `Prologue`'s / `BlockMask`'s tensors."""
    if isinstance(first, torch.Tensor):
        return first.device
    for holder in (first, *(getattr(first, name, None) for name in ("q", "kept_bits", "counts"))):
        device = getattr(holder, "device", None)
        if isinstance(device, torch.device):
            return device
    return torch.device("cpu")
