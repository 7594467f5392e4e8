"""benchmarks/quantization_floor.py: each quantization step's error in isolation, at a small size (CPU)."""
import json
import math

import pytest

from bench_helpers import load_benchmark


def test_fp8_pv_floor_and_op_error(tmp_path):
    result = load_benchmark("quantization_floor").main(["--n", "520", "--heads", "2", "--seed", "3", "--out", str(tmp_path)])
    err = {row["step"]: row["rel_l2_vs_fp64"] for row in result["rows"]}
    written = json.loads((tmp_path / "quantization_floor.json").read_text())
    assert written["rows"] == result["rows"] and written["stamp"]["command"].startswith("python benchmarks/quantization_floor.py")
    # one e4m3 rounding of P or of V costs ~2.5e-2 relative; together ~3.6e-2 (above the kernel's 2e-2 accuracy target)
    for step in ("p_fp8", "v_fp8"):
        assert 0.018 < err[step] < 0.032, (step, err[step])
    assert 0.03 < err["pv_fp8"] < 0.042
    assert err["pv_fp8"] == pytest.approx(math.hypot(err["p_fp8"], err["v_fp8"]), rel=0.15)
    # the whole op sits at the floor its formats set: QK INT8 and PV FP8 errors add in quadrature
    assert err["op_int8_fp8"] == pytest.approx(math.hypot(err["pv_fp8"], err["qk_int8"]), rel=0.1)
    assert err["qk_int8"] < err["op_int8_bf16"] * 1.1 < err["op_int8_fp8"]
    assert err["sdpa_bf16"] < 0.01
