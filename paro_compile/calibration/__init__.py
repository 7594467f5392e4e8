"""Calibration: block-pooled attention statistics → PARO order per head → static block masks → `Plan`.

Public API: `calibrate(model, inputs, ...)`, `calibrate_site(q, k, grid, ...)`, `CalibrationOptions` (every option,
with its default and help), `CalibrationError` / `CalibrationOptionError`, `DEFAULT_ALPHA`, `DEFAULT_DENSITY`.
docs/calibration.md describes the method, the options and the plan file.

Modules, in the order the data flows:
- `options`: `CalibrationOptions`, its validation, and the metadata the ``paro calibrate`` flags come from;
- `grids`: each attention site's token grid (given, from the layout pass, or inferred from the inputs);
- `recording`: the instrumented graph (dense SDPA + statistics per site);
- `statistics`: block-pooled attention maps of every candidate order, in query chunks (never N×N);
- `outliers`: Q/K block incoherence and the INT8 error it implies, per head (flags sites that need qk_bits=16 or
  finer quantization groups);
- `orders`: the token order per head from the sparsity and quantization scores (α), the model's own order unless
  another gains more than ``min_order_gain``;
- `masks`: which blocks a head keeps (mandatory diagonal/text blocks, density or mass threshold);
- `budget`: the block budget over heads/sites, step-bucket boundaries, the density an average target needs;
- `site_plans`: orders + masks of every step bucket → `SitePlan`;
- `driver`: `calibrate` and `calibrate_site`;
- `summary`: the calibration summary `calibrate` prints (plan, skipped sites and why, Q/K outlier flags).

Capturing a pipeline's transformer calls as calibration inputs: `paro_compile.capture.capture_calls`.
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
