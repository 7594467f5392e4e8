"""Pass 1: find every attention site in a Dynamo FX graph and decide whether it can be lowered.

We match at the Dynamo (torch-level) graph: SDPA is one node there, on every device, and nodes carry
``nn_module_stack`` for stable site ids. The ATen variants (``aten._scaled_dot_product_*``) are matched
too, for graphs that reach us already lowered (e.g. a user calling the pass on an exported graph).

A site id is ``<module path>#<ordinal>``: the innermost module's qualified name (as in
``model.named_modules()``) and the index of this call among the SDPA calls inside that module, in graph
order. It never depends on FX node names, so plans survive re-tracing.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.fx as fx

from paro_compile.config import MAX_HEAD_DIM, ParoConfig
from paro_compile.passes.mask_analysis import PaddingForm, padding_analysis
from paro_compile.passes.fx_utils import fake_value, known_equal
from paro_compile.passes.layout import keys_from_other_tokens

SDPA_TARGETS: set[Any] = {torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention}
for _name in (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "scaled_dot_product_attention",
):
    _op = getattr(torch.ops.aten, _name, None)
    if _op is not None:
        SDPA_TARGETS.add(_op)
        SDPA_TARGETS.update(getattr(_op, overload) for overload in _op.overloads())

# Positional parameter order of F.scaled_dot_product_attention after (query, key, value).
SDPA_OPTIONAL_ARGS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
ATEN_FLASH_OPTIONAL_ARGS = ("dropout_p", "is_causal", "return_debug_mask", "scale")


@dataclass
class AttentionSite:
    """One SDPA call in the graph, with what we know about it."""

    site_id: str
    node: fx.Node
    module_path: str
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: Optional[float]
    batch: Any = None
    heads: Any = None
    seq_len: Any = None
    kv_seq_len: Any = None
    head_dim: Any = None
    dtype: Optional[torch.dtype] = None
    reasons: list[str] = field(default_factory=list)
    attn_mask: Optional[fx.Node] = None
    """The SDPA ``attn_mask``; a site that lowers with one has it as `padding`."""
    padding: Optional[PaddingForm] = None
    """``attn_mask`` read as padding (`mask_analysis.padding_form`): key parts lowered as the op's key bias, query
    parts (if any) zeroing the padded queries' output rows."""
    keys_from_other_tokens: bool = False
    """The keys provably come from another sequence although as many as the queries (`layout.keys_from_other_tokens`:
    e.g. 512 text tokens attended by 512 video tokens)."""

    @property
    def supported(self) -> bool:
        return not self.reasons

    @property
    def is_cross(self) -> bool:
        """Keys and values from another sequence (e.g. text): no token order or block mask applies."""
        lengths_differ = self.kv_seq_len is not None and not known_equal(self.seq_len, self.kv_seq_len)
        return lengths_differ or self.keys_from_other_tokens

    @property
    def shape(self) -> tuple:
        return (self.batch, self.heads, self.seq_len, self.head_dim)


# Dynamo spells the module path as the Python source it traced: ``L['self'].blocks[0]._modules['attn']``,
# ``getattr(L['self'], 'weird-name')`` for names that are not identifiers, and, when a hook replaced a module's
# ``forward`` (diffusers' HookRegistry: context parallelism, offloading, caches), hops from the module back to
# itself: ``.forward.func.__closure__[0].cell_contents.forward.__self__``. Hops are dropped, so a site id is the
# same with or without hooks.
_HOP_STARTS = ("forward", "original_forward", "_old_forward")


@dataclass(frozen=True)
class _PathPart:
    kind: str  # "root" (L[...] / G[...] / a bare name), "attr" (.name), "index" ([0]), "key" (['name'])
    value: Any


_STRING = re.compile(r"'(?:[^'\\]|\\.)*'" + r'|"(?:[^"\\]|\\.)*"')


def _parse_source(path: str, start: int = 0) -> tuple[list[_PathPart], int]:
    """Parse one Dynamo source expression from ``path[start:]`` into parts; returns (parts, end index)."""
    import ast

    parts: list[_PathPart] = []
    i = start
    if path.startswith("getattr(", i):
        inner, i = _parse_source(path, i + len("getattr("))
        match = _STRING.match(path, i + 2) if path.startswith(", ", i) else None
        if match is None or not path.startswith(")", match.end()):
            raise ValueError(f"unexpected getattr form in {path!r}")
        parts = inner + [_PathPart("attr", ast.literal_eval(match.group()))]
        i = match.end() + 1
    else:
        match = re.compile(r"([A-Za-z_]\w*)(\[(?:'[^']*'|\"[^\"]*\")\])?").match(path, i)
        if match is None:
            raise ValueError(f"unexpected source root in {path!r}")
        parts.append(_PathPart("root", match.group()))
        i = match.end()
    while i < len(path) and path[i] in ".[":
        if path[i] == "[":
            match = _STRING.match(path, i + 1)
            if match is not None and path.startswith("]", match.end()):
                parts.append(_PathPart("key", ast.literal_eval(match.group())))
                i = match.end() + 1
                continue
            close = path.index("]", i)
            token = path[i + 1:close]
            parts.append(_PathPart("index", int(token)) if token.lstrip("-").isdigit() else _PathPart("key", token))
            i = close + 1
        else:
            # Dynamo writes ModuleDict keys raw after the dot (``.d.a b``): a name runs to the next '.' or '['.
            match = re.compile(r"[^.\[\]),]+").match(path, i + 1)
            if match is None:
                raise ValueError(f"empty attribute in {path!r}")
            parts.append(_PathPart("attr", match.group()))
            i = match.end()
    return parts, i


def _is_attr(parts: list[_PathPart], j: int, *names: str) -> bool:
    return j < len(parts) and parts[j].kind == "attr" and parts[j].value in names


def _hop_tail(parts: list[_PathPart], j: int) -> int:
    """Length of the way back from a bound method or wrapper at ``parts[j - 1]`` to its module (0: none)."""
    start = j
    while _is_attr(parts, j, "__wrapped__"):
        j += 1
    if _is_attr(parts, j, "__self__"):
        return j + 1 - start
    if _is_attr(parts, j, "args") and j + 1 < len(parts) and parts[j + 1].kind == "index":
        return j + 2 - start
    if (_is_attr(parts, j, "func") and _is_attr(parts, j + 1, "__closure__") and j + 2 < len(parts)
            and parts[j + 2].kind == "index" and _is_attr(parts, j + 3, "cell_contents")):
        return j + 4 - start
    return 0


def _hop_length(parts: list[_PathPart], i: int) -> int:
    """Length of the hook hop that starts at ``parts[i]`` (0: none). A hop leaves a module through its ``forward``
    and comes back to the same module: ``forward.__self__`` (bound method), ``forward.args[0]`` (functools.partial),
    ``forward.func.__closure__[k].cell_contents`` (the closure of a hook's wrapper; a diffusers HookRegistry keeps
    its function reference there, whose ``forward`` hops on), with any ``__wrapped__`` in between; and a hook
    object's ``fn_ref`` before such a hop."""
    j = i + 1 if _is_attr(parts, i, "fn_ref") and _is_attr(parts, i + 1, *_HOP_STARTS) else i
    if not _is_attr(parts, j, *_HOP_STARTS):
        return 0
    tail = _hop_tail(parts, j + 1)
    return j + 1 + tail - i if tail else 0


def normalize_module_path(dynamo_path: str) -> str:
    """A module's `named_modules()` name from the path Dynamo records in ``nn_module_stack``.

    ``L['self'].blocks[0]._modules['attn']`` → ``blocks.0.attn``; ``getattr(L['self'], 'weird-name')`` →
    ``weird-name``; hook hops (``forward.__self__``, ``forward.func.__closure__[0].cell_contents``, ...) are dropped,
    so ``L['function_reference'].forward.__self__.__dict__['_modules']['blocks'].0.forward.func.__closure__[0]
    .cell_contents.forward.__self__.attn1`` → ``blocks.0.attn1``, and a root that is the model's bound method
    (``L['original_forward'].__self__``, a wrapper that replaced ``forward``) is the model. A path this parser does not understand is kept
    with only the old textual rules applied (never an error: the id stays unique, only less readable)."""
    try:
        parts, end = _parse_source(dynamo_path)
        if end != len(dynamo_path):
            raise ValueError(f"trailing text in {dynamo_path!r}")
    except (ValueError, SyntaxError):
        return _normalize_textually(dynamo_path)
    names: list[str] = []
    i = 1 if parts and parts[0].kind == "root" else 0
    if i:  # a root that is a bound method or wrapper of the model (``L['original_forward'].__self__``)
        i += _hop_tail(parts, 1)
    while i < len(parts):
        hop = _hop_length(parts, i)
        if hop:
            i += hop
            continue
        part = parts[i]
        if part.kind == "attr" and part.value in ("__dict__", "_modules"):
            i += 1
            continue
        if part.kind == "key" and part.value == "_modules" and i > 0 and parts[i - 1].value == "__dict__":
            i += 1
            continue
        names.append(str(part.value))
        i += 1
    return ".".join(names)


def _normalize_textually(dynamo_path: str) -> str:
    path = re.sub(r"^L\[['\"][^'\"]+['\"]\]\.?", "", dynamo_path)
    path = re.sub(r"\._modules\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    path = re.sub(r"\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    parts = [p for p in path.split(".") if p and p not in ("__dict__", "_modules")]
    return ".".join(parts)


def innermost_module_path(node: fx.Node) -> str:
    """`normalize_module_path` of the innermost module on ``node``'s ``nn_module_stack`` ("" for the root)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return normalize_module_path(path)


def is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in SDPA_TARGETS


def sdpa_arguments(node: fx.Node) -> dict[str, Any]:
    """Normalise positional/keyword arguments of any SDPA form into one dict."""
    target_name = str(getattr(node.target, "__name__", node.target))
    names = ["query", "key", "value"]
    if "_scaled_dot_product_" in target_name and "efficient" in target_name:
        names += ["attn_bias", "compute_log_sumexp", "dropout_p", "is_causal", "scale"]
    elif "_scaled_dot_product_" in target_name and "cudnn" in target_name:
        names += ["attn_bias", "compute_log_sumexp", "dropout_p", "is_causal", "return_debug_mask", "scale"]
    elif "_scaled_dot_product_" in target_name:
        names += list(ATEN_FLASH_OPTIONAL_ARGS)
    else:
        names += list(SDPA_OPTIONAL_ARGS)
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    if "attn_bias" in args:
        args["attn_mask"] = args.pop("attn_bias")
    return args


def check_support(site: AttentionSite, args: dict[str, Any], config: ParoConfig) -> list[str]:
    """Every reason this site cannot run on the paro op; empty = supported."""
    reasons = []
    target_name = str(getattr(site.node.target, "__name__", site.node.target))
    if "_scaled_dot_product_" in target_name:
        reasons.append(f"ATen-level SDPA ({target_name}) returns extra outputs; lower at the Dynamo graph instead")
    site.padding, mask_reason = mask_padding(args.get("attn_mask"), fake_value(args.get("query")),
                                             fake_value(args.get("key")))
    if mask_reason:
        reasons.append(mask_reason)
    dropout = args.get("dropout_p", 0.0)
    if not isinstance(dropout, (int, float)) or dropout > 0:
        reasons.append(f"dropout_p={dropout} (inference only; call model.eval())")
    if args.get("is_causal", False):
        reasons.append("is_causal=True (visual DiT attention is bidirectional; causal stays SDPA)")
    if not isinstance(args.get("scale"), (type(None), int, float)):
        reasons.append("scale is a tensor, not a constant")
    q, k, v = (fake_value(args.get(name)) for name in ("query", "key", "value"))
    if q is None or k is None or v is None:
        reasons.append("query/key/value shapes unknown in the graph")
        return reasons
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        reasons.append(f"inputs are not 4-D [B, H, N, D] (query {tuple(q.shape)})")
        return reasons
    if any(t.requires_grad for t in (q, k, v)):
        reasons.append("inputs require grad (paro is inference-only; run under torch.no_grad())")
    if q.dtype not in (torch.float16, torch.bfloat16) and not (q.dtype == torch.float32 and config.allow_fp32):
        reasons.append(f"dtype {q.dtype} (paro kernels take float16/bfloat16; cast the model or set allow_fp32=True)")
    if not (q.dtype == k.dtype == v.dtype):
        reasons.append(f"mixed dtypes q={q.dtype} k={k.dtype} v={v.dtype}")
    head_dim = q.shape[-1]
    if not isinstance(head_dim, int) or head_dim > MAX_HEAD_DIM or not known_equal(v.shape[-1], head_dim):
        reasons.append(f"head_dim {head_dim} (v: {v.shape[-1]}): the kernels take head dims up to {MAX_HEAD_DIM} "
                       "(smaller ones that are not a power of two run zero-padded)")
    # known_equal, not ==: comparing symbolic sizes with == would guard on (specialize) them
    if args.get("enable_gqa", False) or not known_equal((q.shape[1], k.shape[1]), (k.shape[1], v.shape[1])):
        reasons.append(f"grouped-query heads (q {q.shape[1]}, k {k.shape[1]}, v {v.shape[1]})")
    if not known_equal(q.shape[0], k.shape[0]):
        reasons.append("query and key batch sizes differ")
    if not known_equal(q.shape[2], k.shape[2]) and not config.lower_cross_attention:
        reasons.append(f"cross-attention (query length {q.shape[2]} != key length {k.shape[2]}) and "
                       "lower_cross_attention=False")
    if isinstance(site.scale, (int, float)) and not math.isfinite(site.scale):
        reasons.append(f"scale={site.scale} is not finite")
    return reasons


def mask_padding(mask: Any, q: Optional[torch.Tensor],
                 k: Optional[torch.Tensor]) -> tuple[Optional[PaddingForm], Optional[str]]:
    """(``mask`` read as padding, None) when it is provably padding (`mask_analysis.padding_analysis`: masking keys
    only, boolean or additive, or boolean padding of queries and keys together) and broadcasts as [B|1, H|1, Nq|1, Nk];
    (None, None) without a mask; else (None, why the site stays on SDPA)."""
    if mask is None:
        return None, None
    value = fake_value(mask)
    if value is None:
        return None, "attn_mask is not a tensor of known shape"
    if q is None or k is None or q.dim() != 4 or k.dim() != 4:
        return None, "attn_mask with query/key shapes unknown"
    if value.dtype != torch.bool and not value.is_floating_point():
        return None, f"attn_mask of dtype {value.dtype} (SDPA takes boolean or additive float masks)"
    shape = (1,) * (4 - value.dim()) + tuple(value.shape) if value.dim() <= 4 else None
    if shape is None:
        return None, f"attn_mask has {value.dim()} dims"
    batch_ok = known_equal(shape[0], 1) or known_equal(shape[0], q.shape[0])
    heads_ok = known_equal(shape[1], 1) or known_equal(shape[1], q.shape[1])
    rows_ok = known_equal(shape[2], 1) or known_equal(shape[2], q.shape[2])
    if not (batch_ok and heads_ok and rows_ok and known_equal(shape[3], k.shape[2])):
        return None, f"attn_mask of shape {tuple(value.shape)} does not broadcast as [B|1, H|1, Nq|1, Nk]"
    form, written = padding_analysis(mask)
    if form is None:
        why = (": it is built as padding, but an in-place op (e.g. `mask[..., 0] = True`) writes it afterwards"
               if written else " (a key-padding mask, or a boolean AND of a key mask and a query-row mask); only those "
               "lower")
        return None, f"attn_mask of shape {tuple(value.shape)} varies over query rows and is not provably padding{why}"
    return form, None


def _keys_from_other_tokens(site: AttentionSite) -> bool:
    if not isinstance(site.q, fx.Node) or not isinstance(site.k, fx.Node):
        return False
    try:
        return keys_from_other_tokens(site.q, site.k)
    except Exception:  # the trace must never break discovery: an unreadable site keeps its length verdict
        return False


def find_attention_sites(gm: fx.GraphModule, config: ParoConfig) -> list[AttentionSite]:
    """All SDPA calls of ``gm`` in graph order, each with its site id and support verdict."""
    sites: list[AttentionSite] = []
    ordinals: dict[str, int] = {}
    for node in gm.graph.nodes:
        if not is_sdpa(node):
            continue
        args = sdpa_arguments(node)
        module_path = innermost_module_path(node)
        ordinal = ordinals.get(module_path, 0)
        ordinals[module_path] = ordinal + 1
        q = fake_value(args.get("query"))
        scale = args.get("scale")
        site = AttentionSite(
            site_id=f"{module_path or '<root>'}#{ordinal}",
            node=node,
            module_path=module_path,
            q=args.get("query"),
            k=args.get("key"),
            v=args.get("value"),
            scale=float(scale) if isinstance(scale, (int, float)) else None,
        )
        if q is not None and q.dim() == 4:
            site.batch, site.heads, site.seq_len, site.head_dim = tuple(q.shape)
            site.dtype = q.dtype
            kv = fake_value(args.get("key"))
            site.kv_seq_len = kv.shape[2] if kv is not None and kv.dim() == 4 else None
        site.attn_mask = args.get("attn_mask")
        site.reasons = check_support(site, args, config)
        if site.reasons:
            site.padding = None  # a site that stays on SDPA keeps its mask there
        if site.kv_seq_len is not None and known_equal(site.seq_len, site.kv_seq_len):
            site.keys_from_other_tokens = _keys_from_other_tokens(site)
        sites.append(site)
    return sites
