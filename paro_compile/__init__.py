"""paro_compile: sparse, low-bit attention for visual diffusion transformers inside torch.compile.

``torch.compile(model, backend="paro")`` — see README.md.
"""
from paro_compile.config import ParoConfig
from paro_compile.ops import paro_attention
from paro_compile.report import CompileReport, SiteRecord, clear_reports, last_report

__version__ = "0.1.0"

__all__ = ["ParoConfig", "paro_attention", "CompileReport", "SiteRecord", "last_report", "clear_reports", "__version__"]
