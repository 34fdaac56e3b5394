import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Hypothesis profiles for the property tests (tests/test_properties.py). "ci" is the default:
# few examples, derandomized, so CI is fast and reproducible. "long" searches for counterexamples
# by hand: python -m pytest -q tests/test_properties.py --hypothesis-profile=long
settings.register_profile(
    "ci",
    max_examples=50,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "long",
    max_examples=2000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci")


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (the README's test command runs ``-n auto``), the workers share the
    cores: give each its share of torch's threads instead of all of them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
