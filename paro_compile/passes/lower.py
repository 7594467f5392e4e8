"""Pass 2: replace each supported SDPA site by `paro::attention`, carrying the site's plan.

Plan tensors (permutation, CSR of kept blocks, step-bucket boundaries) become buffers of the graph
module, referenced by ``get_attr`` nodes, so Inductor sees them as constants. With several step
buckets the bucket is picked on the device from the timestep input (no host sync, no recompilation).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx as fx

from paro_compile.config import ParoConfig
from paro_compile.kernels.reference import block_mask_to_csr, grouped_block_csr, kept_block_bits, trim_csr
from paro_compile.passes.discover import AttentionSite, fake_value
from paro_compile.report import SiteRecord


def step_bucket_index(boundaries: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """[1] int64: the number of boundaries above the current timestep (boundaries descend: early steps first)."""
    t = timestep.reshape(-1)[:1].to(boundaries.dtype)
    return (boundaries > t).sum().reshape(1)


def select_step_bucket(per_bucket: torch.Tensor, bucket: torch.Tensor) -> torch.Tensor:
    return per_bucket.index_select(0, bucket).squeeze(0)


def find_timestep_input(gm: fx.GraphModule, name: str) -> Optional[fx.Node]:
    """The placeholder Dynamo made for the model's ``name`` argument (``L_timestep_`` and variants)."""
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.target.strip("_").lower() in (f"l_{name}", name, f"l_kwargs_{name}"):
            return node
    for node in gm.graph.nodes:
        if node.op == "placeholder" and name in node.target:
            return node
    return None


def _is_static(size) -> bool:
    """Static (not symbolic) size; never int() on a SymInt (it would specialize the graph)."""
    from paro_compile.plan import _as_int

    return _as_int(size) is not None


def _safe_buffer_name(site_id: str, what: str) -> str:
    cleaned = "".join(c if c.isalnum() else "_" for c in site_id)
    return f"_paro_{cleaned}_{what}"


def add_constant(gm: fx.GraphModule, before: fx.Node, name: str, value: torch.Tensor,
                 device: Optional[torch.device] = None) -> fx.Node:
    """Register ``value`` as a buffer on the activations' device: a CPU constant feeding a CUDA op would be
    copied host→device, synchronously, on every call."""
    gm.register_buffer(name, value.to(device) if device is not None else value)
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(name)


def mask_constants(masks: torch.Tensor, block: int, compensate: bool = False) -> dict[str, torch.Tensor]:
    """The op arguments that stand for a site's block masks [S, H, Mq, Nk] (one per step bucket), as plan constants.

    Compact CSRs (`trim_csr`): rows cut to the largest kept count over all step buckets, int16 indices. Blocks under 64
    rows get only the grouped CSR (the walk of the kernel's shared 64-row tiles; the per-block CSR, 2-4x larger, would
    only serve the reference path, which rebuilds it). ``compensate`` adds the kept-block bit words."""
    masks = masks.bool()
    if block < 64:
        names = ("group_counts", "group_indices", "group_bits")
        constants = dict(zip(names, trim_csr(*grouped_block_csr(masks, 64 // block))))
    else:
        constants = dict(zip(("kv_counts", "kv_indices"), trim_csr(*block_mask_to_csr(masks))))
    if compensate:
        constants["kv_kept_bits"] = kept_block_bits(masks)
    return constants


def lower_attention_sites(
    gm: fx.GraphModule,
    sites: list[AttentionSite],
    config: ParoConfig,
    plan=None,
    kernel_perms: Optional[dict[str, Optional[torch.Tensor]]] = None,
) -> list[SiteRecord]:
    """Rewrite ``gm`` in place; returns one record per site (lowered or not, with reasons).

    ``kernel_perms`` overrides, per site, the permutation left for the kernel after folding (None = the
    folding pass applied it elsewhere). Without it the plan's permutation goes to the kernel.
    """
    records: list[SiteRecord] = []
    bucket_node: Optional[fx.Node] = None  # one step-bucket index per graph, shared by every site
    for site in sites:
        record = SiteRecord(
            site_id=site.site_id, shape=tuple(int(s) if isinstance(s, int) else str(s) for s in site.shape),
            dtype=str(site.dtype).replace("torch.", ""), lowered=False, reasons=list(site.reasons),
        )
        records.append(record)
        if not site.supported:
            continue
        site_plan = plan.sites.get(site.site_id) if plan is not None else None
        block = site_plan.block_size if site_plan is not None else config.block_size
        perm = site_plan.perm if site_plan is not None else None
        if kernel_perms is not None and site.site_id in kernel_perms:
            perm = kernel_perms[site.site_id]
        symbolic = not _is_static(site.seq_len)
        if symbolic and isinstance(perm, torch.Tensor) and site_plan is not None and site_plan.is_identity_perm():
            perm = None
        if symbolic and isinstance(perm, torch.Tensor):
            raise RuntimeError(
                f"site {site.site_id} has a symbolic sequence length but its plan permutation is a fixed [H, N] "
                "tensor; dynamic shapes need an order plan folded by the folding pass (fold_permutations=True)")
        node = site.node
        graph = gm.graph
        activations = fake_value(site.q)
        device = activations.device if activations is not None else None
        perm_node = None
        if isinstance(perm, fx.Node):  # computed in the graph (order plan on a symbolic grid)
            perm_node = perm
        elif perm is not None:
            perm_const = perm.to(torch.int64).contiguous()
            perm_node = add_constant(gm, node, _safe_buffer_name(site.site_id, "perm"), perm_const, device)
            record.plan_bytes += perm_const.numel() * perm_const.element_size()
        counts_node = indices_node = bits_node = None
        group_nodes = [None, None, None]
        sparse = False
        compensate = bool(config.compensate_skipped)
        record.density = 1.0
        if symbolic and site_plan is not None and not bool(site_plan.block_masks.all()):
            record.reasons.append("block masks need static shapes; dense at this site")
        elif site_plan is not None and not bool(site_plan.block_masks.all()):
            masks = site_plan.block_masks.bool()
            record.density = float(masks.float().mean())
            record.step_buckets = masks.shape[0]
            per_bucket = mask_constants(masks, block, compensate)
            multi = masks.shape[0] > 1
            if multi and bucket_node is None:
                timestep = find_timestep_input(gm, plan.timestep_arg)
                if timestep is None:
                    raise RuntimeError(
                        f"the plan has {masks.shape[0]} step buckets for site {site.site_id}, but the compiled graph "
                        f"has no input named {plan.timestep_arg!r}; pass the timestep as that argument or rebuild "
                        "the plan with step_buckets=1"
                    )
                boundaries = torch.tensor(plan.step_boundaries, dtype=torch.float32)
                bounds_node = add_constant(gm, node, "_paro_step_boundaries", boundaries, device)
                with graph.inserting_before(node):
                    bucket_node = graph.call_function(step_bucket_index, (bounds_node, timestep))
            # One constant per mask tensor; with step buckets all buckets are stored and one is selected per call.
            mask_nodes = {}
            for name, tensor in per_bucket.items():
                value = tensor if multi else tensor[0]
                const = add_constant(gm, node, _safe_buffer_name(site.site_id, name), value, device)
                record.plan_bytes += value.numel() * value.element_size()
                if multi:
                    with graph.inserting_before(node):
                        const = graph.call_function(select_step_bucket, (const, bucket_node))
                mask_nodes[name] = const
            counts_node, indices_node = mask_nodes.get("kv_counts"), mask_nodes.get("kv_indices")
            bits_node = mask_nodes.get("kv_kept_bits")
            sparse = True
            group_nodes = [mask_nodes.get(name) for name in ("group_counts", "group_indices", "group_bits")]
        if not sparse and block < 64:
            # Without a mask the block only groups Q/K for quantization, and the dense kernel does not share tiles
            # between query blocks: 16-row tiles leave Hopper's 64-row wgmma mostly idle (the dense call ran ~5x the
            # cuDNN time at the CogVideoX shape). Dense sites of fine-block plans quantize per 64 tokens instead.
            block = 64
        scale = site.scale if site.scale is not None else 1.0 / math.sqrt(site.head_dim)
        with graph.inserting_before(node):
            new = graph.call_function(
                torch.ops.paro.attention.default,
                (site.q, site.k, site.v, perm_node, counts_node, indices_node, float(scale),
                 config.qk_bits, config.pv_dtype, block, block, config.impl,
                 record.density if sparse else -1.0, compensate and sparse, bits_node, *group_nodes),
            )
        new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "example_value", "val", "source_fn_stack")})
        new.meta["paro_site_id"] = site.site_id
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        site.node = new
        record.lowered = True
        record.qk_bits = config.qk_bits
        record.pv_dtype = config.pv_dtype
        record.compensated = compensate and sparse
        record.orders = list(site_plan.orders) if site_plan is not None else []
        record.permutation = "kernel" if perm is not None else ("identity" if site_plan is None or site_plan.perm is None else "folded")
    gm.graph.lint()
    gm.recompile()
    return records
