import pytest

from tests.calibration.calibration_helpers import GRID, HEADS, synthetic_qk


@pytest.fixture(scope="module")
def qk():
    """q, k [1, 4, 1040, 64] of the four structured heads of `HEADS` on `GRID`."""
    return synthetic_qk(GRID, HEADS)
