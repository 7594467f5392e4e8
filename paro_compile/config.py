"""Typed options of the `paro` backend.

Every key of ``torch.compile(model, backend="paro", options={...})`` that names a field below sets it;
``"mode"`` selects an Inductor mode (torch.compile refuses ``mode=`` together with ``options=``); any
other key is handed to Inductor as a config patch (and must be a valid Inductor option).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from paro_compile import envs
from paro_compile.kernels.block_mask import BLOCK_SIZES, MASK_ENCODINGS
from paro_compile.kernels.reference import PV_DTYPES, QK_BITS
from paro_compile.ops import IMPLS

MAX_HEAD_DIM = 128
FALLBACK_POLICIES = ("sdpa", "error")
MISSING_SHAPE_POLICIES = ("dense", "calibrate", "error")


def option(default: Any, doc: str, *, shown: Optional[str] = None, **kwargs: Any) -> Any:
    """A `ParoConfig` field with its documentation: README's options table is generated from these
    (`options_markdown`), so the API, the CLI's ``-o`` and the docs read one definition."""
    metadata = {"doc": doc, "shown": shown if shown is not None else _shown(default)}
    if "default_factory" in kwargs:
        return field(default_factory=kwargs["default_factory"], metadata=metadata)
    return field(default=default, metadata=metadata)


def _shown(default: Any) -> str:
    return f'`"{default}"`' if isinstance(default, str) else str(default)


@dataclass
class ParoConfig:
    """Options of the paro backend. Defaults give dense INT8 QKᵀ / FP8 PV attention in model order."""

    density: float = option(1.0, "fraction of attention blocks kept when a plan is built by auto-calibration "
                                 "(`auto_calibrate`); a given plan's masks decide otherwise")
    qk_bits: int = option(8, "Q/K precision: 8 (INT8 tensor cores), 4 (INT4 numerics: Hopper has no INT4 tensor "
                             "cores), 16 (no quantization)")
    pv_dtype: str = option("fp8", 'P and V in the PV product: `"fp8"` (e4m3), `"int8"`, `"fp16"` (the input dtype, '
                                  "no quantization)")
    block_size: int = option(64, "token block of masks and of Q/K quantization (16/32/64/128) for plans built by "
                                 "auto-calibration and for dense sites; finer blocks keep more quality at a given "
                                 "density and cost more kernel time (`benchmarks/RESULTS.md`)")
    compensate_skipped: bool = option(False, "skipped-block compensation: every KV block a sparse mask skips still "
                                             "enters the softmax as one pooled key (block-mean K, weight log2(tokens), "
                                             "block-mean V) instead of being lost (`docs/quality_tuning.md`)")
    mask_encoding: str = option("auto", 'how each site\'s block masks stay on the device: `"csr"` (the kernel\'s walk, '
                                        'rows as wide as the widest kept row), `"bitmap"` (one bit per block; each '
                                        "call decodes the walk into a transient CSR, one extra kernel launch), "
                                        '`"auto"` (per site, the bitmap where it saves at least 1 MiB, else the CSR: small sites keep one launch '
                                        'per call); the result is the same bit '
                                        "for bit. The report shows each site's encoding and bytes "
                                        "(`docs/plan_format.md`)")
    plan: Optional[Union[str, Path, Any]] = option(None, "a `Plan` or a path to a plan file (orders + masks per site); "
                                                         "None = dense, model order")
    on_missing_shape: str = option("dense", "a graph whose token grid (resolution × frames × text length) the plan "
                                            'has no entry for: `"dense"` runs those sites dense, with a warning and the '
                                            'reason in the report; `"calibrate"` auto-calibrates that shape on its first '
                                            'calls and caches it (as `auto_calibrate`); `"error"` raises '
                                            "`PlanMismatchError` naming the shapes the plan covers. Every token grid "
                                            "compiles its own graph (`docs/calibration.md`)")
    fallback: str = option("sdpa", 'unsupported site: `"sdpa"` keeps it and records why; `"error"` stops with the '
                                   "reasons")
    impl: str = option("auto", '`"auto"` (on CUDA the Triton kernels, and on sm_90 the Gluon kernel for the calls it '
                               'measured faster on: head_dim 64 with FP8 PV at 64-token blocks; the PyTorch reference '
                               'elsewhere), `"triton"`, `"hopper"` (the Gluon kernel for sm_90: same numerics, INT8 QK '
                               'with FP8/16-bit PV at 64-token blocks; `benchmarks/RESULTS.md` compares the two), '
                               '`"reference"`')
    allow_fp32: bool = option(False, "also lower fp32 sites (reference numerics in fp32); the kernels take fp16/bf16 "
                                     "and an fp32 model usually wants full precision")
    heads: Any = option(None, "global heads of this rank's attention sites under context parallelism: None = read "
                              "from the graph's all-to-all, `(start, stop)`, a list of head indices, or a callable "
                              "`(site_id, local_heads)` returning either (`docs/context_parallel.md`)")
    fold_permutations: bool = option(True, "absorb token permutations into layout ops instead of the kernel")
    lower_cross_attention: bool = option(True, "also run cross-attention sites (keys from another sequence, e.g. "
                                               "text) on the paro op, dense, with the same Q/K/PV numerics; False "
                                               "keeps them on SDPA. They never get a token order or block mask")
    auto_calibrate: bool = option(False, "with no plan: calibrate on the first calls, cache the plan, recompile once")
    calibration_calls: int = option(1, "calls observed by auto-calibration")
    cache_dir: Optional[str] = option(None, "plan and autotune cache (else `PARO_CACHE_DIR`, else "
                                            "`~/.cache/paro_compile`)", shown="`~/.cache/paro_compile`")
    inductor: dict[str, Any] = option(None, "Inductor config patches (also filled from unknown `options` keys and "
                                            "from `mode`); Inductor's `benchmark_harness` is off unless set here",
                                      shown="{}", default_factory=dict)

    def __post_init__(self) -> None:
        self._check_types()
        if not 0.0 < float(self.density) <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.qk_bits not in QK_BITS:
            raise ValueError(f"qk_bits must be one of {QK_BITS}, got {self.qk_bits!r}")
        if self.pv_dtype not in PV_DTYPES:
            raise ValueError(f"pv_dtype must be one of {PV_DTYPES}, got {self.pv_dtype!r}")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {self.block_size!r}")
        if self.on_missing_shape not in MISSING_SHAPE_POLICIES:
            raise ValueError(f"on_missing_shape must be one of {MISSING_SHAPE_POLICIES}, got {self.on_missing_shape!r}")
        if self.fallback not in FALLBACK_POLICIES:
            raise ValueError(f"fallback must be one of {FALLBACK_POLICIES}, got {self.fallback!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if self.mask_encoding not in MASK_ENCODINGS:
            raise ValueError(f"mask_encoding must be one of {MASK_ENCODINGS}, got {self.mask_encoding!r}")
        if self.calibration_calls < 1:
            raise ValueError(f"calibration_calls must be >= 1, got {self.calibration_calls}")

    def _check_types(self) -> None:
        """Reject values of the wrong type before they are read as something else (the string "False" is true, 8.0
        is not a qk_bits the op's schema takes, a string density would reach the calibration as a string)."""
        for name in ("compensate_skipped", "allow_fp32", "fold_permutations", "lower_cross_attention",
                     "auto_calibrate"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"option {name} must be True or False, got {getattr(self, name)!r}")
        for name in ("qk_bits", "block_size", "calibration_calls"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"option {name} must be an int, got {value!r}")
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)):
            raise TypeError(f"option density must be a number in (0, 1], got {self.density!r}")
        self.density = float(self.density)
        for name in ("pv_dtype", "mask_encoding", "on_missing_shape", "fallback", "impl"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"option {name} must be a string, got {getattr(self, name)!r}")
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, Path)):
            raise TypeError(f"option cache_dir must be a path (str or pathlib.Path), got {self.cache_dir!r}")
        if self.plan is not None and not isinstance(self.plan, (str, Path)):
            from paro_compile.plan import Plan

            if not isinstance(self.plan, Plan):
                raise TypeError(f"option plan must be a Plan or a path to a plan file, got {type(self.plan).__name__}")
        if not isinstance(self.inductor, dict):
            raise TypeError(f"option inductor must be a dict of Inductor config patches, got {self.inductor!r}")
        self._check_heads()

    def _check_heads(self) -> None:
        heads = self.heads
        if heads is None or callable(heads) or isinstance(heads, range):
            return
        if isinstance(heads, tuple):
            if len(heads) != 2 or not all(isinstance(h, int) and not isinstance(h, bool) for h in heads) \
                    or not 0 <= heads[0] < heads[1]:
                raise ValueError(f"option heads={heads!r}: a tuple is (start, stop) with 0 <= start < stop; give "
                                 "explicit global head indices as a list")
            return
        if isinstance(heads, list) and all(isinstance(h, int) and not isinstance(h, bool) for h in heads):
            return
        raise TypeError(f"option heads={heads!r}: expected None, (start, stop), a list of global head indices, or a "
                        "callable (site_id, local_heads) returning one of them")

    @property
    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else envs.PARO_CACHE_DIR

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
        patches = options.pop("inductor", {}) or {}
        if not isinstance(patches, dict):
            raise TypeError(f"option inductor must be a dict of Inductor config patches, got {patches!r}")
        inductor.update(patches)
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


def options_markdown() -> str:
    """README's options table, generated from the `ParoConfig` fields (a test keeps the README in step)."""
    rows = ["| option | default | meaning |", "| --- | --- | --- |"]
    for item in dataclasses.fields(ParoConfig):
        if item.name == "inductor":
            continue
        rows.append(f"| `{item.name}` | {item.metadata['shown']} | {item.metadata['doc']} |")
    return "\n".join(rows)
