"""The plan file format: what a malformed file is refused with (file, site, field in the message), SitePlan's checks
of plans built in code, and atomic saving with concurrent writers."""
import copy
import json
import os
import threading

import pytest
import torch
from safetensors.torch import safe_open, save_file

from paro_compile.grid import TokenGrid, orders_permutation
from paro_compile.plan import Plan, PlanError, SitePlan
from paro_compile.plan_file import METADATA_KEY, pack_bool

GRID = TokenGrid(frames=2, height=4, width=6, text_tokens=5)  # 53 tokens, blocks of 16: 4, text in block 0
NB = 4


def sparse_masks(buckets=2, heads=2, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(buckets, heads, NB, NB, generator=gen) < 0.3
    masks |= torch.eye(NB, dtype=torch.bool)
    masks[..., 0, :] = masks[..., :, 0] = True
    return masks


def make_plan(seed=0) -> Plan:
    gen = torch.Generator().manual_seed(seed)
    derived = SitePlan("blocks.0.attn#0", 2, GRID.num_tokens, 16, orders_permutation(GRID, ["HWF", "FHW"]),
                       sparse_masks(seed=seed), orders=["HWF", "FHW"], grid=GRID)
    stored = SitePlan("blocks.1.attn#0", 2, 40, 16, torch.stack([torch.randperm(40, generator=gen) for _ in range(2)]),
                      torch.ones(2, 2, 3, 3, dtype=torch.bool), dense_buckets=[0, 1])
    return Plan({s.site_id: s for s in (derived, stored)}, step_boundaries=[500.0], density=0.3, meta={"seed": seed})


@pytest.fixture
def saved(tmp_path):
    path = make_plan().save(tmp_path / "plan.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()[METADATA_KEY])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return path, header, tensors


def rewrite(path, header, tensors, header_text=None):
    save_file(tensors, str(path), metadata={METADATA_KEY: header_text if header_text is not None else json.dumps(header)})
    return path


def refused(path, *fragments):
    with pytest.raises(PlanError) as info:
        Plan.load(path)
    message = str(info.value)
    for fragment in (str(path),) + fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# ---- permutations --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, fragment", [(3, "token 3 appears 2 times and token 5 is missing"),
                                             (-1, "holds -1 at position 5"), (40, "holds 40 at position 5"),
                                             (2**31 - 1, "holds 2147483647 at position 5")])
def test_stored_perm_that_is_not_a_permutation_is_refused(saved, value, fragment):
    path, header, tensors = saved
    perm = tensors["1/perm"].clone()
    perm[0] = torch.arange(40, dtype=torch.int32)
    perm[0, 5] = value
    message = refused(rewrite(path, header, {**tensors, "1/perm": perm}), "site 'blocks.1.attn#0'", "perm row 0",
                      fragment)
    assert "re-run calibration" in message


def test_siteplan_in_code_checks_permutations():
    masks = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    with pytest.raises(PlanError, match=r"site 's': perm row 0 is not a permutation of range\(40\): token 0 appears 40 times and token 1 is missing"):
        SitePlan("s", 1, 40, 16, torch.zeros(1, 40, dtype=torch.long), masks)
    with pytest.raises(PlanError, match="row 0 holds 40 at position 39"):
        SitePlan("s", 1, 40, 16, torch.arange(1, 41)[None], masks)
    with pytest.raises(PlanError, match="integer dtype"):
        SitePlan("s", 1, 40, 16, torch.arange(40.0)[None], masks)
    with pytest.raises(PlanError, match="moves text tokens"):
        SitePlan("s", 1, GRID.num_tokens, 16, torch.arange(GRID.num_tokens).flip(0)[None], sparse_masks(1, 1), grid=GRID)
    with pytest.raises(PlanError, match=r"perm row 1 is not the order 'FHW'"):
        SitePlan("s", 2, GRID.num_tokens, 16, orders_permutation(GRID, ["HWF", "HWF"]), sparse_masks(1),
                 orders=["HWF", "FHW"], grid=GRID)


# ---- masks ---------------------------------------------------------------------------------------------------
def test_masks_without_mandatory_blocks_are_refused(saved):
    path, header, tensors = saved
    masks = make_plan().sites["blocks.0.attn#0"].block_masks.clone()
    for edit, fragment in ((lambda m: m.zero_(), "diagonal block (0, 0) is not kept"),
                           (lambda m: m[1, 1, 2, 2].fill_(False), "bucket 1, head 1: diagonal block (2, 2)"),
                           (lambda m: m[0, 0, 0, 3].fill_(False), "block (0, 3) in a text row"),
                           (lambda m: m[1, 0, 2, 0].fill_(False), "block (2, 0) in a text column")):
        bad = masks.clone()
        edit(bad)
        refused(rewrite(path, header, {**tensors, "0/block_masks": pack_bool(bad)}), "'blocks.0.attn#0'",
                "block_masks", fragment)
    with pytest.raises(PlanError, match="diagonal block"):
        SitePlan("s", 2, 40, 16, None, torch.zeros(1, 2, 3, 3, dtype=torch.bool))


def test_dense_bucket_must_be_all_ones(saved):
    path, header, tensors = saved
    header["sites"][0]["dense_buckets"] = [1]
    refused(rewrite(path, header, tensors), "'blocks.0.attn#0'", "dense_buckets lists bucket 1")


@pytest.mark.parametrize("dtype", [torch.int64, torch.float32, torch.bool])
def test_mask_tensor_of_another_dtype_is_refused(saved, dtype):
    path, header, tensors = saved
    bad = tensors["0/block_masks"].to(dtype) if dtype != torch.float32 else torch.full((8,), float("nan"))
    refused(rewrite(path, header, {**tensors, "0/block_masks": bad}), "'blocks.0.attn#0'", "'block_masks'",
            "expected U8 of shape [8]")


def test_mask_padding_bits_and_lengths_are_exact(saved):
    path, header, tensors = saved
    packed = tensors["1/block_masks"].clone()  # 2·2·3·3 = 36 bits in 5 bytes: 4 padding bits
    packed[-1] |= 0x80
    refused(rewrite(path, header, {**tensors, "1/block_masks": packed}), "non-zero padding bits")
    refused(rewrite(path, header, {**tensors, "1/block_masks": packed[:4].clone()}), "expected U8 of shape [5]")


# ---- header fields -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, fragment", [
    ("block_size", 0, "field 'block_size' is 0, the kernel runs token blocks of 16, 32, 64, 128"),
    ("block_size", 8, "field 'block_size' is 8"),
    ("block_size", 48, "field 'block_size' is 48"),
    ("block_size", 256, "field 'block_size' is 256"),
    ("block_size", 16.0, "field 'block_size' is 16.0"),
    ("heads", True, "field 'heads' must be an integer in [1, 4096], got True"),
    ("heads", 2**40, "field 'heads' must be an integer in [1, 4096]"),
    ("seq_len", 10**12, "field 'seq_len' must be an integer in [1, 16777216]"),
    ("seq_len", 54, "field 'grid' describes 53 tokens"),
    ("num_buckets", 3, "field 'num_buckets' is 3, the plan's step_boundaries make 2"),
    ("orders", ["HWF"], "field 'orders' must be a list of 2 order strings"),
    ("orders", ["HWF", "FHX"], "field 'orders[1]' 'FHX' is not a permutation of the grid axes 'FHW'"),
    ("perm", "reversed", "field 'perm' is 'reversed', expected one of ['identity', 'derived', 'stored']"),
    ("perm", "stored", "field 'perm' needs tensor '0/perm'"),
    ("perm", "identity", "perm row 0 is not the order 'HWF'"),
    ("empty_heads", [2], "field 'empty_heads[0]' must be an integer in [0, 1], got 2"),
    ("dense_buckets", [0, 0], "field 'dense_buckets' repeats an entry"),
    ("stats", [], "field 'stats' must be a JSON object"),
    ("grid", {"frames": 2, "height": 4, "width": 6, "text_tokens": 5}, "missing ['text_position']"),
    ("grid", {"frames": 2**40, "height": 2**40, "width": 2**40, "text_tokens": 5, "text_position": "prefix"},
     "field 'grid.frames' must be an integer in [1, 16777216]"),
    ("site_id", "", "field 'site_id' must be a non-empty string"),
    ("site_id", "blocks.1.attn#0", "repeats the site id of sites[0]"),
])
def test_site_fields_are_checked(saved, field, value, fragment):
    path, header, tensors = saved
    header["sites"][0][field] = value
    if field == "site_id" and value:
        header["version"] = 1  # version 2 holds several entries per site (test_plan_multi_shape.py checks them)
    site_name = "" if field == "site_id" else "site 'blocks.0.attn#0'"
    refused(rewrite(path, header, tensors), site_name, fragment)


@pytest.mark.parametrize("field, value, fragment", [
    ("step_boundaries", [float("nan")], "field 'step_boundaries[0]' must be a finite number, got nan"),
    ("step_boundaries", [100.0, 200.0], "strictly descending"),
    ("step_boundaries", [], "field 'num_buckets' is 2, the plan's step_boundaries make 1"),
    ("density", 0.0, "field 'density' must be null or a finite number in (0.0, 1.0]"),
    ("density", float("inf"), "field 'density'"),
    ("density", 10**400, "field 'density' must be null or a finite number in (0.0, 1.0], got 1000"),
    ("step_boundaries", [10**400], "field 'step_boundaries[0]' must be a finite number, got 1000"),
    ("alpha", -0.1, "field 'alpha'"),
    ("qk_bits", 6, "field 'qk_bits' must be null or one of [4, 8, 16]"),
    ("pv_dtype", "bf16", "field 'pv_dtype' must be null or one of ['fp8', 'int8', 'fp16']"),
    ("timestep_arg", "t-1", "field 'timestep_arg' must name a model argument"),
    ("fingerprint", 7, "field 'fingerprint' must be a string or null"),
    ("meta", [], "field 'meta' must be a JSON object"),
    ("sites", {}, "field 'sites' must be a list"),
    ("format", "other", "field 'format' is 'other'"),
])
def test_plan_fields_are_checked(saved, field, value, fragment):
    path, header, tensors = saved
    header[field] = value
    refused(rewrite(path, header, tensors), fragment)


def test_missing_and_unknown_fields_are_named(saved):
    path, original, tensors = saved
    header = copy.deepcopy(original)
    del header["alpha"]
    header["alfa"] = 0.5
    refused(rewrite(path, header, tensors), "missing ['alpha']", "unknown ['alfa']")
    header = copy.deepcopy(original)
    del header["sites"][1]["heads"]
    refused(rewrite(path, header, tensors), "site 'blocks.1.attn#0' (sites[1])", "missing ['heads']")


def test_unreadable_json_is_refused(saved):
    path, header, tensors = saved
    text = json.dumps(header)
    for bad, fragment in ((text[:-1], "not valid JSON (JSONDecodeError"),
                          ("[" * 100_000 + "]" * 100_000, "not valid JSON (RecursionError"),
                          (text.replace('"density": 0.3', '"density": 0.3, "density": 0.9'),
                           "field 'density' appears twice in one JSON object"),
                          (text.replace('"alpha": null', '"alpha": ' + "9" * 5000), "not valid JSON (ValueError"),
                          ("null", "must be a JSON object")):
        refused(rewrite(path, header, tensors, header_text=bad), fragment)


def test_tensors_must_match_the_sites_exactly(saved):
    path, header, tensors = saved
    refused(rewrite(path, header, {k: v for k, v in tensors.items() if k != "1/perm"}),
            "site 'blocks.1.attn#0'", "needs tensor '1/perm' (perm is 'stored')")
    refused(rewrite(path, header, {**tensors, "0/perm": tensors["1/perm"][:, :1].clone()}), "holds ['0/perm']")
    refused(rewrite(path, header, {**tensors, "1/perm": tensors["1/perm"].long()}),
            "tensor '1/perm' is I64 of shape [2, 40], expected I32 of shape [2, 40]")


def test_huge_declared_sizes_are_refused_before_allocating(saved):
    """A grid and seq_len far beyond the file's tensors fail on the byte count, not in an allocation."""
    path, header, tensors = saved
    site = header["sites"][0]
    site.update(heads=4096, seq_len=4096, block_size=16, orders=["HWF"] * 4096)
    site["grid"].update(frames=1, height=64, width=64, text_tokens=0)
    refused(rewrite(path, header, tensors), "tensor '0/block_masks' is U8 of shape [8], expected U8 of shape [67108864]")


def test_damaged_safetensors_layout_is_refused(saved):
    path, header, tensors = saved
    rewrite(path, header, tensors)
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    layout, body = json.loads(raw[8:8 + length]), raw[8 + length:]

    def with_layout(edit, extra=b""):
        changed = copy.deepcopy(layout)
        edit(changed)
        text = json.dumps(changed).encode()
        path.write_bytes(len(text).to_bytes(8, "little") + text + body + extra)
        return path

    first = next(k for k in layout if k != "__metadata__")
    refused(with_layout(lambda h: None, extra=b"\0"), "not safetensors: 1 bytes after the last tensor")
    refused(with_layout(lambda h: h[first].update(dtype="Q7")), f"tensor {first!r} has unknown dtype 'Q7'")
    refused(with_layout(lambda h: h[first].update(data_offsets=[0, 2**40])), "outside the")
    refused(with_layout(lambda h: h[first].update(shape=[3])), f"tensor {first!r} spans")
    refused(with_layout(lambda h: h["__metadata__"].update(other=1)), "__metadata__ must map names to strings")
    path.write_bytes(raw[:8] + raw[8:8 + length].replace(b'"dtype"', b'"dtype":"U8","dtype"', 1) + body)
    refused(path, "header names 'dtype' twice")
    path.write_bytes((2**63).to_bytes(8, "little") + raw[8:])
    refused(path, "header length 9223372036854775808 exceeds the file")
    path.write_bytes(raw[:-1])
    refused(path, "not safetensors")


def test_directory_and_missing_files(tmp_path):
    with pytest.raises(PlanError, match="is a directory"):
        Plan.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        Plan.load(tmp_path / "none.safetensors")


# ---- plans built in code -------------------------------------------------------------------------------------
def test_plan_in_code_checks_its_fields():
    site = make_plan().sites["blocks.0.attn#0"]
    with pytest.raises(PlanError, match="strictly descending"):
        Plan({site.site_id: site}, step_boundaries=[100.0, 500.0])
    for bad in (float("nan"), 10**400):
        with pytest.raises(PlanError, match="finite numbers"):
            Plan({}, step_boundaries=[bad])
    with pytest.raises(PlanError, match="1 mask bucket"):
        Plan({"x": SitePlan("x", 1, 40, 16, None, torch.ones(1, 1, 3, 3, dtype=torch.bool))}, step_boundaries=[5.0])
    with pytest.raises(PlanError, match="differs from its SitePlan's site_id"):
        Plan({"other": site}, step_boundaries=[500.0])
    with pytest.raises(PlanError, match="qk_bits"):
        Plan({}, qk_bits=6)
    with pytest.raises(PlanError, match="heads must be an int >= 1, got the bool True"):
        SitePlan("s", True, 40, 16, None, torch.ones(1, 1, 3, 3, dtype=torch.bool))
    with pytest.raises(PlanError, match="block_size must be an int >= 1, got 0"):
        SitePlan("s", 1, 40, 0, None, torch.ones(1, 1, 3, 3, dtype=torch.bool))
    with pytest.raises(PlanError, match="dtype torch.float32"):
        SitePlan("s", 1, 40, 16, None, torch.ones(1, 1, 3, 3))
    with pytest.raises(PlanError, match="empty_heads holds 1"):
        SitePlan("s", 1, 40, 16, None, torch.ones(1, 1, 3, 3, dtype=torch.bool), empty_heads=[1])


def test_save_refuses_what_load_would_refuse(tmp_path):
    site = SitePlan("s", 1, 40, 8, None, torch.ones(1, 1, 5, 5, dtype=torch.bool))
    path = tmp_path / "plan.safetensors"
    with pytest.raises(PlanError, match="field 'block_size' is 8, the kernel runs token blocks of 16, 32, 64, 128"):
        Plan({"s": site}).save(path)
    with pytest.raises(PlanError, match=r"meta is not JSON-serialisable"):
        Plan({}, meta={"tensor": torch.zeros(1)}).save(path)
    assert not list(tmp_path.iterdir())


# ---- saving --------------------------------------------------------------------------------------------------
def test_concurrent_writers_leave_one_whole_plan(tmp_path):
    """Writers of different plans to one path, and a reader, at the same time: every load sees a whole plan, the
    last file is one of the plans, and no temporary file is left."""
    plans = [make_plan(seed) for seed in range(4)]
    path = tmp_path / "plan.safetensors"
    plans[0].save(path)
    errors: list[BaseException] = []
    done = threading.Event()

    def writer(plan):
        try:
            for _ in range(40):
                plan.save(path)
        except BaseException as error:  # collected: the test fails on any
            errors.append(error)

    def reader():
        try:
            while not done.is_set():
                loaded = Plan.load(path)
                assert any(loaded == plan for plan in plans)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(plan,)) for plan in plans] + [threading.Thread(target=reader)]
    for thread in threads:
        thread.start()
    for thread in threads[:-1]:
        thread.join()
    done.set()
    threads[-1].join()
    assert not errors, errors
    loaded = Plan.load(path)
    assert any(loaded == plan for plan in plans)
    assert sorted(os.listdir(tmp_path)) == ["plan.safetensors"]


def test_plan_renamed_over_the_path_during_a_read_is_not_mixed_in(tmp_path, monkeypatch):
    """The loader reads the file through one open: a plan renamed over the path right after it was opened does not
    pair the first plan's header with the second plan's tensors (safetensors' own reader opens the path twice)."""
    import builtins

    from paro_compile import plan_container

    first, second = make_plan(0), make_plan(1)
    path = first.save(tmp_path / "plan.safetensors")
    newer = second.save(tmp_path / "newer.safetensors")
    renamed = []

    def open_then_rename(*args, **kwargs):
        handle = builtins.open(*args, **kwargs)
        if not renamed:
            renamed.append(os.replace(newer, path))
        return handle

    monkeypatch.setattr(plan_container, "open", open_then_rename, raising=False)
    assert Plan.load(path) == first and renamed
    assert Plan.load(path) == second


def test_failed_save_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import safetensors.torch

    path = make_plan(0).save(tmp_path / "plan.safetensors")
    before = path.read_bytes()

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a plan")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        make_plan(1).save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["plan.safetensors"]


def test_saved_file_mode_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = make_plan().save(tmp_path / "plan.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
