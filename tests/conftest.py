import os
import random
import zlib

import torch

# The Triton interpreter must be chosen before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

try:
    from hypothesis import settings as _hypothesis_settings

    # Property tests are derandomized by default, like the kernel tests' seeds: a run is reproducible and CI cannot
    # turn red on an example no one has seen. HYPOTHESIS_PROFILE=explore searches fresh examples.
    _hypothesis_settings.register_profile("reproducible", derandomize=True)
    _hypothesis_settings.register_profile("explore", derandomize=False)
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "reproducible"))
except ImportError:
    pass


def cpu_rowwise_scaled_mm() -> bool:
    """Whether torch._scaled_mm takes row-wise scales on the CPU, as torchao's row-wise Float8Tensor needs there: torch
    2.13 does; torch 2.11's CPU kernel asserts per-tensor scales (its CUDA kernel, the one FP8 users run, takes both)."""
    a = torch.zeros(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


CPU_ROWWISE_FP8 = pytest.mark.skipif(
    not torch.cuda.is_available() and not cpu_rowwise_scaled_mm(),
    reason="this torch's CPU torch._scaled_mm takes per-tensor scales only (torch < 2.13); row-wise FP8 linears run "
           "on the GPU")


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")])]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def fresh_dynamo():
    import paro_compile

    torch._dynamo.reset()
    paro_compile.clear_reports()
    yield
    torch._dynamo.reset()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# A seed per test, fixed (derived from its node id): a run is reproducible and CI cannot turn red on a seed no one
# has seen. PARO_TEST_SEED=random draws a fresh seed per test to explore; PARO_TEST_SEED=<n> replays one. The seed
# is printed, so a failure names its replay. Defined here (not in tests/kernels/) so that a pytest run collecting
# files from several folders always sees it.
@pytest.fixture
def seed(request):
    chosen = os.environ.get("PARO_TEST_SEED", "")
    if chosen == "random":
        s = random.SystemRandom().randrange(2**31)
    elif chosen:
        s = int(chosen)
    else:
        s = zlib.crc32(request.node.nodeid.encode()) % 2**31
    print(f"seed={s} (replay with PARO_TEST_SEED={s})")
    return s


@pytest.fixture
def gen(seed):
    return torch.Generator().manual_seed(seed)
