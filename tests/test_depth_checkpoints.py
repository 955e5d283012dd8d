"""The shipped depth-extrapolation checkpoints (examples/depth/checkpoints/, docs/results.md "Depth
extrapolation") still load and reprint their headline behaviour in both twins: trained on 1..10 bits of
prefix parity, nope-s0 answers 20 bits at 22 loop steps and fails at 10; the 1-loop baseline fails at every
step; PonderNet's own halting runs longer on longer inputs. A change to the twins' forward, the bridge or the
task that breaks the experiment fails here (the numbers are the recorded results of that experiment)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mythos.eval_task import eval_task

CKPT = Path(__file__).resolve().parents[1] / "examples" / "depth" / "checkpoints"


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_headline_checkpoint_needs_more_steps_for_more_bits(backend):
    r = eval_task(CKPT / "nope-s0.safetensors", task="pparity", difficulty=20, steps=(10, 22), backend=backend,
                  n_examples=64, n_loops=22, stop=("max_confidence",))
    em = r["exact_match"]
    assert em[9] <= 0.1 and em[21] >= 0.95, em  # recorded on 512 rows: 2.7% and 100%
    assert r["position_accuracy"][21][-1] == 1.0  # the 20th bit's parity, right at 22 steps in every row


def test_twins_agree_on_the_shipped_checkpoint_and_the_baseline_fails():
    t = eval_task(CKPT / "nope-s0.safetensors", difficulty=12, steps=(6, 14), backend="torch", n_examples=32,
                  n_loops=14, stop=())
    j = eval_task(CKPT / "nope-s0.safetensors", difficulty=12, steps=(6, 14), backend="jax", n_examples=32,
                  n_loops=14, stop=())
    np.testing.assert_allclose(t["position_accuracy"], j["position_accuracy"], atol=1 / 32)
    base = eval_task(CKPT / "one-loop-s0.safetensors", difficulty=12, steps=(1, 14), backend="torch",
                     n_examples=32, n_loops=14, stop=())
    assert max(base["exact_match"]) <= 0.05


def test_pondernet_halts_later_on_longer_inputs():
    short, long = (eval_task(CKPT / "ponder-s0.safetensors", difficulty=d, steps=(d,), backend="torch",
                             n_examples=32, n_loops=d + 4, stop=())["own_halting"] for d in (6, 16))
    assert long["row_max_loops_median"] >= short["row_max_loops_median"] + 8  # recorded: 8 -> 18 (d + 2)
    assert long["exact_match"] >= 0.95
