"""The Gluon Hopper attention kernel (`paro_compile.kernels.attention_hopper`) vs the PyTorch reference.

Same method as test_attention.py (fresh random inputs per run, seed printed, output poisoned with NaN, the Triton
kernel's GPU tolerances): INT8 QKᵀ with FP8 or 16-bit PV, head_dim 64 and 128, dense and CSR-sparse masks (int32
and trimmed int16 counts and indices), with and without a per-head permutation (int64, and int32 as plans store it),
N not a multiple of 64, B·H > 1, both launch shapes (one or two query blocks per CTA). GPU tests need an sm_90 GPU; the CPU tests check the import guard and routing.
"""
import pytest
import torch

from paro_compile.kernels import attention_hopper as AH
from paro_compile.kernels import reference as R
from paro_compile.kernels import tuning
from paro_compile.kernels.block_mask import BlockMask, num_blocks

from paro_kernel_helpers import attention_f64, rel_l2
from test_attention import KERNEL_TOL, QUANT_TOL

HOPPER = AH.available()
requires_hopper = pytest.mark.skipif(
    not HOPPER, reason="needs an sm_90 (Hopper) GPU and Triton's Gluon Hopper API "
    f"(cuda={torch.cuda.is_available()}, gluon error={AH._GLUON_ERROR!r})")


# ----------------------------------------------------------------------------------------------- CPU
def test_module_imports_and_is_unavailable_without_hopper():
    assert callable(AH.paro_attention_hopper) and callable(AH.supports)
    assert AH.available("cpu") is False
    if not torch.cuda.is_available():
        assert AH.available() is False


def test_default_config_fits_two_ctas_per_sm_only_at_head_dim_64_with_fp8_p():
    two = AH.default_config(64, "fp8")
    assert two["maxnreg"] * 3 * 128 * 2 <= 65536 and two["consumer_regs"] * 2 + 24 <= two["maxnreg"] * 3
    for d, pv in ((128, "fp8"), (64, "fp16"), (128, "fp16")):
        assert AH.default_config(d, pv) == AH.DEFAULT_CONFIG
    assert set(two) == AH.CONFIG_KEYS and not two["defer_pv_wait"]


def test_auto_selects_the_gluon_kernel_only_at_head_dim_64_with_fp8_p():
    assert AH.selected_by_auto(64, "fp8")
    for d, pv in ((128, "fp8"), (64, "fp16"), (128, "fp16")):
        assert not AH.selected_by_auto(d, pv), (d, pv)


def test_supports_routes_only_the_implemented_cases():
    assert AH.supports(8, "fp8", 64, 64, 64) and AH.supports(8, "fp8", 64, 64, 128)
    assert AH.supports(8, "fp16", 64, 64, 128, dtype=torch.bfloat16)
    assert AH.supports(8, "fp8", 64, 64, 64, dtype=torch.float32)
    rejected = [dict(qk_bits=4), dict(qk_bits=16), dict(pv_dtype="int8"), dict(block_m=32, block_n=32),
                dict(block_m=128), dict(block_n=32), dict(head_dim=32), dict(head_dim=256), dict(compensate=True),
                dict(group=2), dict(pv_dtype="fp16", dtype=torch.float32)]
    base = dict(qk_bits=8, pv_dtype="fp8", block_m=64, block_n=64, head_dim=64)
    for change in rejected:
        assert not AH.supports(**{**base, **change}), change


def test_refuses_to_launch_where_unavailable():
    if HOPPER:
        pytest.skip("a Hopper GPU is present")
    q = torch.zeros(1, 1, 70, 64)
    with pytest.raises(RuntimeError, match="sm_90"):
        AH.paro_attention_hopper_qkv(q, q, q)


# ----------------------------------------------------------------------------------------------- GPU
def _inputs(gen, b, h, n, d, dtype, perm, density, empty_row=True):
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
    k = k + 2.0 * torch.randn(1, 1, 1, d, generator=gen)
    q = q * 1.5
    pm = torch.stack([torch.randperm(n, generator=gen) for _ in range(h)]).cuda() if perm else None
    if perm == "int32":  # the lowering's plan constants
        pm = pm.to(torch.int32)
    nb = num_blocks(n, 64)
    mask = None
    if density is not None:
        mask = tuning.random_block_mask(h, nb, nb, density, generator=gen)
        if empty_row:  # one query block keeps nothing -> zeros
            mask[int(torch.randint(h, (1,), generator=gen)), int(torch.randint(nb, (1,), generator=gen))] = False
    return *(x.to(dtype).cuda() for x in (q, k, v)), pm, mask


def _check(seed, q, k, v, pm, mask, pv, *, config=None, trim=False, check_f64=True):
    b, h, n, d = q.shape
    bm = None
    if mask is not None:  # trim: plan constants, rows cut to the largest count, int16 indices
        bm = BlockMask.from_dense(mask, compact=trim).to("cuda")
    out = torch.full_like(q, float("nan"))
    res = AH.paro_attention_hopper_qkv(q, k, v, perm=pm, mask=bm, pv_dtype=pv, out=out, config=config)
    torch.cuda.synchronize()
    assert res is out
    ref = R.paro_attention_reference(q, k, v, perm=pm, mask=bm, qk_bits=8, pv_dtype=pv)
    msg = (f"seed={seed} pv={pv} dtype={q.dtype} shape={tuple(q.shape)} perm={pm is not None} dense={mask is None} "
           f"trim={trim} config={config}")
    assert not out.isnan().any(), f"unwritten (NaN) output rows: {int(out.isnan().any(-1).sum())}; {msg}"
    err = rel_l2(out, ref)
    tol = KERNEL_TOL[q.dtype]
    if err > tol and pv == "fp8":
        # As test_attention._run_and_check on the GPU: a P entry within an ulp of an e4m3 rounding boundary (MUFU
        # ex2 vs torch.exp2, one FFMA vs two roundings) moves one step; accepted when confined to few rows and the
        # kernel is as accurate as the reference against float64.
        row = ((out - ref).double().norm(dim=-1) / ref.double().norm(dim=-1).clamp_min(1e-30)).flatten()
        exact = attention_f64(q, k, v, pm, mask)
        e_ref, e_ker = rel_l2(ref, exact), rel_l2(out, exact)
        assert (row > tol).float().mean() <= 0.15 and row.max() <= 0.15 and e_ker <= 1.02 * e_ref + 1e-4, (
            f"rel-L2 {err:.3e} > {tol:.1e}: {int((row > tol).sum())} of {row.numel()} rows off (max {row.max():.3e}), "
            f"vs float64 kernel {e_ker:.4e} / reference {e_ref:.4e}; {msg}")
    else:
        assert err <= tol, f"kernel vs reference rel-L2 {err:.3e} > {tol:.1e}; {msg}"
    if mask is not None:
        empty = (mask.sum(-1) == 0)  # [H, NQB]: these query blocks store exact zeros
        rows_perm = empty.repeat_interleave(64, dim=1)[:, :n]
        rows = R.unpermute_tokens(rows_perm[None, :, :, None].float(), pm.cpu() if pm is not None else None)[0, :, :, 0] > 0
        if rows.any():
            assert torch.equal(out.cpu()[:, rows], torch.zeros_like(out.cpu()[:, rows])), f"empty rows not zero; {msg}"
    if check_f64:
        exact = attention_f64(q, k, v, pm, mask)
        bound = QUANT_TOL[(8, pv)] + (0.01 if q.dtype == torch.bfloat16 else 0.0)
        assert rel_l2(out, exact) <= bound, f"vs float64 {rel_l2(out, exact):.3e} > {bound:.2e}; {msg}"
    return out, ref


@pytest.mark.gpu
@requires_hopper
@pytest.mark.parametrize("perm", [True, "int32", False], ids=["perm", "perm32", "noperm"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("pv,dtype", [("fp8", torch.bfloat16), ("fp8", torch.float16), ("fp8", torch.float32),
                                      ("fp16", torch.bfloat16), ("fp16", torch.float16)],
                         ids=["fp8-bf16", "fp8-fp16", "fp8-fp32", "fp16-bf16", "fp16-fp16"])
def test_hopper_matches_reference(seed, gen, pv, dtype, d, perm):
    """Sparse (with an empty query block and a key tail) and dense, B·H = 6 and 2, N not a multiple of 64."""
    n = 1000 + int(torch.randint(0, 63, (1,), generator=gen)) | 1
    density = float(torch.empty(1).uniform_(0.2, 0.6, generator=gen))
    q, k, v, pm, mask = _inputs(gen, 2, 3, n, d, dtype, perm, density)
    _check(seed, q, k, v, pm, mask, pv, check_f64=(d == 64))
    q, k, v, pm, _ = _inputs(gen, 1, 2, n, d, dtype, perm, None)
    _check(seed, q, k, v, pm, None, pv, check_f64=False)


@pytest.mark.gpu
@requires_hopper
@pytest.mark.parametrize("config", [{"consumers": 1}, {"consumers": 2, "stages": 2}, {"consumers": 2, "stages": 4},
                                    {"consumers": 1, "stages": 2, "consumer_regs": 208, "maxnreg": 128},
                                    {"permuted_k": False}, {"permuted_k": False, "consumers": 1},
                                    {"defer_pv_wait": False}, {"defer_pv_wait": True, "consumers": 1},
                                    {"consumer_regs": 104, "maxnreg": 80, "stages": 2}],
                         ids=["one-consumer", "stages2", "stages4", "one-consumer-small", "plain-k", "plain-k-one",
                              "wait-in-step", "deferred-wait-one", "two-ctas"])
@pytest.mark.parametrize("d", [64, 128])
def test_hopper_launch_configs(seed, gen, config, d):
    """Every launch shape computes the same function (sparse with trimmed int16 CSR, and dense with an odd number of
    query blocks, so the last CTA of two consumers has one past the end), with K tiles in permuted row order (the
    default for FP8 PV) or plain. Head_dim 128 refuses a register budget it cannot run in."""
    n = 64 * 9 + 1 + int(torch.randint(0, 62, (1,), generator=gen))
    q, k, v, pm, mask = _inputs(gen, 1, 3, n, d, torch.bfloat16, True, 0.4)
    if d > 64 and config.get("maxnreg", 168) < 128:
        with pytest.raises(ValueError, match="maxnreg=80 is too few registers for head_dim 128"):
            AH.paro_attention_hopper_qkv(q, k, v, perm=pm, config=config)
        return
    _check(seed, q, k, v, pm, mask, "fp8", config=config, trim=True, check_f64=False)
    q, k, v, pm, _ = _inputs(gen, 2, 1, n, d, torch.bfloat16, True, None)
    _check(seed, q, k, v, pm, None, "fp8", config=config, check_f64=False)
    if config.get("permuted_k", True):
        assert AH.permuted_k_refused() is None, f"the permuted-K descriptor fell back: {AH.permuted_k_refused()}"


@pytest.mark.gpu
@requires_hopper
@pytest.mark.parametrize("n", [17, 64, 65, 200])
def test_hopper_small_and_exact_multiples(seed, gen, n):
    """One query block or a few, N a multiple of 64 or one past it; sparse and dense."""
    q, k, v, pm, mask = _inputs(gen, 1, 2, n, 64, torch.float16, True, 0.5, empty_row=False)
    _check(seed, q, k, v, pm, mask, "fp8", check_f64=False)
    _check(seed, q, k, v, pm, None, "fp8", check_f64=False)


@pytest.mark.gpu
@requires_hopper
@pytest.mark.parametrize("pv", ["fp8", "fp16"])
def test_hopper_agrees_with_triton_kernel(seed, gen, pv):
    """Same prologue, same numerics: the Gluon kernel and the Triton kernel differ only by accumulation order."""
    from paro_compile.kernels.attention import paro_attention_triton

    n = 3000 + int(torch.randint(0, 63, (1,), generator=gen))
    q, k, v, pm, mask = _inputs(gen, 1, 4, n, 128, torch.bfloat16, True, 0.3)
    for kw in (dict(mask=BlockMask.from_dense(mask).to("cuda")), {}):
        ours = AH.paro_attention_hopper_qkv(q, k, v, perm=pm, pv_dtype=pv, **kw)
        # A fixed launch config: the numerics do not depend on it, and autotuning here would cost minutes.
        theirs = paro_attention_triton(q, k, v, perm=pm, pv_dtype=pv, config={"TILE_M": 64, "num_warps": 4,
                                                                             "num_stages": 3}, **kw)
        err = rel_l2(ours, theirs)
        assert err < 2e-3, f"seed={seed} pv={pv} sparse={bool(kw)}: Gluon vs Triton kernel rel-L2 {err:.2e}"


@pytest.mark.gpu
@requires_hopper
def test_hopper_rejects_unsupported_prologue(gen):
    from paro_compile.kernels.prologue import paro_prologue

    q = torch.randn(1, 2, 100, 64, generator=gen).cuda()
    out = torch.empty_like(q)
    pro = paro_prologue(q, q, q, pv_dtype="int8")
    with pytest.raises(ValueError, match="unsupported"):
        AH.paro_attention_hopper(pro, out, None, None, None, 100, 2)
    with pytest.raises(ValueError, match="config"):
        AH.paro_attention_hopper_qkv(q, q, q, config={"warps": 8})


@pytest.mark.gpu
@requires_hopper
@pytest.mark.parametrize("d,expected", [(64, "hopper"), (48, "hopper"), (128, "triton")])
def test_auto_dispatch_runs_the_selected_kernel(seed, gen, monkeypatch, d, expected):
    """impl="auto" runs the Gluon kernel where `selected_by_auto` picks it (head_dim 64, also reached by padding 48)
    and the Triton kernel elsewhere: its output equals that implementation's bit for bit, and the Gluon entry point
    is (or is not) called."""
    from paro_compile import ops

    n = 64 * 5 + 7
    q, k, v, pm, mask = _inputs(gen, 1, 2, n, d, torch.bfloat16, "int32", 0.5)
    bm = BlockMask.from_dense(mask, compact=True).to("cuda")
    calls = []
    real = AH.paro_attention_hopper_qkv
    monkeypatch.setattr(AH, "paro_attention_hopper_qkv", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ops._ROUTES.clear()
    auto = ops.paro_attention(q, k, v, perm=pm, mask=bm, impl="auto")
    assert bool(calls) == (expected == "hopper"), f"seed={seed} d={d}: Gluon kernel called {len(calls)} times"
    chosen = ops.paro_attention(q, k, v, perm=pm, mask=bm, impl=expected)
    assert torch.equal(auto, chosen), f"seed={seed} d={d}: impl='auto' differs from impl={expected!r}"
