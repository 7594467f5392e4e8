"""Shared fixtures of the kernel tests: a fresh random seed per test (printed, so a failure can be replayed
with PARO_TEST_SEED=<seed>), and CUDA/interpreter selection."""
import os
import random

import pytest
import torch


@pytest.fixture
def seed():
    s = int(os.environ.get("PARO_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"seed={s} (replay with PARO_TEST_SEED={s})")
    return s


@pytest.fixture
def gen(seed):
    return torch.Generator().manual_seed(seed)

