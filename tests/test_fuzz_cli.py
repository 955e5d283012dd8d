"""Fuzz tier of the command line (issue 17): hypothesis-drawn arguments through the `mythos` entry points.

Asserted for every draw: the command ends with exit 0, 1 or 2 and never a traceback (only SystemExit
escapes typer's runner); a refusal (exit 2) prints one `error:` line; nothing is written on failure.
Commands that build a model get inputs that are refused before any model is built, or are run on
the tiny preset (milliseconds), so the default tier stays a few seconds; MYTHOS_FUZZ=thorough draws 20x more.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mythos.cli import app

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")

FIELDS = ["dim", "vocab_size", "attention.n_heads", "attention.type", "recurrent.max_loop_iters", "moe.top_k",
          "halting.threshold", "init.std", "norm_eps", "semantics", "nonsense", "attention", "a.b.c", ""]
VALUES = st.one_of(
    st.sampled_from(["[1", "{", "&a 1", "*a", "!!python/object:os.system", "inf", "nan", "-1", "0", "1e300",
                     "'x'", "null", "true", "gqa", "mla", "\x00", "\u202e", "32", "0.5", "[1, 2]"]),
    st.text(max_size=12),
    st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
OVERRIDES = st.builds(lambda f, sep, v: f"{f}{sep}{v}", st.sampled_from(FIELDS), st.sampled_from(["=", "", "==", " = "]),
                      VALUES)
NUMBERS = st.one_of(st.integers(-10**9, 10**9).map(str), st.sampled_from(["inf", "nan", "1e400", "x", "", "-0"]))


def run(args: list[str]):
    r = runner.invoke(app, args)
    assert r.exception is None or isinstance(r.exception, SystemExit), (
        f"a traceback for {args!r}: {type(r.exception).__name__}: {r.exception}\n{r.output}")
    assert r.exit_code in (0, 1, 2), (args, r.exit_code, r.output)
    assert "Traceback" not in r.output, r.output
    return r


def _settings(n: int):
    return settings(max_examples=n * (20 if os.environ.get("MYTHOS_FUZZ") == "thorough" else 1), deadline=None)


@_settings(40)
@given(sets=st.lists(OVERRIDES, min_size=1, max_size=3))
def test_info_with_drawn_overrides(sets):
    run(["info", "tiny", *[a for s in sets for a in ("--set", s)]])


@_settings(30)
@given(loops=NUMBERS, seq=NUMBERS, dtype=st.sampled_from(["float32", "bfloat16", "int8", "", "float64x"]))
def test_info_with_drawn_numbers(loops, seq, dtype):
    run(["info", "tiny", "--loops", loops, "--seq", seq, "--dtype", dtype])


@_settings(25)
@given(seed=NUMBERS, seq=NUMBERS, loops=NUMBERS, dtype=st.sampled_from(["float16", "int8", "fp32", ""]),
       weights=st.sampled_from(["probe", "init", "random", ""]))
def test_parity_refuses_drawn_arguments_before_any_work(seed, seq, loops, dtype, weights, tmp_path_factory):
    """A bad --dtype always: the command must refuse (exit 2) before it builds a model, whatever else is drawn."""
    out = tmp_path_factory.mktemp("p") / "r.json"
    r = run(["parity", "tiny", "--seed", seed, "--seq", seq, "--loops", loops, "--dtype", dtype,
             "--weights", weights, "--json", str(out)])
    assert r.exit_code == 2 and not out.exists(), r.output


@_settings(25)
@given(sets=st.lists(OVERRIDES, min_size=1, max_size=2), tokens=NUMBERS, temperature=NUMBERS)
def test_generate_with_drawn_arguments(sets, tokens, temperature):
    run(["generate", "tiny", "--set", "vocab_size=258", *[a for s in sets for a in ("--set", s)],
         "--prompt", "hi", "--max-new-tokens", tokens, "--temperature", temperature, "--backend", "torch"])


@_settings(20)
@given(data=st.binary(min_size=0, max_size=2048))
def test_check_and_generate_on_drawn_files(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "w.safetensors"
    path.write_bytes(data)
    for args in (["check", str(path)], ["generate", str(path), "--prompt", "x", "--max-new-tokens", "1"]):
        r = run(args)
        assert r.exit_code == 2, (args, r.output)


SMALL = st.one_of(st.integers(-3, 6).map(str), st.sampled_from(["inf", "nan", "x", "", "1-3", "3-1", "0", "1e9"]))
STEPS = st.one_of(st.sampled_from(["1,2", "2", "1-3", "0", "-1", "3,x", "", ",", "1,,2", "5-2", "100000"]), st.text(max_size=6))
RULES = st.sampled_from(["max_confidence", "kl:1e-3", "cumulative:0.5", "kl:", "kl:-1", "fixed:2", "fixed:99",
                         "fixed:x", "nope", ""])


@_settings(25)
@given(difficulty=SMALL, steps=STEPS, stop=RULES, examples=SMALL, task=st.sampled_from(["pparity", "modadd", "x"]),
       backend=st.sampled_from(["torch", "jax", "tensorflow"]))
def test_eval_task_with_drawn_arguments(difficulty, steps, stop, examples, task, backend, tmp_path_factory):
    """The shipped depth checkpoint under drawn flags: a tiny model, small difficulties, a few rows."""
    ckpt = os.path.join(os.path.dirname(__file__), "..", "examples", "depth", "checkpoints", "nope-s0.safetensors")
    out = tmp_path_factory.mktemp("e") / "r.json"
    r = run(["eval-task", ckpt, "--task", task, "--difficulty", difficulty, "--steps", steps, "--stop", stop,
             "--examples", examples, "--backend", backend, "--loops", "6", "--json", str(out)])
    assert (r.exit_code == 0) == out.exists(), r.output
