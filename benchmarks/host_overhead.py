"""Host cost of one `paro::attention` call, and where it goes.

On a tiny input the GPU finishes each launch long before the host issues the next, so the wall time of many
back-to-back calls (no sync in between) divided by their number is the host cost per call. Measured for:

- ``op``: `torch.ops.paro.attention` as a compiled graph calls it (dispatcher + Python impl + all launches);
- ``triton-wrapper``: `paro_attention_triton` directly (no dispatcher);
- ``prologue``: `paro_prologue` alone (three launches);
- ``sdpa``: `F.scaled_dot_product_attention` on the same tensors (a peer's host cost);
- ``flex``: a compiled FlexAttention call with a BlockMask of the same blocks.

Then, at the Flux-1024 shape (B1·H24·N4608·D128, density 0.2) the device time of our call and of FlexAttention at
its best block size, with the host cost added as it shows up in a model (wall time per call, synchronised).

    python benchmarks/host_overhead.py --out OUT          (CUDA)
    python benchmarks/host_overhead.py --out OUT --tiny   (CPU smoke run, interpreter; numbers meaningless)
    python benchmarks/host_overhead.py --out OUT --stub-launches   (CPU: our Python path alone, see below)

``--stub-launches`` measures what is ours, on the CPU: every Triton launch the wrappers make (``kernel[grid](...)``
of the prologue's three kernels, the attention kernel and its autotuner) is replaced by a `LaunchRecorder` that only
counts the call, and the op runs on CPU tensors (the Triton interpreter is never entered). What is left per call is
the dispatcher, the op's Python impl, the wrappers and their tensor allocations: the host cost that is not Triton's
launcher. Timed with `torch.utils.benchmark`, profiled with cProfile (``stub_profile.txt``).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--calls", type=int, default=2000, help="back-to-back calls per host-cost measurement")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run under the Triton interpreter")
    ap.add_argument("--stub-launches", action="store_true",
                    help="CPU: time our Python path per call with every Triton launch replaced by a no-op recorder")
    ap.add_argument("--min-run-time", type=float, default=1.0,
                    help="--stub-launches: seconds torch.utils.benchmark spends per case and round")
    ap.add_argument("--rounds", type=int, default=3,
                    help="--stub-launches: rounds over every case; each case keeps its fastest median")
    return ap.parse_args(argv)


class LaunchRecorder:
    """Stands in for a Triton kernel or autotuner: ``recorder[grid](*args, **kwargs)`` counts the launch and runs
    nothing. ``best_config`` / ``benchmarked_now`` answer what the attention wrapper asks its autotuner after a
    launch."""

    def __init__(self, name: str, best_config=None) -> None:
        self.name = name
        self.launches = 0
        self.best_config = best_config
        self.benchmarked_now = False

    def __getitem__(self, grid) -> Callable[..., None]:
        return self._launch

    def _launch(self, *args, **kwargs) -> None:
        self.launches += 1


# Where the wrappers call the @triton.jit kernels (module globals, looked up at every call).
STUBBED_KERNELS = {
    "paro_compile.kernels.prologue": ("_stats_kernel", "_stats_finalize_kernel", "_prologue_kernel"),
    "paro_compile.kernels.attention": ("_attn_fwd", "_attn_fwd_tuned"),
}


@contextlib.contextmanager
def stubbed_launches() -> Iterator[dict[str, LaunchRecorder]]:
    """Every Triton launch of the prologue and attention wrappers replaced by a `LaunchRecorder` (by kernel name).
    The attention wrapper's launch cache is emptied on entry and exit, so no config chosen under the stub outlives
    it."""
    import importlib

    import triton

    from paro_compile.kernels import attention

    recorders: dict[str, LaunchRecorder] = {}
    with contextlib.ExitStack() as stack:
        for module_name, names in STUBBED_KERNELS.items():
            module = importlib.import_module(module_name)
            for name in names:
                best = triton.Config({"TILE_M": 64}, num_warps=4, num_stages=1) if name == "_attn_fwd_tuned" else None
                recorders[name] = LaunchRecorder(name, best)
                stack.enter_context(mock.patch.object(module, name, recorders[name]))
        attention.clear_launch_cache()
        stack.callback(attention.clear_launch_cache)
        yield recorders


def empty_custom_op():
    """A `torch.library.custom_op` of `paro::attention`'s signature whose body only allocates the output: what the
    dispatcher and custom_op's wrappers cost per call before any of our code runs."""
    if not hasattr(torch.ops.paro_bench, "empty_attention"):
        @torch.library.custom_op("paro_bench::empty_attention", mutates_args=())
        def empty_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, perm: Optional[torch.Tensor],
                            key_bias: Optional[torch.Tensor], mask_tensors: list[Optional[torch.Tensor]],
                            mask_sizes: list[int], scale: float, qk_bits: int, pv_dtype: str, compensate: bool,
                            density: float, impl: str) -> torch.Tensor:
            return torch.empty_like(q)
    return torch.ops.paro_bench.empty_attention.default


_LIBRARIES: list = []  # a `torch.library.Library` keeps its registrations only while it lives


def empty_library_op():
    """The same op with the same empty body, registered through a plain `torch.library.Library` (schema and one
    CompositeExplicitAutograd kernel): the dispatcher without custom_op's Python autograd and aliasing wrappers."""
    if not hasattr(torch.ops.paro_bench, "empty_attention_library"):
        library = torch.library.Library("paro_bench", "FRAGMENT")
        schema = str(empty_custom_op()._schema).split("(", 1)[1]
        library.define(f"empty_attention_library({schema}")
        library.impl("empty_attention_library", lambda q, *args: torch.empty_like(q), "CompositeExplicitAutograd")
        _LIBRARIES.append(library)
    return torch.ops.paro_bench.empty_attention_library.default


def cpu_us(fn: Callable[[], object], min_run_time: float) -> float:
    """Median µs per call of ``fn`` on the CPU (`torch.utils.benchmark`, one thread)."""
    from torch.utils import benchmark

    fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=1)
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e6


def host_us(fn, calls: int, device: torch.device) -> float:
    """Median over 5 rounds of (wall time of ``calls`` unsynchronised calls) / calls, in microseconds."""
    for _ in range(3):
        fn()
    harness.synchronize(device)
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
        harness.synchronize(device)
    return sorted(rounds)[len(rounds) // 2]


def profile_calls(fn, calls: int, path: Path) -> None:
    """cProfile of ``calls`` calls: where the host time of one call goes (top functions by own and total time)."""
    import cProfile
    import io
    import pstats

    fn()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    text.write(f"{calls} calls\n")
    stats.sort_stats("tottime").print_stats(35)
    stats.sort_stats("cumulative").print_stats(35)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.getvalue())


SMALL_SHAPE = (1, 2, 128, 64)
"""B·H·N·D of the host-cost calls: small enough that the GPU is never what a call waits for."""


def small_call_cases(device: torch.device, gen: torch.Generator) -> tuple[dict[str, Callable], tuple]:
    """The calls both modes time on one `SMALL_SHAPE` fp16 input on ``device``: the op with a sparse mask and dense,
    the Triton wrapper, the prologue. Returns (name → call, (q, k, v, mask))."""
    from paro_compile.kernels.attention import paro_attention_triton
    from paro_compile.kernels.block_mask import BlockMask
    from paro_compile.kernels.prologue import paro_prologue
    from paro_compile.kernels.tuning import random_block_mask

    q, k, v = (torch.randn(*SMALL_SHAPE, generator=gen).to(device, torch.float16) for _ in range(3))
    mask = BlockMask.from_dense(random_block_mask(2, 2, 2, 0.5, generator=gen)).to(device)
    tensors, sizes = mask.as_op_args()
    op = torch.ops.paro.attention.default
    cases = {
        "op (sparse mask)": lambda: op(q, k, v, None, None, tensors, sizes, 0.125, 8, "fp8", False, mask.density,
                                       "triton"),
        "op (dense)": lambda: op(q, k, v, None, None, [None] * 4, [64, 64, 1, 0, 0, 0], 0.125, 8, "fp8", False, 1.0,
                                 "triton"),
        "triton-wrapper (sparse mask)": lambda: paro_attention_triton(q, k, v, mask=mask),
        "prologue": lambda: paro_prologue(q, k, v),
    }
    return cases, (q, k, v, mask)


def stub_main(args: argparse.Namespace, argv=None) -> list[dict]:
    """``--stub-launches``: µs per call of our Python path on CPU tensors, every Triton launch a no-op."""
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")  # the op runs its Triton path on CPU tensors only under this flag
    shape = SMALL_SHAPE
    cases, (q, k, v, mask) = small_call_cases(torch.device("cpu"), torch.Generator().manual_seed(0))
    tensors, sizes = mask.as_op_args()
    cases.update({
        "custom op with an empty body (dispatch alone)": lambda: empty_custom_op()(
            q, k, v, None, None, tensors, sizes, 0.125, 8, "fp8", False, mask.density, "triton"),
        "torch.library.Library op with an empty body": lambda: empty_library_op()(
            q, k, v, None, None, tensors, sizes, 0.125, 8, "fp8", False, mask.density, "triton"),
        "plain torch op (torch.empty_like)": lambda: torch.empty_like(q),
    })
    rows: list[dict] = []
    with stubbed_launches() as recorders:
        launches = {}
        for name, fn in cases.items():
            before = sum(r.launches for r in recorders.values())
            fn()
            launches[name] = sum(r.launches for r in recorders.values()) - before
        # Rounds over every case in turn, keeping each case's fastest median: on a loaded machine a burst of other
        # work slows one measurement, not one case in every round, so the ratios between cases stay meaningful.
        best = {name: cpu_us(fn, args.min_run_time) for name, fn in cases.items()}
        for _ in range(args.rounds - 1):
            for name, fn in cases.items():
                best[name] = min(best[name], cpu_us(fn, args.min_run_time))
        for name in cases:
            rows.append({"shape": "x".join(map(str, shape)), "case": name, "stubbed_launches_per_call": launches[name],
                         "python_us_per_call": round(best[name], 2)})
            print(f"{name:40s} {best[name]:8.2f} us/call ({launches[name]} launches stubbed)", flush=True)
        profile_calls(cases["op (sparse mask)"], 2000, Path(args.out) / "stub_profile.txt")
    harness.write_results(Path(args.out) / "host_overhead_stub.json", {"rows": rows}, harness.stamp(__file__, argv),
                          title="our Python path per paro::attention call (us), Triton launches stubbed, CPU")
    return rows


def fast_launch(enabled: bool) -> contextlib.AbstractContextManager:
    """``PARO_FAST_LAUNCH`` set to ``enabled`` inside the block (read per launch), restored after."""
    import os

    return mock.patch.dict(os.environ, {"PARO_FAST_LAUNCH": "1" if enabled else "0"})


def cuda_graph_of(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` recorded in a CUDA graph (after warm-up calls on a side stream); returns the replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.stub_launches:
        return stub_main(args, argv)
    if args.tiny:
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch.nn.functional as F

    from paro_compile.kernels.block_mask import BlockMask, num_blocks
    from paro_compile.kernels.tuning import random_block_mask

    device = torch.device("cpu" if args.tiny else "cuda")
    calls = 3 if args.tiny else args.calls
    rows: list[dict] = []
    gen = torch.Generator().manual_seed(0)
    tiny_shape = SMALL_SHAPE
    cases, (q, k, v, _) = small_call_cases(device, gen)
    cases["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v)
    op = torch.ops.paro.attention.default
    if not args.tiny and torch.cuda.get_device_capability(device) == (9, 0):
        cases["op (dense, impl=auto: Hopper kernel)"] = lambda: op(q, k, v, None, None, [None] * 4,
                                                                    [64, 64, 1, 0, 0, 0], 0.125, 8, "fp8", False, 1.0,
                                                                    "auto")
    for fast in (False, True):
        # Same run, both launch paths: Triton's `kernel[grid](...)` and the direct launch (`kernels.launch`).
        with fast_launch(fast):
            for name, fn in cases.items():
                fn()
                us = host_us(fn, calls, device)
                rows.append({"shape": "x".join(map(str, tiny_shape)), "case": name, "fast_launch": fast,
                             "host_us_per_call": round(us, 2)})
                print(f"{name:40s} fast_launch={int(fast)} {us:8.2f} us/call", flush=True)
    profile_calls(cases["op (sparse mask)"], 5 if args.tiny else 300, Path(args.out) / "host_profile.txt")
    if not args.tiny:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        b, h, n, d = 1, 24, 4608, 128
        q, k, v = (torch.randn(b, h, n, d, generator=gen).to(device, torch.bfloat16) for _ in range(3))
        nb = num_blocks(n, 64)
        coarse = random_block_mask(h, num_blocks(n, 128), num_blocks(n, 128), 0.2, generator=gen)
        dense_mask = coarse.repeat_interleave(2, -1).repeat_interleave(2, -2)[:, :nb, :nb]  # the same blocks for both
        ours = BlockMask.from_dense(dense_mask).to(device)
        tensors, sizes = ours.as_op_args()
        from bench_attention import flex_block_mask

        for block in (64, 128):
            fmask = dense_mask if block == 64 else coarse
            bm = flex_block_mask(fmask.to(device), n, block)
            kopt = {"BLOCK_M": block, "BLOCK_N": block} if block == 64 else {}
            try:
                flex(q, k, v, block_mask=bm, kernel_options=kopt)
                t = harness.time_ms(lambda: flex(q, k, v, block_mask=bm, kernel_options=kopt), device)
                wall = host_us(lambda: flex(q, k, v, block_mask=bm, kernel_options=kopt), 200, device)
                rows.append({"shape": f"{b}x{h}x{n}x{d}", "case": f"flex block {block} @0.2", "device_ms": t.median_ms,
                             "host_us_per_call": round(wall, 2)})
                print(f"flex {block}: {t.median_ms:.4f} ms device, {wall:.1f} us wall per call", flush=True)
            except Exception as error:  # noqa: BLE001  (a peer failing must not lose our numbers)
                print(f"flex {block} failed: {type(error).__name__}: {str(error)[:200]}")
        for impl, fast in (("triton", False), ("triton", True), ("auto", True)):
            fn = lambda: op(q, k, v, None, None, tensors, sizes, 1 / d ** 0.5, 8, "fp8", False, ours.density, impl)  # noqa: E731
            with fast_launch(fast):
                fn()
                t = harness.time_ms(fn, device)
                wall = host_us(fn, 200, device)
            rows.append({"shape": f"{b}x{h}x{n}x{d}", "case": f"ours impl={impl} @0.2", "fast_launch": fast,
                         "device_ms": t.median_ms, "host_us_per_call": round(wall, 2)})
            print(f"ours {impl} fast_launch={int(fast)}: {t.median_ms:.4f} ms device, {wall:.1f} us wall per call",
                  flush=True)
        # The call's GPU time without any host cost: the op recorded once in a CUDA graph, replayed; with our
        # 64-token blocks and with the 128-token blocks of the same mask (the block size Flex runs best at).
        coarse_ours = BlockMask.from_dense(coarse, 128, 128).to(device)
        for block, mask in ((64, ours), (128, coarse_ours)):
            mask_tensors, mask_sizes = mask.as_op_args()
            try:
                fn = lambda: op(q, k, v, None, None, mask_tensors, mask_sizes, 1 / d ** 0.5, 8, "fp8", False,  # noqa: E731
                                mask.density, "triton")
                fn()
                graph_ms = harness.time_ms(cuda_graph_of(fn), device).median_ms
                rows.append({"shape": f"{b}x{h}x{n}x{d}", "case": f"ours impl=triton block {block} @0.2, CUDA graph "
                             "replay", "device_ms": graph_ms})
                print(f"ours triton block {block} in a CUDA graph: {graph_ms:.4f} ms", flush=True)
            except Exception as error:  # noqa: BLE001
                print(f"CUDA graph replay failed: {type(error).__name__}: {str(error)[:200]}")
    harness.write_results(Path(args.out) / "host_overhead.json", {"rows": rows}, harness.stamp(__file__, argv),
                          title="host cost per paro::attention call (us) and the Flux-1024 call against FlexAttention")
    return rows


if __name__ == "__main__":
    main()
