"""CalibrationOptions: one definition with its validation (the CLI and docs agreement: tests/test_cli.py)."""
import dataclasses

import pytest

from paro_compile.calibration import DEFAULT_ALPHA, CalibrationError, CalibrationOptionError, CalibrationOptions
from paro_compile.calibration.options import merge_options, option_fields, option_flag, option_value_type

BAD = [
    (dict(density=0.0), "density must be in (0, 1], got 0.0"),
    (dict(density=1.5), "density must be in (0, 1]"),
    (dict(average_density=0.0), "average_density must be in (0, 1]"),
    (dict(mass_threshold=2.0), "mass_threshold must be in (0, 1]"),
    (dict(alpha=-0.1), "alpha must be in [0, 1]"),
    (dict(alpha=None), "alpha cannot be None"),
    (dict(alpha="0.9"), "alpha must be a number, got '0.9'"),
    (dict(sigma=0.0), "sigma must be in (0, 1]"),
    (dict(eps=1.0), "eps must be in (0, 1)"),
    (dict(step_buckets=0), "step_buckets must be >= 1"),
    (dict(step_buckets=1.5), "step_buckets must be an integer"),
    (dict(dense_steps=-1), "dense_steps must be >= 0"),
    (dict(block_size=0), "block_size must be >= 1"),
    (dict(chunk_rows=0), "chunk_rows must be >= 1"),
    (dict(max_chunk_elements=0), "max_chunk_elements must be >= 1"),
    (dict(empty_head_tol=-1.0), "empty_head_tol must be >= 0"),
    (dict(allocation="heads"), "allocation must be one of"),
    (dict(block_score="error"), "block_score must be one of"),
    (dict(sparsity_metric="entropy"), "sparsity_metric must be one of"),
    (dict(empty_heads="drop"), "empty_heads must be one of"),
    (dict(timestep_arg=""), "timestep_arg must be an input name"),
    (dict(orders="FHW"), "orders must be a list of orders"),
    (dict(orders=3), "orders must be a list of orders"),
    (dict(orders=["FHW", "FHW"]), "orders lists an order twice"),
    (dict(step_boundaries="500"), "step_boundaries must be a list of timesteps"),
    (dict(stats_device="gpu"), "stats_device must be a device such as 'cpu' or 'cuda:0', got 'gpu'"),
    (dict(sampling_timesteps=[1.0, "x"], average_density=0.3), "sampling_timesteps must be a list of numbers"),
    (dict(density=0.3, average_density=0.3), "pass density (per sparse bucket) or average_density"),
    (dict(average_density=0.3, mass_threshold=0.8), "average_density and mass_threshold both set"),
    (dict(sampling_timesteps=[999.0]), "sampling_timesteps only weights average_density"),
    (dict(block_score="output", allocation="site"), "block_score='output' supports allocation='uniform' only"),
    (dict(dense_steps=1, step_boundaries=[]), "dense_steps with explicit step_boundaries needs at least one boundary"),
    (dict(step_buckets=3, step_boundaries=[600.0]), "step_buckets=3 disagrees with the 2 sparse bucket(s)"),
]


@pytest.mark.parametrize("values,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_invalid_options_say_what_is_wrong(values, message):
    with pytest.raises(CalibrationOptionError) as info:
        CalibrationOptions(**values)
    assert message in str(info.value)
    assert isinstance(info.value, CalibrationError) and isinstance(info.value, ValueError)
    assert set(info.value.options) <= set(values) | {"average_density", "density", "step_buckets"}
    # The same problem, named as command line flags.
    rendered = info.value.render(option_flag)
    for name in info.value.options:
        assert option_flag(name) in rendered


def test_values_are_normalised():
    options = CalibrationOptions(step_buckets=3.0, alpha=1, sampling_timesteps=(t for t in (3, 1)), average_density=0.3,
                                 step_boundaries=[100, 700], orders=("FHW", "HWF"), stats_device="cpu")
    assert options.step_buckets == 3 and isinstance(options.step_buckets, int)
    assert options.alpha == 1.0 and isinstance(options.alpha, float)
    assert options.sampling_timesteps == [3.0, 1.0]
    assert options.step_boundaries == [700.0, 100.0]  # descending
    assert options.orders == ["FHW", "HWF"]
    assert dataclasses.replace(options) == options  # validation is idempotent


def test_defaults_and_mask_density():
    options = CalibrationOptions()
    assert options.alpha == DEFAULT_ALPHA == 0.9
    assert options.density is None and options.mask_density == 0.3
    assert CalibrationOptions(density=0.2).mask_density == 0.2
    with pytest.raises(CalibrationOptionError, match="average_density is solved into a density"):
        CalibrationOptions(average_density=0.4).mask_density
    assert CalibrationOptions(step_buckets=2, average_density=0.3).step_options_set() == ["average_density", "step_buckets"]
    assert options.step_options_set() == []


def test_merge_options():
    base = CalibrationOptions(density=0.2)
    assert merge_options(base, {}, "f") is base
    assert merge_options(None, {"alpha": 0.5}, "f") == CalibrationOptions(alpha=0.5)
    assert merge_options(base, {"alpha": 0.5}, "f") == CalibrationOptions(density=0.2, alpha=0.5)
    with pytest.raises(CalibrationOptionError, match="not both"):
        merge_options(base, {"average_density": 0.3}, "f")
    with pytest.raises(TypeError, match=r"f\(\) got unknown option\(s\) \['grid'\]"):
        merge_options(None, {"grid": None}, "f")


def test_every_option_has_help_and_a_command_line_form():
    for option in option_fields():
        assert option.metadata["help"], option.name
        kind, is_list = option_value_type(option)
        assert kind in (float, int, str)
        choices = option.metadata["choices"]
        if choices:
            assert option.default in choices and kind is str and not is_list
