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
