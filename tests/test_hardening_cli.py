"""Hardening of the command line and of training (issue 17): one test per reproduction.

Every bad input ends in one message naming what was wrong and what is allowed, exit 2, no traceback
and nothing written; a diverged run exits 1 and keeps its last good checkpoint; float64 files work in
a fresh process (each command switches JAX to x64 itself); long work is bounded by the spec.
Fast tests use the torch twin; the float64 ones run `mythos` in a subprocess (a clean JAX).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import spec as S
import weights_bridge as wb
from mythos import train as PT
from mythos.checkpoints import read_state, write_state
from mythos.cli import app, shown
from weights_bridge import convert as wconvert

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")
MYTHOS = [sys.executable, "-m", "mythos.cli"]
TINY258 = ["--set", "vocab_size=258"]
TRAIN = ["train", "tiny", "--task", "modadd", "--difficulty", "2-3", "--backend", "torch", "--steps", "4",
         "--batch-size", "2", "--warmup", "1", "--eval-examples", "4"]


def invoke(*args: str):
    r = runner.invoke(app, list(args))
    assert r.exception is None or isinstance(r.exception, SystemExit), (
        f"a traceback for {args}: {type(r.exception).__name__}: {r.exception}\n{r.output}")
    return r


def flat(text: str) -> str:
    return " ".join(text.split())


def refused(args, *needles: str, code: int = 2) -> str:
    r = invoke(*args)
    assert r.exit_code == code, (args, r.exit_code, r.output)
    assert "Traceback" not in r.output, r.output
    text = flat(r.output)
    for n in needles:
        assert flat(n) in text, (args, n, r.output)
    return text


def dead_pid() -> int:
    """A process id that runs nothing (for a temporary file left by a killed writer)."""
    for pid in range(4_000_000, 3_000_000, -7919):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue
    pytest.skip("no free pid found")


@pytest.fixture(scope="module")
def w64(tmp_path_factory) -> Path:
    import mythos_torch as mt

    path = tmp_path_factory.mktemp("w64") / "w64.safetensors"
    return wb.save(mt.build(S.load("tiny", overrides={"vocab_size": 258}), seed=0, dtype="float64"), path)


@pytest.fixture(scope="module")
def w32(tmp_path_factory) -> Path:
    import mythos_torch as mt

    path = tmp_path_factory.mktemp("w32") / "w32.safetensors"
    return wb.save(mt.build(S.load("tiny", overrides={"vocab_size": 258}), seed=0, dtype="float32"), path)


# --------------------------------------------------------------------------- spec input, every command


COMMANDS = {  # each command with the arguments it needs besides SPEC and --set
    "info": ["info", "tiny"],
    "parity": ["parity", "tiny"],
    "generate": ["generate", "tiny"],
    "trace": ["trace", "tiny"],
    "train": TRAIN[:1] + ["tiny"] + TRAIN[2:],
}
MALFORMED = [
    ("dim=[1", "override 'dim=[1': not valid YAML"),
    ("dim", "must look like field.path=value"),
    ("=3", "is not a field path"),
    ("a..b=1", "is not a field path"),
    ("dim=&a 1", "YAML anchors (&a) are not allowed"),
    ("dimm=32", "dimm"),
]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("override, message", MALFORMED)
def test_malformed_overrides_in_every_command(command, override, message, tmp_path):
    refused([*COMMANDS[command], "--set", override], message)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_non_utf8_spec_file(command, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"dim: 32\nname: \xff\xfe\n")
    args = [COMMANDS[command][0], str(bad), *COMMANDS[command][2:]]
    refused(args, "is not UTF-8 text", "save it as UTF-8")


@pytest.mark.parametrize("command", ["info", "parity", "generate", "trace"])
def test_spec_path_that_is_a_directory(command, tmp_path):
    d = tmp_path / "dir.yaml"
    d.mkdir()
    refused([command, str(d)], "is a directory")


# --------------------------------------------------------------------------- numbers out of range


@pytest.mark.parametrize("flag, value, message", [
    ("--tokens", "0", "--tokens=0 must be an integer in [1, 64]"),
    ("--tokens", "-5", "--tokens=-5 must be an integer in [1, 64]"),
    ("--loops", "0", "--loops=0 must be an integer in [1, 256]"),
    ("--loops", "-2", "--loops=-2 must be an integer in [1, 256]"),
    ("--loops", "100000", "--loops=100000 must be an integer in [1, 256]"),
])
def test_check_tokens_and_loops(w32, flag, value, message):
    refused(["check", str(w32), flag, value], message)


def test_parity_seed_negative():
    refused(["parity", "tiny", "--seed", "-1"], "--seed")


def test_info_dtype_int8():
    refused(["info", "tiny", "--dtype", "int8"], "--dtype 'int8' is not allowed; allowed: float32")


def test_info_negative_loops_no_negative_flops():
    refused(["info", "tiny", "--loops", "-3"], "--loops=-3 must be an integer in [1, 256]")
    refused(["info", "tiny", "--seq", "0"], "--seq=0 must be an integer in [1, 64]")
    r = invoke("info", "tiny")  # the default --seq fits a spec whose max_seq_len is below 256
    assert r.exit_code == 0 and "(seq 64, 4 loop steps)" in flat(r.output), r.output


@pytest.mark.parametrize("args, message", [
    (["--seed", "-1"], "--seed"),
    (["--eval-loops", "-1"], "--eval-loops=-1 must be an integer in [1, 256]"),
    (["--eval-loops", "100000"], "--eval-loops=100000 must be an integer in [1, 256]"),
    (["--stop-at", "-3"], "--stop-at -3 must lie in [1, --steps=4]"),
    (["--stop-at", "0"], "--stop-at 0 must lie in [1, --steps=4]"),
    (["--lr", "inf"], "lr=inf must be a finite number"),
    (["--lr", "nan"], "lr=nan"),
    (["--weight-decay", "inf"], "--weight-decay=inf must be a finite number"),  # the message names the flag
    (["--loops-min", "1", "--loops-max", "1000"], "--loops-max=1000 must be an integer in [1, 256]"),
    (["--bptt", "0"], "--bptt=0 must be >= 1"),
    (["--difficulty", "3-1"], "difficulty '3-1' must satisfy 1 <= low <= high"),
    (["--dtype", "int8"], "dtype='int8' is not allowed"),
    (["--mesh", "data=2,data=2"], "--mesh: axis 'data' given twice"),
    (["--mesh", "batch=2"], "--mesh: unknown axis 'batch'; allowed: data, model, expert"),
    (["--mesh", "data=0"], "--mesh: data=0 must be at least 1"),
    (["--strategy", "fsdp"], "--strategy needs --mesh"),
    (["--mesh", "data=2", "--strategy", "dp+fsdp"], "dp and fsdp both use the data axis"),
    (["--mesh", "data=2", "--strategy", "tp"], "strategy tp needs mesh axis 'model'"),
    (["--mesh", "data=2,model=2", "--strategy", "dp"], "mesh axis model=2 is used by no strategy"),
    # tiny: 4 heads, 2 kv heads, 4 experts; batch 2
    (["--mesh", "model=4"], "prelude.0.attn.wk.weight: dimension 0 (kv_heads, 2 kv heads) is not divisible "
                            "by mesh axis model=4"),
    (["--mesh", "expert=8"], "dimension 0 (expert, 4 elements) is not divisible by mesh axis expert=8"),
    (["--mesh", "data=4"], "batch 2 is not divisible by the 4 batch shards of mesh data=4"),
    (["--mesh", "data=2"], "--mesh data=2 needs 2 torch ranks, this process is one of 1: run it under torchrun "
                           "--nproc-per-node 2 -m mythos train"),
    (["--mesh", "data=2", "--backend", "jax"], ("--mesh data=2 needs 2 JAX devices, JAX has 1",
                                                "XLA_FLAGS=--xla_force_host_platform_device_count=2")),
])
def test_train_arguments_are_checked_before_any_work(args, message, tmp_path, monkeypatch):
    messages = message if isinstance(message, tuple) else (message,)

    def no_work(*a, **k):
        raise AssertionError("training started before every argument was checked")

    monkeypatch.setattr(PT, "train", no_work)
    out = tmp_path / "run"
    refused([*TRAIN, "--out", str(out), *args], *messages)
    assert not out.exists()


def test_train_out_is_a_file_or_cannot_be_written(tmp_path, monkeypatch):
    monkeypatch.setattr(PT, "train", lambda *a, **k: pytest.fail("trained"))
    f = tmp_path / "afile"
    f.write_text("x")
    refused([*TRAIN, "--out", str(f)], "is a file, not a folder")
    refused([*TRAIN, "--out", str(f / "sub")], "is a file, so the folder cannot be created")
    refused([*TRAIN, "--out", "/proc/mythos-run"], "--out '/proc/mythos-run' cannot be written")
    if os.geteuid() != 0:  # root writes through permission bits
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            refused([*TRAIN, "--out", str(ro / "run")], "cannot be written")
        finally:
            ro.chmod(0o700)


# --------------------------------------------------------------------------- output paths, before the work


@pytest.fixture
def no_compare(monkeypatch):
    """parity.compare.compare that records its arguments instead of running the twins."""
    import importlib

    calls = []

    def fake(*args, **kwargs):
        calls.append(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(importlib.import_module("parity.compare"), "compare", fake)
    return calls


def test_parity_json_path_checked_before_the_run(tmp_path, no_compare):
    refused(["parity", "tiny", "--json", "/nonexistent/r.json"], "folder '/nonexistent' does not exist")
    refused(["parity", "tiny", "--json", str(tmp_path)], "is a directory; give a file name")
    refused(["parity", "tiny", "--json", "/proc/r.json"], "--json '/proc/r.json' cannot be written")
    assert no_compare == []  # refused before any work
    assert list(tmp_path.iterdir()) == []


def test_trace_out_checked_before_the_forward(tmp_path, monkeypatch):
    from mythos import trace as tr

    monkeypatch.setattr(tr, "run_trace", lambda *a, **k: pytest.fail("traced before checking --out"))
    f = tmp_path / "f"
    f.write_text("x")
    refused(["trace", "tiny", *TINY258, "--out", str(f)], "is a file, not a folder")
    refused(["trace", "tiny", *TINY258, "--out", "/proc/trace-out"], "cannot be written")


def test_convert_out_checked_before_reading(w32, tmp_path):
    refused(["convert", str(w32), str(tmp_path)], "it is a directory; give a file name")
    refused(["convert", str(w32), str(tmp_path / "missing" / "o.safetensors")], "does not exist")
    refused(["convert", str(w32), "/proc/o.safetensors"], "cannot write /proc/o.safetensors")
    refused(["convert", str(tmp_path), str(tmp_path / "o.safetensors")], "is a directory, not a weights file")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the new parity options


def test_parity_defaults_and_verdict_options(no_compare):
    invoke("parity", "bench-s-gqa")
    assert no_compare[-1]["weights"] == "probe" and no_compare[-1]["both_directions"] is True
    assert no_compare[-1]["n_loops"] is None  # probe mode: compare runs max_loop_iters + 2
    assert no_compare[-1]["allow_near_ties"] is None and no_compare[-1]["allow_nonfinite"] is False
    invoke("parity", "tiny", "--weights", "init", "--one-direction", "--allow-near-ties", "--allow-nonfinite",
           "--loops", "3")
    got = no_compare[-1]
    assert (got["weights"], got["both_directions"], got["allow_near_ties"], got["allow_nonfinite"], got["n_loops"]) == (
        "init", False, True, True, 3)
    refused(["parity", "tiny", "--weights", "random"], "--weights 'random' is not allowed; allowed: probe, init")
    refused(["parity", "tiny", "--loops", "0"], "--loops=0 must be an integer in [1, 256]")
    refused(["parity", "tiny", "--seq", "65"], "--seq=65 must be an integer in [1, 64]")


# --------------------------------------------------------------------------- training: checkpoints and failures


def test_train_on_corrupt_truncated_or_missing_checkpoint_files(tmp_path):
    out = tmp_path / "run"
    assert invoke(*TRAIN, "--out", str(out), "--stop-at", "2").exit_code == 0
    ckpt = out / "step-000002"
    state = ckpt / "optimizer.safetensors"
    raw = state.read_bytes()
    flipped = bytearray(raw)
    flipped[-20] ^= 0x40  # one exponent-ish bit of the last moment tensor
    state.write_bytes(bytes(flipped))
    refused([*TRAIN, "--out", str(out)], f"cannot resume from {ckpt}", str(state), "checksum mismatch",
            f"delete {ckpt} to resume from the checkpoint before it")
    state.write_bytes(raw[: len(raw) // 2])
    refused([*TRAIN, "--out", str(out)], str(state), "truncated")
    state.write_bytes(raw)
    weights = ckpt / "weights.safetensors"
    wraw = weights.read_bytes()
    weights.unlink()
    refused([*TRAIN, "--out", str(out)], f"cannot resume from {ckpt}", "weights.safetensors")
    weights.write_bytes(wraw[:4000])
    refused([*TRAIN, "--out", str(out)], str(weights), "truncated")
    weights.write_bytes(wraw)
    assert invoke(*TRAIN, "--out", str(out)).exit_code == 0  # repaired: resumes and finishes


def test_optimizer_state_bit_flip_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "optimizer.safetensors"
    write_state(path, {"step": np.asarray(3, dtype=np.int64), "exp_avg/w": np.arange(8.0)}, {"step": 3})
    arrays, meta = read_state(path)
    assert meta == {"step": 3} and int(arrays["step"]) == 3
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(wb.BridgeError, match="optimizer.safetensors"):
        read_state(path)


def test_diverged_training_exits_1_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    text = refused([*TRAIN, "--out", str(out), "--checkpoint-every", "1", "--lr", "1e30"],
                   "training diverged at step 1", "Largest gradient norm:", "the last good checkpoint",
                   "step-000001", code=1)
    assert "lr 1e+30" in text
    assert [s for s, _ in PT.checkpoints(out)] == [1]
    wb.load(out / "step-000001" / "weights.safetensors", backend="torch")  # intact, and it loads
    read_state(out / "step-000001" / "optimizer.safetensors")
    logged = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert logged == [0]  # the diverged step is not logged as if it were a good one


def test_no_resume_keeps_the_old_run_until_the_first_new_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert invoke(*TRAIN, "--out", str(out), "--stop-at", "2").exit_code == 0
    old = (out / "step-000002" / "weights.safetensors").read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # killed before the new run's first checkpoint

    monkeypatch.setattr(PT, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        PT.train(PT.Run(S.preset("tiny"), PT.TrainConfig(steps=4, batch_size=2, warmup_steps=1, lr=3e-3), "modadd",
                        (2, 3), "torch"), out, resume=False)
    aside = [p for p in out.iterdir() if p.name.startswith("replaced-")]
    assert len(aside) == 1 and (aside[0] / "step-000002" / "weights.safetensors").read_bytes() == old
    assert (aside[0] / "log.jsonl").is_file()
    monkeypatch.undo()
    r = invoke(*TRAIN, "--out", str(out), "--no-resume", "--lr", "0.002")
    assert r.exit_code == 0, r.output
    assert "the old run is kept in" in flat(r.output)
    assert [p.name for p in out.iterdir() if p.name.startswith("replaced-")] == [aside[0].name]  # the killed one
    assert [s for s, _ in PT.checkpoints(out)] == [4]


def test_leftovers_of_interrupted_writes_are_removed(tmp_path):
    out = tmp_path / "run"
    assert invoke(*TRAIN, "--out", str(out), "--stop-at", "2").exit_code == 0
    pid = dead_pid()
    junk = [out / ".step-000004.tmp", out / "step-000002" / f".weights.safetensors.{pid}.0123abcd.tmp",
            out / f".log.jsonl.{pid}.89abcdef.tmp"]
    junk[0].mkdir()
    (junk[0] / "weights.safetensors").write_bytes(b"partial")
    for p in junk[1:]:
        p.write_bytes(b"partial")
    alive = out / "step-000002" / f".weights.safetensors.{os.getpid()}.fedcba98.tmp"  # a write in progress
    alive.write_bytes(b"in progress")
    r = invoke(*TRAIN, "--out", str(out))
    assert r.exit_code == 0, r.output
    assert not any(p.exists() for p in junk) and alive.exists()
    assert "leftover" in flat(r.output)


def test_convert_removes_a_killed_converts_temporary_file(w32, tmp_path):
    out = tmp_path / "o.safetensors"
    stale = tmp_path / f".o.safetensors.{dead_pid()}.0123abcd.tmp"
    stale.write_bytes(b"\0" * 1000)
    other = tmp_path / f".other.safetensors.{dead_pid()}.0123abcd.tmp"  # another file's: not ours to touch
    other.write_bytes(b"x")
    r = wconvert.convert(w32, out)
    assert not stale.exists() and other.exists() and r.removed == (stale,)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, other.name])


def test_resume_truncates_the_log_to_the_resumed_step(tmp_path):
    out = tmp_path / "run"
    assert invoke(*TRAIN, "--out", str(out), "--checkpoint-every", "2", "--stop-at", "3").exit_code == 0
    # as if killed after step 2's log line: the log holds steps 0, 1, 2, the newest checkpoint is step 2
    import shutil

    shutil.rmtree(out / "step-000003")
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.0')  # a line cut by the kill
    r = invoke(*TRAIN, "--out", str(out), "--checkpoint-every", "2")
    assert r.exit_code == 0, r.output
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3], steps


def test_checkpoint_spec_is_read_as_text_and_diffs_are_named(tmp_path):
    run = PT.Run(S.preset("tiny"), PT.TrainConfig(steps=2, batch_size=2, warmup_steps=1), "modadd", (2, 3), "torch")
    PT.train(run, tmp_path, stop_at=1)
    other = PT.Run(S.preset("tiny", {"dim": 64, "dense_hidden": 128}), run.cfg, "modadd", (2, 3), "torch")
    with pytest.raises(PT.TrainError, match="dim checkpoint 32 vs 64"):
        PT.train(other, tmp_path)


# --------------------------------------------------------------------------- unbounded work


def test_generate_and_trace_loop_counts_are_bounded(tmp_path):
    refused(["generate", "tiny", *TINY258, "--loops", "100000"], "--loops=100000 must be an integer in [1, 256]")
    refused(["trace", "tiny", *TINY258, "--n-loops", "100000", "--out", str(tmp_path / "t")],
            "--n-loops=100000 must be an integer in [1, 256]")
    refused(["generate", "tiny", *TINY258, "--max-new-tokens", "100"],
            "plus --max-new-tokens 100 is 101 tokens, more than the spec's max_seq_len=64", "at most 63 new tokens")
    assert not (tmp_path / "t").exists()


# --------------------------------------------------------------------------- what generate shows


def test_generate_names_tokens_that_are_not_bytes():
    r = invoke("generate", "tiny", "--set", "vocab_size=300", "--max-new-tokens", "6")
    assert r.exit_code == 0, r.output
    text = flat(r.output)
    assert "of the 6 new tokens are not bytes" in text, r.output


def test_prompt_is_echoed_without_terminal_escapes():
    r = invoke("generate", "tiny", *TINY258, "--max-new-tokens", "0", "--prompt", "hi\x1b[31mred\x07")
    assert r.exit_code == 0, r.output
    assert "\x1b[31m" not in r.output and "\x07" not in r.output
    assert "hi\\x1b[31mred\\x07" in r.output
    assert shown("a\tb\nc\x1b\u202e") == "a\tb\nc\\x1b\\u202e"


# --------------------------------------------------------------------------- float64 files, in a fresh process


def mythos(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*MYTHOS, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200", "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_check_a_float64_file_in_a_fresh_process(w64, backend):
    p = mythos("check", str(w64), "--backend", backend)
    assert p.returncode == 0 and "PASS" in p.stdout, p.stdout + p.stderr
    assert "Traceback" not in p.stderr


def test_convert_to_float64_checks_its_own_output(w32, tmp_path):
    out = tmp_path / "o64.safetensors"
    p = mythos("convert", str(w32), str(out), "--dtype", "float64")
    assert p.returncode == 0 and "PASS" in p.stdout and "float64" in p.stdout, p.stdout + p.stderr
    assert wb.read_spec(out)[1] == "float64"


def test_generate_a_float64_file_with_jax_in_a_fresh_process(w64):
    p = mythos("generate", str(w64), "--backend", "jax", "--max-new-tokens", "3", "--prompt", "a")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "set_parity_precision" not in p.stdout + p.stderr and "new tokens" in p.stdout
