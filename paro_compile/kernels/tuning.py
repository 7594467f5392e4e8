"""Autotuning of the paro attention kernel: candidate configs, an on-disk cache per GPU, `tune()`.

The attention kernel (`attention._attn_fwd`) is wrapped in `triton.autotune` over
`candidate_configs()` (num_warps × num_stages × query tile), keyed on (N bucket, D, density bucket,
modes (incl. the exp2 mode), block sizes, dtypes). Winners are persisted as JSON in
``${PARO_CACHE_DIR:-~/.cache/paro_compile}/autotune/<gpu name>.json`` so a new process launches the
tuned config directly (no re-benchmarking). Switches:

- ``PARO_AUTOTUNE=0``: never benchmark; use `fixed_config` (a good default measured on H100).
- ``TRITON_INTERPRET=1`` (CPU tests): a single config, nothing tuned, nothing written.
"""
from __future__ import annotations

import json
import math
import os
import re
import threading
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
import triton

_LOCK = threading.Lock()
_MEMORY: dict[str, dict] = {}
_LOADED: set[str] = set()

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
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"TILE_M": 64}, num_warps=4, num_stages=1)]
    cfgs = []
    for tile_m in (64, 128):
        for warps in (4, 8):
            for stages in (2, 3, 4):
                if tile_m == 64 and warps == 8 and stages == 4:
                    continue
                cfgs.append(triton.Config({"TILE_M": tile_m}, num_warps=warps, num_stages=stages))
    # Register-capped configs, kept by the attention kernel's pruner for the compensated kernel only: uncapped it
    # needs 208 registers per thread (2 CTAs per SM); capped at 168 / 128 it ran 14 % faster on the H100.
    for maxnreg in (168, 128):
        for stages in (2, 3):
            cfgs.append(triton.Config({"TILE_M": 64}, num_warps=4, num_stages=stages, maxnreg=maxnreg))
    return cfgs


def fixed_config(meta: dict) -> triton.Config:
    """The config used with PARO_AUTOTUNE=0 and under the interpreter."""
    tile = meta["BLOCK_M"] * int(meta.get("GROUP", 1))
    if os.environ.get("TRITON_INTERPRET") == "1":
        return triton.Config({"TILE_M": tile}, num_warps=4, num_stages=1)
    if meta.get("COMPENSATE"):
        return triton.Config({"TILE_M": tile}, num_warps=4, num_stages=3, maxnreg=168)
    return triton.Config({"TILE_M": tile}, num_warps=4, num_stages=3)


def autotune_enabled() -> bool:
    return os.environ.get("PARO_AUTOTUNE", "1") not in ("0", "false", "False", "off") and \
        os.environ.get("TRITON_INTERPRET") != "1"


def cache_dir() -> Path:
    root = os.environ.get("PARO_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "paro_compile")
    return Path(root) / "autotune"


def gpu_name(device) -> str:
    name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "gpu"


def cache_file(device) -> Path:
    return cache_dir() / f"{gpu_name(device)}.json"


_SRC_HASH: Optional[str] = None


def _source_hash() -> str:
    """Short hash of the kernel sources: a cached config never outlives the kernel it was tuned for."""
    global _SRC_HASH
    if _SRC_HASH is None:
        import hashlib

        here = Path(__file__).resolve().parent
        h = hashlib.sha256()
        for name in ("attention.py", "prologue.py"):
            try:
                h.update((here / name).read_bytes())
            except OSError:
                pass
        _SRC_HASH = h.hexdigest()[:10]
    return _SRC_HASH


def _key(args: tuple, meta: dict) -> str:
    # args layout of attention._attn_fwd: ..., OUT at index 6, ..., n_bucket, density_bucket at the end.
    out = args[6]
    parts = [
        "attn_fwd", f"n{args[-2]}", f"d{meta['D']}", f"dens{args[-1]}", str(out.dtype).replace("torch.", ""),
        f"qk{meta['QK_BITS']}", f"pv{meta['PV_MODE']}", f"dense{int(bool(meta['DENSE']))}",
        f"bm{meta['BLOCK_M']}", f"bn{meta['BLOCK_N']}",
        f"exp2{int(meta.get('EXP2_MODE', 0))}",
        *(["comp"] if meta.get("COMPENSATE") else []),  # (absent = no compensation: older cache keys still hit)
        "v" + "".join(str(int(bool(meta.get(k, 0))))
                      for k in ("FUSED_SOFTMAX", "P_ROUND_INT", "WARP_SPEC", "PREFETCH_QK", "TMA_KV", "FMA_EXP_ARG")),
        f"g{int(meta.get('GROUP', 1))}",
        f"triton{triton.__version__}", f"src{_source_hash()}",
    ]
    return "|".join(parts)


def _load(path: Path) -> None:
    p = str(path)
    if p in _LOADED:
        return
    _LOADED.add(p)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    for k, v in data.get("configs", {}).items():
        _MEMORY.setdefault(p + "::" + k, v)


def _to_config(entry: dict) -> triton.Config:
    return triton.Config(dict(entry["kwargs"]), num_warps=int(entry["num_warps"]), num_stages=int(entry["num_stages"]),
                         maxnreg=entry.get("maxnreg"))


def _from_config(cfg: triton.Config) -> dict:
    entry = {"kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if getattr(cfg, "maxnreg", None):
        entry["maxnreg"] = cfg.maxnreg
    return entry


def select_config(tuned_kernel, device, args: tuple, meta: dict, interp: bool) -> Optional[triton.Config]:
    """Config to launch with directly, or None: then the caller runs the autotuner (and calls `record`)."""
    if interp or not autotune_enabled():
        return fixed_config(meta)
    path = cache_file(device)
    with _LOCK:
        _load(path)
        entry = _MEMORY.get(str(path) + "::" + _key(args, meta))
    return _to_config(entry) if entry is not None else None


def record(tuned_kernel, device, args: tuple, meta: dict) -> Optional[dict]:
    """Persist the autotuner's winner for this key to the JSON cache (merge, atomic replace)."""
    cfg = getattr(tuned_kernel, "best_config", None)
    if cfg is None:
        return None
    path = cache_file(device)
    key = _key(args, meta)
    entry = _from_config(cfg)
    with _LOCK:
        _MEMORY[str(path) + "::" + key] = entry
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                data = {}
            data.setdefault("gpu", gpu_name(device))
            data.setdefault("configs", {})[key] = entry
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, path)
        except OSError:
            pass
    return {"key": key, **entry}


def forget(device=None) -> None:
    """Drop the in-memory cache (tests; after deleting the JSON file)."""
    with _LOCK:
        _MEMORY.clear()
        _LOADED.clear()


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


def tune(shapes: Sequence[Sequence[int]], densities: Iterable[float] = (1.0, 0.5, 0.3, 0.2),
         dtypes: Iterable[torch.dtype] = (torch.bfloat16,), *, qk_bits: int = 8, pv_dtype: str = "fp8",
         perm: bool = False, block: int = 64, force: bool = False, device="cuda") -> list[dict]:
    """Pre-tune the attention kernel for every (shape [B, H, N, D], density, dtype); return the winners.

    Each winner is ``{"shape", "density", "dtype", "key", "kwargs", "num_warps", "num_stages"}`` and is
    persisted in the JSON cache. ``force`` re-benchmarks keys that are already cached.
    """
    from paro_compile.kernels import attention
    from paro_compile.kernels.reference import block_mask_to_csr, num_blocks

    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        raise RuntimeError("tune() needs a CUDA GPU (and TRITON_INTERPRET unset)")
    if not autotune_enabled():
        raise RuntimeError("PARO_AUTOTUNE=0: autotuning is disabled")
    results = []
    gen = torch.Generator().manual_seed(0)
    for shape in shapes:
        bsz, heads, n, d = (int(x) for x in shape)
        for dtype in dtypes:
            q, k, v = (torch.randn(bsz, heads, n, d, device=device, dtype=dtype) for _ in range(3))
            pm = torch.stack([torch.randperm(n, generator=gen) for _ in range(heads)]).to(device) if perm else None
            for dens in densities:
                mq, nk = num_blocks(n, block), num_blocks(n, block)
                if dens >= 1.0:
                    counts = indices = None
                else:
                    counts, indices = block_mask_to_csr(random_block_mask(heads, mq, nk, dens, device=device, generator=gen))
                if force:
                    with _LOCK:
                        _MEMORY.clear()
                        _LOADED.add(str(cache_file(device)))  # don't reload stale entries
                    attention._attn_fwd_tuned.cache.clear()
                attention.paro_attention_triton(q, k, v, perm=pm, kv_counts=counts, kv_indices=indices,
                                                qk_bits=qk_bits, pv_dtype=pv_dtype, block_m=block, block_n=block)
                torch.cuda.synchronize()
                info = attention.last_launch_info()
                results.append({"shape": [bsz, heads, n, d], "density": dens, "dtype": str(dtype).replace("torch.", ""),
                                **info})
    return results
