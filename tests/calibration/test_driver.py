"""The driver: calibrate(model, inputs) end to end (step buckets, dense steps, average density) and
calibrate_site; options as a dataclass or as keyword arguments."""
import pytest
import torch

from paro_compile.calibration import CalibrationError, CalibrationOptions, calibrate, calibrate_site
from paro_compile.config import ParoConfig
from paro_compile.passes.discover import find_attention_sites
from paro_compile.plan import Plan
from tests.calibration.calibration_helpers import BLOCK, GOOD_ORDERS, GRID, TinyModel, model_inputs


def test_calibrate_model_end_to_end(qk, tmp_path):
    model = TinyModel()
    # min_order_gain=0: orders by score alone (see test_orders.py::test_orders_and_masks_on_structured_heads).
    plan = calibrate(model, model_inputs(qk, (999.0, 500.0, 10.0)), density=0.2, grid=GRID, block_size=BLOCK,
                     step_buckets=2, dense_steps=1, min_order_gain=0.0, progress=False)
    assert set(plan.sites) == {"blocks.0#0", "blocks.1#0"}
    assert plan.step_boundaries == [749.5, 255.0] and plan.num_buckets == 3
    for site in plan.sites.values():
        assert site.dense_buckets == [0] and bool(site.block_masks[0].all())
        assert site.density(1) == pytest.approx(0.2, abs=0.01)
        for h, order in enumerate(site.orders):
            assert order in GOOD_ORDERS[h]
        assert min(site.stats["kept_mass_per_head"][1]) >= 0.9
        assert site.stats["bucket_calls"] == [1, 1, 1]
    # The plan fits the graph the backend will see (sites discovered in a Dynamo graph).
    seen = []

    def grab(gm, example_inputs):
        seen.extend(find_attention_sites(gm, ParoConfig(allow_fp32=True)))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(TinyModel(), backend=grab, dynamic=False)(*model_inputs(qk)[0][0])
    plan.check_sites(seen, block_size=BLOCK)
    loaded = Plan.load(plan.save(tmp_path / "plan.safetensors"), model=model)
    assert loaded.sites["blocks.0#0"].orders == plan.sites["blocks.0#0"].orders


def test_options_object_and_keywords_are_the_same_calibration(qk):
    model = TinyModel()
    inputs = model_inputs(qk, (999.0, 500.0, 10.0))
    options = CalibrationOptions(density=0.2, block_size=BLOCK, step_buckets=2, dense_steps=1)
    from_options = calibrate(model, inputs, options=options, grid=GRID, progress=False)
    from_keywords = calibrate(model, inputs, density=0.2, block_size=BLOCK, step_buckets=2, dense_steps=1, grid=GRID,
                              progress=False)
    assert from_options.step_boundaries == from_keywords.step_boundaries
    for sid, site in from_options.sites.items():
        assert site.orders == from_keywords.sites[sid].orders
        assert torch.equal(site.block_masks, from_keywords.sites[sid].block_masks)
    # Keywords override the object's fields; the object itself is not changed.
    denser = calibrate(model, inputs, options=options, density=0.5, grid=GRID, progress=False)
    assert denser.density == 0.5 and options.density == 0.2
    assert denser.sites["blocks.0#0"].density(1) > from_options.sites["blocks.0#0"].density(1)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['densty'\]"):
        calibrate(model, inputs, densty=0.2, grid=GRID, progress=False)
    with pytest.raises(TypeError, match="takes a CalibrationOptions"):
        calibrate(model, inputs, options={"density": 0.2}, grid=GRID, progress=False)
    with pytest.raises(ValueError, match="step_buckets=3 disagrees"):
        calibrate(model, inputs, step_boundaries=[600.0], step_buckets=3, grid=GRID, progress=False)


def test_calibrate_site_refuses_step_options(qk):
    q, k = qk
    with pytest.raises(CalibrationError, match="step_buckets, dense_steps need calibrate"):
        calibrate_site(q, k, GRID, step_buckets=2, dense_steps=1)
    with pytest.raises(CalibrationError, match="average_density need calibrate"):
        calibrate_site(q, k, GRID, average_density=0.3)
    with pytest.raises(TypeError, match="unknown option"):
        calibrate_site(q, k, GRID, alhpa=0.5)


def test_calibrate_average_density(qk):
    model = TinyModel()
    inputs = model_inputs(qk, (999.0, 750.0, 500.0, 250.0))
    plan = calibrate(model, inputs, average_density=0.5, grid=GRID, block_size=BLOCK, dense_steps=1, progress=False)
    meta = plan.meta
    assert meta["dense_step_share"] == pytest.approx(0.25)
    assert meta["sparse_density"] == pytest.approx((0.5 - 0.25) / 0.75)
    for site in plan.sites.values():
        assert site.dense_buckets == [0] and site.density(1) == pytest.approx(meta["sparse_density"], abs=0.02)
    expected = sum(plan.overall_density(plan.bucket_for_timestep(t)) for t in (999.0, 750.0, 500.0, 250.0)) / 4
    assert meta["average_density_achieved"] == pytest.approx(expected)
    assert meta["average_density_achieved"] == pytest.approx(0.5, abs=0.02)
    # Without dense steps the average is the density of every bucket.
    flat = calibrate(model, inputs, average_density=0.4, grid=GRID, block_size=BLOCK, progress=False)
    assert flat.meta["sparse_density"] == 0.4 and flat.meta["dense_step_share"] == 0.0
    with pytest.raises(ValueError, match="not both"):
        calibrate(model, inputs, density=0.3, average_density=0.3, grid=GRID, block_size=BLOCK, progress=False)
    with pytest.raises(CalibrationError, match="not reachable"):
        calibrate(model, inputs, average_density=0.2, grid=GRID, block_size=BLOCK, dense_steps=1, progress=False)
    # sampling_timesteps as a one-shot generator: weights the solve and the achieved average alike
    schedule = calibrate(model, inputs, average_density=0.5, sampling_timesteps=(t for t in (999.0, 500.0, 400.0, 300.0)),
                         grid=GRID, block_size=BLOCK, dense_steps=1, progress=False)
    assert schedule.meta["dense_step_share"] == pytest.approx(0.25)
    expected = sum(schedule.overall_density(schedule.bucket_for_timestep(t)) for t in (999.0, 500.0, 400.0, 300.0)) / 4
    assert schedule.meta["average_density_achieved"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="mass_threshold"):
        calibrate(model, inputs, average_density=0.3, mass_threshold=0.8, grid=GRID, block_size=BLOCK, progress=False)
    # Explicit boundaries: the calibration timesteps are read for the weights; without a timestep input it says so.
    explicit = calibrate(model, inputs, average_density=0.75, step_boundaries=[600.0], dense_steps=1, grid=GRID,
                         block_size=BLOCK, progress=False)
    assert explicit.meta["dense_step_share"] == pytest.approx(0.5)  # 999 and 750 above 600
    assert explicit.meta["sparse_density"] == pytest.approx(0.5)
    no_t = [(args, {}) for args, _ in inputs]
    with pytest.raises(CalibrationError, match="average_density with dense buckets needs the timestep"):
        calibrate(model, no_t, average_density=0.75, step_boundaries=[600.0], dense_steps=1, grid=GRID,
                  block_size=BLOCK, progress=False)
