"""`mythos train --mesh` end to end, in the default tier: a JAX run on 4 fake CPU devices (its own process,
since XLA_FLAGS must precede JAX's start) trains exactly as the single-device run. The sharded tier
(tests/sharded) holds the per-strategy parity; this is the command a user types."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

ARGS = ["train", "tiny", "--set", "moe.n_experts=8", "--backend", "jax", "--steps", "3", "--batch-size", "8",
        "--dtype", "float64", "--difficulty", "1-3", "--eval-examples", "8", "--warmup", "1"]


def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "mythos", *ARGS, "--out", str(out), *extra], env=env,
                          capture_output=True, text=True, timeout=600)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_jax_train_on_a_mesh_equals_one_device(tmp_path):
    one = run(tmp_path / "one")
    assert one.returncode == 0, one.stdout + one.stderr
    # two steps on one mesh, stopped, then resumed on another: a checkpoint holds whole tensors
    first = run(tmp_path / "mesh", "--mesh", "data=2,expert=2", "--strategy", "fsdp+ep", "--stop-at", "2")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "mesh data=2,expert=2, fsdp+ep" in first.stdout
    rest = run(tmp_path / "mesh", "--mesh", "data=4", "--strategy", "dp")
    assert rest.returncode == 0, rest.stdout + rest.stderr
    assert "resumed from" in rest.stdout and "mesh data=4, dp" in rest.stdout
    a, b = losses(tmp_path / "one"), losses(tmp_path / "mesh")
    assert len(a) == len(b) == 3
    np.testing.assert_allclose(b, a, rtol=1e-12, atol=0)  # float64: the same losses, step by step
    wa = load_file(tmp_path / "one" / "step-000003" / "weights.safetensors")
    wb = load_file(tmp_path / "mesh" / "step-000003" / "weights.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:  # the final weights equal the single-device run's
        np.testing.assert_allclose(wb[k], wa[k], rtol=1e-12, atol=1e-15, err_msg=k)


def test_a_mesh_jax_cannot_hold_exits_2(tmp_path):
    r = run(tmp_path / "bad", "--mesh", "data=8")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "needs 8 JAX devices, JAX has 4" in " ".join(r.stdout.split()) and "Traceback" not in r.stdout + r.stderr
    assert not (tmp_path / "bad").exists()
