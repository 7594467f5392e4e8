"""Typed options of the `paro` backend.

Every key of ``torch.compile(model, backend="paro", options={...})`` that names a field below sets it;
``"mode"`` selects an Inductor mode (torch.compile refuses ``mode=`` together with ``options=``); any
other key is handed to Inductor as a config patch (and must be a valid Inductor option).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from paro_compile.kernels.reference import PV_DTYPES, QK_BITS
from paro_compile.ops import IMPLS

SUPPORTED_HEAD_DIMS = (64, 128)
FALLBACK_POLICIES = ("sdpa", "error")


@dataclass
class ParoConfig:
    """Options of the paro backend. Defaults give dense INT8 QKᵀ / FP8 PV attention in model order."""

    density: float = 1.0
    """Fraction of 64×64 attention blocks kept when a plan is built (1.0 = dense). Used by calibration;
    at compile time the plan's masks decide."""
    qk_bits: int = 8
    """Bits of Q and K: 8 (INT8 tensor cores), 4 (INT4 numerics, run on INT8 units on Hopper), 16 (no quantization)."""
    pv_dtype: str = "fp8"
    """Type of P and V in the PV product: "fp8" (e4m3), "int8", or "fp16" (no quantization: the input dtype)."""
    block_size: int = 64
    """Token block of masks and Q/K quantization (query and key blocks alike)."""
    compensate_skipped: bool = False
    """Skipped-block compensation: every KV block a sparse mask skips still enters the softmax as one pooled
    key (its mean K with weight log2(token count), its mean V), so rows keep an estimate of the skipped mass
    instead of losing it (docs/quality_tuning.md). Costs one extra pooled tile per 64 skipped blocks."""
    plan: Optional[Union[str, Path, Any]] = None
    """A `paro_compile.plan.Plan` or a path to a plan file; None = no plan (dense, identity order)."""
    fallback: str = "sdpa"
    """What to do with an attention site we cannot lower: "sdpa" keeps it (reason recorded), "error" raises."""
    impl: str = "auto"
    """Kernel: "auto" (Triton on CUDA, PyTorch reference elsewhere), "triton", "reference"."""
    allow_fp32: bool = False
    """Lower fp32 sites too (computed with the reference numerics on fp32 data). Off by default: the
    kernels take fp16/bf16, and an fp32 model usually wants full precision."""
    fold_permutations: bool = True
    """Move token permutations into layout ops where possible (folding pass) instead of the kernel."""
    auto_calibrate: bool = False
    """With no plan: run the first `calibration_calls` calls dense, collect statistics, build a plan and recompile once."""
    calibration_calls: int = 1
    cache_dir: Optional[str] = None
    """Where auto-calibrated plans and autotune results are cached (default ~/.cache/paro_compile)."""
    inductor: dict[str, Any] = field(default_factory=dict)
    """Inductor config patches (also filled from unknown `options` keys and from `mode`)."""

    def __post_init__(self) -> None:
        if not 0.0 < float(self.density) <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.qk_bits not in QK_BITS:
            raise ValueError(f"qk_bits must be one of {QK_BITS}, got {self.qk_bits!r}")
        if self.pv_dtype not in PV_DTYPES:
            raise ValueError(f"pv_dtype must be one of {PV_DTYPES}, got {self.pv_dtype!r}")
        if self.block_size not in (16, 32, 64, 128):
            raise ValueError(f"block_size must be 16, 32, 64 or 128, got {self.block_size!r}")
        if self.fallback not in FALLBACK_POLICIES:
            raise ValueError(f"fallback must be one of {FALLBACK_POLICIES}, got {self.fallback!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if self.calibration_calls < 1:
            raise ValueError(f"calibration_calls must be >= 1, got {self.calibration_calls}")

    @property
    def resolved_cache_dir(self) -> Path:
        root = self.cache_dir or os.environ.get("PARO_CACHE_DIR") or Path.home() / ".cache" / "paro_compile"
        return Path(root)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_options(cls, options: Optional[dict[str, Any]] = None, mode: Optional[str] = None) -> "ParoConfig":
        """Split ``options`` into paro fields and Inductor patches; add the patches that ``mode`` implies."""
        options = dict(options or {})
        # torch.compile refuses mode= together with options=, so mode may also come as an option.
        mode = options.pop("mode", mode)
        inductor: dict[str, Any] = {}
        if mode is not None and mode != "default":
            from torch._inductor import list_mode_options

            inductor.update(list_mode_options(mode))
        inductor.update(options.pop("inductor", {}) or {})
        ours = {key: options.pop(key) for key in list(options) if key in cls.field_names()}
        if options:
            import torch._inductor.config as inductor_config

            unknown = [key for key in options if not hasattr(inductor_config, key)]
            if unknown:
                raise ValueError(
                    f"unknown paro/Inductor option(s) {unknown}; paro options are {sorted(cls.field_names())}, "
                    "anything else must be an attribute of torch._inductor.config"
                )
            inductor.update(options)
        return cls(**ours, inductor=inductor)
