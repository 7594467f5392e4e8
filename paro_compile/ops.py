"""The `paro::attention` custom op (what the lowering pass puts in place of SDPA) and `paro_attention`, its
Python entry point.

A `torch.library.custom_op` with a fake impl (not `triton_op`: under TRITON_INTERPRET=1 a triton_op
fails in every torch.compile backend on torch 2.13, see docs/DESIGN_NOTES.md). Inductor treats it as an opaque
extern call, so everything around it keeps Inductor's codegen. The block mask travels as `BlockMask.as_op_args`
(its tensors and sizes), the way FlexAttention's higher-order op carries its ``BlockMask``.

Dispatch of ``impl``:
- ``"reference"``: `paro_compile.kernels.reference` (pure PyTorch; any device).
- ``"triton"``: the portable Triton kernels (CUDA, or the CPU under TRITON_INTERPRET=1).
- ``"hopper"``: the Gluon kernel for sm_90 (`kernels.attention_hopper`; an error where it does not run the call).
- ``"auto"``: on CUDA the Triton kernels, or the Hopper kernel where it runs the call and
  `attention_hopper.selected_by_auto` picks it; the reference elsewhere.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from paro_compile import envs
from paro_compile.kernels.block_mask import BLOCK_SIZES, SIZE_FIELDS, TENSOR_FIELDS, BlockMask
from paro_compile.kernels.reference import LOG2E, check_attention_inputs, paro_attention_reference

IMPLS = ("auto", "reference", "triton", "hopper")


def triton_available_for(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return device.type == "cpu" and bool(envs.TRITON_INTERPRET)


def check_permutation(perm: torch.Tensor, heads: int, seq_len: int) -> None:
    """Raise ValueError unless ``perm`` [heads, seq_len] holds a permutation of range(seq_len) in every row."""
    if tuple(perm.shape) != (heads, seq_len):
        raise ValueError(f"perm has shape {tuple(perm.shape)}, expected ({heads}, {seq_len})")
    if perm.dtype not in (torch.int16, torch.int32, torch.int64):
        raise ValueError(f"perm must be an integer tensor, got {perm.dtype}")
    rows = perm.long().cpu()
    if bool(((rows < 0) | (rows >= seq_len)).any()):
        raise ValueError(f"perm holds values outside [0, {seq_len}): every row must be a permutation of the tokens")
    if not torch.equal(rows.sort(-1).values, torch.arange(seq_len).expand(heads, -1)):
        bad = int((rows.sort(-1).values != torch.arange(seq_len)).any(-1).nonzero()[0][0])
        raise ValueError(f"perm row {bad} repeats a token: every row must be a permutation of range({seq_len})")


@torch.library.custom_op("paro::attention", mutates_args=())
def paro_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    perm: Optional[torch.Tensor],
    key_bias: Optional[torch.Tensor],
    mask_tensors: list[Optional[torch.Tensor]],
    mask_sizes: list[int],
    scale: float,
    qk_bits: int,
    pv_dtype: str,
    compensate: bool,
    density: float,
    impl: str,
    site: str = "",
) -> torch.Tensor:
    """Block-sparse low-bit attention of q [B, H, N, D] over k, v [B, H, Nk, D]; returns [B, H, N, D] in model order.

    ``key_bias`` [B or 1, H or 1, Nk] (fp32, added to the scores; -inf masks a key): a key-padding mask
    (`kernels.reference`, step 7). ``mask_tensors`` / ``mask_sizes`` / ``density``: a `BlockMask` as
    `BlockMask.as_op_args` gives it. Compiled graphs pass masks and permutations the lowering has validated once; a
    mask or permutation on the CPU is validated here on its first call, and again whenever one of its tensors has
    been changed in place (its version counter moved); on the GPU the kernels never read or write outside their
    tensors whatever the indices hold. Head dims the kernels do not tile (e.g. 96) run zero-padded to the next power
    of two, which leaves every score and output channel unchanged.

    Which implementation runs a call (and the checks that only depend on shapes, dtypes, devices and options) is
    decided on the first call of each combination (`_route`). An empty call (B, H, N, Nk or D zero) returns zeros,
    as SDPA does.

    ``site``: the id of the attention site the lowering put this call in place of ("" for a direct call); only a
    `paro_compile.qk_outlier_watch.watch_qk_outliers` block reads it."""
    route = _route(q, k, v, perm, key_bias, mask_tensors, mask_sizes, qk_bits, pv_dtype, compensate, impl)
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"mask density must be in [0, 1] (kept blocks / all blocks), got {density}")
    bsz, heads, n, head_dim = q.shape
    n_kv = k.shape[2]
    mask = _mask_from_op_args(mask_tensors, mask_sizes, density, n, n_kv)
    stored = next((t for t in (mask.counts, mask.kept_bits) if t is not None), None)
    if stored is not None and stored.device.type == "cpu":
        _validate_once((mask.counts, mask.indices, mask.slot_bits, mask.kept_bits), (heads, n, n_kv, *mask_sizes),
                       lambda: mask.validate(heads, n, kv_len=n_kv))
    if perm is not None and perm.device.type == "cpu":
        _validate_once((perm,), (heads, n), lambda: check_permutation(perm, heads, n))
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if scale <= 0:
        # The kernels fold a positive scale into Q's quantization scale; q·k·s = (-q)·k·|s| and s = 0 is uniform
        # attention (every score 0), so both run exactly as a positive scale on a transformed q.
        q, scale = (-q, -scale) if scale < 0 else (torch.zeros_like(q), 1.0)
    if ACTIVE_QK_WATCHES and not route.empty:
        for watch in ACTIVE_QK_WATCHES:
            watch.observe(site, q, k, v, perm, scale=scale, qk_bits=qk_bits, block=int(mask_sizes[0]))
    if route.empty:
        return torch.zeros_like(q, memory_format=torch.contiguous_format)
    if route.pad:
        q, k, v = (torch.nn.functional.pad(x, (0, route.pad)) for x in (q, k, v))
    if route.hopper:
        out = attention_hopper().paro_attention_hopper_qkv(q, k, v, perm=perm, mask=mask, scale=scale,
                                                           pv_dtype=pv_dtype)
    elif route.triton:
        out = paro_attention_triton()(q, k, v, perm=perm, mask=mask, key_bias=key_bias, scale=scale, qk_bits=qk_bits,
                                      pv_dtype=pv_dtype, compensate=compensate)
    else:
        out = paro_attention_reference(q, k, v, perm=perm, mask=mask, key_bias=key_bias, scale=scale,
                                       qk_bits=qk_bits, pv_dtype=pv_dtype, compensate=compensate)
    if route.pad:
        out = out[..., :head_dim]
    # The fake impl promises a contiguous result; Inductor asserts the strides.
    return out.contiguous()


ACTIVE_QK_WATCHES: tuple = ()
"""The `paro_compile.qk_outlier_watch.QKOutlierWatch`es whose block is running; empty outside every such block, so
that a call pays one truthiness check for the watch."""


@dataclass(frozen=True)
class _Route:
    """Which implementation runs a call, and the zero padding of its head dim (`_route`)."""

    triton: bool
    hopper: bool
    """The Gluon Hopper kernel runs this call: impl="hopper", or "auto" where `attention_hopper.selected_by_auto`."""
    pad: int
    empty: bool
    """Nothing to compute (B, H, N, Nk or D is zero): the result is zeros."""


_ROUTES: dict = {}
_MAX_ROUTES = 256  # a bound, so that a stream of ever-new shapes cannot grow the cache without limit


def _tensor_key(x: Optional[torch.Tensor]) -> Optional[tuple]:
    return None if x is None else (x.shape, x.dtype, x.device)


def _route(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, perm: Optional[torch.Tensor],
           key_bias: Optional[torch.Tensor], mask_tensors: list[Optional[torch.Tensor]], mask_sizes: list[int],
           qk_bits: int, pv_dtype: str, compensate: bool, impl: str) -> _Route:
    key = (q.shape, q.dtype, q.device, k.shape, k.dtype, k.device, v.shape, v.dtype, v.device, _tensor_key(perm),
           _tensor_key(key_bias), tuple(None if t is None else t.device for t in mask_tensors), tuple(mask_sizes),
           qk_bits, pv_dtype, compensate, impl, envs.raw_values(("TRITON_INTERPRET",)))
    route = _ROUTES.get(key)
    if route is None:
        route = _make_route(q, k, v, perm, key_bias, mask_tensors, mask_sizes, qk_bits, pv_dtype, compensate, impl)
        if len(_ROUTES) >= _MAX_ROUTES:
            _ROUTES.clear()
        _ROUTES[key] = route
    return route


def _make_route(q, k, v, perm, key_bias, mask_tensors, mask_sizes, qk_bits, pv_dtype, compensate, impl) -> _Route:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    dense, no_key_bias = BlockMask.op_args_are_dense(mask_tensors), key_bias is None
    check_attention_inputs(q, k, v, perm, key_bias, compensate and not dense)
    head_dim, n, n_kv = q.shape[-1], q.shape[2], k.shape[2]
    block_m, block_n = int(mask_sizes[0]), int(mask_sizes[1])
    _check_mask_devices(q, mask_tensors)
    use_kernel = impl in ("triton", "hopper") or (impl == "auto" and q.device.type == "cuda")
    if block_m <= 0 or block_n <= 0 or (use_kernel and (block_m not in BLOCK_SIZES or block_n not in BLOCK_SIZES)):
        raise ValueError(f"mask blocks {block_m}x{block_n}: the kernels take block sizes {BLOCK_SIZES} "
                         "(impl='reference' takes any positive size)")
    if q.numel() == 0 or n_kv == 0:
        return _Route(triton=False, hopper=False, pad=0, empty=True)
    pad = kernel_head_dim(head_dim) - head_dim if use_kernel else 0
    hopper_runs = False
    if impl in ("hopper", "auto") and q.device.type == "cuda":
        hopper = attention_hopper()
        hopper_runs = hopper.available(q.device) and no_key_bias and n_kv == n and \
            hopper.supports(qk_bits, pv_dtype, block_m, block_n, head_dim + pad, compensate and not dense,
                            dtype=q.dtype)
        if impl == "hopper" and not hopper_runs:
            raise ValueError(f"impl='hopper' cannot run this call (device {q.device}, qk_bits={qk_bits}, "
                             f"pv_dtype={pv_dtype!r}, blocks {block_m}x{block_n}, head_dim {head_dim}, "
                             f"compensate={compensate}, key bias={not no_key_bias}, Nk={n_kv} for N={n}, "
                             f"dtype {q.dtype}); use impl='auto' or 'triton'")
    if use_kernel and not (impl == "hopper" and hopper_runs) and not triton_available_for(q.device):
        raise RuntimeError(
            f"impl='triton' needs CUDA tensors (got {q.device}); on the CPU set TRITON_INTERPRET=1 "
            "before importing paro_compile, or use impl='reference'"
        )
    hopper_chosen = hopper_runs and (impl == "hopper" or attention_hopper().selected_by_auto(head_dim + pad, pv_dtype))
    return _Route(triton=use_kernel, hopper=hopper_chosen, pad=pad, empty=False)


def _check_mask_devices(q: torch.Tensor, mask_tensors: list[Optional[torch.Tensor]]) -> None:
    for name, t in zip(TENSOR_FIELDS, mask_tensors):
        if t is not None and t.device not in (q.device, torch.device("cpu")):
            raise ValueError(f"mask {name} is on {t.device}, q on {q.device}: build the mask on q's device (or the CPU)")


def _mask_from_op_args(tensors: list[Optional[torch.Tensor]], sizes: list[int], density: float, n: int,
                       n_kv: int) -> BlockMask:
    """The `BlockMask` of the op's mask arguments; a dense one's block counts follow N and Nk (they may be symbolic
    in the graph: passed as 0)."""
    if len(tensors) == len(TENSOR_FIELDS) and len(sizes) == len(SIZE_FIELDS) and BlockMask.op_args_are_dense(tensors):
        return BlockMask.dense(n, int(sizes[0]), int(sizes[1]), kv_len=n_kv)
    mask = BlockMask.from_op_args(tensors, sizes, density)
    return BlockMask.dense(n, mask.block_m, mask.block_n, kv_len=n_kv) if mask.is_dense else mask


_VALIDATED: dict = {}
_MAX_VALIDATED = 1024


def _validate_once(tensors: tuple[Optional[torch.Tensor], ...], context: tuple, validate: Callable[[], object]) -> None:
    """Run ``validate()`` unless these same tensor objects passed it before for the same ``context`` and none of them
    has been changed in place since (their version counters, which views share, have not moved). Held by weak
    references: a tensor that dies takes its entry with it. Inference tensors have no version counter: validated on
    every call."""
    present = tuple(t for t in tensors if t is not None)
    if any(t.is_inference() for t in present):
        validate()
        return
    state = (context, tuple(t._version for t in present))
    entry = _VALIDATED.get(id(present[0]))
    if entry is not None and entry[1] == state and len(entry[0]) == len(present) and \
            all(ref() is t for ref, t in zip(entry[0], present)):
        return
    validate()
    if len(_VALIDATED) >= _MAX_VALIDATED:
        _VALIDATED.clear()
    _VALIDATED[id(present[0])] = (tuple(weakref.ref(t) for t in present), state)


def attention_hopper():
    """`paro_compile.kernels.attention_hopper`, imported on first use (it needs Gluon)."""
    from paro_compile.kernels import attention_hopper as module

    return module


def paro_attention_triton():
    """`paro_compile.kernels.attention.paro_attention_triton`, imported on first use (it needs Triton)."""
    from paro_compile.kernels.attention import paro_attention_triton as function

    return function


@paro_attention_op.register_fake
def _paro_attention_fake(q, k, v, perm, key_bias, mask_tensors, mask_sizes, scale, qk_bits, pv_dtype, compensate,
                         density, impl, site=""):
    # Also the kernel of a call with a meta tensor among real ones (the dispatcher picks Meta): check the devices.
    check_attention_inputs(q, k, v, perm, key_bias, False)
    _check_mask_devices(q, mask_tensors)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


KERNEL_HEAD_DIMS = (16, 32, 64, 128, 256)


def kernel_head_dim(head_dim: int) -> int:
    """The head dim the kernels run a call of ``head_dim`` at: the next power of two they tile (zero padding)."""
    for size in KERNEL_HEAD_DIMS:
        if head_dim <= size:
            return size
    raise ValueError(f"head_dim {head_dim} is larger than the kernels' {KERNEL_HEAD_DIMS[-1]}")


def paro_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    perm: Optional[torch.Tensor] = None,
    mask: Optional[BlockMask] = None,
    key_bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    qk_bits: int = 8,
    pv_dtype: str = "fp8",
    compensate: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """`paro::attention` on q [B, H, N, D] and k, v [B, H, Nk, D] (model token order) with a per-head token order
    ``perm`` [H, N], a `BlockMask` (None: dense, 64-token blocks) and a key-padding ``key_bias`` [B|1, H|1, Nk].
    Same numerics as `kernels.reference` (its docstring); ``key_bias`` may also be a boolean keep-mask
    (`additive_key_bias`)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, N, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if isinstance(qk_bits, bool) or not isinstance(qk_bits, int):
        raise ValueError(f"qk_bits must be an int (4, 8 or 16), got {qk_bits!r}")
    mask = mask if mask is not None else BlockMask.dense(q.shape[2], kv_len=k.shape[2])
    tensors, sizes = mask.as_op_args()
    if key_bias is not None:
        key_bias = additive_key_bias(key_bias)
    return paro_attention_op(q, k, v, perm, key_bias, tensors, sizes,
                             float(scale if scale is not None else 1.0 / math.sqrt(max(q.shape[-1], 1))),
                             qk_bits, pv_dtype, compensate, float(mask.density), impl)


# An additive bias below this overflows to -inf once the kernels turn it into log2 units (bias · log2 e).
MIN_FINITE_BIAS = -torch.finfo(torch.float32).max / LOG2E


def additive_key_bias(bias: torch.Tensor) -> torch.Tensor:
    """The op's key bias of a key-padding mask as SDPA reads it: a boolean one (True keeps a key) as 0 / -inf; an
    additive one as fp32, its finite values clamped at `MIN_FINITE_BIAS` so that they stay finite in log2 units, as
    they do in SDPA (a row whose keys all carry ``finfo.min`` then averages V, as in SDPA, instead of returning zeros)."""
    if bias.dtype == torch.bool:
        return torch.zeros(bias.shape, dtype=torch.float32, device=bias.device).masked_fill(~bias, float("-inf"))
    if not bias.is_floating_point():
        return bias  # `check_attention_inputs` names the dtype
    bias = bias.float()
    return torch.where(bias == float("-inf"), bias, bias.clamp(min=MIN_FINITE_BIAS))
