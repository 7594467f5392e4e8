"""Recording: instrument a Dynamo graph so that every supported SDPA site computes dense SDPA and feeds statistics.

`Recorder.instrument` finds the attention sites (`passes.discover.find_attention_sites`, with fp32 allowed so
fp32 models calibrate too), resolves each supported site's token grid and replaces its SDPA node by
`_observe_sdpa`; unsupported sites (masks, dropout, cross-attention, ...) are listed in ``skipped``. The graph
function refers to its recorder by id (`_RECORDERS`), so the graph module holds no reference to the statistics.
"""
from __future__ import annotations

import copy
import itertools
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from paro_compile.calibration.grids import GridResolver
from paro_compile.calibration.options import CalibrationError, CalibrationOptions
from paro_compile.calibration.site_plans import build_site_plans
from paro_compile.calibration.statistics import SiteStatistics
from paro_compile.grid import TokenGrid
from paro_compile.plan import Plan

_RECORDERS: dict[int, "Recorder"] = {}
_RECORDER_IDS = itertools.count()


def _observe_sdpa(recorder_id: int, site_id: str, q, k, v, scale=None):
    """What an instrumented graph calls instead of SDPA: dense SDPA plus statistics for ``site_id``."""
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    recorder = _RECORDERS.get(recorder_id)
    if recorder is not None:
        recorder.observe(site_id, q, k, v, scale)
    return out


class Recorder:
    """Statistics of every observed site of one calibration run, keyed by site id."""

    def __init__(
        self,
        options: CalibrationOptions,
        resolver: GridResolver,
        *,
        num_buckets: int = 1,
        progress: bool = False,
    ) -> None:
        self.options = options
        self.options.mask_density  # noqa: B018 - refuses options that carry only an average_density target
        self.resolver = resolver
        self.num_buckets = num_buckets
        self.bucket = 0
        self.grids: dict[str, TokenGrid] = {}
        self.sites: dict[str, SiteStatistics] = {}
        self.skipped: dict[str, list[str]] = {}
        self.head_shards: dict[str, Any] = {}
        """site → `HeadShard` of the heads this rank observes under context parallelism."""
        self.progress = progress
        self.id = next(_RECORDER_IDS)
        _RECORDERS[self.id] = self

    def close(self) -> None:
        _RECORDERS.pop(self.id, None)

    def observe(self, site_id: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float]) -> None:
        stats = self.sites.get(site_id)
        if stats is None:
            stats = SiteStatistics(self.grids[site_id], q.shape[1], self.options, num_buckets=self.num_buckets)
            self.sites[site_id] = stats
        stats.update(q.detach(), k.detach(), v.detach(), scale=scale, bucket=self.bucket)

    def instrument(self, gm: fx.GraphModule) -> fx.GraphModule:
        """Replace every supported SDPA site of ``gm`` (in place) by `_observe_sdpa`."""
        from paro_compile.config import ParoConfig
        from paro_compile.passes.discover import find_attention_sites

        sites = find_attention_sites(gm, ParoConfig(allow_fp32=True))
        for site in sites:
            if not site.supported:
                self.skipped[site.site_id] = list(site.reasons)
                continue
            shard, problem = self._context_parallel(site)
            if problem:
                self.skipped[site.site_id] = [problem]
                continue
            if shard is not None and self.resolver.use_layout_pass:
                # the layout pass reads the exchanged (rank, local token) axis as a patchify merge: use the inputs
                self.resolver.use_layout_pass = False
                try:
                    grid = self.resolver(site)
                finally:
                    self.resolver.use_layout_pass = True
            else:
                grid = self.resolver(site)
            if shard is not None:
                from paro_compile.passes.context_parallel import token_order_problem

                problem = token_order_problem(grid)
                if problem:
                    self.skipped[site.site_id] = [problem]
                    continue
                self.head_shards[site.site_id] = shard
            self.grids[site.site_id] = grid
            node = site.node
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(_observe_sdpa, (self.id, site.site_id, site.q, site.k, site.v, site.scale))
            new.meta = copy.copy(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        gm.graph.lint()
        gm.recompile()
        return gm

    @staticmethod
    def _context_parallel(site) -> tuple[Any, str]:
        """(`HeadShard` of the heads this rank observes under Ulysses, or None; why the site cannot be calibrated
        under this parallelism, or ""). Sharded sites' statistics are gathered over the ranks in `build_plan`
        (`paro_compile.parallel.gather_site_statistics`)."""
        from paro_compile.passes.context_parallel import detect_site

        parallel = detect_site(site)
        if parallel.kind in ("ring", "unknown"):
            return None, f"not calibrated under this context parallelism: {parallel.reason}"
        return parallel.shard, ""

    def build_plan(self, *, step_boundaries: list[float], dense_buckets: Iterable[int] = (), timestep_arg: str = "timestep",
                   fingerprint: Optional[str] = None, meta: Optional[dict] = None) -> Plan:
        if not self.sites:
            reasons = "; ".join(f"{sid}: {', '.join(r)}" for sid, r in self.skipped.items()) or "no SDPA call found"
            raise CalibrationError(f"no supported attention site was observed ({reasons})")
        statistics = self.sites
        if self.head_shards:
            from paro_compile.parallel import gather_site_statistics

            statistics = gather_site_statistics(self.sites, self.head_shards)
        sites = build_site_plans(statistics, dense_buckets=dense_buckets)
        return Plan(
            sites=sites,
            step_boundaries=list(step_boundaries),
            timestep_arg=timestep_arg,
            fingerprint=fingerprint,
            density=self.options.mask_density,
            alpha=self.options.alpha,
            meta={"skipped_sites": self.skipped, **(meta or {})},
        )
