"""NaN and infinities in q, k, v: the reference and the kernels agree with each other and with SDPA's rows
(`kernels.reference`, step 8), and one bad value never spreads to rows or channels that do not see it."""
import math

import pytest
import torch
import torch.nn.functional as F

from paro_compile.kernels.block_mask import BlockMask, num_blocks
from paro_compile.kernels.tuning import random_block_mask
from paro_compile.ops import paro_attention

from paro_kernel_helpers import kernel_device, rel_l2

def _hopper_runs() -> bool:
    from paro_compile.kernels import attention_hopper

    return attention_hopper.available()


IMPLS = ["reference", "triton"] + (["hopper"] if torch.cuda.is_available() and _hopper_runs() else [])
N, H, D = 200, 2, 64


def inputs(seed: int, dtype=torch.float16):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, H, N, D, generator=gen) for _ in range(3))
    return [x.to(dtype).to(kernel_device()) for x in (q, k, v)]


def rows_with_nan(out: torch.Tensor) -> torch.Tensor:
    return out.float().isnan().any(-1).cpu()


def token_mask(mask: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Boolean [H, N, N] of the tokens a block mask keeps (model order, no permutation)."""
    tok = torch.arange(N) // block
    return mask[:, tok][:, :, tok]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["+inf", "-inf", "nan"])
@pytest.mark.parametrize("numerics", [(8, "fp8"), (4, "int8"), (8, "fp16")], ids=["int8-fp8", "int4-int8", "int8-fp16"])
def test_a_bad_query_row_is_nan_and_alone(impl, value, numerics):
    """SDPA returns NaN for that query row only; the per-block scale used to spread it over its 64-row block."""
    bits, pv = numerics
    if impl == "hopper" and bits != 8:
        pytest.skip("the Hopper kernel runs INT8 QK only (other numerics go to the Triton kernel)")
    q, k, v = inputs(1)
    bad = q.clone()
    bad[0, 1, 70, 5] = value
    clean = q.clone()
    clean[0, 1, 70] = 0  # the row a bad row is quantized as: zeros, out of its block's scale
    out = paro_attention(bad, k, v, qk_bits=bits, pv_dtype=pv, impl=impl)
    want = paro_attention(clean, k, v, qk_bits=bits, pv_dtype=pv, impl=impl)
    sdpa = F.scaled_dot_product_attention(bad.float(), k.float(), v.float())
    assert torch.equal(rows_with_nan(out), rows_with_nan(sdpa))
    keep = ~rows_with_nan(out)
    torch.testing.assert_close(out.cpu()[keep], want.cpu()[keep], rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan], ids=["+inf", "-inf", "nan"])
def test_a_bad_key_makes_exactly_the_rows_that_attend_its_block_nan(impl, value):
    """A key token holding a NaN or an infinity gives NaN in every query row that attends its block (SDPA: NaN where
    its score is NaN or +inf, and with an attn_mask even in rows that mask it out, through the additive -inf; never
    a finite wrong value here). Rows that do not attend its block are finite and as accurate as without the token;
    the rest of the head is unaffected (the smoothing mean and block scales leave the bad token out)."""
    q, k, v = inputs(2)
    mask = random_block_mask(H, num_blocks(N, 64), num_blocks(N, 64), 0.5, generator=torch.Generator().manual_seed(3))
    bm = BlockMask.from_dense(mask).to(kernel_device())
    bad = k.clone()
    bad[0, 0, 130, 7] = value  # key block 2 of head 0
    out = paro_attention(q, bad, v, mask=bm, impl=impl)
    attends = token_mask(mask)[0][:, 130]  # query rows of head 0 whose kept blocks hold the token
    assert attends.any() and not attends.all()
    nan_rows = rows_with_nan(out)
    assert torch.equal(nan_rows[0, 0], attends) and not nan_rows[0, 1].any()
    clean = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=token_mask(mask).to(q.device))
    keep = ~nan_rows
    assert rel_l2(out.cpu()[keep], clean.cpu()[keep]) < 6e-2


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("value", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("pv", ["fp8", "int8"])
def test_a_bad_value_poisons_its_channel_only(impl, value, pv):
    if impl == "hopper" and pv == "int8":
        pytest.skip("the Hopper kernel runs FP8 / 16-bit PV only")
    q, k, v = inputs(4)
    bad = v.clone()
    bad[0, 1, 33, 9] = value
    clean = v.clone()
    clean[0, 1, 33, 9] = 0
    out = paro_attention(q, k, bad, pv_dtype=pv, impl=impl).float().cpu()
    want = paro_attention(q, k, clean, pv_dtype=pv, impl=impl).float().cpu()
    assert out[0, 1, :, 9].isnan().all()  # SDPA: NaN in every row of that channel
    rest = torch.ones_like(out, dtype=torch.bool)
    rest[0, 1, :, 9] = False
    assert not out[rest].isnan().any()
    torch.testing.assert_close(out[rest], want[rest], rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_unquantized_numerics_propagate_like_sdpa(impl):
    if impl == "hopper":
        pytest.skip("the Hopper kernel runs INT8 QK only")
    q, k, v = (x.float() for x in inputs(5))
    q[0, 0, 11, 3] = math.nan
    v[0, 1, 40, 2] = math.inf
    out = paro_attention(q, k, v, qk_bits=16, pv_dtype="fp16", impl=impl).cpu()
    # Plain attention in float64 on the CPU (GPU SDPA kernels turn some infinities into NaN while rescaling).
    qd, kd, vd = (x.double().cpu() for x in (q, k, v))
    plain = torch.softmax(qd @ kd.transpose(-1, -2) / math.sqrt(D), -1) @ vd
    assert torch.equal(out.isnan(), plain.isnan()) and torch.equal(out.isinf(), plain.isinf())


def test_paths_agree_on_bad_inputs():
    q, k, v = inputs(6)
    q[0, 0, 3, 1] = math.inf
    k[0, 1, 150, 0] = math.nan
    v[0, 0, 20, 5] = -math.inf
    ref = paro_attention(q, k, v, impl="reference").float().cpu()
    for impl in IMPLS[1:]:
        ker = paro_attention(q, k, v, impl=impl).float().cpu()
        assert torch.equal(ref.isnan(), ker.isnan()), impl
        finite = ~ref.isnan()
        assert rel_l2(ker[finite], ref[finite]) < 3e-3, impl
