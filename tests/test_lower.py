"""Lowering with a plan: per-site permutations, block masks and step buckets reach the op."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import paro_compile
from paro_compile.kernels.block_mask import BlockMask
from paro_compile.kernels.reference import paro_attention_reference
from paro_compile.passes.lower import site_constants
from paro_compile.toy.dit import ToyVideoDiT, toy_inputs
from paro_compile.plan import Plan, SitePlan

EXACT = {"allow_fp32": True, "qk_bits": 16, "pv_dtype": "fp16"}
SITES = ["blocks.0.attn#0", "blocks.1.attn#0"]
HEADS, N, BLOCK = 2, 40, 16  # toy inputs: 8 text + 2x4x4 video tokens


class PlannedAttention(TorchFunctionMode):
    """Eager oracle: the i-th SDPA call computes the reference numerics with the i-th site's plan."""

    def __init__(self, plan: Plan, bucket: int, **numerics):
        super().__init__()
        self.plan, self.bucket, self.numerics, self.calls = plan, bucket, numerics, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            site = self.plan.sites[SITES[self.calls]]
            self.calls += 1
            mask = BlockMask.from_csr(*site.csr(self.bucket), N, BLOCK, BLOCK)
            return paro_attention_reference(*args, perm=site.perm, mask=mask, **self.numerics)
        return func(*args, **kwargs)


def random_plan(buckets: int = 1) -> Plan:
    nb = math.ceil(N / BLOCK)
    sites = {}
    for site_id in SITES:
        masks = torch.rand(buckets, HEADS, nb, nb) < 0.4
        masks |= torch.eye(nb, dtype=torch.bool)
        perm = torch.stack([torch.cat([torch.arange(8), 8 + torch.randperm(N - 8)]) for _ in range(HEADS)])
        sites[site_id] = SitePlan(site_id=site_id, heads=HEADS, seq_len=N, block_size=BLOCK, perm=perm, block_masks=masks)
    return Plan(sites=sites, step_boundaries=[500.0] if buckets == 2 else [])


@torch.no_grad()
def test_plan_masks_and_perms_reach_the_op():
    torch.manual_seed(0)
    model = ToyVideoDiT().eval()
    inputs = toy_inputs()
    plan = random_plan()
    with PlannedAttention(plan, 0, qk_bits=16, pv_dtype="fp16"):
        expected = model(**inputs)
    out = torch.compile(model, backend="paro", options={**EXACT, "plan": plan, "fold_permutations": False})(**inputs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    report = paro_compile.last_report()
    assert all(s.permutation == "kernel" for s in report.sites)
    assert all(0 < s.density < 1 for s in report.sites)
    dense = model(**inputs)
    assert (out - dense).abs().max() > 1e-4, "masks had no effect"


@torch.no_grad()
@pytest.mark.parametrize("fold", [False, True], ids=["kernel-perm", "folded"])
def test_compensate_skipped_reaches_the_op(fold):
    torch.manual_seed(1)
    model = ToyVideoDiT().eval()
    inputs = toy_inputs()
    plan = random_plan()
    with PlannedAttention(plan, 0, qk_bits=16, pv_dtype="fp16", compensate=True):
        expected = model(**inputs)
    with PlannedAttention(plan, 0, qk_bits=16, pv_dtype="fp16"):
        uncompensated = model(**inputs)
    options = {**EXACT, "plan": plan, "fold_permutations": fold, "compensate_skipped": True}
    out = torch.compile(model, backend="paro", options=options)(**inputs)
    # fp16 rounding of the pooled operands (reference step 6) differs by op order between the two paths
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)
    assert (out - uncompensated).abs().max() > 1e-3, "compensation had no effect"
    report = paro_compile.last_report()
    assert [s.compensated for s in report.sites] == [True, True]
    assert "compensated" in report.summary()


@torch.no_grad()
def test_compensation_is_off_by_default_and_not_reported_for_dense_sites():
    model = ToyVideoDiT().eval()
    torch.compile(model, backend="paro", options={**EXACT, "plan": random_plan()})(**toy_inputs())
    assert not any(s.compensated for s in paro_compile.last_report().sites)
    torch._dynamo.reset()
    torch.compile(model, backend="paro", options={**EXACT, "compensate_skipped": True})(**toy_inputs())
    assert not any(s.compensated for s in paro_compile.last_report().sites)  # dense: nothing is skipped


@torch.no_grad()
def test_step_buckets_follow_the_timestep_without_recompiling():
    torch.manual_seed(0)
    model = ToyVideoDiT().eval()
    plan = random_plan(buckets=2)
    compiled = torch.compile(model, backend="paro", options={**EXACT, "plan": plan, "fold_permutations": False})
    for timestep, bucket in [(900.0, 0), (300.0, 1), (700.0, 0)]:
        inputs = toy_inputs()
        inputs["timestep"] = torch.full((1,), timestep)
        with PlannedAttention(plan, bucket, qk_bits=16, pv_dtype="fp16"):
            expected = model(**inputs)
        torch.testing.assert_close(compiled(**inputs), expected, rtol=1e-5, atol=1e-5)
    assert len(paro_compile.report.compile_reports) == 1
    assert all(s.step_buckets == 2 for s in paro_compile.last_report().sites)


@torch.no_grad()
def test_small_blocks_get_their_grouped_csr_as_plan_constants(monkeypatch):
    """Blocks under 64 rows: the lowering stores the grouped CSR of every step bucket (the walk of the kernel's shared
    64-row tiles) and selects it per call; the kernel never derives it at run time, and the result is the plan's."""
    from paro_compile.kernels import attention as kernel_module
    from paro_compile.kernels import block_mask as block_mask_module

    def derive(*args, **kwargs):
        raise AssertionError("grouped CSR derived at run time: the plan constants did not reach the kernel")

    calls = []
    original = kernel_module.paro_attention_triton

    def spy(q, k, v, **kwargs):
        calls.append(kwargs["mask"])
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(kernel_module, "paro_attention_triton", spy)
    torch.manual_seed(0)
    model = ToyVideoDiT().eval()
    plan = random_plan(buckets=2)
    assert BLOCK < 64
    compiled = torch.compile(model, backend="paro",
                             options={**EXACT, "plan": plan, "fold_permutations": False, "impl": "triton"})
    compiled(**toy_inputs())  # compiles: the lowering builds the grouped walk once, here
    monkeypatch.setattr(block_mask_module, "grouped_block_csr", derive)
    calls.clear()
    for timestep, bucket in [(300.0, 1), (900.0, 0)]:
        inputs = toy_inputs()
        inputs["timestep"] = torch.full((1,), timestep)
        with PlannedAttention(plan, bucket, qk_bits=16, pv_dtype="fp16"):
            expected = model(**inputs)
        torch.testing.assert_close(compiled(**inputs), expected, rtol=1e-4, atol=1e-4)
    # the grouped walk stands for the mask alone: no per-block CSR is stored or passed
    assert calls and all(m.group == 64 // BLOCK and m.slot_bits is not None for m in calls)
    monkeypatch.undo()
    # the report counts the site's plan constants: permutation + grouped CSR of both buckets
    for record in paro_compile.last_report().sites:
        grouped = BlockMask.from_dense(plan.sites[record.site_id].block_masks, BLOCK, BLOCK)
        assert grouped.indices.dtype == torch.int16  # compact: int16, rows cut to the largest count
        expected = HEADS * N * 4 + grouped.nbytes  # int32 permutation
        assert record.plan_bytes == expected, (record.plan_bytes, expected)
        site = plan.sites[record.site_id]
        assert site_constants(site.perm, site.block_masks, BLOCK, HEADS, N).nbytes == expected
        assert "plan=" in paro_compile.last_report().summary()


@torch.no_grad()
def test_kernel_permutations_share_one_table_of_distinct_rows(monkeypatch):
    """Permutations of at least `SHARED_PERMUTATION_MIN_BYTES` (video sizes; lowered here to 0) are stored as one
    table of distinct rows per graph: the second site adds only its row ids, and every site still runs its own heads'
    orders. Smaller ones stay per-site constants (no gather per call; the other tests here)."""
    import paro_compile.passes.lower as lower_module

    monkeypatch.setattr(lower_module, "SHARED_PERMUTATION_MIN_BYTES", 0)
    torch.manual_seed(0)
    model = ToyVideoDiT().eval()
    plan = random_plan()
    first, second = (plan.sites[s] for s in SITES)
    shared = first.perm.clone()
    second.perm = shared.flip(0).clone()  # the same rows, in the other head order
    first.perm = shared
    inputs = toy_inputs()
    with PlannedAttention(plan, 0, qk_bits=16, pv_dtype="fp16"):
        expected = model(**inputs)
    compiled = torch.compile(model, backend="paro", options={**EXACT, "plan": plan, "fold_permutations": False})
    torch.testing.assert_close(compiled(**inputs), expected, rtol=1e-5, atol=1e-5)
    records = {r.site_id: r for r in paro_compile.last_report().sites}
    masks = {s: BlockMask.from_dense(plan.sites[s].block_masks[0], BLOCK, BLOCK).nbytes for s in SITES}
    assert records[SITES[0]].plan_bytes == HEADS * N * 4 + HEADS * 8 + masks[SITES[0]]
    assert records[SITES[1]].plan_bytes == HEADS * 8 + masks[SITES[1]]
    assert all(r.permutation == "kernel" for r in records.values())
    graph_constants = [name for r in paro_compile.last_report().passes for name in [r["after"]]]
    assert any("_paro_perm_rows_" in code for code in graph_constants)  # the graph's table of permutation rows
    # swapping the second site's rows changes the result: each site selects its own heads' rows
    swapped = copy.deepcopy(plan)
    swapped.sites[SITES[1]].perm = shared.clone()
    torch._dynamo.reset()
    other = torch.compile(model, backend="paro", options={**EXACT, "plan": swapped, "fold_permutations": False})
    assert (other(**inputs) - expected).abs().max() > 1e-4


@torch.no_grad()
def test_identical_step_buckets_are_stored_once():
    """A site whose step buckets share one mask stores it once and selects nothing per call; a site whose buckets
    differ keeps both, and both give the plan's result at every timestep."""
    torch.manual_seed(0)
    model = ToyVideoDiT().eval()
    plan = random_plan(buckets=2)
    same = plan.sites[SITES[0]].block_masks
    same[1] = same[0]
    assert not torch.equal(plan.sites[SITES[1]].block_masks[0], plan.sites[SITES[1]].block_masks[1])
    compiled = torch.compile(model, backend="paro", options={**EXACT, "plan": plan, "fold_permutations": False})
    for timestep, bucket in [(900.0, 0), (300.0, 1)]:
        inputs = toy_inputs()
        inputs["timestep"] = torch.full((1,), timestep)
        with PlannedAttention(plan, bucket, qk_bits=16, pv_dtype="fp16"):
            expected = model(**inputs)
        torch.testing.assert_close(compiled(**inputs), expected, rtol=1e-5, atol=1e-5)
    records = {r.site_id: r for r in paro_compile.last_report().sites}
    for site_id, stored in [(SITES[0], same[:1]), (SITES[1], plan.sites[SITES[1]].block_masks)]:
        masks = BlockMask.from_dense(stored, BLOCK, BLOCK)
        per_bucket = sum(t.numel() * t.element_size() for t in masks.as_op_args()[0] if t is not None)
        assert records[site_id].plan_bytes == HEADS * N * 4 + per_bucket, site_id
        assert records[site_id].step_buckets == 2  # the plan's buckets, whatever is stored


@torch.no_grad()
def test_dense_sites_of_fine_block_plans_run_with_64_token_blocks(monkeypatch):
    """A site whose plan keeps every block (density 1) has no mask to walk: the op gets block 64 (quantization groups of
    64 tokens, full 64-row tiles) instead of the plan's 16, which the dense kernel would run in 16-row tiles."""
    torch.manual_seed(0)
    model = ToyVideoDiT().eval()
    plan = random_plan()
    sites = list(plan.sites.values())
    sites[0].block_masks[:] = True  # the first site dense, the other sparse
    assert plan.sites[SITES[0]].block_masks.all() and not plan.sites[SITES[1]].block_masks.all()
    import paro_compile.backend as backend_module

    original = backend_module.lower_attention_sites
    seen = {}

    def record_blocks(gm, sites_, config, plan=None, kernel_perms=None):
        records = original(gm, sites_, config, plan, kernel_perms)
        for node in gm.graph.nodes:
            if node.target is torch.ops.paro.attention.default:
                mask_nodes, sizes = node.args[5], node.args[6]
                seen[node.meta["paro_site_id"]] = (all(m is None for m in mask_nodes), sizes[0], sizes[1])
        return records

    monkeypatch.setattr(backend_module, "lower_attention_sites", record_blocks)
    inputs = toy_inputs()
    with PlannedAttention(plan, 0, qk_bits=16, pv_dtype="fp16"):
        expected = model(**inputs)
    compiled = torch.compile(model, backend="paro", options={**EXACT, "plan": plan, "fold_permutations": False})
    torch.testing.assert_close(compiled(**inputs), expected, rtol=1e-5, atol=1e-5)
    assert seen[SITES[0]] == (True, 64, 64), seen
    assert seen[SITES[1]] == (False, BLOCK, BLOCK), seen


@torch.no_grad()
def test_lowered_sites_pass_their_density_so_the_kernel_never_syncs(monkeypatch):
    """With step buckets the CSR is selected on the device each call; the kernel must take the autotune
    density from the plan (compile time), not by reading the selected counts back (a host sync per site)."""
    def no_sync(self, *args, **kwargs):
        raise AssertionError("a host read of a plan tensor at run time: a sync per site per call")

    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    monkeypatch.setattr(torch.Tensor, "tolist", no_sync)
    torch.manual_seed(0)
    model = ToyVideoDiT().eval()
    plan = random_plan(buckets=2)
    compiled = torch.compile(model, backend="paro",
                             options={**EXACT, "plan": plan, "fold_permutations": False, "impl": "triton"})
    inputs = toy_inputs()
    inputs["timestep"] = torch.full((1,), 300.0)
    with PlannedAttention(plan, 1, qk_bits=16, pv_dtype="fp16"):
        expected = model(**inputs)
    torch.testing.assert_close(compiled(**inputs), expected, rtol=1e-4, atol=1e-4)
    densities = [s.density for s in paro_compile.last_report().sites]
    assert all(0 < d < 1 for d in densities)


@torch.no_grad()
def test_compensated_step_buckets_use_the_plans_kept_bits(monkeypatch):
    """Kernel path: the kept-block bits are plan constants selected per step bucket, never rebuilt per call."""
    from paro_compile.kernels import block_mask as block_mask_module

    def rebuilt(mask):
        raise AssertionError("kept-block bits derived from the CSR at run time")

    torch.manual_seed(2)
    model = ToyVideoDiT().eval()
    plan = random_plan(buckets=2)
    compiled = torch.compile(model, backend="paro", options={
        **EXACT, "plan": plan, "fold_permutations": False, "impl": "triton", "compensate_skipped": True})
    compiled(**toy_inputs())  # compiles: the lowering builds the kept bits once, here
    monkeypatch.setattr(block_mask_module, "kept_block_bits", rebuilt)
    for timestep, bucket in [(300.0, 1), (900.0, 0)]:
        inputs = toy_inputs()
        inputs["timestep"] = torch.full((1,), timestep)
        with PlannedAttention(plan, bucket, qk_bits=16, pv_dtype="fp16", compensate=True):
            expected = model(**inputs)
        torch.testing.assert_close(compiled(**inputs), expected, rtol=1e-3, atol=1e-3)
    assert all(s.compensated for s in paro_compile.last_report().sites)


@torch.no_grad()
def test_bitmap_encoded_plan_matches_the_csr_encoding():
    """``mask_encoding="bitmap"``: the lowering stores one bit per block (every distinct step bucket) and the kernel
    path decodes the walk per call; the compiled model's output equals the CSR encoding's bit for bit at every step
    bucket (with skipped-block compensation, which reads the same bits), and the report names each site's encoding
    and counts the bytes it stores."""
    compensate = True
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs impl="triton" under the interpreter
    torch.manual_seed(3)
    model = ToyVideoDiT().eval().to(device)
    plan = random_plan(buckets=2)
    calls = []
    for timestep in (900.0, 300.0):
        inputs = toy_inputs(device=device)
        inputs["timestep"] = torch.full((1,), timestep, device=device)
        calls.append(inputs)
    outputs = {}
    for encoding in ("csr", "bitmap"):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="paro", options={
            **EXACT, "plan": plan, "fold_permutations": False, "impl": "triton", "compensate_skipped": compensate,
            "mask_encoding": encoding})
        outputs[encoding] = [compiled(**inputs) for inputs in calls]
        report = paro_compile.last_report()
        for record in report.sites:
            site = plan.sites[record.site_id]
            stored = site_constants(site.perm, site.block_masks, BLOCK, HEADS, N, compensate, encoding=encoding)
            assert record.mask_encoding == stored.mask.encoding == encoding and record.step_buckets == 2
            assert record.plan_bytes == stored.nbytes
            if encoding == "bitmap":
                assert set(stored.tensors) == {"perm", "kept_bits"} and stored.tensors["kept_bits"].shape[0] == 2
        assert f"mask={encoding}" in report.summary()
    for csr, bitmap in zip(outputs["csr"], outputs["bitmap"]):
        torch.testing.assert_close(bitmap, csr, rtol=0, atol=0)


_ACTIVATION_ARGS = {"QQ", "QS", "Q_BAD", "KQ", "KS", "VT", "VS", "OUT", "KBAR", "VBAR", "KBIAS", "KBIAS_FLAGS"}
"""Arguments of `_attn_fwd` computed from the activations (the prologue's outputs and the result)."""


class _LaunchRecorder:
    """Stands in for the attention kernel (`_attn_fwd`, `_attn_fwd_tuned`): records a copy of every argument of each
    launch (the arguments' buffers may be reused by the compiled graph afterwards), then launches."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.launches.append([a.clone() if isinstance(a, torch.Tensor) else a for a in args])
            return self.kernel[grid](*args, **meta)
        return launch


@torch.no_grad()
def test_bitmap_and_csr_encodings_launch_the_kernel_with_the_same_walk(device, monkeypatch):
    """bf16, the default INT8 / FP8 numerics, 16-token blocks walked in shared tiles, two step buckets: at every site
    and bucket the attention kernel gets the same walk from a bitmap-encoded plan (decoded per call) as from the CSR
    encoding (counts, indices, slot bits, kept bits), the same permutation and the same scalars. The quantized
    activations are left out: the two encodings compile to two graphs, and Inductor may round the ops before
    attention differently in each."""
    from paro_compile.kernels import attention

    launches = {}
    torch.manual_seed(0)
    model = ToyVideoDiT().eval().to(device, torch.bfloat16)
    plan = random_plan(buckets=2)
    for encoding in ("csr", "bitmap"):
        torch._dynamo.reset()
        launches[encoding] = []
        for name in ("_attn_fwd", "_attn_fwd_tuned"):
            monkeypatch.setattr(attention, name, _LaunchRecorder(getattr(attention, name), launches[encoding]))
        compiled = torch.compile(model, backend="paro", options={"plan": plan, "fold_permutations": False,
                                                                 "impl": "triton", "mask_encoding": encoding})
        for call, timestep in enumerate((900.0, 300.0)):
            inputs = toy_inputs(device=device, dtype=torch.bfloat16, seed=call)
            inputs["timestep"] = torch.full((1,), timestep, device=device)
            compiled(**inputs)
        monkeypatch.undo()
    names = attention._attn_fwd.arg_names
    assert len(launches["csr"]) == len(launches["bitmap"]) == 2 * len(SITES), {k: len(v) for k, v in launches.items()}
    for index, (csr, bitmap) in enumerate(zip(launches["csr"], launches["bitmap"])):
        differ = [name for name, a, b in zip(names, csr, bitmap) if name not in _ACTIVATION_ARGS and (
            (a.dtype, a.shape, a.tolist()) != (b.dtype, b.shape, b.tolist()) if isinstance(a, torch.Tensor) else a != b)]
        assert not differ, f"launch {index} (site {index % len(SITES)}, bucket {index // len(SITES)}): {differ} differ"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
@torch.no_grad()
def test_cuda_graphs_replay_bitmap_masks_as_the_csr_encoding():
    """mode="reduce-overhead": the per-call decode of bitmap masks is recorded in the CUDA graph (no host read, torch
    allocations: no cudagraph skip), and replays at both step buckets give the output of the same model compiled
    without CUDA graphs bit for bit. The CSR encoding's graphs agree to the tolerance
    `test_cuda_graphs_through_the_backend` allows: each encoding is its own Inductor graph, whose other kernels need
    not round identically (on the H200 the two differed by one bf16 step at one of the two timesteps, in graph and
    plain mode alike); that both launch the kernel with the same walk is
    `test_bitmap_and_csr_encodings_launch_the_kernel_with_the_same_walk`."""
    import copy

    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = ToyVideoDiT().eval().to("cuda", torch.bfloat16)
    plan = random_plan(buckets=2)
    options = {"plan": plan, "fold_permutations": False}
    counters.clear()
    graphs = {encoding: torch.compile(copy.deepcopy(model), backend="paro",
                                      options={**options, "mode": "reduce-overhead", "mask_encoding": encoding})
              for encoding in ("bitmap", "csr")}
    plain = torch.compile(copy.deepcopy(model), backend="paro", options={**options, "mask_encoding": "bitmap"})
    for call in range(4):  # warm-up, record, replays
        inputs = toy_inputs(device="cuda", dtype=torch.bfloat16, seed=call)
        inputs["timestep"] = torch.full((1,), (900.0, 300.0)[call % 2], device="cuda")
        bitmap = graphs["bitmap"](**inputs).clone()
        torch.testing.assert_close(bitmap, plain(**inputs), rtol=0, atol=0, msg=lambda m: f"call {call}: {m}")
        csr = graphs["csr"](**inputs).float()
        assert float((bitmap.float() - csr).norm() / csr.norm()) < 1e-2, f"call {call}: the CSR encoding differs"
    assert counters["inductor"].get("cudagraph_skips", 0) == 0, dict(counters["inductor"])


@torch.no_grad()
def test_plan_for_other_shapes_is_refused():
    model = ToyVideoDiT().eval()
    plan = random_plan()
    inputs = toy_inputs(height=16, width=16)  # 8 + 2*8*8 tokens: the plan was made for 40
    with pytest.raises(Exception, match="blocks.0.attn#0"):  # the default, on_missing_shape="dense", warns instead
        torch.compile(model, backend="paro", options={**EXACT, "plan": plan, "on_missing_shape": "error"})(**inputs)


def test_missing_plan_file_says_how_to_make_one(tmp_path):
    model = ToyVideoDiT().eval()
    with torch.no_grad(), pytest.raises(Exception, match="does not exist.*calibrate"):
        torch.compile(model, backend="paro", options={**EXACT, "plan": str(tmp_path / "nope.safetensors")})(**toy_inputs())


def test_plan_constants_live_on_the_activations_device():
    """A CPU constant feeding a CUDA op is copied host→device on every call; plans must follow the activations.
    The meta device stands in for CUDA here (no GPU in CI)."""
    from paro_compile.backend import rewrite_graph
    from paro_compile.config import ParoConfig
    from paro_compile.report import CompileReport

    captured = {}

    def capture(gm, example_inputs):
        captured["gm"] = gm
        return gm.forward

    model = ToyVideoDiT().eval().to("meta")
    inputs = {k: v.to("meta") for k, v in toy_inputs().items()}
    with torch.no_grad():
        torch.compile(model, backend=capture)(**inputs)
    plan = random_plan(buckets=2)
    config = ParoConfig(allow_fp32=True, fold_permutations=False)
    rewritten = rewrite_graph(captured["gm"], config, plan, CompileReport(graph_index=0))
    constants = {name: buf for name, buf in rewritten.named_buffers() if name.startswith("_paro_")}
    assert {n.rsplit("_", 1)[-1] for n in constants} >= {"perm", "bits", "boundaries"}
    assert all(buf.device.type == "meta" for buf in constants.values()), {n: b.device for n, b in constants.items()}


@torch.no_grad()
def test_site_ids_that_differ_only_in_punctuation_get_their_own_constants():
    """``blocks.0#0`` and ``blocks_0#0`` sanitize to the same name; each site must still run its own mask."""
    import torch.fx as fx

    from paro_compile.passes.lower import _buffer_name

    assert _buffer_name(0, "blocks.0#0", "perm") != _buffer_name(1, "blocks_0#0", "perm")
    gm = fx.GraphModule(torch.nn.Module(), fx.Graph())
    from paro_compile.passes.lower import add_constant

    node = gm.graph.placeholder("x")
    add_constant(gm, node, "_paro_0_a_perm", torch.zeros(1))
    with pytest.raises(RuntimeError, match="must not collide"):
        add_constant(gm, node, "_paro_0_a_perm", torch.zeros(1))


@torch.no_grad()
def test_a_plan_permutation_that_is_not_a_permutation_is_refused():
    model = ToyVideoDiT().eval()
    plan = random_plan()
    site = plan.sites[SITES[0]]
    site.perm[1, 3] = site.perm[1, 4]  # a repeated token
    with pytest.raises(Exception, match="perm row 1 repeats a token"):
        torch.compile(model, backend="paro", options={**EXACT, "plan": plan, "fold_permutations": False})(**toy_inputs())
