"""Bad or unusual inputs to `paro_attention`, the op and the backend options: each either gives SDPA's result (exactly
without quantization) or a ValueError/TypeError that names what was wrong. The Triton kernels run under the
interpreter on the CPU (small shapes)."""
import contextlib
import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import paro_compile
from paro_compile.config import ParoConfig
from paro_compile.kernels.block_mask import BlockMask
from paro_compile.ops import MIN_FINITE_BIAS, additive_key_bias, paro_attention

IMPLS = ["reference", "triton"]
EXACT = {"qk_bits": 16, "pv_dtype": "fp16"}


def qkv(*shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=gen).to(dtype) for _ in range(3))


def assert_sdpa(out, q, k, v, bias=None, scale=None):
    mask = None if bias is None else bias[:, :, None, :]
    # torch 2.11's CPU flash SDPA dies with SIGFPE on zero heads; the math backend gives the same (empty) result
    with sdpa_kernel(SDPBackend.MATH) if q.numel() == 0 else contextlib.nullcontext():
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=scale)
    torch.testing.assert_close(out.float(), ref, rtol=1e-4, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["transposed", "expanded"])
def test_strided_inputs_match_sdpa(impl, layout):
    gen = torch.Generator().manual_seed(1)
    if layout == "transposed":  # [B, N, H, D] views seen as [B, H, N, D]
        q, k, v = (torch.randn(2, 70, 2, 40, generator=gen).transpose(1, 2) for _ in range(3))
    else:  # stride-0 batch and head axes
        q = torch.randn(1, 2, 70, 40, generator=gen).expand(2, -1, -1, -1)
        k = torch.randn(1, 1, 70, 40, generator=gen).expand(2, 2, -1, -1)
        v = torch.randn(2, 2, 70, 40, generator=gen)
    assert_sdpa(paro_attention(q, k, v, impl=impl, **EXACT), q, k, v)


@torch.no_grad()
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n, head_dim", [(1, 64), (5, 72), (65, 80), (33, 96), (20, 160), (17, 256)])
def test_lengths_and_head_dims_match_sdpa(impl, n, head_dim):
    q, k, v = qkv(1, 2, n, head_dim)
    assert_sdpa(paro_attention(q, k, v, impl=impl, **EXACT), q, k, v)


@torch.no_grad()
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(0, 2, 33, 64), (1, 0, 33, 64), (1, 2, 0, 64), (1, 2, 33, 0)],
                         ids=["B=0", "H=0", "N=0", "D=0"])
def test_empty_calls_return_zeros_like_sdpa(impl, shape):
    q, k, v = qkv(*shape)
    out = paro_attention(q, k, v, impl=impl)
    assert out.shape == q.shape
    assert_sdpa(out, q, k, v)


@torch.no_grad()
@pytest.mark.parametrize("impl", IMPLS)
def test_cross_attention_with_no_keys_returns_zeros(impl):
    q, (k, v) = qkv(1, 2, 5, 64)[0], qkv(1, 2, 0, 64)[:2]
    out = paro_attention(q, k, v, impl=impl)
    assert out.shape == q.shape and not out.any()


@torch.no_grad()
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("masked", ["-inf", "-1e30", "finfo.min", "bool"])
def test_key_padding_with_all_masked_rows_matches_sdpa(impl, masked):
    q, k, v = qkv(2, 2, 33, 64)
    keep = torch.ones(2, 1, 33, dtype=torch.bool)
    keep[0, :, 20:] = False
    keep[1] = False  # every key of batch element 1 masked
    if masked == "bool":
        bias = keep
        sdpa_bias = additive_key_bias(keep)
    else:
        value = {"-inf": -math.inf, "-1e30": -1e30, "finfo.min": torch.finfo(torch.float32).min}[masked]
        bias = sdpa_bias = torch.zeros(2, 1, 33).masked_fill(~keep, value)
    out = paro_attention(q, k, v, key_bias=bias, impl=impl, **EXACT)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, :, None, :])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert_sdpa(out, q, k, v, bias=sdpa_bias)


def test_additive_key_bias_keeps_finite_values_finite_in_log2_units():
    bias = torch.tensor([0.0, -1e4, torch.finfo(torch.float32).min, -math.inf])
    out = additive_key_bias(bias)
    assert out[2] == MIN_FINITE_BIAS and math.isfinite(float(out[2]) * 1.4426950408889634)
    assert out[3] == -math.inf and out[:2].tolist() == [0.0, -1e4]
    assert additive_key_bias(torch.tensor([True, False])).tolist() == [0.0, -math.inf]


@torch.no_grad()
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scale", [0.0, -0.1, 1e-40])
def test_zero_negative_and_tiny_scales_match_sdpa(impl, scale):
    q, k, v = qkv(1, 2, 33, 64)
    assert_sdpa(paro_attention(q, k, v, scale=scale, impl=impl, **EXACT), q, k, v, scale=scale)


def _bad_call(case: str):
    q, k, v = qkv(2, 2, 33, 64)
    perm = torch.stack([torch.randperm(33) for _ in range(2)])
    sparse = BlockMask.from_dense(torch.tensor([[[True, False], [True, True]]] * 2), 32, 32)
    bitmap = BlockMask.from_dense(torch.tensor([[[True, False], [True, True]]] * 2), 32, 32, encoding="bitmap")
    cases = {
        "mixed dtypes": lambda: ((q.half(), k, v.bfloat16()), {}),
        "integer inputs": lambda: ((q.long(), k.long(), v.long()), {}),
        "k on meta": lambda: ((q, k.to("meta"), v), {}),
        "3-D inputs": lambda: ((q[0], k[0], v[0]), {}),
        "grouped heads": lambda: ((q, k[:, :1], v[:, :1]), {}),
        "v head dim": lambda: ((q, k, v[..., :32]), {}),
        "scale nan": lambda: ((q, k, v), {"scale": math.nan}),
        "scale inf": lambda: ((q, k, v), {"scale": math.inf}),
        "perm duplicates": lambda: ((q, k, v), {"perm": torch.zeros(2, 33, dtype=torch.long)}),
        "perm negative": lambda: ((q, k, v), {"perm": perm.clone().index_fill_(1, torch.tensor([0]), -1)}),
        "perm out of range": lambda: ((q, k, v), {"perm": perm.clone().index_fill_(1, torch.tensor([0]), 33)}),
        "perm shape": lambda: ((q, k, v), {"perm": perm[:, :32]}),
        "perm float": lambda: ((q, k, v), {"perm": perm.float()}),
        "perm on meta": lambda: ((q, k, v), {"perm": perm.to("meta")}),
        "key_bias int": lambda: ((q, k, v), {"key_bias": torch.zeros(2, 1, 33, dtype=torch.int32)}),
        "key_bias shape": lambda: ((q, k, v), {"key_bias": torch.zeros(2, 1, 32)}),
        "key_bias on meta": lambda: ((q, k, v), {"key_bias": torch.zeros(2, 1, 33, device="meta")}),
        "mask on meta": lambda: ((q, k, v), {"mask": sparse.to("meta")}),
        "mask heads": lambda: ((q, k, v), {"mask": BlockMask.from_dense(torch.ones(3, 2, 2, dtype=torch.bool).tril(),
                                                                          32, 32)}),
        "mask index out of range": lambda: ((q, k, v), {"mask": dataclasses.replace(
            sparse, indices=sparse.indices.clone().fill_(5))}),
        "mask count negative": lambda: ((q, k, v), {"mask": dataclasses.replace(
            sparse, counts=sparse.counts.clone().fill_(-1))}),
        "bitmap bits past Nk": lambda: ((q, k, v), {"mask": dataclasses.replace(bitmap, kept_bits=bitmap.kept_bits | 4)}),
        "bitmap bits int64": lambda: ((q, k, v), {"mask": dataclasses.replace(bitmap, kept_bits=bitmap.kept_bits.long())}),
        "bitmap bits shape": lambda: ((q, k, v), {"mask": dataclasses.replace(bitmap, kept_bits=bitmap.kept_bits[:1])}),
        "bitmap walk width 0": lambda: ((q, k, v), {"mask": dataclasses.replace(bitmap, walk_width=0)}),
        "bitmap walk width short": lambda: ((q, k, v), {"mask": dataclasses.replace(
            BlockMask.from_dense(torch.tensor([[[True, True], [False, True]]] * 2), 32, 32, encoding="bitmap"),
            walk_width=1)}),
        "bitmap on meta": lambda: ((q, k, v), {"mask": bitmap.to("meta")}),
        "mask density above 1": lambda: ((q, k, v), {"mask": dataclasses.replace(sparse, density=1.5)}),
        "mask density nan": lambda: ((q, k, v), {"mask": dataclasses.replace(sparse, density=math.nan)}),
        "mask block 0": lambda: ((q, k, v), {"mask": BlockMask(0, 0, 0, 0)}),
        "qk_bits float": lambda: ((q, k, v), {"qk_bits": 8.0}),
        "qk_bits 5": lambda: ((q, k, v), {"qk_bits": 5}),
        "pv_dtype": lambda: ((q, k, v), {"pv_dtype": "bf16"}),
    }
    return cases[case]()


BAD_CALLS = {
    "mixed dtypes": "share one dtype", "integer inputs": "share one dtype", "k on meta": "one device",
    "3-D inputs": r"\[B, H, N, D\]", "grouped heads": "q's B, H and D", "v head dim": "q's B, H and D",
    "scale nan": "finite", "scale inf": "finite", "perm duplicates": "repeats a token", "perm negative": "outside",
    "perm out of range": "outside", "perm shape": "perm has shape", "perm float": "integer tensor",
    "perm on meta": "perm is on meta", "key_bias int": "additive float", "key_bias shape": "key_bias must be",
    "key_bias on meta": "key_bias is on meta", "mask on meta": "is on meta", "mask heads": "do not fit",
    "mask index out of range": "indices", "mask count negative": "counts", "mask density above 1": "density",
    "mask density nan": "density", "bitmap bits past Nk": "bits past the last KV block",
    "bitmap bits int64": "kept_bits must be int32", "bitmap bits shape": "kept_bits has shape",
    "bitmap walk width 0": "walk_width must lie in", "bitmap walk width short": "narrower than the widest walk row",
    "bitmap on meta": "is on meta", "mask block 0": "block", "qk_bits float": "qk_bits", "qk_bits 5": "qk_bits",
    "pv_dtype": "pv_dtype",
}


@torch.no_grad()
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_calls_raise_value_errors_naming_the_problem(impl, case):
    args, kwargs = _bad_call(case)
    with pytest.raises(ValueError, match=BAD_CALLS[case]):
        paro_attention(*args, impl=impl, **kwargs)


@torch.no_grad()
def test_kernels_reject_block_sizes_they_do_not_tile_and_the_reference_runs_them():
    q, k, v = qkv(1, 2, 100, 64)
    mask = BlockMask.dense(100, 48, 48)
    with pytest.raises(ValueError, match="block sizes"):
        paro_attention(q, k, v, mask=mask, impl="triton")
    assert_sdpa(paro_attention(q, k, v, mask=mask, impl="reference", **EXACT), q, k, v)


@pytest.mark.parametrize("options, error", [
    ({"densty": 0.2}, "unknown paro/Inductor option"),
    ({"density": 0}, "density"), ({"density": math.nan}, "density"), ({"density": "0.5"}, "density"),
    ({"density": True}, "density"), ({"qk_bits": 8.0}, "qk_bits"), ({"qk_bits": True}, "qk_bits"),
    ({"qk_bits": "8"}, "qk_bits"), ({"pv_dtype": "FP8"}, "pv_dtype"), ({"pv_dtype": None}, "pv_dtype"),
    ({"block_size": 48}, "block_size"), ({"block_size": 64.0}, "block_size"),
    ({"compensate_skipped": "yes"}, "compensate_skipped"), ({"allow_fp32": "False"}, "allow_fp32"),
    ({"fold_permutations": "no"}, "fold_permutations"), ({"lower_cross_attention": 0}, "lower_cross_attention"),
    ({"auto_calibrate": "true"}, "auto_calibrate"), ({"calibration_calls": 0}, "calibration_calls"),
    ({"calibration_calls": 1.5}, "calibration_calls"), ({"plan": 123}, "plan"), ({"cache_dir": 123}, "cache_dir"),
    ({"on_missing_shape": "Dense"}, "on_missing_shape"), ({"fallback": "SDPA"}, "fallback"),
    ({"impl": "Triton"}, "impl"), ({"mask_encoding": "Bitmap"}, "mask_encoding"), ({"mask_encoding": 1}, "mask_encoding"), ({"heads": "all"}, "heads"), ({"heads": (3, 1)}, "heads"),
    ({"heads": (0, 1, 2)}, "heads"), ({"inductor": "x"}, "inductor"),
])
def test_option_typos_and_wrong_types_are_refused(options, error):
    with pytest.raises((TypeError, ValueError), match=error):
        ParoConfig.from_options(options)


def test_option_values_of_the_right_type_pass():
    config = ParoConfig.from_options({"density": 1, "heads": [0, 1], "cache_dir": "/tmp/x", "plan": None})
    assert config.density == 1.0 and isinstance(config.density, float)
    assert ParoConfig(heads=(0, 2)).heads == (0, 2) and ParoConfig(heads=range(2)).heads == range(2)


class MaskedAttention(nn.Module):
    def __init__(self, **sdpa) -> None:
        super().__init__()
        self.sdpa = sdpa
        self.qkv = nn.Linear(64, 3 * 2 * 32)

    def forward(self, x, mask=None):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 2, 32).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.sdpa)


@torch.no_grad()
@pytest.mark.parametrize("case", ["causal mask", "per-query mask", "is_causal", "scale nan"])
def test_unsupported_sites_fall_back_to_sdpa_with_a_reason(case):
    torch.manual_seed(0)
    x = torch.randn(2, 40, 64)
    mask, sdpa = None, {}
    if case == "causal mask":
        mask = torch.ones(40, 40, dtype=torch.bool).tril()
    elif case == "per-query mask":
        mask = torch.rand(2, 1, 40, 40) > 0.3
    elif case == "is_causal":
        sdpa = {"is_causal": True}
    else:
        sdpa = {"scale": math.nan}
    model = MaskedAttention(**sdpa).eval()
    ref = model(x, mask)
    out = torch.compile(model, backend="paro", options={"allow_fp32": True, **EXACT})(x, mask)
    site = paro_compile.last_report().sites[0]
    assert not site.lowered and site.reasons, site
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


@torch.no_grad()
def test_finfo_min_key_padding_with_an_all_masked_batch_element_matches_eager():
    torch.manual_seed(0)
    model = MaskedAttention().eval()
    x = torch.randn(2, 40, 64)
    mask = torch.zeros(2, 1, 1, 40)
    mask[0, ..., 25:] = torch.finfo(torch.float32).min
    mask[1] = torch.finfo(torch.float32).min
    ref = model(x, mask)
    out = torch.compile(model, backend="paro", options={"allow_fp32": True, **EXACT})(x, mask)
    assert paro_compile.last_report().sites[0].lowered
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
