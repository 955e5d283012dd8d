"""Parity between the two twins: run `mythos_torch` and `mythos_jax` on the same weights and tokens.

    >>> import parity
    >>> report = parity.compare("bench-s-gqa", dtype="float32")
    >>> report.passed
    >>> parity.render(report)

The twins are imported on first use, so `import parity` (and the `mythos` CLI) stays cheap.
"""

from .compare import (
    ADVERSARIAL_KINDS,
    DTYPES,
    TOLERANCES,
    Outputs,
    ParityInputError,
    Tolerances,
    adversarial_weights,
    compare,
    make_ids,
    set_parity_precision,
)
from .report import NearTie, ParityReport, Row, render, table

__all__ = [
    "compare", "adversarial_weights", "make_ids", "set_parity_precision", "Tolerances", "TOLERANCES", "DTYPES",
    "ADVERSARIAL_KINDS", "ParityInputError", "Outputs", "ParityReport", "Row", "NearTie", "render", "table",
]
