"""One definition per option: `ParoConfig` fields and `paro_compile.envs` are what the README documents."""
from pathlib import Path

import pytest

from paro_compile import envs
from paro_compile.config import ParoConfig, options_markdown

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_options_table_is_generated_from_paro_config():
    assert options_markdown() in README, "README's options table drifted: paste paro_compile.config.options_markdown()"


def test_readme_environment_table_is_generated_from_envs():
    assert envs.environment_markdown() in README, "README's environment table drifted: paste envs.environment_markdown()"


def test_every_paro_environment_variable_is_read_through_envs():
    """No module reads a PARO_* variable itself (one parser, one error message per variable)."""
    root = Path(__file__).resolve().parents[1] / "paro_compile"
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.name != "envs.py" and ("os.environ" in p.read_text() or "os.getenv" in p.read_text())]
    assert offenders == []


@pytest.mark.parametrize("name,value,match", [
    ("PARO_EXP2_MODE", "abc", r"PARO_EXP2_MODE='abc': expected one of 0, 1, 2, 3"),
    ("PARO_AUTOTUNE", "maybe", r"PARO_AUTOTUNE='maybe': expected one of"),
    ("PARO_KERNEL_VARIANT", "prefetch_qk", r"PARO_KERNEL_VARIANT: entries must look like switch=0 or switch=1"),
])
def test_malformed_environment_values_name_the_variable(monkeypatch, name, value, match):
    monkeypatch.setenv(name, value)
    with pytest.raises(envs.EnvironmentVariableError, match=match):
        getattr(envs, name)


def test_environment_values_parse(monkeypatch, tmp_path):
    monkeypatch.setenv("PARO_AUTOTUNE", "off")
    monkeypatch.setenv("PARO_EXP2_MODE", "2")
    monkeypatch.setenv("PARO_KERNEL_VARIANT", "prefetch_qk=1, tma_kv=0")
    monkeypatch.setenv("PARO_CACHE_DIR", str(tmp_path))
    assert envs.PARO_AUTOTUNE is False and envs.PARO_EXP2_MODE == 2
    assert envs.PARO_KERNEL_VARIANT == {"prefetch_qk": True, "tma_kv": False}
    assert envs.PARO_CACHE_DIR == tmp_path and ParoConfig().resolved_cache_dir == tmp_path
    assert ParoConfig(cache_dir=str(tmp_path / "x")).resolved_cache_dir == tmp_path / "x"
    monkeypatch.delenv("PARO_EXP2_MODE")
    assert envs.PARO_EXP2_MODE is None
    with pytest.raises(AttributeError):
        envs.PARO_NOT_A_VARIABLE


@pytest.mark.parametrize("field,value", [("density", 0.0), ("qk_bits", 6), ("pv_dtype", "fp4"), ("block_size", 48),
                                         ("fallback", "ignore"), ("impl", "cuda"), ("calibration_calls", 0)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ParoConfig(**{field: value})


def test_unknown_options_go_to_inductor_or_fail_clearly():
    config = ParoConfig.from_options({"qk_bits": 16, "max_autotune": True})
    assert config.qk_bits == 16 and config.inductor == {"max_autotune": True}
    with pytest.raises(ValueError, match="unknown paro/Inductor option"):
        ParoConfig.from_options({"qkbits": 16})
