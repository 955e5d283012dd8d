"""Test setup: hypothesis profiles and the precision switches (set once, here)."""

import os

from hypothesis import HealthCheck, settings

# `ci` (default): derandomized and bounded so the whole suite fits CI.
# `thorough`: many random examples, for local runs: MYTHOS_HYPOTHESIS=thorough pytest
settings.register_profile(
    "ci", derandomize=True, deadline=None, database=None, print_blob=True, max_examples=12,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough", deadline=None, max_examples=300, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("MYTHOS_HYPOTHESIS", "ci"))


def pytest_configure(config):
    # float64 parity needs x64 in JAX; both twins' parity switches are turned on once for the session.
    import mythos_jax
    import mythos_torch

    mythos_jax.set_parity_precision()
    mythos_torch.set_parity_precision()
