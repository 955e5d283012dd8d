"""Test setup: hypothesis profiles, the precision switches, and the `twin` and `one_torch_thread` fixtures.

No twin is imported here: a test module imports the twin it uses, and `helpers.twin(name)` imports one
on first use.
"""

import os
import sys

import pytest
from hypothesis import HealthCheck, settings

import helpers

# generate(compile=None) decodes eagerly here (mythos_torch.generate.COMPILE_ENV): no test pays a torch.compile
# unless it asks for one (compile=True); CLI subprocesses inherit it
os.environ.setdefault("MYTHOS_COMPILE", "0")

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


@pytest.fixture(autouse=True, scope="session")
def _parity_precision():
    """Both twins' parity switches (docs/design.md "Precision switches") for the twins the collected test
    modules imported, on before the first test runs: float64 JAX needs jax_enable_x64 before any array.
    (No test module creates a JAX array at import; a twin imported later, through helpers.twin, sets its
    own switch then.)"""
    for name in ("mythos_torch", "mythos_jax"):
        if name in sys.modules:
            sys.modules[name].set_parity_precision()


@pytest.fixture(scope="session", params=helpers.TWIN_NAMES)
def twin(request):
    """Each twin in turn (helpers.TorchTwin / helpers.JaxTwin); restrict a test to one twin with
    @pytest.mark.parametrize("twin", ["torch"], indirect=True)."""
    return helpers.twin(request.param)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch intra-op thread for the module: tiny tensors run fastest so, and no OpenMP spin contention on
    small CI boxes. Use with pytestmark = pytest.mark.usefixtures("one_torch_thread")."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
