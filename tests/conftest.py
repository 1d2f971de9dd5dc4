import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("thorough", deadline=None, max_examples=400)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _finite_checks():
    """Every test runs with the hot paths' non-finite checks on (mosaic_kit.finite_checks)."""
    from mosaic_kit import finite_checks

    with finite_checks(True):
        yield


@pytest.fixture
def one_thread():
    """One torch thread for the test (tiny models gain nothing from threads and lose much to their
    synchronisation); use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each test ends with accelerate's process-wide state unset: an in-process training run fixes
    its mixed precision for the whole process, and the next test's run with another precision
    would be refused ("AcceleratorState has already been initialized")."""
    yield
    import sys

    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
