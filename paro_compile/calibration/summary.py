"""The calibration summary `calibrate` prints: the plan's per-site lines, then what needs the user's attention.

- sites calibration skipped (``Plan.meta["skipped_sites"]``), with each reason: the backend runs them dense in the
  model's token order, or keeps SDPA where it cannot lower them (masks, cross-attention, ...);
- sites whose Q/K outliers would cost accuracy with per-block INT8 (``SitePlan.stats["qk_outliers"]``, see
  `outliers`), with the suggested fix.
"""
from __future__ import annotations

from typing import Any


def skipped_sites(plan: Any) -> dict[str, list[str]]:
    """{site_id: reasons} of the sites a plan's calibration left out (empty for plans built otherwise)."""
    meta = getattr(plan, "meta", None) or {}
    skipped = meta.get("skipped_sites") or {}
    return {str(site_id): [str(r) for r in (reasons if isinstance(reasons, (list, tuple)) else [reasons])]
            for site_id, reasons in skipped.items()}


def calibration_summary(plan: Any) -> str:
    """`Plan.summary` followed by the skipped sites and the sites flagged for Q/K outliers (with the suggested fix)."""
    lines = [plan.summary()]
    skipped = skipped_sites(plan)
    if skipped:
        lines.append(f"skipped {len(skipped)} site(s): the backend runs them dense in the model's token order, or on "
                     "SDPA where it cannot lower them:")
        lines += [f"  {site_id}: {'; '.join(reasons)}" for site_id, reasons in skipped.items()]
    flagged = [(site_id, site.stats["qk_outliers"]) for site_id, site in plan.sites.items()
               if (site.stats or {}).get("qk_outliers", {}).get("flagged")]
    if flagged:
        lines.append(f"Q/K outliers at {len(flagged)} site(s) would cost accuracy with per-block INT8:")
        lines += [f"  {site_id}: {report['summary']}" for site_id, report in flagged]
    return "\n".join(lines)
