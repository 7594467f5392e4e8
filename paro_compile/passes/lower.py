"""Pass 2: replace each supported SDPA site by `paro::attention`, carrying the site's plan.

Plan tensors (permutation, kept blocks as a CSR or a bitmap, step-bucket boundaries) become buffers of the graph
module, referenced by ``get_attr`` nodes, so Inductor sees them as constants. With several step
buckets the bucket is picked on the device from the timestep input (no host sync, no recompilation).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

from paro_compile.config import ParoConfig
from paro_compile.kernels.block_mask import AUTO_BITMAP_MIN_SAVING, TENSOR_FIELDS, BlockMask
from paro_compile.ops import additive_key_bias, check_permutation
from paro_compile.passes.discover import AttentionSite
from paro_compile.passes.fx_utils import fake_value, static_int
from paro_compile.passes.mask_analysis import replay, zero_padded_query_rows
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


def _buffer_name(site_index: int, site_id: str, what: str) -> str:
    """Graph-module attribute of a site's plan constant. The site's position makes it unique: ids that differ only in
    characters a Python name cannot hold (``blocks.0#0`` / ``blocks_0#0``) must never share a buffer."""
    cleaned = "".join(c if c.isalnum() else "_" for c in site_id)
    return f"_paro_{site_index}_{cleaned}_{what}"


def add_constant(gm: fx.GraphModule, before: fx.Node, name: str, value: torch.Tensor,
                 device: Optional[torch.device] = None) -> fx.Node:
    """Register ``value`` as a buffer on the activations' device: a CPU constant feeding a CUDA op would be
    copied host→device, synchronously, on every call."""
    if hasattr(gm, name):
        raise RuntimeError(f"graph module already has an attribute {name!r}; plan constants must not collide")
    gm.register_buffer(name, value.to(device) if device is not None else value)
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(name)


# A shared permutation table costs one gather per site and call (the site's rows, H x N indices) where a per-site
# constant costs none: the same trade as the bitmap mask form's decode, so the same size decides it.
SHARED_PERMUTATION_MIN_BYTES = AUTO_BITMAP_MIN_SAVING


class SharedPermutationRows:
    """The kernel permutations of one graph, stored as the distinct rows of all its sites.

    A site's kernel permutation [H, N] holds, per head, the head's order (or its residual after the shared order is
    folded). Calibrated plans choose each head's order among a few candidates of one token grid, so over a whole
    model only a handful of distinct rows exist: storing [H, N] per site would repeat them in every layer (at 720p the
    int32 permutation of a HunyuanVideo site is the size of its bitmap masks). Each token count gets one table of
    distinct rows, registered once per graph; a site keeps only its row ids [H] and selects its [H, N] permutation
    from the table per call (one small gather the graph runs before the op). Used for permutations of at least
    `SHARED_PERMUTATION_MIN_BYTES`."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.rows: dict[tuple, list[torch.Tensor]] = {}
        self.row_ids: dict[tuple, dict[bytes, int]] = {}
        self.table_nodes: dict[tuple, fx.Node] = {}

    def table_name(self, key: tuple) -> str:
        seq_len, dtype, device = key
        return f"_paro_perm_rows_{seq_len}_{str(dtype).replace('torch.', '')}_{str(device).replace(':', '')}"

    def add(self, before: fx.Node, ids_name: str, perm: torch.Tensor,
            device: Optional[torch.device]) -> tuple[fx.Node, int]:
        """The [H, N] permutation of a site as a node selecting rows of its token count's table; also the bytes this
        site added to the graph's constants (its row ids and the rows no earlier site had)."""
        key = (int(perm.shape[1]), perm.dtype, device)
        rows, ids = self.rows.setdefault(key, []), self.row_ids.setdefault(key, {})
        site_ids, added = [], 0
        for row in perm.cpu():
            digest = row.numpy().tobytes()
            if digest not in ids:
                ids[digest] = len(rows)
                rows.append(row)
                added += row.numel() * row.element_size()
            site_ids.append(ids[digest])
        ids_node = add_constant(self.gm, before, ids_name, torch.tensor(site_ids, dtype=torch.int64), device)
        if key not in self.table_nodes:
            name = self.table_name(key)
            # the rows are only known once every site is lowered: a placeholder now, the table in `finish`
            self.gm.register_buffer(name, torch.empty(0, int(perm.shape[1]), dtype=perm.dtype, device=device))
            with self.gm.graph.inserting_before(_after_placeholders(self.gm)):  # before every site that reads it
                self.table_nodes[key] = self.gm.graph.get_attr(name)
        with self.gm.graph.inserting_before(before):
            selected = self.gm.graph.call_function(torch.ops.aten.index_select.default,
                                                   (self.table_nodes[key], 0, ids_node))
        return selected, added + len(site_ids) * 8

    def finish(self) -> None:
        """Register every table with its rows."""
        for key, rows in self.rows.items():
            seq_len, dtype, device = key
            table = torch.stack(rows).to(device) if device is not None else torch.stack(rows)
            self.gm.register_buffer(self.table_name(key), table.contiguous())


def _after_placeholders(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op != "placeholder")


def key_padding_bias(mask: torch.Tensor) -> torch.Tensor:
    """An SDPA ``attn_mask`` that masks keys only ([B|1, H|1, Nq|1, Nk] after broadcasting, constant over query rows;
    discover proved it) as the op's key bias: fp32 [B|1, H|1, Nk] (`additive_key_bias`: 0 / -inf for a boolean mask,
    the values themselves for an additive one, kept finite in log2 units)."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return additive_key_bias(mask[:, :, 0, :])


def site_block_mask(masks: torch.Tensor, block: int, heads: int, seq_len: int, compensate: bool = False,
                    device: Optional[torch.device] = None, validate: bool = True,
                    encoding: str = "auto") -> BlockMask:
    """The `BlockMask` of a site's masks [S, H, Mq, Nk] (one per step bucket; its tensors keep the leading S), every
    bucket validated once here so that no call has to. ``encoding`` (`MASK_ENCODINGS`; "auto": the bitmap where it saves
    `AUTO_BITMAP_MIN_SAVING` bytes):
    compact CSRs (rows cut to the largest kept count over all step buckets, int16 counts and indices; blocks under 64
    rows get only the grouped walk of the kernel's shared 64-row tiles, the reference path rebuilds the per-block CSR
    from it) or one bit per block, the same walk decoded per call (`mask_decode`). Built on ``device`` (the
    activations'): a 720p model's masks take seconds per site on a CPU and milliseconds on a GPU. ``validate=False``
    (size measurements only) skips the checks."""
    if device is not None and device.type == "meta":
        device = None
    mask = BlockMask.from_dense(masks.to(device).bool(), block, block, kept_bits=compensate, encoding=encoding)
    for bucket in range(masks.shape[0] if validate else 0):
        mask.bucket(bucket).validate(heads, seq_len)
    return mask


def permutation_constant(perm: torch.Tensor, heads: int, seq_len: int) -> torch.Tensor:
    """A site's kernel permutation [H, N] as its plan constant, checked: int32 (every token index fits; int64 only past
    2^31 tokens). The kernels widen each entry they load to 64 bits before addressing with it."""
    dtype = torch.int32 if seq_len <= torch.iinfo(torch.int32).max else torch.int64
    const = perm.to(dtype).contiguous()
    check_permutation(const, heads, seq_len)
    return const


def distinct_step_buckets(masks: torch.Tensor) -> torch.Tensor:
    """A site's masks [S, H, Mq, Nk] with identical step buckets stored once: ``masks[:1]`` when every bucket equals
    the first (the site then needs no per-call bucket selection), else ``masks`` unchanged."""
    if masks.shape[0] > 1 and bool((masks == masks[:1]).all()):
        return masks[:1]
    return masks


@dataclass
class SiteConstants:
    """What the lowering stores on the device for one site: ``tensors`` maps each constant's name (``perm`` and the
    `TENSOR_FIELDS` the mask holds) to the tensor registered as a graph buffer; mask tensors keep a leading step-bucket
    dimension only when ``step_buckets > 1``."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    mask: Optional[BlockMask] = None
    step_buckets: int = 1

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def site_constants(perm: Optional[torch.Tensor], masks: Optional[torch.Tensor], block: int, heads: int, seq_len: int,
                   compensate: bool = False, device: Optional[torch.device] = None,
                   validate: bool = True, encoding: str = "auto") -> SiteConstants:
    """The device constants of a site: its kernel permutation (`permutation_constant`; None: folded or identity) and
    the `BlockMask` of its sparse masks [S, H, Mq, Nk] (None: dense) in ``encoding`` (`site_block_mask`), identical
    step buckets stored once (`distinct_step_buckets`). What `lower_attention_sites` registers and counts in
    ``SiteRecord.plan_bytes``. ``validate=False`` (size measurements only) skips the mask checks `site_block_mask`
    runs."""
    out = SiteConstants()
    if perm is not None:
        out.tensors["perm"] = permutation_constant(perm, heads, seq_len).to(device)
    if masks is not None:
        masks = distinct_step_buckets(masks.bool())
        out.step_buckets = int(masks.shape[0])
        out.mask = site_block_mask(masks, block, heads, seq_len, compensate, device, validate, encoding)
        for name, tensor in zip(TENSOR_FIELDS, out.mask.as_op_args()[0]):
            if tensor is not None:
                out.tensors[name] = tensor if out.step_buckets > 1 else tensor[0]
    return out


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
    permutations = SharedPermutationRows(gm)
    for index, site in enumerate(sites):
        record = SiteRecord(
            site_id=site.site_id, shape=tuple(int(s) if isinstance(s, int) else str(s) for s in site.shape),
            dtype=str(site.dtype).replace("torch.", ""), lowered=False, reasons=list(site.reasons),
        )
        records.append(record)
        if not site.supported:
            continue
        site_plan = plan.sites.get(site.site_id) if plan is not None and not site.is_cross else None
        record.cross_attention = site.is_cross
        block = site_plan.block_size if site_plan is not None else config.block_size
        perm = site_plan.perm if site_plan is not None else None
        if kernel_perms is not None and site.site_id in kernel_perms:
            perm = kernel_perms[site.site_id]
        symbolic = static_int(site.seq_len) is None
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
            perm_const = site_constants(perm, None, block, int(site.heads), int(site.seq_len)).tensors["perm"]
            perm_bytes = perm_const.numel() * perm_const.element_size()
            if perm_bytes >= SHARED_PERMUTATION_MIN_BYTES:
                perm_node, perm_bytes = permutations.add(node, _buffer_name(index, site.site_id, "perm_rows"),
                                                         perm_const, device)
            else:
                perm_node = add_constant(gm, node, _buffer_name(index, site.site_id, "perm"), perm_const, device)
            record.plan_bytes += perm_bytes
        mask_nodes: list[Optional[fx.Node]] = [None] * len(TENSOR_FIELDS)
        mask_sizes: Optional[list[int]] = None
        sparse = False
        compensate = bool(config.compensate_skipped)
        if compensate and site.attn_mask is not None:
            compensate = False
            record.reasons.append("no skipped-block compensation with a key-padding mask (pooled keys would mix "
                                  "masked and unmasked tokens)")
        record.density = 1.0
        if symbolic and site_plan is not None and not bool(site_plan.block_masks.all()):
            record.reasons.append("block masks need static shapes; dense at this site")
        elif site_plan is not None and not bool(site_plan.block_masks.all()):
            masks = site_plan.block_masks.bool()
            record.density = float(masks.float().mean())
            record.step_buckets = masks.shape[0]
            constants = site_constants(None, masks, block, int(site.heads), int(site.seq_len), compensate, device,
                                       encoding=config.mask_encoding)
            mask = constants.mask
            record.mask_encoding = mask.encoding
            multi = constants.step_buckets > 1  # identical buckets are stored once and need no selection
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
            sizes = mask.as_op_args()[1]
            for slot, name in enumerate(TENSOR_FIELDS):
                if name not in constants.tensors:
                    continue
                value = constants.tensors[name]
                const = add_constant(gm, node, _buffer_name(index, site.site_id, name), value, device)
                record.plan_bytes += value.numel() * value.element_size()
                if multi:
                    with graph.inserting_before(node):
                        const = graph.call_function(select_step_bucket, (const, bucket_node))
                mask_nodes[slot] = const
            mask_sizes = sizes
            sparse = True
        if not sparse and block < 64:
            # Without a mask the block only groups Q/K for quantization, and the dense kernel does not share tiles
            # between query blocks: 16-row tiles leave Hopper's 64-row wgmma mostly idle (the dense call ran ~5x the
            # cuDNN time at the CogVideoX shape). Dense sites of fine-block plans quantize per 64 tokens instead.
            block = 64
        if mask_sizes is None:  # dense: only the block sizes matter (quantization groups, tiles)
            mask_sizes = BlockMask.dense(0, block, block).as_op_args()[1]
        scale = site.scale if site.scale is not None else 1.0 / math.sqrt(site.head_dim)
        with graph.inserting_before(node):
            bias_node = None
            rows_node = None
            if site.padding is not None:
                key_node = site.padding.keys[0]
                if site.padding.queries:  # each part in the mask's own shape and batch/head layout
                    key_node = replay(graph, site.padding, site.padding.keys)
                    rows_node = replay(graph, site.padding, site.padding.queries)
                bias_node = graph.call_function(key_padding_bias, (key_node,))
                record.key_padding = True
                record.query_padding = rows_node is not None
            new = graph.call_function(
                torch.ops.paro.attention.default,
                (site.q, site.k, site.v, perm_node, bias_node, mask_nodes, mask_sizes, float(scale),
                 config.qk_bits, config.pv_dtype, compensate and sparse, record.density if sparse else 1.0,
                 config.impl, site.site_id),
            )
        new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "example_value", "val", "source_fn_stack")})
        new.meta["paro_site_id"] = site.site_id
        result = new
        if rows_node is not None:
            with graph.inserting_after(new):
                result = graph.call_function(zero_padded_query_rows, (new, rows_node))
            result.meta.update({k: v for k, v in new.meta.items() if k in ("example_value", "val")})
        node.replace_all_uses_with(result)
        graph.erase_node(node)
        site.node = new
        record.lowered = True
        record.qk_bits = config.qk_bits
        record.pv_dtype = config.pv_dtype
        record.compensated = compensate and sparse
        record.orders = list(site_plan.orders) if site_plan is not None else []
        record.permutation = "kernel" if perm is not None else ("identity" if site_plan is None or site_plan.perm is None else "folded")
    permutations.finish()
    gm.graph.lint()
    gm.recompile()
    return records
