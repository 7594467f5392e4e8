"""Hostile plan files: every mutation of a valid plan file either loads and runs exactly as the plan the mutated
file describes, or raises PlanError. Never another exception, never a large allocation (the address space is
capped at the current size + 1 GiB while a mutated file is loaded). The plan holds two token grids for two of its
sites (format version 2); its header is also fuzzed as a version-1 file of its first entries (read and migrated)."""
import contextlib
import copy
import json
import re
import resource
import sys

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st
from safetensors.torch import safe_open, save_file

from paro_compile.grid import TokenGrid, orders_permutation
from paro_compile.kernels.block_mask import BlockMask
from paro_compile.kernels.reference import paro_attention_reference
from paro_compile.plan import Plan, PlanError, SitePlan
from paro_compile.plan_file import METADATA_KEY

VIDEO = TokenGrid(frames=2, height=4, width=6, text_tokens=5)  # 53 tokens: 4 blocks of 16, text in block 0
IMAGE = TokenGrid(frames=None, height=6, width=8, text_tokens=4, text_position="suffix")  # 52 tokens, text in block 3
SMALL_VIDEO = TokenGrid(frames=2, height=4, width=4, text_tokens=5)  # 37 tokens: 3 blocks of 16
ADDRESS_SPACE_HEADROOM = 2**30
FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def mandatory(nb: int, text_blocks: list[int]) -> torch.Tensor:
    mask = torch.eye(nb, dtype=torch.bool)
    for b in text_blocks:
        mask[b, :] = mask[:, b] = True
    return mask


def random_masks(gen, buckets, heads, nb, text_blocks, dense_bucket=None):
    masks = (torch.rand(buckets, heads, nb, nb, generator=gen) < 0.4) | mandatory(nb, text_blocks)
    if dense_bucket is not None:
        masks[dense_bucket] = True
    return masks


def make_plan(with_other_shapes: bool = True) -> Plan:
    gen = torch.Generator().manual_seed(0)
    derived = SitePlan("blocks.0.attn#0", 2, VIDEO.num_tokens, 16, orders_permutation(VIDEO, ["HWF", "FHW"]),
                       random_masks(gen, 2, 2, 4, [0], dense_bucket=0), orders=["HWF", "FHW"], grid=VIDEO,
                       empty_heads=[1], dense_buckets=[0], stats={"density": [1.0, 0.5]})
    stored = SitePlan("blocks.1.attn#0", 2, 40, 16, torch.stack([torch.randperm(40, generator=gen) for _ in range(2)]),
                      random_masks(gen, 2, 2, 3, []))
    identity = SitePlan("blocks.2.attn#0", 1, IMAGE.num_tokens, 16, None, random_masks(gen, 2, 1, 4, [3]),
                        orders=["HW"], grid=IMAGE)
    plan = Plan(sites={s.site_id: s for s in (derived, stored, identity)}, step_boundaries=[500.0], timestep_arg="t",
                fingerprint="abc", density=0.3, alpha=0.5, qk_bits=8, pv_dtype="fp8", meta={"note": "fuzz"})
    if not with_other_shapes:
        return plan
    derived_small = SitePlan("blocks.0.attn#0", 2, SMALL_VIDEO.num_tokens, 16,
                             orders_permutation(SMALL_VIDEO, ["FWH", "HWF"]), random_masks(gen, 2, 2, 3, [0]),
                             orders=["FWH", "HWF"], grid=SMALL_VIDEO, stats={"shape": "small"})
    stored_short = SitePlan("blocks.1.attn#0", 2, 24, 16, torch.stack([torch.randperm(24, generator=gen) for _ in range(2)]),
                            random_masks(gen, 2, 2, 2, []))
    plan.add_shape([derived_small, stored_short])
    return plan


PLAN = make_plan()
SITES = PLAN.all_entries()  # the file's entry order
PLAN_V1 = make_plan(with_other_shapes=False)
SITES_V1 = PLAN_V1.all_entries()


def site_outputs(site: SitePlan) -> list[torch.Tensor]:
    """The reference op's output at every step bucket with the site's perm and CSR (fixed inputs per shape)."""
    gen = torch.Generator().manual_seed(site.heads * 1000 + site.seq_len)
    q, k, v = (torch.randn(1, site.heads, site.seq_len, 8, generator=gen) for _ in range(3))
    outs = []
    for bucket in range(site.num_buckets):
        mask = BlockMask.from_csr(*site.csr(bucket), site.seq_len, site.block_size, site.block_size)
        outs.append(paro_attention_reference(q, k, v, perm=site.perm, mask=mask, qk_bits=16, pv_dtype="fp16"))
    return outs


EXPECTED = [site_outputs(site) for site in SITES]
EXPECTED_V1 = EXPECTED[:len(SITES_V1)]


def _saved(plan: Plan, directory) -> tuple[dict, dict]:
    path = plan.save(directory / "plan.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()[METADATA_KEY])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return header, tensors


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    return _saved(PLAN, tmp_path_factory.mktemp("fuzz"))


@pytest.fixture(scope="module")
def original_v1(tmp_path_factory):
    """The single-shape plan's file with its header written as version 1 (the layout version 1 had)."""
    header, tensors = _saved(PLAN_V1, tmp_path_factory.mktemp("fuzz_v1"))
    header["version"] = 1
    return header, tensors


def _address_space() -> int:
    return int(re.search(r"VmSize:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024


@contextlib.contextmanager
def bounded_memory():
    """Cap the address space at its current size + 1 GiB: a loader that allocates from a hostile header fails."""
    if not sys.platform.startswith("linux"):
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _address_space() + ADDRESS_SPACE_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def load_or_plan_error(path):
    """The loaded plan, or None when the loader raised PlanError (any other exception fails the test)."""
    with bounded_memory():
        try:
            plan = Plan.load(path)
        except PlanError as error:
            assert str(path) in str(error), f"the message does not name the file: {error}"
            return None
    return plan


def runs_as(loaded: Plan, expected_sites: list[SitePlan], expected_outputs=None) -> None:
    """The loaded plan has the expected entries and every entry's reference output matches, bucket by bucket. Entries
    are paired by (heads, seq_len), unique in the fuzzed plan: a mutated site id may regroup the file's entries into
    other sites (a valid version-2 file) without changing what any of them runs."""
    key = lambda site: (site.heads, site.seq_len)  # noqa: E731
    got = sorted(loaded.all_entries(), key=key)
    order = sorted(range(len(expected_sites)), key=lambda i: key(expected_sites[i]))
    assert len(got) == len(expected_sites)
    expected_sites = [expected_sites[i] for i in order]
    if expected_outputs is not None:
        expected_outputs = [expected_outputs[i] for i in order]
    for i, (site, want) in enumerate(zip(got, expected_sites)):
        assert (site.heads, site.seq_len, site.block_size, site.num_buckets) == (
            want.heads, want.seq_len, want.block_size, want.num_buckets)
        outputs = expected_outputs[i] if expected_outputs is not None else site_outputs(want)
        for bucket, out in enumerate(site_outputs(site)):
            assert torch.equal(out, outputs[bucket]), f"site {i} bucket {bucket} runs differently"


def write(path, header_text: str, tensors: dict) -> None:
    save_file(tensors, str(path), metadata={METADATA_KEY: header_text})


# ---- header mutations --------------------------------------------------------------------------------------------
def header_paths(header, prefix=()):
    """Every field and list element of the header (meta and stats as wholes)."""
    paths = [prefix] if prefix else []
    if isinstance(header, dict) and (not prefix or prefix[-1] not in ("meta", "stats")):
        for key, value in header.items():
            paths += header_paths(value, prefix + (key,))
    elif isinstance(header, list):
        for i, value in enumerate(header):
            paths += header_paths(value, prefix + (i,))
    return paths


NASTY = [None, True, False, 0, -1, 1, 2, 3, 4, 8, 15, 16, 17, 31, 32, 48, 63, 64, 128, 256, 2**31 - 1, 2**31,
         -2**31, 2**63, 10**30, 10**400, 10**4000, 0.0, -0.0, 0.5, 1.0, 1.5, 16.0, 1e308, -1e308, float("nan"), float("inf"),
         float("-inf"), "", " ", "x", "FHW", "HWF", "HW", "WH", "FFF", "FH", "FHWX", "identity", "derived", "stored",
         "fp8", "int8", "fp16", "prefix", "suffix", "paro_plan", "timestep", "1", "0/perm", [], [0], [1, 1], [-1],
         ["FHW"], ["HWF", "FHW"], ["HW"], [1e308], [float("nan")], {}, {"frames": 2}, [[[]]], "é" * 3]


def nasty_value(current):
    options = [st.sampled_from(NASTY), st.integers(), st.floats(), st.text(max_size=6),
               st.lists(st.one_of(st.integers(-2, 70), st.sampled_from(["FHW", "HWF", "WH", "HW", ""])), max_size=4),
               st.dictionaries(st.sampled_from(["frames", "height", "x"]), st.integers(-1, 70), max_size=2)]
    if isinstance(current, int) and not isinstance(current, bool):
        options.append(st.integers(current - 3, current + 3) | st.sampled_from([current * 2, -current, current * 1000]))
    if isinstance(current, float):
        options.append(st.sampled_from([current + 1.0, -current, current * 1e300]))
    return st.one_of(options)


def get_parent(header, path):
    node = header
    for key in path[:-1]:
        node = node[key]
    return node


def expected_after_header_edit(path, header, sites: list[SitePlan]) -> list[SitePlan] | None:
    """The sites the edited header describes when the edit is one of the plan's meaningful edits (another order for
    a derived site, the text position of its grid): built in memory from the original site. None: the edit must
    leave the plan running exactly as before."""
    if len(path) < 3 or path[0] != "sites" or path[2] not in ("orders", "grid"):
        return None
    index = path[1]
    if not isinstance(index, int) or index >= len(sites) or header["sites"][index].get("perm") != "derived":
        return None
    entry = header["sites"][index]
    site = sites[index]
    try:
        grid = TokenGrid(**entry["grid"])
        orders = list(entry["orders"])
        perm = orders_permutation(grid, orders)
        edited = SitePlan(site.site_id, site.heads, site.seq_len, site.block_size, perm, site.block_masks.clone(),
                          orders=orders, grid=grid, empty_heads=list(site.empty_heads),
                          dense_buckets=list(site.dense_buckets), stats=dict(site.stats))
    except Exception:  # the edit makes a site the in-memory constructor refuses too: the loader must refuse it
        return []
    return sites[:index] + [edited] + sites[index + 1:]


@FUZZ
@given(data=st.data())
@pytest.mark.parametrize("version", [2, 1])
def test_header_mutations_load_exactly_or_raise_plan_error(original, original_v1, tmp_path, data, version):
    header0, tensors = original if version == 2 else original_v1
    sites, expected_outputs = (SITES, EXPECTED) if version == 2 else (SITES_V1, EXPECTED_V1)
    header = copy.deepcopy(header0)
    path = data.draw(st.sampled_from(header_paths(header0)), label="path")
    operation = data.draw(st.sampled_from(["replace", "drop", "add_field"]), label="operation")
    parent = get_parent(header, path)
    if operation == "drop":
        del parent[path[-1]]
    elif operation == "add_field" and isinstance(parent[path[-1]], dict):
        parent[path[-1]][data.draw(st.sampled_from(["extra", "heads", "grid", "x" * 40]))] = 1
    else:
        parent[path[-1]] = data.draw(nasty_value(parent[path[-1]]), label="value")
    file = tmp_path / "mutated.safetensors"
    write(file, json.dumps(header), tensors)
    loaded = load_or_plan_error(file)
    event("refused" if loaded is None else "loaded")
    if loaded is None:
        return
    expected = expected_after_header_edit(path, header, sites)
    if expected is None:
        runs_as(loaded, sites, expected_outputs)
    else:
        assert expected, f"the loader accepted an edit that SitePlan refuses: {path} -> {get_parent(header, path)}"
        runs_as(loaded, expected)


# ---- tensor mutations --------------------------------------------------------------------------------------------
def expected_after_tensor_edit(key: str, edit) -> list[SitePlan] | None:
    """Sites as the plan built in memory with the same edit (None: SitePlan refuses the edit as well)."""
    index, field = int(key.split("/")[0]), key.split("/")[1]
    site = SITES[index]
    masks, perm = site.block_masks.clone(), None if site.perm is None else site.perm.clone()
    if field == "block_masks":
        flat = masks.view(-1)
        if edit >= flat.numel():
            return None  # a padding bit: it has no element
        flat[edit] = ~flat[edit]
    else:
        position, value = edit
        perm.view(-1)[position] = value
    try:
        rebuilt = SitePlan(site.site_id, site.heads, site.seq_len, site.block_size, perm, masks, orders=list(site.orders),
                           grid=site.grid, empty_heads=list(site.empty_heads), dense_buckets=list(site.dense_buckets),
                           stats=dict(site.stats))
    except PlanError:
        return None
    return SITES[:index] + [rebuilt] + SITES[index + 1:]


TENSOR_OPERATIONS = ["drop", "add", "retype", "reshape", "truncate", "extend", "flip_bit", "set_entry", "nan"]


@FUZZ
@given(data=st.data())
def test_tensor_mutations_load_exactly_or_raise_plan_error(original, tmp_path, data):
    header, tensors0 = original
    tensors = {k: v.clone() for k, v in tensors0.items()}
    key = data.draw(st.sampled_from(sorted(tensors)), label="key")
    operation = data.draw(st.sampled_from(TENSOR_OPERATIONS), label="operation")
    tensor = tensors[key]
    expected = None  # every operation but a flipped bit or a set entry makes a malformed file
    if operation == "drop":
        del tensors[key]
    elif operation == "add":
        extra = data.draw(st.sampled_from(["0/perm", "2/perm", "3/perm", "5/block_masks", "x", "1/perm_",
                                           "0/block_masks/"]))
        if extra in tensors:
            return
        tensors[extra] = tensor.clone()
    elif operation == "retype":
        dtype = data.draw(st.sampled_from([torch.int8, torch.int16, torch.int32, torch.int64, torch.float32,
                                           torch.float16, torch.bool, torch.uint8]))
        if dtype == tensor.dtype:
            return
        tensors[key] = tensor.to(dtype)
    elif operation == "reshape":
        tensors[key] = tensor.reshape(1, -1) if tensor.dim() == 1 else tensor.reshape(-1)
    elif operation == "truncate":
        tensors[key] = tensor.reshape(-1)[: data.draw(st.integers(0, tensor.numel() - 1))].reshape(-1).clone()
        if tensor.dim() == 2:
            tensors[key] = tensors[key][None]
    elif operation == "extend":
        pad = torch.zeros(data.draw(st.integers(1, 9)), dtype=tensor.dtype)
        tensors[key] = torch.cat([tensor.reshape(-1), pad]).reshape(1, -1) if tensor.dim() == 2 else torch.cat([tensor, pad])
    elif operation == "nan":
        tensors[key] = torch.full(tensor.shape, float("nan"))
    elif operation == "flip_bit" and key.endswith("block_masks"):
        bit = data.draw(st.integers(0, tensor.numel() * 8 - 1), label="bit")
        tensors[key] = tensor.clone()
        tensors[key][bit // 8] ^= 1 << (bit % 8)
        expected = expected_after_tensor_edit(key, bit)
    elif operation == "set_entry" and key.endswith("perm"):
        position = data.draw(st.integers(0, tensor.numel() - 1), label="position")
        value = data.draw(st.sampled_from([-1, 0, 1, 39, 40, 41, 2**31 - 1, -2**31]) | st.integers(-2**31, 2**31 - 1))
        tensors[key] = tensor.clone()
        tensors[key].view(-1)[position] = value
        expected = expected_after_tensor_edit(key, (position, value))
    else:
        return
    file = tmp_path / "mutated.safetensors"
    write(file, json.dumps(header), tensors)
    loaded = load_or_plan_error(file)
    event("refused" if loaded is None else "loaded")
    if expected is None:
        assert loaded is None, f"{operation} of {key!r} loaded"
    else:
        assert loaded is not None, f"{operation} of {key!r} makes a valid plan but the loader refused it"
        runs_as(loaded, expected)


# ---- safetensors container -----------------------------------------------------------------------------------------
@FUZZ
@given(data=st.data())
def test_safetensors_header_mutations_load_exactly_or_raise_plan_error(original, tmp_path, data):
    """The safetensors header (tensor dtypes, shapes, byte ranges, metadata) mutated like the plan header, and bytes
    added after the data: each file loads exactly as the original or raises PlanError."""
    header, tensors = original
    file = tmp_path / "whole.safetensors"
    write(file, json.dumps(header), tensors)
    raw = file.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    container, body = json.loads(raw[8:8 + length]), raw[8 + length:]
    path = data.draw(st.sampled_from(header_paths(container)), label="path")
    operation = data.draw(st.sampled_from(["replace", "drop", "add_field", "append_bytes"]), label="operation")
    parent = get_parent(container, path)
    if operation == "drop":
        del parent[path[-1]]
    elif operation == "append_bytes":
        body += bytes(data.draw(st.integers(1, 16), label="count"))
    elif operation == "add_field" and isinstance(parent[path[-1]], dict):
        parent[path[-1]][data.draw(st.sampled_from(["extra", "dtype", "x" * 40]))] = 1
    else:
        parent[path[-1]] = data.draw(nasty_value(parent[path[-1]]), label="value")
    text = json.dumps(container).encode()
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(len(text).to_bytes(8, "little") + text + body)
    loaded = load_or_plan_error(damaged)
    event("refused" if loaded is None else "loaded")
    if loaded is not None:
        runs_as(loaded, SITES, EXPECTED)


# ---- raw bytes ---------------------------------------------------------------------------------------------------
@settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_damaged_bytes_raise_plan_error(original, tmp_path, data):
    """A truncated file or a damaged safetensors header length is never read as a plan."""
    header, tensors = original
    file = tmp_path / "whole.safetensors"
    write(file, json.dumps(header), tensors)
    raw = bytearray(file.read_bytes())
    if data.draw(st.booleans(), label="truncate"):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1), label="length")]
    else:
        length = data.draw(st.integers(0, 2**64 - 1) | st.sampled_from([0, 1, 2**63, 2**64 - 1]), label="length")
        if length == int.from_bytes(raw[:8], "little"):
            return
        raw[:8] = length.to_bytes(8, "little")
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(raw))
    assert load_or_plan_error(damaged) is None


def test_fuzz_baseline_loads_and_runs_as_saved(original, original_v1, tmp_path):
    """The unmutated file loads and runs as the plan it was saved from (what every mutation is compared with)."""
    header, tensors = original
    file = tmp_path / "plan.safetensors"
    write(file, json.dumps(header), tensors)
    loaded = load_or_plan_error(file)
    assert loaded is not None and loaded == PLAN
    runs_as(loaded, SITES, EXPECTED)
    header_v1, tensors_v1 = original_v1
    file_v1 = tmp_path / "plan_v1.safetensors"
    write(file_v1, json.dumps(header_v1), tensors_v1)
    loaded_v1 = load_or_plan_error(file_v1)
    assert loaded_v1 == PLAN_V1 and loaded_v1.version == 2
    runs_as(loaded_v1, SITES_V1, EXPECTED_V1)
