"""paro_compile: sparse, low-bit attention for visual diffusion transformers inside torch.compile.

``torch.compile(model, backend="paro")`` — see README.md.

``compile``, ``inspect``, ``model_report``, ``watch_attention``, ``watch_qk_outliers``, ``calibrate``, ``Plan``,
``SitePlan``, ``PlanError``, ``PlanMismatchError`` and ``TokenGrid`` are imported on first use, so importing
paro_compile never imports the calibration code or the Triton kernels (which must see TRITON_INTERPRET before they
load).
"""
import importlib as _importlib

from paro_compile.config import ParoConfig
from paro_compile.ops import paro_attention
from paro_compile.report import CompileReport, SiteRecord, clear_reports, last_report

__version__ = "0.1.0"

_LAZY = {
    "compile": ("paro_compile.backend", "compile"),
    "inspect": ("paro_compile.inspection", "inspect"),
    "model_report": ("paro_compile.model_inspection", "model_report"),
    "watch_attention": ("paro_compile.model_inspection", "watch_attention"),
    "watch_qk_outliers": ("paro_compile.qk_outlier_watch", "watch_qk_outliers"),
    "calibrate": ("paro_compile.calibration", "calibrate"),
    "capture_calls": ("paro_compile.capture", "capture_calls"),
    "Plan": ("paro_compile.plan", "Plan"),
    "SitePlan": ("paro_compile.plan", "SitePlan"),
    "PlanError": ("paro_compile.plan", "PlanError"),
    "PlanMismatchError": ("paro_compile.plan", "PlanMismatchError"),
    "TokenGrid": ("paro_compile.grid", "TokenGrid"),
    "BlockMask": ("paro_compile.kernels.block_mask", "BlockMask"),
    "quantize_linears": ("paro_compile.fp8", "quantize_linears"),
}


def __getattr__(name: str):
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        value = getattr(_importlib.import_module(module_name), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'paro_compile' has no attribute {name!r}")


__all__ = ["ParoConfig", "paro_attention", "CompileReport", "SiteRecord", "last_report", "model_report", "watch_attention",
           "watch_qk_outliers", "clear_reports", "compile", "inspect", "calibrate", "capture_calls", "Plan", "SitePlan",
           "PlanError", "PlanMismatchError", "TokenGrid", "BlockMask", "__version__"]
