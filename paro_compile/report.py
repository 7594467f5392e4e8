"""What the backend did to each graph: one `CompileReport` per compiled graph, kept for inspection."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

log = logging.getLogger("paro_compile")


@dataclass
class SiteRecord:
    site_id: str
    shape: tuple
    dtype: str
    lowered: bool
    reasons: list[str] = field(default_factory=list)
    density: float = 1.0
    qk_bits: Optional[int] = None
    pv_dtype: Optional[str] = None
    orders: list[str] = field(default_factory=list)
    permutation: str = "identity"
    """How the token order is applied: "identity", "kernel" (gather in the prologue, scatter in the
    epilogue), "folded:<op>" (absorbed by a layout op), or "gather" (an explicit runtime gather)."""
    folded_order: Optional[str] = None
    """The order folded into the layout ops upstream of this site (e.g. "HWF"), None when its tokens arrive in model
    order. With ``kernel_permutation="residual"`` the kernel applies the rest of each head's order on top of it."""
    kernel_permutation: str = "none"
    """What the kernel still permutes: "none", "residual" (the per-head rest after ``folded_order``: partial folding)
    or "full" (the whole plan permutation, nothing folded for this site)."""
    step_buckets: int = 1
    compensated: bool = False
    """Skipped blocks enter as pooled keys (``compensate_skipped`` and a sparse mask at this site)."""
    plan_bytes: int = 0
    """Device memory of the plan constants lowered for this site (permutation, masks of every step bucket)."""


class SiteFilters:
    """`lowered` / `fallbacks` over ``self.sites`` (one graph's sites or a whole model's)."""

    sites: list[SiteRecord]

    @property
    def lowered(self) -> list[SiteRecord]:
        return [s for s in self.sites if s.lowered]

    @property
    def fallbacks(self) -> list[SiteRecord]:
        return [s for s in self.sites if not s.lowered]


@dataclass
class CompileReport(SiteFilters):
    graph_index: int
    sites: list[SiteRecord] = field(default_factory=list)
    gathers_left: int = 0
    passes: list[dict[str, Any]] = field(default_factory=list)
    """Per pass: {"name", "before", "after"} (readable graph code), for the diff report."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"paro graph {self.graph_index}: {len(self.lowered)}/{len(self.sites)} attention sites lowered, "
                 f"{self.gathers_left} runtime gathers"]
        for s in self.sites:
            if s.lowered:
                lines.append(f"  {s.site_id:40s} {str(s.shape):28s} density={s.density:.2f} qk={s.qk_bits}b "
                             f"pv={s.pv_dtype} perm={s.permutation}"
                             + (f" folded={s.folded_order}" if s.folded_order else "")
                             + (f" kernel_perm={s.kernel_permutation}" if s.kernel_permutation != "none" else "")
                             + (" compensated" if s.compensated else "")
                             + (f" plan={s.plan_bytes / 2**20:.1f}MiB" if s.plan_bytes else ""))
            else:
                lines.append(f"  {s.site_id:40s} {str(s.shape):28s} SDPA: {'; '.join(s.reasons)}")
        return "\n".join(lines)


compile_reports: list[CompileReport] = []


def new_report() -> CompileReport:
    report = CompileReport(graph_index=len(compile_reports))
    compile_reports.append(report)
    return report


def last_report() -> Optional[CompileReport]:
    """The report of the most recently compiled graph (None before any compile)."""
    return compile_reports[-1] if compile_reports else None


def clear_reports() -> None:
    compile_reports.clear()
