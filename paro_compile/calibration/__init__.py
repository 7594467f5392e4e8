"""Calibration: block-pooled attention statistics → PARO order per head → static block masks → `Plan`.

Public API: `calibrate(model, inputs, ...)`, `calibrate_site(q, k, grid, ...)`, `CalibrationOptions` (every option,
with its default and help), `CalibrationError` / `CalibrationOptionError`, `DEFAULT_ALPHA`, `DEFAULT_DENSITY`.
docs/calibration.md describes the method, the options and the plan file.

Modules, in the order the data flows:
- `options`: `CalibrationOptions`, its validation, and the metadata the ``paro calibrate`` flags come from;
- `grids`: each attention site's token grid (given, from the layout pass, or inferred from the inputs);
- `recording`: the instrumented graph (dense SDPA + statistics per site);
- `statistics`: block-pooled attention maps of every candidate order, in query chunks (never N×N);
- `orders`: the token order per head from the sparsity and quantization scores (α);
- `masks`: which blocks a head keeps (mandatory diagonal/text blocks, density or mass threshold);
- `budget`: the block budget over heads/sites, step-bucket boundaries, the density an average target needs;
- `site_plans`: orders + masks of every step bucket → `SitePlan`;
- `driver`: `calibrate` and `calibrate_site`.
"""
from paro_compile.calibration.driver import calibrate, calibrate_site
from paro_compile.calibration.options import (
    DEFAULT_ALPHA,
    DEFAULT_DENSITY,
    CalibrationError,
    CalibrationOptionError,
    CalibrationOptions,
)

__all__ = ["calibrate", "calibrate_site", "CalibrationOptions", "CalibrationError", "CalibrationOptionError",
           "DEFAULT_ALPHA", "DEFAULT_DENSITY"]
