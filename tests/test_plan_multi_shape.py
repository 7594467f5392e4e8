"""Plans with several token grids per site: `Plan.add_shape`, `Plan.merge`, `Plan.select`, the version-2 file and
version-1 files read as before."""
import json

import pytest
import torch
from safetensors.torch import safe_open, save_file

from paro_compile.grid import TokenGrid, orders_permutation
from paro_compile.plan import PLAN_FORMAT_VERSION, Plan, PlanError, SitePlan
from paro_compile.plan_file import METADATA_KEY, migrate_header

SMALL = TokenGrid(frames=2, height=4, width=4, text_tokens=8)  # 40 tokens
LARGE = TokenGrid(frames=2, height=8, width=8, text_tokens=8)  # 136 tokens
PORTRAIT = TokenGrid(frames=2, height=8, width=4, text_tokens=8)  # 72 tokens
LANDSCAPE = TokenGrid(frames=2, height=4, width=8, text_tokens=8)  # 72 tokens, another layout
SITES = ("blocks.0.attn#0", "blocks.1.attn#0")


def entry(site_id: str, grid: TokenGrid, seed: int = 0, buckets: int = 1, heads: int = 2, orders=("HWF", "FHW"),
          block: int = 16) -> SitePlan:
    gen = torch.Generator().manual_seed(seed)
    nb = -(-grid.num_tokens // block)
    masks = torch.rand(buckets, heads, nb, nb, generator=gen) < 0.4
    masks |= torch.eye(nb, dtype=torch.bool)
    text = range(0, -(-grid.text_tokens // block))
    for b in text:
        masks[..., b, :] = masks[..., :, b] = True
    orders = list(orders)[:heads]
    return SitePlan(site_id, heads, grid.num_tokens, block, orders_permutation(grid, orders), masks, orders=orders,
                    grid=grid)


def plan_at(grid: TokenGrid, seed: int = 0, **fields) -> Plan:
    return Plan({sid: entry(sid, grid, seed + i) for i, sid in enumerate(SITES)}, density=0.5, fingerprint="fp",
                **fields)


def test_merge_keeps_every_grid_and_changes_neither_plan():
    small, large = plan_at(SMALL), plan_at(LARGE, seed=7)
    merged = small.merge(large)
    assert [e.seq_len for e in merged.entries(SITES[0])] == [40, 136]
    assert merged.sites[SITES[0]] == small.sites[SITES[0]]
    assert merged.other_shapes[SITES[1]][0] == large.sites[SITES[1]]
    assert not small.other_shapes and not large.other_shapes
    assert merged.describe_shapes() == "seq_len 40 (2×4×4 + 8 text) at 2 sites; seq_len 136 (2×8×8 + 8 text) at 2 sites"
    assert "2 token grids" in merged.summary()


def test_add_shape_in_place_refuses_a_grid_already_covered_unless_replace():
    plan = plan_at(SMALL)
    plan.add_shape(plan_at(LARGE).sites)
    assert [e.seq_len for e in plan.entries(SITES[1])] == [40, 136]
    again = entry(SITES[0], LARGE, seed=99)
    with pytest.raises(PlanError, match=r"already has an entry for seq_len 136 \(2×8×8 \+ 8 text\); pass replace=True"):
        plan.add_shape([again])
    assert plan.entries(SITES[0])[1] != again, "a refused entry must leave the plan unchanged"
    plan.add_shape([again], replace=True)
    assert plan.entries(SITES[0])[1] == again
    plan.add_shape({"blocks.9.attn#0": entry("blocks.9.attn#0", SMALL)})
    assert plan.entries("blocks.9.attn#0")[0].seq_len == 40  # a new site gets its first entry


def test_entries_of_a_site_keep_its_heads_and_buckets():
    plan = plan_at(SMALL)
    with pytest.raises(PlanError, match="the entry for seq_len 136 .* has 4 heads, the entry for seq_len 40 .* 2"):
        plan.add_shape([entry(SITES[0], LARGE, heads=4, orders=["HWF"] * 4)])
    with pytest.raises(PlanError, match=r"2 mask bucket\(s\), this plan's step_boundaries \[\] make 1"):
        plan.add_shape([entry(SITES[0], LARGE, buckets=2)])


def test_one_token_count_needs_grids_to_tell_entries_apart():
    plan = plan_at(PORTRAIT)
    plan.add_shape([entry(SITES[0], LANDSCAPE)])  # same 72 tokens, another layout: fine
    gridless = SitePlan(SITES[1], 2, 72, 16, None, torch.ones(1, 2, 5, 5, dtype=torch.bool))
    with pytest.raises(PlanError, match="have one token count and no grid to tell them apart"):
        plan.add_shape([gridless])


@pytest.mark.parametrize("field, value, fix", [
    ("step_boundaries", [500.0], "calibrate with step_boundaries=[]"),
    ("fingerprint", "other", "different models"),
    ("density", 0.3, "calibrate with density=0.5"),
    ("timestep_arg", "t", "same timestep_arg"),
])
def test_merge_refuses_plans_calibrated_differently(field, value, fix):
    small = plan_at(SMALL)
    other = plan_at(LARGE)
    setattr(other, field, value)
    if field == "step_boundaries":
        other = Plan({sid: entry(sid, LARGE, buckets=2) for sid in SITES}, step_boundaries=[500.0], density=0.5,
                     fingerprint="fp")
    with pytest.raises(PlanError, match=f"their {field} differs") as info:
        small.merge(other)
    assert fix in str(info.value)


def test_merge_keeps_the_other_plans_meta():
    small, large = plan_at(SMALL, meta={"calls": 2}), plan_at(LARGE, meta={"calls": 6})
    assert small.merge(large).meta == {"calls": 2, "merged": [{"calls": 6}]}
    assert small.merge(plan_at(LARGE, meta={"calls": 2})).meta == {"calls": 2}


# ---- selection ---------------------------------------------------------------------------------------------------
def test_select_picks_each_sites_entry_for_the_graphs_token_count():
    plan = plan_at(SMALL).merge(plan_at(LARGE, seed=5))
    chosen = plan.select({sid: (136, None) for sid in SITES})
    assert not chosen.missing and not chosen.plan.other_shapes
    assert all(chosen.plan.sites[sid] == plan.entries(sid)[1] for sid in SITES)
    symbolic = plan.select({SITES[0]: (None, None)})
    assert symbolic.plan.sites[SITES[0]] == plan.sites[SITES[0]], "a symbolic count gets the site's first entry"
    absent = plan.select({"blocks.7.attn#0": (40, None)})
    assert not absent.plan.sites and not absent.missing, "sites the plan lacks are check_sites' to report"


def test_select_names_the_shapes_covered_when_none_fits():
    plan = plan_at(SMALL).merge(plan_at(LARGE))
    missing = plan.select({SITES[0]: (72, PORTRAIT)}).missing
    assert missing == {SITES[0]: "graph has seq_len 72 (2×8×4 + 8 text), plan has seq_len 40 (2×4×4 + 8 text) or "
                                 "seq_len 136 (2×8×8 + 8 text) only"}


def test_select_tells_grids_of_one_token_count_apart_by_layout():
    plan = plan_at(PORTRAIT, seed=1).merge(plan_at(LANDSCAPE, seed=2))
    landscape = plan.select({sid: (72, LANDSCAPE) for sid in SITES})
    assert all(landscape.plan.sites[sid].grid == LANDSCAPE for sid in SITES)
    unknown = plan.select({SITES[0]: (72, None)})
    assert "several entries have this seq_len and the graph's grid could not be inferred" in unknown.missing[SITES[0]]
    single = plan_at(PORTRAIT)
    assert "plan has seq_len 72 (2×8×4 + 8 text) only" in single.select({SITES[0]: (72, LANDSCAPE)}).missing[SITES[0]]
    one_frame = plan_at(TokenGrid(frames=1, height=8, width=4, text_tokens=8))
    image = TokenGrid(frames=None, height=8, width=4, text_tokens=8)  # one frame and an image: one token layout
    assert not one_frame.select({SITES[0]: (40, image)}).missing


def test_check_sites_accepts_any_entrys_token_count():
    from types import SimpleNamespace

    plan = plan_at(SMALL).merge(plan_at(LARGE))
    site = lambda n, heads=2: SimpleNamespace(site_id=SITES[0], heads=heads, seq_len=n, supported=True)  # noqa: E731
    plan.check_sites([site(40)], allow_extra=True)
    plan.check_sites([site(136)], allow_extra=True)
    problems = plan.site_problems([site(72)], allow_extra=True)
    assert problems == [(SITES[0], f"site {SITES[0]}: plan has seq_len 40 or 136, graph has 72")]


# ---- the file ----------------------------------------------------------------------------------------------------
def test_multi_shape_plan_roundtrips_through_a_version_2_file(tmp_path):
    plan = plan_at(SMALL).merge(plan_at(LARGE, seed=3))
    path = plan.save(tmp_path / "multi.paro.safetensors")
    loaded = Plan.load(path)
    assert loaded == plan and loaded.source == str(path)
    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()[METADATA_KEY])
    assert header["version"] == PLAN_FORMAT_VERSION == 2
    assert [(s["site_id"], s["seq_len"]) for s in header["sites"]] == [
        (SITES[0], 40), (SITES[1], 40), (SITES[0], 136), (SITES[1], 136)]


def _header_and_tensors(path):
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()[METADATA_KEY]), {key: handle.get_tensor(key) for key in handle.keys()}


def test_version_1_files_are_read_and_migrated(tmp_path):
    plan = plan_at(SMALL)
    header, tensors = _header_and_tensors(plan.save(tmp_path / "v2.paro.safetensors"))
    header["version"] = 1
    old = tmp_path / "v1.paro.safetensors"
    save_file(tensors, str(old), metadata={METADATA_KEY: json.dumps(header)})
    loaded = Plan.load(old)
    assert loaded == plan and loaded.version == PLAN_FORMAT_VERSION
    assert Plan.load(loaded.save(tmp_path / "again.paro.safetensors")) == plan  # saved as version 2

    header["sites"][1]["site_id"] = SITES[0]  # two entries of one site: version 2 only
    save_file(tensors, str(old), metadata={METADATA_KEY: json.dumps(header)})
    with pytest.raises(PlanError, match=r"repeats the site id of sites\[0\] \(a version 1 plan holds one entry per site\)"):
        Plan.load(old)


def test_migrate_header():
    current = {"version": PLAN_FORMAT_VERSION, "sites": []}
    assert migrate_header(current) is current
    assert migrate_header({"version": 1, "sites": []}) == {"version": 2, "sites": []}
    for version, fragment in ((3, "newer than this paro_compile reads (versions 1, 2); upgrade"), (0, "not supported"),
                              (True, "not supported"), (1.0, "not supported"), ("2", "not supported")):
        with pytest.raises(PlanError) as info:
            migrate_header({"version": version}, "p.safetensors")
        assert str(info.value).startswith("plan file p.safetensors: plan file version") and fragment in str(info.value)


@pytest.mark.parametrize("edit, fragment", [
    (lambda sites: sites[2].update(heads=4, orders=["HWF"] * 4),
     "field 'heads' is 4, the site's entry sites[0] has 2"),
    (lambda sites: sites[2].update(seq_len=40, grid=sites[0]["grid"]),
     "(with the grid) makes two entries for seq_len 40 (2×4×4 + 8 text) of this site, with sites[0]"),
    (lambda sites: sites[2].update(grid=None, perm="stored"),
     "needs tensor '2/perm'"),
])
def test_version_2_entries_of_one_site_are_checked(tmp_path, edit, fragment):
    header, tensors = _header_and_tensors(plan_at(SMALL).merge(plan_at(LARGE)).save(tmp_path / "m.paro.safetensors"))
    edit(header["sites"])
    bad = tmp_path / "bad.paro.safetensors"
    save_file(tensors, str(bad), metadata={METADATA_KEY: json.dumps(header)})
    with pytest.raises(PlanError) as info:
        Plan.load(bad)
    assert str(bad) in str(info.value) and f"{SITES[0]!r} (sites[2])" in str(info.value)
    assert fragment in str(info.value), str(info.value)


def test_a_second_entry_without_grids_for_one_token_count_is_refused(tmp_path):
    plan = Plan({SITES[0]: SitePlan(SITES[0], 2, 72, 16, None, torch.ones(1, 2, 5, 5, dtype=torch.bool))})
    header, tensors = _header_and_tensors(plan.save(tmp_path / "p.paro.safetensors"))
    header["sites"].append(dict(header["sites"][0]))
    tensors["1/block_masks"] = tensors["0/block_masks"].clone()
    bad = tmp_path / "bad.paro.safetensors"
    save_file(tensors, str(bad), metadata={METADATA_KEY: json.dumps(header)})
    with pytest.raises(PlanError, match="two entries for seq_len 72 of this site, with sites"):
        Plan.load(bad)
