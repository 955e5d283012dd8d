"""`torchrun --nproc-per-node 4 -m mythos train ... --backend torch --mesh data=2,model=2`: the command a user
types trains exactly as one process does (float64: losses and final weights to 1e-12), and rank 0 alone writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

ARGS = ["train", "tiny", "--set", "moe.n_experts=8", "--backend", "torch", "--steps", "3", "--batch-size", "8",
        "--dtype", "float64", "--difficulty", "1-3", "--eval-examples", "8", "--warmup", "1"]
TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("mesh, strategy, ranks", [("data=2,model=2", "fsdp+tp", 4), ("data=2,expert=2", "dp+ep", 4)])
def test_torchrun_train_equals_one_process(tmp_path, mesh, strategy, ranks):
    assert TORCHRUN is not None, "torchrun is not beside this Python (torch's console script)"
    one = run([sys.executable, "-m", "mythos", *ARGS, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stdout + one.stderr
    many = run([TORCHRUN, "--nproc-per-node", str(ranks), "-m", "mythos", *ARGS, "--out", str(tmp_path / "many"),
                "--mesh", mesh, "--strategy", strategy])
    assert many.returncode == 0, many.stdout[-3000:] + many.stderr[-3000:]
    assert many.stdout.count(f"torch on mesh {mesh}, {strategy}") == 1  # rank 0 alone prints
    np.testing.assert_allclose(losses(tmp_path / "many"), losses(tmp_path / "one"), rtol=1e-12, atol=0)
    wa = load_file(tmp_path / "one" / "step-000003" / "weights.safetensors")
    wb = load_file(tmp_path / "many" / "step-000003" / "weights.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wb[k], wa[k], rtol=1e-12, atol=1e-14, err_msg=k)
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["log.jsonl", "step-000003"]
