import json

import pytest
import torch
from safetensors.torch import safe_open, save_file

from paro_compile.grid import TokenGrid, orders_permutation
from paro_compile.kernels.block_mask import block_mask_to_csr, csr_to_block_mask
from paro_compile.passes.discover import AttentionSite
from paro_compile.plan import PLAN_FORMAT_VERSION, Plan, PlanError, PlanMismatchError, SitePlan, model_fingerprint
from paro_compile.plan_file import pack_bool, unpack_bool

GRID = TokenGrid(frames=2, height=4, width=5, text_tokens=3)  # 43 tokens


def make_site(site_id="blocks.0.attn#0", heads=2, buckets=2, block=8, seed=0, perm_kind="derived"):
    gen = torch.Generator().manual_seed(seed)
    n = GRID.num_tokens
    nb = -(-n // block)
    masks = torch.rand(buckets, heads, nb, nb, generator=gen) < 0.4
    masks |= torch.eye(nb, dtype=torch.bool)  # calibrated masks keep the diagonal and the text blocks
    if perm_kind == "derived":
        masks[..., 0, :] = masks[..., :, 0] = True
    masks[0] = True  # dense_buckets=[0]
    orders = ["HWF", "FHW"][:heads] + ["FHW"] * max(0, heads - 2)
    if perm_kind == "derived":
        perm = orders_permutation(GRID, orders)
    elif perm_kind == "stored":
        perm = torch.stack([torch.randperm(n, generator=gen) for _ in range(heads)])
    else:
        perm = None
    return SitePlan(site_id=site_id, heads=heads, seq_len=n, block_size=block, perm=perm, block_masks=masks,
                    orders=orders if perm_kind == "derived" else [], grid=GRID if perm_kind == "derived" else None,
                    empty_heads=[1], dense_buckets=[0], stats={"density": [0.4, 0.4]})


def make_plan(block=8):
    sites = {s.site_id: s for s in (make_site(block=block),
                                    make_site("blocks.1.attn#0", perm_kind="stored", seed=1, block=block),
                                    make_site("blocks.2.attn#0", perm_kind="identity", seed=2, block=block))}
    return Plan(sites=sites, step_boundaries=[500.0], timestep_arg="t", fingerprint="abc", density=0.3, alpha=0.9,
                qk_bits=8, pv_dtype="fp8", meta={"note": "x"})


def graph_site(site_id, heads=2, seq_len=GRID.num_tokens, reasons=()):
    return AttentionSite(site_id=site_id, node=None, module_path=site_id.split("#")[0], q=None, k=None, v=None,
                         scale=None, batch=1, heads=heads, seq_len=seq_len, kv_seq_len=seq_len, head_dim=64,
                         reasons=list(reasons))


def test_roundtrip(tmp_path):
    plan = make_plan(block=16)
    path = plan.save(tmp_path / "plan.safetensors")
    loaded = Plan.load(path)
    assert loaded.step_boundaries == [500.0] and loaded.timestep_arg == "t" and loaded.fingerprint == "abc"
    assert (loaded.density, loaded.alpha, loaded.qk_bits, loaded.pv_dtype) == (0.3, 0.9, 8, "fp8")
    assert loaded.meta == {"note": "x"} and loaded.version == PLAN_FORMAT_VERSION
    assert list(loaded.sites) == list(plan.sites)
    for sid, site in plan.sites.items():
        got = loaded.sites[sid]
        assert torch.equal(got.block_masks, site.block_masks)
        if site.perm is None:
            assert got.perm is None
        else:
            assert torch.equal(got.perm, site.perm) and got.perm.dtype == torch.long
        assert (got.orders, got.grid, got.empty_heads, got.dense_buckets, got.stats) == (
            site.orders, site.grid, site.empty_heads, site.dense_buckets, site.stats)
    # Header: JSON in the safetensors metadata; a derived perm is not stored, a stored one is int32.
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["paro_plan"])
        keys = set(f.keys())
    assert header["version"] == PLAN_FORMAT_VERSION and header["format"] == "paro_plan"
    assert [s["perm"] for s in header["sites"]] == ["derived", "stored", "identity"]
    assert keys == {"0/block_masks", "1/block_masks", "1/perm", "2/block_masks"}


def test_csr_and_buckets():
    site = make_site()
    counts, indices = site.csr(1)
    assert torch.equal(csr_to_block_mask(counts, indices), site.block_masks[1])
    assert torch.equal(counts, block_mask_to_csr(site.block_masks[1])[0])
    with pytest.raises(IndexError):
        site.csr(2)
    plan = Plan(sites={}, step_boundaries=[800.0, 400.0])
    assert [plan.bucket_for_timestep(t) for t in (999, 800, 799, 400, 0)] == [0, 0, 1, 1, 2]
    assert plan.bucket_for_timestep(torch.tensor([450.0, 450.0])) == 1


def test_pack_bool_roundtrip():
    for numel in (1, 7, 8, 9, 100):
        mask = torch.rand(numel) < 0.5
        assert torch.equal(unpack_bool(pack_bool(mask), (numel,)), mask)


def test_check_sites_accepts_matching_graph():
    plan = make_plan()
    sites = [graph_site(sid) for sid in plan.sites] + [graph_site("cross#0", reasons=["cross-attention"])]
    plan.check_sites(sites, block_size=8)


def test_check_sites_errors_name_the_mismatch():
    plan = make_plan()
    ids = list(plan.sites)
    with pytest.raises(PlanMismatchError, match=r"graph does not: \['blocks.2.attn#0'\]"):
        plan.check_sites([graph_site(ids[0]), graph_site(ids[1])])
    with pytest.raises(PlanMismatchError, match=r"does not cover: \['blocks.9.attn#0'\]"):
        plan.check_sites([graph_site(s) for s in ids] + [graph_site("blocks.9.attn#0")])
    plan.check_sites([graph_site(s) for s in ids] + [graph_site("blocks.9.attn#0")], allow_missing=True)
    with pytest.raises(PlanMismatchError, match=r"blocks.0.attn#0: plan has 2 heads, graph has 4"):
        plan.check_sites([graph_site(ids[0], heads=4)] + [graph_site(s) for s in ids[1:]])
    with pytest.raises(PlanMismatchError, match=r"plan has seq_len 43, graph has 50"):
        plan.check_sites([graph_site(ids[0], seq_len=50)] + [graph_site(s) for s in ids[1:]])
    with pytest.raises(PlanMismatchError, match=r"block_size 8, backend uses 64"):
        plan.check_sites([graph_site(s) for s in ids], block_size=64)


def test_model_fingerprint_and_check():
    a = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    b = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)).half()
    c = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3))
    assert model_fingerprint(a) == model_fingerprint(b) != model_fingerprint(c)
    plan = Plan(sites={}, fingerprint=model_fingerprint(a))
    plan.check_model(b)
    with pytest.raises(PlanMismatchError, match="fingerprint"):
        plan.check_model(c)


def test_load_rejects_other_versions_and_non_plans(tmp_path):
    plan = make_plan(block=16)
    path = plan.save(tmp_path / "plan.safetensors")
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["paro_plan"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for version, message in ((PLAN_FORMAT_VERSION + 1, "newer"), (0, "not supported")):
        header["version"] = version
        bad = tmp_path / f"v{version}.safetensors"
        save_file(tensors, str(bad), metadata={"paro_plan": json.dumps(header)})
        with pytest.raises(PlanError, match=message):
            Plan.load(bad)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(PlanError, match="without a paro plan header"):
        Plan.load(other)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(PlanError, match="not a paro plan file"):
        Plan.load(junk)
    with pytest.raises(FileNotFoundError):
        Plan.load(tmp_path / "missing.safetensors")
    with pytest.raises(PlanMismatchError):
        Plan.load(path, model=torch.nn.Linear(2, 2))


def test_siteplan_validation():
    with pytest.raises(PlanError, match="block_masks has shape"):
        SitePlan(site_id="s", heads=2, seq_len=43, block_size=8, perm=None, block_masks=torch.ones(1, 2, 5, 5, dtype=torch.bool))
    with pytest.raises(PlanError, match="perm has shape"):
        SitePlan(site_id="s", heads=2, seq_len=43, block_size=8, perm=torch.zeros(2, 40, dtype=torch.long),
                 block_masks=torch.ones(1, 2, 6, 6, dtype=torch.bool))


def test_plan_equality_compares_tensors_by_value():
    """torch.compile compares backend options (the plan) on cache lookups: == must not raise on tensors."""
    grid = TokenGrid(2, 4, 4, 0)
    def make(flip: bool) -> Plan:
        masks = torch.ones(1, 2, 2, 2, dtype=torch.bool)
        if flip:
            masks = masks.clone()
            masks[0, 1, 0, 1] = False
        perm = torch.arange(32).repeat(2, 1)
        return Plan({"a#0": SitePlan("a#0", 2, 32, 16, perm, masks, orders=["FHW", "FHW"], grid=grid)})
    assert make(False) == make(False)
    assert make(False) != make(True)
    assert make(False).sites["a#0"] == make(False).sites["a#0"]
    assert (make(False) == "plan") is False


def test_one_model_compiled_with_two_plans():
    """Two compiled wrappers of the same module with different plans run side by side (the cache
    lookup compares their options)."""
    import paro_compile
    from paro_compile.toy.dit import toy_calibration_inputs, toy_model

    model = toy_model(seed=0)
    inputs = toy_calibration_inputs(count=1)
    plans = [paro_compile.calibrate(model, inputs, density=d, block_size=16, progress=False) for d in (0.5, 0.9)]
    assert plans[0] != plans[1]
    compiled = [torch.compile(model, backend="paro", options={"plan": p, "impl": "reference", "allow_fp32": True})
                for p in plans]
    with torch.no_grad():
        first = [c(**inputs[0]) for c in compiled]
        again = [c(**inputs[0]) for c in compiled]
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], first[1])
