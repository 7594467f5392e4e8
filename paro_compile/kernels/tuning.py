"""Autotuning of the paro attention kernel: candidate configs, key buckets, and Triton's own on-disk cache.

The attention kernel (`attention._attn_fwd`) is wrapped in `autotune` over `candidate_configs()` (num_warps ×
num_stages × query tile), keyed on (N bucket, D, density bucket, numerics, block sizes, code switches) plus the
argument dtypes. Winners persist through Triton's own autotune cache (``cache_results=True``): one small JSON file
per key, written atomically, keyed by Triton's version, the GPU target, the kernel's source and the candidate set,
so a cached config never outlives the kernel it was tuned for. The files live under
``<cache_dir>/autotune`` (`set_cache_dir`: the backend passes its ``cache_dir`` option; default
``$PARO_CACHE_DIR`` or ``~/.cache/paro_compile``). A corrupt or hand-edited entry is dropped and tuned again.

- ``PARO_AUTOTUNE=0``: never benchmark; launch `fixed_config`.
- ``TRITON_INTERPRET=1`` (CPU tests): a single config, nothing tuned, nothing written.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import triton
from triton import knobs
from triton.runtime.autotuner import Autotuner
from triton.runtime.cache import FileCacheManager

from paro_compile import envs

N_BUCKETS = (1024, 4096, 8192, 16384, 32768, 65536)
DENSITY_BUCKETS = (10, 20, 30, 40, 50, 70, 100)


def n_bucket(n: int) -> int:
    """Smallest bucket >= n (power-of-two-ish); N beyond the largest bucket share the last one."""
    for b in N_BUCKETS:
        if n <= b:
            return b
    return N_BUCKETS[-1]


def density_bucket(density: float) -> int:
    """Density in percent rounded up to the next bucket (dense = 100)."""
    pct = 100.0 * density
    for b in DENSITY_BUCKETS:
        if pct <= b + 1e-6:
            return b
    return 100


def candidate_configs() -> list[triton.Config]:
    """Configs the autotuner tries. TILE_M = 2*block_m is only legal for dense masks (pruned otherwise)."""
    if envs.TRITON_INTERPRET:
        return [triton.Config({"TILE_M": 64}, num_warps=4, num_stages=1)]
    cfgs = []
    for tile_m in (64, 128):
        for warps in (4, 8):
            for stages in (2, 3, 4):
                if tile_m == 64 and warps == 8 and stages == 4:
                    continue
                cfgs.append(triton.Config({"TILE_M": tile_m}, num_warps=warps, num_stages=stages))
    # Register-capped configs, kept by the attention kernel's pruner for the compensated kernel only (uncapped it
    # needs two CTAs' worth of registers per SM; benchmarks/RESULTS.md, "Skipped-block compensation").
    for maxnreg in (168, 128):
        for stages in (2, 3):
            cfgs.append(triton.Config({"TILE_M": 64}, num_warps=4, num_stages=stages, maxnreg=maxnreg))
    return cfgs


def fixed_config(meta: dict) -> triton.Config:
    """The config used with PARO_AUTOTUNE=0 and under the interpreter."""
    tile = meta["BLOCK_M"] * int(meta.get("GROUP", 1))
    if envs.TRITON_INTERPRET:
        return triton.Config({"TILE_M": tile}, num_warps=4, num_stages=1)
    if meta.get("COMPENSATE"):
        return triton.Config({"TILE_M": tile}, num_warps=4, num_stages=3, maxnreg=168)
    return triton.Config({"TILE_M": tile}, num_warps=4, num_stages=3)


def autotune_enabled() -> bool:
    return bool(envs.PARO_AUTOTUNE) and not envs.TRITON_INTERPRET


_CACHE_DIR: Optional[Path] = None


def set_cache_dir(root: Optional[os.PathLike]) -> None:
    """Root of the paro cache whose ``autotune/`` folder holds tuned configs (None: back to the default). The
    backend calls it with its ``cache_dir`` option; Triton's autotune cache is per process, so the last compiled
    model's setting applies to every kernel launch after it."""
    global _CACHE_DIR
    _CACHE_DIR = Path(root) if root is not None else None


def cache_dir() -> Path:
    return (_CACHE_DIR or envs.PARO_CACHE_DIR) / "autotune"


def _known_config_texts() -> set[str]:
    return {str(c) for c in candidate_configs()}


class AutotuneFileCache(FileCacheManager):
    """Triton's file cache manager rooted at `cache_dir()`, for autotune results only. `get_file` returns an entry
    only when it parses and names candidate configs with finite timings: a corrupt, truncated or hand-edited file
    is removed (and the key tuned again) instead of crashing the launch or launching an unknown config."""

    def __init__(self, key: str, override: bool = False, dump: bool = False) -> None:
        self.key = key
        self.cache_dir = str(cache_dir() / key)
        self.lock_path = os.path.join(self.cache_dir, "lock")
        os.makedirs(self.cache_dir, exist_ok=True)

    def get_file(self, filename: str) -> Optional[str]:
        path = super().get_file(filename)
        if path is None or not filename.endswith(".autotune.json"):
            return path
        if _valid_autotune_entry(path):
            return path
        warnings.warn(f"paro: ignoring the corrupt autotune cache entry {path}; the kernel is tuned again",
                      stacklevel=2)
        try:
            os.remove(path)
        except OSError:
            pass
        return None


class RetuneFileCache(AutotuneFileCache):
    """`AutotuneFileCache` that sees no stored autotune result, so the key is tuned again and overwritten."""

    def get_file(self, filename: str) -> Optional[str]:
        return None if filename.endswith(".autotune.json") else super().get_file(filename)


def _valid_autotune_entry(path: str) -> bool:
    try:
        with open(path) as handle:
            timings = json.load(handle)["configs_timings"]
        known = _known_config_texts()
        for config, values in timings:
            cfg = triton.Config(**config)
            values = values if isinstance(values, list) else [values]
            if str(cfg) not in known or not all(isinstance(t, (int, float)) and math.isfinite(t) for t in values):
                return False
        return bool(timings)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


class CachedAutotuner(Autotuner):
    """`triton.autotune` with its disk cache in paro's cache directory (`AutotuneFileCache`). Records whether the
    last launch benchmarked (``benchmarked_now``) for `tune` and the benchmarks; ``force`` re-tunes keys that are
    cached on disk."""

    benchmarked_now = False
    force = False

    def check_disk_cache(self, tuning_key: Any, configs: list, bench_fn: Callable[[], None]) -> bool:
        def bench() -> None:
            self.benchmarked_now = True
            with knobs.cache.scope():  # the candidates' compiled kernels go to Triton's own cache, not ours
                del knobs.cache.manager_class
                bench_fn()

        self.benchmarked_now = False
        try:
            with knobs.cache.scope():
                knobs.cache.manager_class = RetuneFileCache if self.force else AutotuneFileCache
                return super().check_disk_cache(tuning_key, configs, bench)
        except OSError as error:
            _warn_unwritable(error)
            if not self.benchmarked_now:
                bench()
            return False


_WARNED_UNWRITABLE = False


def _warn_unwritable(error: OSError) -> None:
    global _WARNED_UNWRITABLE
    if not _WARNED_UNWRITABLE:
        _WARNED_UNWRITABLE = True
        warnings.warn(f"paro: the autotune cache under {cache_dir()} cannot be written ({error}); tuned configs are "
                      "kept in memory for this process only. Point options={'cache_dir': ...} or PARO_CACHE_DIR at a "
                      "writable directory to keep them.", stacklevel=3)


def autotune(key: list[str], prune: Callable) -> Callable[[Any], CachedAutotuner]:
    """``triton.autotune(configs=candidate_configs(), key=key, prune_configs_by=prune, cache_results=True)`` with
    paro's cache directory."""
    def decorator(fn: Any) -> CachedAutotuner:
        return CachedAutotuner(fn, fn.arg_names, candidate_configs(), key, reset_to_zero=None, restore_value=None,
                               prune_configs_by={"early_config_prune": prune}, cache_results=True)
    return decorator


def random_block_mask(heads: int, mq: int, nk: int, density: float, *, device=None,
                      generator: Optional[torch.Generator] = None, block_m: int = 64, block_n: int = 64) -> torch.Tensor:
    """Random boolean block mask [heads, mq, nk] with ~density kept blocks per row; the diagonal is always kept."""
    if density >= 1.0:
        return torch.ones(heads, mq, nk, dtype=torch.bool, device=device)
    r = torch.rand(heads, mq, nk, generator=generator, device="cpu")
    keep = max(1, int(round(density * nk)))
    thresh = r.sort(dim=-1).values[..., keep - 1:keep]
    mask = r <= thresh
    rows = torch.arange(mq)
    diag = (rows * block_m + block_m // 2) // block_n
    mask[:, rows, diag.clamp(max=nk - 1)] = True
    return mask.to(device)


def refine_block_mask(coarse: torch.Tensor, factor: int, num_blocks: int, keep_diagonal: bool = True) -> torch.Tensor:
    """A [..., Mc, Nc] block mask (or block scores) at a ``factor``-times finer block, cut to ``num_blocks`` square:
    every coarse block is kept or skipped whole, so neighbouring fine query blocks keep the same KV blocks, as
    calibrated PARO masks tend to ("coherent" masks in the benchmarks). ``keep_diagonal`` (boolean masks) sets the fine
    diagonal, as `random_block_mask` keeps its own."""
    fine = coarse.repeat_interleave(factor, -2).repeat_interleave(factor, -1)[..., :num_blocks, :num_blocks].clone()
    if keep_diagonal:
        fine[..., torch.arange(num_blocks), torch.arange(num_blocks)] = True
    return fine
