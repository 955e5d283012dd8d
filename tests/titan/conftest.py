"""The torchtitan tier (docs/scaling.md "torchtitan"): its own venv, built by tests/titan/install.sh.

    /tmp/tt/bin/python -m pytest -m titan tests/titan -q

Every test here carries the `titan` marker, which the default run deselects. Where torchtitan is not installed
(the project's own venv) these files are not even imported; asking for the tier there is an error, not a skip.
"""

from __future__ import annotations

import importlib.util
import os
import re

import pytest

HERE = os.path.dirname(__file__)


def _asks_for_titan(config: pytest.Config) -> bool:
    expr = config.getoption("markexpr") or ""
    return re.search(r"(?<!not )\btitan\b", expr) is not None


def pytest_ignore_collect(collection_path, config: pytest.Config) -> bool | None:
    if not str(collection_path).startswith(HERE) or importlib.util.find_spec("torchtitan") is not None:
        return None
    if _asks_for_titan(config):
        raise pytest.UsageError("the titan tier needs torchtitan 0.3.0: build its venv with tests/titan/install.sh "
                                "and run /tmp/tt/bin/python -m pytest -m titan tests/titan")
    return True


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if str(item.fspath).startswith(HERE):
            item.add_marker(pytest.mark.titan)
