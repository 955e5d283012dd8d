"""`mythos eval-task` and mythos.eval_task (issue #14): every step's numbers from one pass of step-wise logits
equal independent forwards stopped at that step (mythos.train.evaluate's batches and predict), the model's own
halting equals the ordinary inference forward, the twins give the same numbers for one checkpoint, the
checkpoint forms load, and bad input exits 2 with a message."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import spec as S
from mythos import stopping as ST
from mythos import train as PT
from mythos.cli import app
from mythos.eval_task import eval_difficulties, eval_task, find_weights, parse_steps
from mythos.load import LoadError
from mythos.tasks import exact_match, get_task, make_batch, position_accuracy
from spec.training import TrainConfig

# a dense looped block, no depth LoRA, room for 8 bits of pparity
BASE = {"vocab_size": 4, "max_seq_len": 9, "recurrent.ffn": "dense", "recurrent.lora_rank": 0,
        "recurrent.max_loop_iters": 3}
D, EXAMPLES = 3, 40  # 3 bits: a barely trained model still gets whole rows right


def spec_of(mode: str) -> S.Spec:
    return S.preset("tiny", overrides={**BASE, "halting.mode": mode})


@pytest.fixture(scope="module", params=["last", "act"])
def run_dir(request, tmp_path_factory):
    """A `mythos train` run directory: 30 pparity steps in float64 with the loops tied to the difficulty."""
    out = tmp_path_factory.mktemp(f"run-{request.param}")
    cfg = TrainConfig(steps=30, batch_size=8, lr=1e-2, warmup_steps=1, loop_plan="difficulty", dtype="float64")
    PT.train(PT.Run(spec_of(request.param), cfg, "pparity", (1, 3), "torch"), out, checkpoint_every=15)
    return out


def test_checkpoint_forms(run_dir, tmp_path):
    newest = run_dir / "step-000030" / "weights.safetensors"
    assert find_weights(run_dir) == newest  # a run directory: its newest checkpoint (step 15 is kept too)
    assert find_weights(run_dir / "step-000015") == run_dir / "step-000015" / "weights.safetensors"
    assert find_weights(newest) == newest
    with pytest.raises(LoadError, match="does not exist"):
        find_weights(tmp_path / "nope")
    with pytest.raises(LoadError, match="does not exist"):
        find_weights(tmp_path / "nope.safetensors")
    with pytest.raises(LoadError, match="holds no step-"):
        find_weights(tmp_path)


def test_parse_steps():
    assert parse_steps("10,22") == (10, 22) and parse_steps("3-5,1") == (1, 3, 4, 5) and parse_steps([2, 2]) == (2,)
    for bad in ("0", "x", "5-2", "1,,2"):
        with pytest.raises(ValueError, match="--steps"):
            parse_steps(bad)


def test_every_step_equals_a_forward_stopped_there(run_dir):
    from mythos.load import load_model

    model = load_model(find_weights(run_dir), "torch")
    mode = model.spec.halting.mode
    N = 6
    r = eval_task(model=model, task="pparity", difficulty=D, steps="1-6", backend="torch", n_examples=EXAMPLES,
                  stop=("max_confidence", "kl:1e-3", "cumulative:0.5", "fixed:4"), n_loops=N, batch_size=16)
    assert r["n_loops"] == N and len(r["exact_match"]) == N and np.shape(r["position_accuracy"]) == (N, D)
    task = get_task("pparity")
    batches = [make_batch(task, 10 ** 6, D * 1000 + i // 16, min(16, EXAMPLES - i), D) for i in range(0, EXAMPLES, 16)]
    tgt, mask = np.concatenate([b.targets for b in batches]), np.concatenate([b.mask for b in batches])
    if mode == "last":  # the readout of an n_loops=t forward is step t's logits
        for t in range(1, N + 1):
            pred = np.concatenate([PT.predict("torch", model, b.ids, t)[0] for b in batches])
            assert r["exact_match"][t - 1] == pytest.approx(((pred == tgt) | ~mask).all(1).mean(), abs=1e-12)
            np.testing.assert_allclose(r["position_accuracy"][t - 1], position_accuracy(pred, tgt, mask))
            assert r["exact_match"][t - 1] == pytest.approx(
                PT.evaluate("torch", model, task, D, t, n_examples=EXAMPLES, batch_size=16)["exact_match"])
        assert r["own_halting"] is None
    else:  # act: the model's own readout is the ordinary inference forward's (early exit)
        want = PT.evaluate("torch", model, task, D, N, n_examples=EXAMPLES, batch_size=16)
        assert r["own_halting"]["exact_match"] == pytest.approx(want["exact_match"], abs=1e-12)
        assert r["own_halting"]["mean_loops"] == pytest.approx(want["mean_loops"], rel=1e-12)
    em = np.asarray(r["exact_match"])
    assert 0 < em.max() and r["best_exact_match"] == em.max() and em[r["best_step"] - 1] == em.max()
    assert r["steps"]["4"]["exact_match"] == em[3]
    fx = r["stopping"]["fixed:4"]
    assert fx["mean_step"] == 4 and fx["exact_match"] == em[3] and fx["best_fixed_exact_match"] == em.max()
    for rule in ("max_confidence", "kl:1e-3", "cumulative:0.5"):
        x = r["stopping"][rule]
        assert 1 <= x["min_step"] <= x["mean_step"] <= x["max_step"] <= N
        if x["min_step"] == x["max_step"]:  # one step for every row: that step's exact match
            assert x["exact_match"] == em[x["min_step"] - 1]


def test_the_rules_are_applied_to_the_same_pass(run_dir):
    """max_confidence recomputed from the step logits of an independent forward picks the same steps."""
    from mythos.load import load_model
    from weights_bridge import backends

    model = load_model(find_weights(run_dir), "torch")
    task = get_task("pparity")
    b = make_batch(task, 10 ** 6, D * 1000, 16, D)
    out = backends.forward("torch", model, b.ids, 5, early_exit=False, step_logits=True)
    z = backends.to_numpy(out.step_logits).astype(np.float64)
    steps = ST.max_confidence(z, b.mask)
    correct = ST.sweep(z, b.targets, b.mask)
    r = eval_task(model=model, task="pparity", difficulty=D, steps="1-5", backend="torch", n_examples=16,
                  stop=("max_confidence",), n_loops=5)
    assert r["stopping"]["max_confidence"]["mean_step"] == pytest.approx(steps.mean())
    assert r["stopping"]["max_confidence"]["exact_match"] == pytest.approx(correct[steps - 1, np.arange(16)].mean())
    np.testing.assert_allclose(r["exact_match"], correct.mean(1))


def test_the_jax_twin_gives_the_same_numbers(run_dir):
    kw = dict(task="pparity", difficulty=D, steps="1-4", n_examples=16, n_loops=4, dtype="float64",
              stop=("max_confidence", "kl:1e-2", "cumulative:0.5"))
    a, b = eval_task(run_dir, backend="torch", **kw), eval_task(run_dir, backend="jax", **kw)
    for key in ("exact_match", "position_accuracy", "best_step", "stopping", "own_halting"):
        assert a[key] == b[key], key


def test_eval_difficulties_loads_once_and_sweeps(run_dir):
    rs = eval_difficulties(run_dir, "2-3", backend="torch", task="pparity", steps=(1, 2), n_examples=8, n_loops=3,
                           stop=())
    assert [r["difficulty"] for r in rs] == [2, 3] and all(np.shape(r["position_accuracy"]) == (3, r["difficulty"])
                                                           for r in rs)


def test_mythos_eval_task_prints_tables_and_writes_json(run_dir, tmp_path):
    out = tmp_path / "r.json"
    args = ["eval-task", str(run_dir), "--task", "pparity", "--difficulty", str(D), "--steps", "2,4", "--examples",
            "16", "--loops", "5", "--stop", "max_confidence,kl:1e-3,cumulative:0.9", "--json", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "exact match" in text and "stopping rules" in text and "max_confidence" in text
    saved = json.loads(out.read_text())
    assert saved["difficulty"] == D and len(saved["exact_match"]) == 5 and set(saved["steps"]) == {"2", "4"}
    r = CliRunner().invoke(app, args[:-2] + ["--difficulty", "2-3"])
    assert r.exit_code == 0 and "by difficulty" in r.output, r.output


@pytest.mark.parametrize("extra, match", [
    (["--task", "nope"], "unknown task 'nope'"),
    (["--difficulty", "9"], "--difficulty 9 needs 10 positions"),
    (["--steps", "0"], "--steps"),
    (["--steps", "4", "--loops", "2"], "exceeds --loops 2"),
    (["--stop", "often"], "unknown rule 'often'"),
    (["--backend", "mxnet"], "--backend 'mxnet' is not allowed"),
])
def test_mythos_eval_task_refuses_bad_input(run_dir, extra, match):
    r = CliRunner().invoke(app, ["eval-task", str(run_dir), "--examples", "4", "--difficulty", "2"] + extra)
    assert r.exit_code == 2, r.output
    assert match in " ".join(r.output.split()) and "Traceback" not in r.output, r.output


def test_mythos_eval_task_refuses_a_missing_checkpoint(tmp_path):
    r = CliRunner().invoke(app, ["eval-task", str(tmp_path / "gone")])
    assert r.exit_code == 2 and "does not exist" in r.output, r.output
