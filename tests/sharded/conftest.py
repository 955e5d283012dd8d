"""The sharded tier (docs/scaling.md): its own pytest process, 8 fake CPU devices for JAX, gloo ranks for torch.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest -m sharded tests/sharded

Every test here carries the `sharded` marker, which the default run deselects.
"""

from __future__ import annotations

import os

import pytest

N_DEVICES = 8
FLAG = f"--xla_force_host_platform_device_count={N_DEVICES}"


def pytest_configure(config: pytest.Config) -> None:
    """With -m sharded, 8 fake devices before JAX creates its CPU client (importing jax does not, the first
    jax.devices() does). Any other run leaves XLA_FLAGS alone: collecting this folder must not turn the
    default suite's one CPU device into eight."""
    expr = config.getoption("markexpr") or ""
    if "sharded" in expr and "not sharded" not in expr and FLAG not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FLAG).strip()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.sharded)


@pytest.fixture(scope="session")
def jax_devices():
    """The 8 fake CPU devices; a clear failure (not a skip) when JAX started with fewer."""
    import jax

    devices = jax.devices("cpu")
    if len(devices) < N_DEVICES:
        pytest.fail(f"the sharded tier needs {N_DEVICES} JAX CPU devices, JAX has {len(devices)}: JAX was "
                    f"initialised before tests/sharded/conftest.py set XLA_FLAGS; run it in its own process: "
                    f"XLA_FLAGS={FLAG} python -m pytest -m sharded tests/sharded")
    return devices[:N_DEVICES]
