"""Q/K outliers: what per-block INT8 quantization of Q and K would cost at a site, measured at calibration.

The kernels quantize Q and K per block of ``block_size`` tokens with one symmetric scale ``amax / 127`` per block
(K smoothed first by subtracting its per-channel mean over tokens; `kernels.reference`). One large value spreads over
its whole block: a query token 100× larger than its neighbours leaves them a quantization step so coarse that their
scores lose most of their information, and a key channel 100× larger than the others (smoothing does not remove a
channel whose mean is ~0) does the same to every key block.

Per site, head and calibration call, `OutlierStatistics.update` measures, in the model's token order:

- the block incoherence of Q and of smoothed K: ``max|x| / mean|x|`` over each quantization block (tokens × channels;
  the same ratio as the method's Ψ, on the inputs instead of P), its maximum and median over blocks;
- the error that INT8 implies: the L2 error of the attention output over the rows of the head's most incoherent Q
  block (where Q outliers do their harm; K outliers harm every row), against all keys, with Q and K fake-quantized
  exactly as `kernels.reference.quantize_blockwise` does and P, V unquantized (V: the site's values, or seeded
  Gaussian values when none are given), relative to the head's typical output: the RMS output of ``block_size``
  seeded random rows. (Relative to the sampled rows' own output, a row that an outlier query makes one-hot would
  dominate the norm and hide the rows it destroys.) So a head without outliers scores its plain INT8 error, and a
  head whose worst block is wrecked scores about 1. The same rows are also measured with only Q quantized, only K,
  and with ``FINE_GROUP``-token quantization groups, which says where the error comes from and whether finer groups
  fix it.

`report` keeps the worst call per head and flags the site when a head's INT8 error exceeds ``qk_outlier_error``
(`CalibrationOptions`), with the suggested fix: finer quantization groups (``block_size=16``) when they bring the error
under the threshold, else ``qk_bits=16`` for the site. Memory: heads are processed in groups whose attention rows
and fp32 copies of q, k, v each stay within half of ``max_elements`` (the statistics pass's chunk budget).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from paro_compile.kernels.reference import num_blocks, quantize_blockwise

FINE_GROUP = 16
"""Token group of the finer-quantization measurement (the smallest block size the kernels run)."""
OUTLIER_INCOHERENCE = 20.0
"""Block incoherence from which the summary names Q or K as the outliers' source: a block of 64 tokens × 64 channels
of Gaussian values has max|x|/mean|x| ≈ 5-6, so 20 means one value far beyond its block's extreme. (The INT8 error
split cannot say it: a query outlier makes its own row's attention sharp, which also amplifies K's rounding.)"""
ERROR_KEYS = ("int8_error", "int8_error_q_only", "int8_error_k_only", "int8_error_fine")


def smooth_keys(k: torch.Tensor) -> torch.Tensor:
    """K minus its per-(batch, head, channel) mean over tokens, as the kernels smooth it before quantizing."""
    return k - k.mean(dim=2, keepdim=True)


def block_incoherence(x: torch.Tensor, block: int) -> torch.Tensor:
    """[B, H, nb] ``max|x| / mean|x|`` over each block of ``block`` tokens × all channels of x [B, H, N, D] (the last
    block counts its real tokens only); 1 for an all-zero block."""
    b, h, n, d = x.shape
    nb = num_blocks(n, block)
    blocks = torch.nn.functional.pad(x.abs(), (0, 0, 0, nb * block - n)).reshape(b, h, nb, block * d)
    counts = torch.full((nb,), float(block * d), device=x.device)
    counts[-1] = (n - (nb - 1) * block) * d
    mean = blocks.sum(-1) / counts
    peak = blocks.amax(-1)
    return torch.where(mean > 0, peak / mean.clamp_min(1e-30), torch.ones_like(mean))


def fake_quantize(x: torch.Tensor, block: int, bits: int = 8) -> torch.Tensor:
    """x [B, H, N, D] quantized per ``block`` tokens (`quantize_blockwise`) and dequantized back to float32."""
    values, scale = quantize_blockwise(x.float().contiguous(), block, bits)
    per_token = scale.repeat_interleave(block, dim=-1)[..., : x.shape[2]]
    return values * per_token[..., None]


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.softmax(torch.matmul(q * scale, k.transpose(-1, -2)), dim=-1).matmul(v)


def _rms_rows(x: torch.Tensor) -> torch.Tensor:
    """[B, H] root mean square over rows of each row's L2 norm (x [B, H, rows, D])."""
    return x.pow(2).sum(-1).mean(-1).sqrt()


class OutlierStatistics:
    """Worst-call Q/K block incoherence and implied INT8 error per head of one site (module docstring)."""

    def __init__(self, heads: int, block_size: int, threshold: float) -> None:
        self.heads = int(heads)
        self.block_size = int(block_size)
        self.fine = min(FINE_GROUP, self.block_size)
        self.threshold = float(threshold)
        self.calls = 0
        self.worst: dict[str, torch.Tensor] = {
            name: torch.zeros(self.heads, dtype=torch.float64)
            for name in ("q_incoherence_max", "k_incoherence_max", "q_incoherence_median", "k_incoherence_median",
                         *ERROR_KEYS)}

    @torch.no_grad()
    def update(self, q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor], *, scale: float,
               max_elements: int) -> None:
        """Measure one attention call (q, k, v [B, H, N, D], model token order)."""
        bsz, heads, n, d = q.shape
        bs = self.block_size
        gen = torch.Generator(device=q.device).manual_seed(0)
        typical_rows = torch.randint(0, n, (bs,), generator=gen, device=q.device)
        # Per group: attention rows [B, h, bs, N] and about seven [B, h, N, D] copies (fp32 q, k, v, smoothed and
        # quantized K): keep each within half the chunk budget.
        group = max(1, min(heads, max_elements // max(1, 2 * bsz * n * max(bs, d))))
        found: dict[str, list[torch.Tensor]] = {name: [] for name in self.worst}
        for h0 in range(0, heads, group):
            h1 = min(heads, h0 + group)
            qf, kf = (x[:, h0:h1].float().contiguous() for x in (q, k))
            vf = (v[:, h0:h1].float().contiguous() if v is not None
                  else torch.randn(bsz, h1 - h0, n, d, generator=gen, device=q.device))
            smoothed = smooth_keys(kf)
            psi_q, psi_k = block_incoherence(qf, bs), block_incoherence(smoothed, bs)
            # The rows of each (batch, head)'s most incoherent Q block, quantized as that block (a block's scale
            # depends on the block alone); the tail block's padding rows repeat its last token.
            rows = (psi_q.argmax(-1)[..., None] * bs + torch.arange(bs, device=q.device)).clamp_max(n - 1)
            index = rows[..., None].expand(-1, -1, -1, d)
            q_rows = torch.gather(qf, 2, index)
            q_int8 = fake_quantize(q_rows, bs)
            q_fine = fake_quantize(q_rows, self.fine)
            k_int8, k_fine = fake_quantize(smoothed, bs), fake_quantize(smoothed, self.fine)
            reference = _attention(q_rows, kf, vf, scale)
            typical = _rms_rows(_attention(qf[:, :, typical_rows], kf, vf, scale)).clamp_min(1e-30)
            errors = {
                "int8_error": _rms_rows(_attention(q_int8, k_int8, vf, scale) - reference) / typical,
                "int8_error_q_only": _rms_rows(_attention(q_int8, kf, vf, scale) - reference) / typical,
                "int8_error_k_only": _rms_rows(_attention(q_rows, k_int8, vf, scale) - reference) / typical,
                "int8_error_fine": _rms_rows(_attention(q_fine, k_fine, vf, scale) - reference) / typical,
            }
            for name, value in errors.items():
                found[name].append(value.amax(0))
            found["q_incoherence_max"].append(psi_q.amax(-1).amax(0))
            found["k_incoherence_max"].append(psi_k.amax(-1).amax(0))
            found["q_incoherence_median"].append(psi_q.median(-1).values.amax(0))
            found["k_incoherence_median"].append(psi_k.median(-1).values.amax(0))
        for name, parts in found.items():
            value = torch.cat(parts).double().cpu()
            self.worst[name] = torch.maximum(self.worst[name], torch.nan_to_num(value, nan=math.inf))
        self.calls += 1

    def report(self) -> dict[str, Any]:
        """JSON-able per-head numbers, ``flagged``, ``flagged_heads``, the suggested fix and a one-line summary."""
        per_head = {name: [round(float(x), 4) for x in value] for name, value in self.worst.items()}
        error = self.worst["int8_error"]
        flagged_heads = [h for h in range(self.heads) if float(error[h]) > self.threshold]
        report: dict[str, Any] = {
            "threshold": self.threshold, "block_size": self.block_size, "fine_group": self.fine, "calls": self.calls,
            **per_head, "flagged": bool(flagged_heads), "flagged_heads": flagged_heads,
        }
        if not flagged_heads:
            return report
        worst_head = max(flagged_heads, key=lambda h: float(error[h]))
        sources = [name for name in ("Q", "K")
                   if float(self.worst[f"{name.lower()}_incoherence_max"][worst_head]) >= OUTLIER_INCOHERENCE]
        sources = sources or ["Q and K together"]
        fine = float(self.worst["int8_error_fine"][flagged_heads].max())
        fine_helps = self.fine < self.block_size and fine <= self.threshold
        report["suggested_qk_bits"] = 16
        if fine_helps:
            report["suggested_block_size"] = self.fine
            fix = (f"finer quantization groups: block_size={self.fine} brings it to {fine:.3f} (or use qk_bits=16 for "
                   "this site)")
        else:
            fix = "use qk_bits=16 for this site" + (
                f" (block_size={self.fine} still gives {fine:.3f})" if self.fine < self.block_size else "")
        incoherence = "; ".join(
            f"{name} block max|x|/mean|x| {float(self.worst[f'{name.lower()}_incoherence_max'][worst_head]):.0f}, "
            f"median block {float(self.worst[f'{name.lower()}_incoherence_median'][worst_head]):.1f}"
            for name in ("Q", "K") if name in sources or sources == ["Q and K together"])
        report["suggestion"] = fix
        report["summary"] = (f"head(s) {flagged_heads}: INT8 Q/K error {float(error[worst_head]):.3f} > "
                             f"{self.threshold:g} from {' and '.join(sources)} outliers ({incoherence}); {fix}")
        return report
