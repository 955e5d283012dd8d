"""The vllm tier (docs/serving.md "vLLM"): its own venv, built by tests/vllm/install.sh.

    .venv-vllm/bin/python -m pytest -q -m vllm tests/vllm -p no:cacheprovider

Every test here carries the `vllm` marker, which the default run deselects. Where vLLM is not importable (the
project's own .venv) each test is skipped with the reason, never run and never counted as a pass.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
# a regular package: this directory (tests/ is on sys.path) would otherwise pass for a namespace package `vllm`
_SPEC = importlib.util.find_spec("vllm")
HAS_VLLM = _SPEC is not None and _SPEC.origin is not None
REASON = ("vllm is not importable in this interpreter: the vllm tier runs in its own venv; build it with "
          "tests/vllm/install.sh and run .venv-vllm/bin/python -m pytest -q -m vllm tests/vllm")

if HAS_VLLM:
    # before vLLM is imported: no downloads, no usage reports, the engine core in this process (refusals raise
    # here, and no spawned process re-imports the test module)
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("VLLM_NO_USAGE_STATS", "1"),
                       ("DO_NOT_TRACK", "1"), ("VLLM_ENABLE_V1_MULTIPROCESSING", "0")):
        os.environ[key] = value


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if str(item.fspath).startswith(HERE):
            item.add_marker(pytest.mark.vllm)
            if not HAS_VLLM:
                item.add_marker(pytest.mark.skip(reason=REASON))
