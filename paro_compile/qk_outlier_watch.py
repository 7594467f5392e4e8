"""Q/K outliers at run time: `watch_qk_outliers` measures, on the inputs a compiled model actually sees, what per-block
INT8 quantization of Q and K costs at each attention site, with the measure and the suggested fix of calibration
(`paro_compile.calibration.outliers`).

Every call of ``paro::attention`` carries the id of the site the lowering put it in place of (its ``site`` argument).
While a watch's block runs, the op hands each call's q, k, v to the watch (`paro_compile.ops.ACTIVE_QK_WATCHES`; outside
every block that tuple is empty and the op pays one truthiness check). The watch gathers them into the kernel's token
order (the call's permutation; a folded one has already been applied by the graph), so that the measured blocks are the
blocks the kernels quantize, and feeds one `OutlierStatistics` per site, whose block size is the call's query block.
Calls at ``qk_bits=16`` quantize nothing: they are counted, not measured.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from paro_compile import ops
from paro_compile.calibration.options import DEFAULT_QK_OUTLIER_ERROR
from paro_compile.calibration.outliers import OutlierStatistics
from paro_compile.calibration.statistics import default_chunk_elements
from paro_compile.kernels.reference import permute_tokens

DIRECT_CALLS = "<paro_attention calls outside compiled graphs>"
"""The site name of calls that carry no site id (`paro_compile.paro_attention`, the op called by hand)."""


@dataclass
class QKOutlierWatch:
    """Per site id, the worst Q/K block incoherence and implied INT8 error of the calls seen while a
    `watch_qk_outliers` block ran (``report()``, ``flagged()``, ``summary()``)."""

    threshold: float = DEFAULT_QK_OUTLIER_ERROR
    """A site is flagged when a head's INT8 error exceeds this (calibration's ``qk_outlier_error``)."""
    max_elements: Optional[int] = None
    """Bound on the elements of one measurement chunk (unset: the calibration default of the inputs' device)."""
    sites: dict[str, OutlierStatistics] = field(default_factory=dict)
    """Site name → its measurements. A site id whose calls differ in heads or block size (one id in two compiled
    graphs) gets one entry per geometry, named ``"<site id> [H heads, block B]"``."""
    full_precision_calls: dict[str, int] = field(default_factory=dict)
    """Site name → calls at ``qk_bits=16`` (nothing quantized, not measured)."""

    def observe(self, site: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, perm: Optional[torch.Tensor], *,
                scale: float, qk_bits: int, block: int) -> None:
        """Measure one call of the op (q [B, H, N, D], k, v [B, H, Nk, D] in model order, ``perm`` [H, N] or None)."""
        name = site or DIRECT_CALLS
        if qk_bits == 16:
            self.full_precision_calls[name] = self.full_precision_calls.get(name, 0) + 1
            return
        heads = q.shape[1]
        stats = self.sites.get(name)
        if stats is not None and (stats.heads, stats.block_size) != (heads, block):
            name = f"{name} [{heads} heads, block {block}]"
            stats = self.sites.get(name)
        if stats is None:
            stats = self.sites[name] = OutlierStatistics(heads, block, self.threshold)
        with torch.no_grad():
            q, k, v = (permute_tokens(x, perm) for x in (q, k, v))
            stats.update(q, k, v, scale=scale, max_elements=self.max_elements or default_chunk_elements(q.device))

    @property
    def calls(self) -> int:
        return sum(stats.calls for stats in self.sites.values()) + sum(self.full_precision_calls.values())

    def report(self) -> dict[str, dict[str, Any]]:
        """Site name → calibration's per-site outlier report (`OutlierStatistics.report`: calls, per-head incoherence
        and INT8 errors, ``flagged``, ``flagged_heads``, ``suggestion``, ``summary``), plus ``qk_bits_16_calls``."""
        out = {name: {**stats.report(), "qk_bits_16_calls": self.full_precision_calls.get(name, 0)}
               for name, stats in self.sites.items()}
        for name, calls in self.full_precision_calls.items():
            if name not in out:
                out[name] = {"calls": 0, "qk_bits_16_calls": calls, "flagged": False}
        return out

    def flagged(self) -> dict[str, dict[str, Any]]:
        """The reports of the flagged sites only."""
        return {name: report for name, report in self.report().items() if report["flagged"]}

    def summary(self) -> str:
        """One line per site: the flagged ones with calibration's summary and fix, then the others with their worst
        numbers."""
        if not self.calls:
            return ("Q/K outlier watch: no paro attention call ran inside the block (a graph replayed as a CUDA graph "
                    "runs no Python per call and cannot be watched; compile without mode='reduce-overhead')")
        report = self.report()
        flagged = {name: r for name, r in report.items() if r["flagged"]}
        lines = [f"Q/K outlier watch: {self.calls} call(s) at {len(report)} site(s), INT8 error threshold "
                 f"{self.threshold:g}; {len(flagged)} flagged"]
        lines += [f"  {name} ({r['calls']} call(s)): {r['summary']}" for name, r in flagged.items()]
        for name, r in report.items():
            if name in flagged:
                continue
            if not r["calls"]:
                lines.append(f"  {name}: {r['qk_bits_16_calls']} call(s) at qk_bits=16, nothing quantized")
                continue
            lines.append(f"  {name} ({r['calls']} call(s)): worst INT8 error {max(r['int8_error']):.3f}, "
                         f"Q block max|x|/mean|x| {max(r['q_incoherence_max']):.1f}, "
                         f"K {max(r['k_incoherence_max']):.1f}")
        return "\n".join(lines)


@contextlib.contextmanager
def watch_qk_outliers(threshold: float = DEFAULT_QK_OUTLIER_ERROR,
                      max_elements: Optional[int] = None) -> Iterator[QKOutlierWatch]:
    """Measure Q/K outliers on the calls of ``paro::attention`` that run inside the block:
    ``with paro_compile.watch_qk_outliers() as watch: compiled(**inputs)``, then ``watch.summary()`` /
    ``watch.report()`` / ``watch.flagged()``, per site id.

    Each call is measured as calibration measures it (`paro_compile.calibration.outliers`: block incoherence of Q and
    smoothed K, INT8 error on the head's most incoherent query block), in the kernel's token order and block size, and
    a site is flagged when a head's error exceeds ``threshold`` (calibration's ``qk_outlier_error``), with the same fix:
    ``block_size=16`` where finer groups bring the error under it, else ``qk_bits=16``. The measurement costs a few
    attention evaluations of one block of rows per head, and a device sync, per call; nothing is installed outside the
    block. Calls replayed as CUDA graphs run no Python and are not seen."""
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0 (an INT8 attention-output error, e.g. 0.05), got {threshold}")
    if max_elements is not None and (isinstance(max_elements, bool) or not isinstance(max_elements, int)
                                     or max_elements <= 0):
        raise ValueError(f"max_elements must be a positive int (unset: the calibration default), got {max_elements!r}")
    watch = QKOutlierWatch(threshold=float(threshold), max_elements=max_elements)
    ops.ACTIVE_QK_WATCHES = (*ops.ACTIVE_QK_WATCHES, watch)
    try:
        yield watch
    finally:
        ops.ACTIVE_QK_WATCHES = tuple(w for w in ops.ACTIVE_QK_WATCHES if w is not watch)
