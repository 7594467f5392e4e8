"""FP8 linear layers from torchao, for models compiled with ``backend="paro"``.

The paro backend makes attention sparse and low-bit; at 720p video sizes the transformer's linear layers are the other
half of the forward time. `quantize_linears` hands them to torchao's float8 recipe (dynamic per-row e4m3 activations,
per-row e4m3 weights, ``torch._scaled_mm``), then the model compiles with ``backend="paro"`` as before::

    from paro_compile.fp8 import quantize_linears
    result = quantize_linears(model)        # in place; result says what was quantized, skipped, and why
    compiled = torch.compile(model, backend="paro", options={"plan": plan})

torchao's float8 tensor is a tensor subclass that unwraps below Dynamo: the Dynamo graph the paro passes see is the
same graph, node for node, as without FP8, so every attention site is found, folded and lowered as before (tested).

Where FP8 cannot run (no CUDA device, a GPU below compute capability 8.9, linear weights not on the GPU) the model is
left exactly as it is and a `Fp8UnavailableWarning` says why: FP8 is a speed option, and the same script keeps working,
unquantized, on any machine. Make it an error where that is wanted with
``warnings.simplefilter("error", Fp8UnavailableWarning)``, or check ``result.applied``. A missing or too old torchao on
an FP8-capable GPU is an `ImportError` naming the install command (``pip install "paro-compile[fp8]"``).

Which linears (`default_filter`): the linears of the transformer blocks. Skipped, each with its reason in the result:
- the embedders and the output head (top-level ``condition_embedder``, ``time_text_embed``, ``context_embedder``,
  ``x_embedder``, ``patch_embedding``, ``proj_out``, ``norm_out``, ...): they run on a few rows per call (timestep,
  pooled text, or once over the text), so FP8 saves nothing there, and their error reaches every token (embedders) or
  the prediction itself (head);
- adaLN modulation linears (a linear inside a module whose name starts with ``norm``: ``norm1.linear``,
  ``norm1_context.linear``): one row per sample, whose shift/scale/gate multiplies every token of the block;
- layers torchao's row-wise FP8 cannot take: in or out features not multiples of 16 (``_scaled_mm``), weights that are
  not bfloat16 (row-wise scales are for bf16 weights), weights already quantized.
A ``filter(module, name) -> bool`` replaces the choice (the torchao limits still apply, with their reasons).

``quantize_linears(..., inductor_tuning=False)`` (default) leaves Inductor's global configuration alone. torchao's own
default (``set_inductor_config=True``) switches on coordinate-descent tuning of every generated Triton kernel,
process-wide and for every later compile, which benchmarks each kernel at its first call (`docs/video_720p.md`).
"""
from __future__ import annotations

import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

FP8_MIN_CAPABILITY = (8, 9)
TORCHAO_MIN_VERSION = (0, 18)
INSTALL_HINT = 'pip install "paro-compile[fp8]"  (torchao>=0.18)'

# Top-level modules of diffusers video/image transformers that embed the inputs or produce the prediction.
EMBEDDER_AND_HEAD_MODULES = frozenset({
    "condition_embedder", "time_text_embed", "time_embed", "time_embedding", "time_proj", "text_embedding",
    "context_embedder", "x_embedder", "patch_embed", "patch_embedding", "pos_embed", "rope", "proj_out", "norm_out",
    "caption_projection", "adaln_single",
})
MODULATION_PARENT = re.compile(r"^norm")

Filter = Callable[[nn.Module, str], bool]


class Fp8UnavailableWarning(UserWarning):
    """FP8 linears cannot run here (no CUDA, compute capability below 8.9, weights off the GPU); the model is unchanged."""


@dataclass
class Fp8LinearsResult:
    """What `quantize_linears` did."""

    applied: bool
    """True when torchao quantized at least the chosen linears; False when FP8 is unavailable (see ``reason``)."""
    reason: Optional[str] = None
    """Why nothing was quantized (FP8 unavailable), else None."""
    quantized: list[str] = field(default_factory=list)
    """Qualified names of the linears now holding FP8 weights."""
    skipped: dict[str, str] = field(default_factory=dict)
    """Qualified name → why the linear stays in high precision."""
    seconds: float = 0.0
    """Wall time of torchao's quantization (weights quantized on the GPU)."""
    inductor_tuning: bool = False
    """Whether torchao's Inductor settings (coordinate-descent tuning, process-wide) were applied."""

    def summary(self) -> str:
        if not self.applied:
            return f"FP8 linears not applied: {self.reason}"
        reasons: dict[str, int] = {}
        for why in self.skipped.values():
            reasons[why] = reasons.get(why, 0) + 1
        kept = "; ".join(f"{n} × {why}" for why, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
        return (f"FP8 linears: {len(self.quantized)} quantized in {self.seconds:.2f}s, {len(self.skipped)} kept in "
                f"high precision" + (f" ({kept})" if kept else ""))


def default_filter(module: nn.Module, name: str) -> bool:
    """True for the linears FP8 pays off on: those of the transformer blocks, less adaLN modulation (module docstring)."""
    return default_skip_reason(module, name) is None


def default_skip_reason(module: nn.Module, name: str) -> Optional[str]:
    """Why `default_filter` keeps ``name`` in high precision (None: quantize it)."""
    parts = name.split(".")
    if parts[0] in EMBEDDER_AND_HEAD_MODULES:
        return "embedder or output head (few rows per call; its error reaches every token or the prediction)"
    if len(parts) >= 2 and MODULATION_PARENT.match(parts[-2]):
        return "adaLN modulation (one row per sample; scales every token of the block)"
    return None


def fp8_unavailable_reason(model: Optional[nn.Module] = None) -> Optional[str]:
    """Why FP8 linears cannot run for ``model`` here, or None when they can: a CUDA device of compute capability ≥ 8.9
    holding the model's linear weights."""
    if not torch.cuda.is_available():
        return ("no CUDA device: FP8 linears need an NVIDIA GPU of compute capability >= 8.9 (Ada, Hopper or newer); "
                "the model keeps its linears")
    if torch.version.hip is not None:
        return ("ROCm build: this recipe covers NVIDIA GPUs; call torchao.quantization.quantize_ directly on MI300 and "
                "newer")
    devices = set()
    if model is not None:
        devices = {m.weight.device for m in model.modules() if isinstance(m, nn.Linear)}
        off_gpu = sorted(str(d) for d in devices if d.type != "cuda")
        if off_gpu:
            return (f"linear weights on {', '.join(off_gpu)}: move the model to the GPU first (model.to('cuda')), then "
                    "quantize")
    for device in sorted(devices, key=str) or [torch.device("cuda", torch.cuda.current_device())]:
        capability = torch.cuda.get_device_capability(device)
        if capability < FP8_MIN_CAPABILITY:
            return (f"{torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}; FP8 "
                    f"matmuls need >= {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} (Ada, Hopper or newer)")
    return None


def _import_torchao():
    """torchao's float8 API, or an ImportError saying how to install it."""
    try:
        import torchao
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    except ImportError as error:
        raise ImportError(f"FP8 linears need torchao >= {'.'.join(map(str, TORCHAO_MIN_VERSION))}: {INSTALL_HINT} "
                          f"({error})") from error
    version = tuple(int(x) for x in re.findall(r"\d+", torchao.__version__)[:2])
    if version < TORCHAO_MIN_VERSION:
        raise ImportError(f"torchao {torchao.__version__} is too old for FP8 linears (row-wise float8 config API): "
                          f"{INSTALL_HINT}")
    return Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_fp8_weight(weight: torch.Tensor) -> bool:
    """A weight already quantized: a tensor subclass (torchao's ``Float8Tensor`` reports the high-precision dtype) or
    a plain float8 tensor."""
    return type(weight) not in (torch.Tensor, nn.Parameter) or weight.dtype in FP8_DTYPES


def torchao_skip_reason(module: nn.Linear) -> Optional[str]:
    """Why torchao's row-wise FP8 cannot take this linear (None: it can)."""
    weight = module.weight
    if is_fp8_weight(weight):
        return "already FP8"
    out_features, in_features = weight.shape
    if in_features % 16 or out_features % 16:
        return f"shape {out_features}x{in_features}: torch._scaled_mm needs both dimensions multiples of 16"
    if weight.dtype != torch.bfloat16:
        return f"weight dtype {str(weight.dtype).replace('torch.', '')}: row-wise FP8 scales need bfloat16 weights"
    return None


def choose_linears(model: nn.Module, filter: Optional[Filter] = None) -> tuple[list[str], dict[str, str]]:
    """(names to quantize, name → reason kept) over every ``nn.Linear`` of ``model``."""
    chosen: list[str] = []
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        reason = torchao_skip_reason(module)
        if reason is None:
            if filter is None:
                reason = default_skip_reason(module, name)
            elif not filter(module, name):
                reason = "excluded by the filter"
        if reason is None:
            chosen.append(name)
        else:
            skipped[name] = reason
    return chosen, skipped


def quantize_linears(model: nn.Module, *, filter: Optional[Filter] = None,
                     inductor_tuning: bool = False) -> Fp8LinearsResult:
    """Quantize ``model``'s linear layers in place to torchao's float8 dynamic activation + float8 weight with row-wise
    scales. Compile afterwards: ``torch.compile(model, backend="paro", ...)``.

    ``filter(module, qualified_name) -> bool`` picks the linears (default: `default_filter`). ``inductor_tuning=True``
    also applies torchao's Inductor settings (coordinate-descent tuning of every kernel, process-wide): a longer first
    call for every later compile in the process. Where FP8 cannot run, warns (`Fp8UnavailableWarning`) and leaves the
    model unchanged; the result says why.
    """
    reason = fp8_unavailable_reason(model)
    if reason is not None:
        warnings.warn(f"FP8 linears not applied: {reason}", Fp8UnavailableWarning, stacklevel=2)
        return Fp8LinearsResult(applied=False, reason=reason)
    config_cls, per_row, quantize_ = _import_torchao()
    chosen, skipped = choose_linears(model, filter)
    names = set(chosen)
    start = time.perf_counter()
    if chosen:
        quantize_(model, config_cls(granularity=per_row(), set_inductor_config=inductor_tuning),
                  filter_fn=lambda module, name: name in names)
        if torch.cuda.is_available():  # the quantization runs asynchronously on the GPU; time all of it
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    modules = dict(model.named_modules())
    missed = [n for n in chosen if not is_fp8_weight(modules[n].weight)]
    if missed:  # torchao returns a weight unchanged where it declines; say so instead of reporting it quantized
        for n in missed:
            skipped[n] = "torchao left it unquantized"
        chosen = [n for n in chosen if n not in set(missed)]
    return Fp8LinearsResult(applied=True, quantized=chosen, skipped=skipped, seconds=seconds,
                            inductor_tuning=inductor_tuning)
