"""Recording: instrument a Dynamo graph so that every supported SDPA site computes dense SDPA and feeds statistics.

`Recorder.instrument` finds the attention sites (`passes.discover.find_attention_sites`, with fp32 allowed so
fp32 models calibrate too), resolves each supported site's token grid and replaces its SDPA node by
`_observe_sdpa`. A site is skipped, with its reasons in ``skipped`` (the plan's ``meta["skipped_sites"]``), when the
backend cannot lower it (masks, dropout, cross-attention, ...) or calibration cannot read it (`unreadable_reason`:
symbolic sizes, all tokens in one block, a token layout no source determines, a shape that changes between calls):
the backend runs a skipped site dense in the model's token order and its report says why. Only when no site can be
read does `build_plan` fail, naming every site's reason. The graph function refers to its recorder by id
(`_RECORDERS`), so the graph module holds no reference to the statistics.
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
from paro_compile.passes.fx_utils import static_int
from paro_compile.passes.mask_analysis import replay
from paro_compile.plan import Plan

_RECORDERS: dict[int, "Recorder"] = {}
_RECORDER_IDS = itertools.count()


def _observe_sdpa(recorder_id: int, site_id: str, q, k, v, scale=None, attn_mask=None, key_mask=None):
    """What an instrumented graph calls instead of SDPA: dense SDPA (with the site's mask, if any) plus statistics for
    ``site_id``, whose rows see the keys of ``key_mask`` (the mask's key part, `mask_analysis.PaddingForm`; the mask
    itself for key padding). Padded query rows, where the mask has them, count in the statistics like the others."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    recorder = _RECORDERS.get(recorder_id)
    if recorder is not None:
        from paro_compile.passes.lower import key_padding_bias

        keys = attn_mask if key_mask is None else key_mask
        recorder.observe(site_id, q, k, v, scale, None if keys is None else key_padding_bias(keys))
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

    def skip(self, site_id: str, reasons: list[str]) -> None:
        """Leave ``site_id`` out of the plan (dense, model order at run time) for ``reasons``; drops its statistics."""
        self.skipped[site_id] = list(reasons)
        self.sites.pop(site_id, None)
        self.grids.pop(site_id, None)

    def observe(self, site_id: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float],
                key_bias: Optional[torch.Tensor] = None) -> None:
        if site_id in self.skipped:
            return
        stats = self.sites.get(site_id)
        try:
            if stats is None:
                stats = SiteStatistics(self.grids[site_id], q.shape[1], self.options, num_buckets=self.num_buckets)
                self.sites[site_id] = stats
            elif stats.seq_len != q.shape[2] or stats.heads != q.shape[1]:
                raise CalibrationError(
                    f"its shape changed between calibration calls ({stats.heads} heads x {stats.seq_len} tokens, then "
                    f"{q.shape[1]} x {q.shape[2]}); a plan holds one shape per site: calibrate with inputs of one shape")
            stats.update(q.detach(), k.detach(), v.detach(), scale=scale, bucket=self.bucket, key_bias=key_bias)
        except CalibrationError as error:
            self.skip(site_id, [str(error)])

    def unreadable_reason(self, site, shard=None) -> Optional[str]:
        """Why calibration cannot read a supported ``site`` (None when it can); resolves and keeps its grid.

        ``shard``: the site's context-parallel head shard, when its graph exchanges tokens for heads."""
        heads, seq_len = static_int(site.heads), static_int(site.seq_len)
        if heads is None or seq_len is None:
            return (f"symbolic sizes ({site.heads} heads, {site.seq_len} tokens): calibration needs static shapes and "
                    "compiles with dynamic=False, so the model or its inputs mark these sizes dynamic "
                    "(torch._dynamo.mark_dynamic); calibrate with inputs of fixed shapes")
        block = self.options.block_size
        if seq_len <= block:
            return (f"its {seq_len} tokens fit in one {block}-token block: there is no token order or block to choose "
                    "(e.g. temporal attention over few frames)")
        try:
            grid = self._resolve_grid(site, sharded=shard is not None)
            SiteStatistics(grid, heads, self.options, num_buckets=self.num_buckets)  # refuses orders the grid lacks
        except (CalibrationError, ValueError) as error:
            return str(error)
        if shard is not None:
            from paro_compile.passes.context_parallel import token_order_problem

            problem = token_order_problem(grid)
            if problem:
                return problem
        self.grids[site.site_id] = grid
        return None

    def _resolve_grid(self, site, *, sharded: bool) -> TokenGrid:
        if not (sharded and self.resolver.use_layout_pass):
            return self.resolver(site)
        # the layout pass reads the exchanged (rank, local token) axis as a patchify merge: use the inputs
        self.resolver.use_layout_pass = False
        try:
            return self.resolver(site)
        finally:
            self.resolver.use_layout_pass = True

    def instrument(self, gm: fx.GraphModule) -> fx.GraphModule:
        """Replace every supported, readable SDPA site of ``gm`` (in place) by `_observe_sdpa`; list the others."""
        from paro_compile.config import ParoConfig
        from paro_compile.passes.discover import find_attention_sites

        sites = find_attention_sites(gm, ParoConfig(allow_fp32=True))
        for site in sites:
            if site.supported and site.is_cross:
                continue  # keys from another sequence: no token order to choose, the backend runs it dense
            if not site.supported:
                self.skipped[site.site_id] = list(site.reasons)
                continue
            if site.site_id in self.skipped:
                continue
            shard, reason = self._context_parallel(site)
            reason = reason or self.unreadable_reason(site, shard)
            if reason:
                self.skip(site.site_id, [reason])
                continue
            if shard is not None:
                self.head_shards[site.site_id] = shard
            node = site.node
            with gm.graph.inserting_before(node):
                key_mask = None
                if site.padding is not None and site.padding.queries:  # m_i ∧ m_j: its key part, in its layout
                    key_mask = replay(gm.graph, site.padding, site.padding.keys)
                new = gm.graph.call_function(_observe_sdpa, (self.id, site.site_id, site.q, site.k, site.v, site.scale,
                                                             site.attn_mask, key_mask))
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
            if not self.skipped:
                raise CalibrationError("no supported attention site was observed: the model made no "
                                       "scaled_dot_product_attention call on the calibration inputs")
            reasons = "\n".join(f"  {sid}: {'; '.join(r)}" for sid, r in self.skipped.items())
            raise CalibrationError(f"no supported attention site was observed; every site was skipped:\n{reasons}")
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
