"""Parity between the two twins: run `mythos_torch` and `mythos_jax` on the same weights and tokens.

    >>> import parity
    >>> report = parity.compare("bench-s-gqa", dtype="float32")
    >>> report.passed
    >>> parity.render(report)

The twins are imported on first use, so `import parity` stays cheap. The `mythos parity` command is mythos/cli.py.
"""

from .compare import (
    ADVERSARIAL_KINDS,
    DTYPES,
    Outputs,
    ParityInputError,
    Tolerances,
    adversarial_weights,
    compare,
    derive_tolerances,
    probe_weights,
    make_ids,
    set_parity_precision,
)
from .report import Excusal, NearTie, ParityReport, Row, render, table

__all__ = [
    "compare", "adversarial_weights", "probe_weights", "derive_tolerances", "make_ids", "set_parity_precision", "Tolerances", "DTYPES",
    "ADVERSARIAL_KINDS", "ParityInputError", "Outputs", "ParityReport", "Row", "NearTie", "Excusal", "render", "table",
]
