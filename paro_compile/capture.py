"""Capture a module's calls as calibration inputs, e.g. a diffusers pipeline's transformer over its denoising loop.

    with paro_compile.capture_calls(pipe.transformer) as calls:
        pipe(prompt_embeds=..., num_inference_steps=30)
    plan = paro_compile.calibrate(pipe.transformer, calls, density=0.3, step_buckets=2)

`capture_calls` registers a forward pre-hook (``with_kwargs=True``, run before the module's other pre-hooks, so it sees
the call as the caller made it) and records every call's ``(args, kwargs)``, tensors detached and copied, so the
pipeline's later in-place updates of its latents do not reach them. Each item of the returned `CapturedCalls` is one
``(args, kwargs)`` pair, the form `calibrate` reads.

Compiled modules: a ``torch.compile(module)`` wrapper, like a module compiled in place (``module.compile()``), runs the
original module's hooks before the compiled frame (Dynamo skips ``nn.Module.__call__``), so the hook goes on the
original module (``_orig_mod``), never changes what Dynamo traced and causes no recompilation. It does run inside the
wrapper's Dynamo context, so the recording code is excluded from tracing (``torch._dynamo.disable``).
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Iterator, Optional, Union

import torch
from torch.utils._pytree import tree_map

Device = Union[str, torch.device]


class _Stored:
    """A captured tensor: its copy and the device it was called on (the copy may live elsewhere, ``store_on``)."""

    __slots__ = ("tensor", "device")

    def __init__(self, tensor: torch.Tensor, device: torch.device) -> None:
        self.tensor = tensor
        self.device = device

    def restore(self) -> torch.Tensor:
        return self.tensor if self.tensor.device == self.device else self.tensor.to(self.device)


class CapturedCalls(Sequence):
    """The captured calls of `capture_calls`, in call order: each item is ``(args, kwargs)``.

    Tensors come back on the device the module was called with, one call at a time (when ``store_on`` kept them
    elsewhere, reading an item copies that call's tensors back). ``seen`` counts every call the module received
    while capturing, captured or not.
    """

    def __init__(self) -> None:
        self._calls: list[tuple[tuple, dict]] = []
        self.seen = 0

    def __len__(self) -> int:
        return len(self._calls)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._restore(call) for call in self._calls[index]]
        return self._restore(self._calls[index])

    @staticmethod
    def _restore(call: tuple[tuple, dict]) -> tuple[tuple, dict]:
        args, kwargs = tree_map(lambda x: x.restore() if isinstance(x, _Stored) else x, call,
                                is_leaf=lambda x: isinstance(x, _Stored))
        return tuple(args), dict(kwargs)

    def __repr__(self) -> str:
        return f"CapturedCalls({len(self)} of {self.seen} calls)"


def _target_module(module: torch.nn.Module) -> torch.nn.Module:
    """The module whose hooks run eagerly on every call of ``module``: a ``torch.compile`` wrapper's original."""
    return getattr(module, "_orig_mod", module)


@contextlib.contextmanager
def capture_calls(
    module: torch.nn.Module,
    *,
    max_calls: Optional[int] = None,
    every: int = 1,
    store_on: Optional[Device] = None,
) -> Iterator[CapturedCalls]:
    """Record the calls of ``module`` made inside the ``with`` block; yields the `CapturedCalls` (filled as it goes).

    max_calls: stop recording after that many captured calls (None: all).
    every: record every n-th call (calls 0, n, 2n, ... of the block); with classifier-free guidance done as two
        calls per step, a call is half a step.
    store_on: where the captured tensors are kept, e.g. ``"cpu"`` to free accelerator memory (None: a copy on the
        tensor's own device). Reading an item moves its tensors back to the device of the call.

    A tensor passed unchanged to several calls (the text embeddings of every step) is stored once. ``module`` may be
    a ``torch.compile`` wrapper or a module compiled in place: neither recompiles (module docstring).
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"capture_calls takes an nn.Module (e.g. pipe.transformer), got {type(module).__name__}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be an integer >= 1, got {every!r}")
    if max_calls is not None and (isinstance(max_calls, bool) or not isinstance(max_calls, int) or max_calls < 1):
        raise ValueError(f"max_calls must be an integer >= 1 or None, got {max_calls!r}")
    store_device = torch.device(store_on) if store_on is not None else None
    calls = CapturedCalls()
    seen_tensors: dict[int, tuple[torch.Tensor, int, _Stored]] = {}

    def store(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        known = seen_tensors.get(id(value))
        if known is not None and known[0] is value and known[1] == value._version:
            return known[2]
        copy = value.detach()
        copy = copy.to(store_device, copy=True) if store_device is not None else copy.clone()
        stored = _Stored(copy, value.device)
        seen_tensors[id(value)] = (value, value._version, stored)  # the reference keeps id(value) from being reused
        return stored

    # A compiled module runs its hooks inside its Dynamo context: without disable, Dynamo would compile the recording
    # code itself (graphs of clones, recompiled as the calls go).
    @torch._dynamo.disable
    def record(args: tuple, kwargs: dict) -> None:
        index = calls.seen
        calls.seen += 1
        if index % every or (max_calls is not None and len(calls) >= max_calls):
            return
        with torch.no_grad():
            stored_args, stored_kwargs = tree_map(store, (tuple(args), dict(kwargs)))
        calls._calls.append((tuple(stored_args), dict(stored_kwargs)))

    def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        record(args, kwargs)

    handle = _target_module(module).register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
    try:
        yield calls
    finally:
        handle.remove()
        seen_tensors.clear()
