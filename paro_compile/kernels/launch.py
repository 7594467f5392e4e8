"""Launch a Triton kernel that has already been compiled for the same arguments, without `JITFunction.run`.

``kernel[grid](*args, **meta)`` binds every argument, works out Triton's specialisation of each (dtype, 16-byte
alignment of pointers, integer values), hashes them into its cache key and only then calls the compiled kernel's
launcher: tens of microseconds per launch on the host, four to five times per attention call (the op's host cost,
benchmarks/RESULTS.md). `launch` does the first launch of each combination through Triton, keeps the
`CompiledKernel` it returns, and launches it directly on later calls whose arguments would specialise the same way.

Its key is at least as fine as Triton's specialisation, so it never launches a binary compiled for other arguments:
per tensor its dtype and whether its address is a multiple of 16 bytes, every other argument by value, the constexpr
and option keywords, the device. Anything it does not recognise (an argument of another type, a
Triton whose launch contract differs from the one checked in `_launch_contract_ok`, the interpreter)
takes Triton's own path. ``PARO_FAST_LAUNCH=0`` turns it off.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import torch

from paro_compile import envs

try:
    from triton import knobs
except ImportError:  # a Triton before `knobs`: its launch contract differs, so `_launch_contract_ok` is False
    knobs = None

_COMPILED: dict = {}
_MAX_COMPILED = 4096  # a bound: a stream of ever-new scalar values cannot grow the cache without limit
_SLOW = object()
"""The cache entry of a combination Triton's path must launch (its first launch did not give a usable kernel)."""
_CONTRACT_OK: Optional[bool] = None


_CONTRACT_FRAGMENTS = (
    "bound_args, specialization, options = binder(",
    "launch_metadata = kernel.launch_metadata(grid, stream, *bound_args.values())",
    "kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, launch_metadata, "
    "knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *bound_args.values())",
)
"""What `JITFunction.run`'s source must contain for `launch` to launch a compiled kernel the same way."""


def _launch_contract_ok() -> bool:
    """Whether this Triton launches a compiled kernel the way `launch` does: ``kernel.run(grid_0, grid_1, grid_2,
    stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook, *bound_args)`` with every parameter
    (constexprs included) in signature order. Read from `JITFunction.run`'s source once per process."""
    global _CONTRACT_OK
    if _CONTRACT_OK is None:
        try:
            from triton.runtime.jit import JITFunction

            source = " ".join(inspect.getsource(JITFunction.run).split())
            _CONTRACT_OK = knobs is not None and all(fragment in source for fragment in _CONTRACT_FRAGMENTS)
        except (ImportError, OSError, TypeError, AttributeError):
            _CONTRACT_OK = False
    return _CONTRACT_OK


def fast_launch_enabled() -> bool:
    """``PARO_FAST_LAUNCH`` (read per call; default on) and not under the Triton interpreter."""
    return bool(envs.PARO_FAST_LAUNCH) and not envs.TRITON_INTERPRET


def _launch_hooks() -> tuple[Optional[Callable], Optional[Callable]]:
    """Triton's launch hooks, None where none is set: since Triton 3.4 each is a `HookChain`, never None, and an
    empty chain calls nothing (passing None skips building the launch metadata it would be handed)."""
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    return (None if _empty_chain(enter) else enter), (None if _empty_chain(leave) else leave)


def _empty_chain(hook: Any) -> bool:
    return hook is None or (type(hook).__name__ == "HookChain" and not hook.calls)


def specialisation_key(args: tuple) -> Optional[tuple]:
    """Per argument: (dtype, address % 16 == 0) for a tensor, the value itself for None, bool, int, float and str;
    None when an argument has another type (it then takes Triton's own path)."""
    key = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            key.append((arg.dtype, arg.data_ptr() & 15 == 0))
        elif arg is None or isinstance(arg, (bool, int, float, str)):
            key.append((type(arg), arg))
        else:
            return None
    return tuple(key)


def _signature_tail(kernel: Any, n_positional: int, meta: dict) -> Optional[tuple]:
    """The values of the parameters after the positional ones, in signature order: from ``meta`` or the defaults."""
    names = getattr(kernel, "arg_names", None)
    signature = getattr(kernel, "signature", None)
    if names is None or signature is None:
        return None
    tail = []
    for name in names[n_positional:]:
        if name in meta:
            tail.append(meta[name])
        else:
            default = signature.parameters[name].default
            if default is inspect.Parameter.empty:
                return None
            tail.append(default)
    return tuple(tail)


def _usable(compiled: Any) -> bool:
    return all(getattr(compiled, name, None) is not None for name in ("function", "packed_metadata")) and \
        callable(getattr(compiled, "run", None))


def launch(kernel: Any, grid: tuple, args: tuple, meta: tuple, device: torch.device) -> None:
    """``kernel[grid](*args, **dict(meta))`` for tensors on ``device``, directly through the compiled kernel once
    this combination has been launched through Triton. ``meta``: the constexpr and option keywords as a tuple of
    (name, value) pairs (hashable; built once by the caller's launch plan)."""
    if device.type != "cuda" or not fast_launch_enabled() or not _launch_contract_ok():
        kernel[grid](*args, **dict(meta))
        return
    # Triton launches on the current device (the callers set it to the tensors' one): key and stream follow it.
    launch_cached(kernel, grid, args, meta, torch.cuda.current_device(), torch._C._cuda_getCurrentRawStream)


def launch_cached(kernel: Any, grid: tuple, args: tuple, meta: tuple, device_index: int,
                  current_stream: Callable[[int], int]) -> None:
    """`launch` past its checks of the device, the switch and Triton's launch contract."""
    spec = specialisation_key(args)
    key = None if spec is None else (id(kernel), device_index, meta, spec)
    entry = None if key is None else _COMPILED.get(key)
    if entry is None:
        meta_dict = dict(meta)
        compiled = kernel[grid](*args, **meta_dict)
        if key is None:
            return
        tail = _signature_tail(kernel, len(args), meta_dict)
        if len(_COMPILED) >= _MAX_COMPILED:
            _COMPILED.clear()
        # The entry holds the kernel, so that its id cannot name another kernel while the entry lives.
        _COMPILED[key] = (compiled, tail, kernel) if tail is not None and _usable(compiled) else _SLOW
        return
    if entry is _SLOW:
        kernel[grid](*args, **dict(meta))
        return
    compiled, tail, _ = entry
    grid_y = grid[1] if len(grid) > 1 else 1
    grid_z = grid[2] if len(grid) > 2 else 1
    stream = current_stream(device_index)
    bound = (*args, *tail)
    # Launch hooks (profilers set them) see the same launch metadata as from Triton's own path.
    enter_hook, exit_hook = _launch_hooks()
    launch_metadata = compiled.launch_metadata(grid, stream, *bound) if enter_hook is not None else None
    compiled.run(grid[0], grid_y, grid_z, stream, compiled.function, compiled.packed_metadata, launch_metadata,
                 enter_hook, exit_hook, *bound)


def clear_launch_cache() -> None:
    """Forget the compiled kernels kept for direct launches."""
    _COMPILED.clear()


def compiled_count() -> int:
    """How many combinations have a kept kernel (tests)."""
    return sum(entry is not _SLOW for entry in _COMPILED.values())

