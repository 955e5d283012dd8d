"""Training loop plans (issue #14, spec/training.py): fixed, random, difficulty (T(d) = d + U{0..k}, one
difficulty per batch) and DeepThinking's progressive split draw what their table says, are pure functions
of (config, spec, step) (so a resumed run draws the same), keep today's draws bit for bit, load configs and
checkpoints written before the fields existed, and refuse bad combinations naming the flag."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

import spec as S
from mythos import train as PT
from mythos.checkpoints import read_state, write_state
from mythos.cli import app
from mythos.tasks import get_task
from spec.training import LoopPlan, TrainConfig, loop_plan

SPEC = S.preset("tiny", overrides={"recurrent.max_loop_iters": 6})
STEPS = range(200)


def test_defaults_keep_todays_plans_and_draws():
    assert TrainConfig().loop_plan == "fixed"
    cfg = TrainConfig(loops_min=2, loops_max=5, seed=7)
    assert cfg.loop_plan == "random"
    for step in STEPS:
        # the formula of the loop plan before loop_plan existed: stream 1 of (seed, step)
        old = int(np.random.default_rng([7, step, 1]).integers(2, 6))
        assert loop_plan(cfg, SPEC, step) == LoopPlan(old, 0, None)
        assert loop_plan(TrainConfig(), SPEC, step) == (6, 0, None)
    bptt = TrainConfig(loops_min=2, loops_max=5, bptt=3)
    assert {loop_plan(bptt, SPEC, s).no_grad_steps for s in STEPS} == {0, 1, 2}
    assert all(p.n_loops - p.no_grad_steps == min(3, p.n_loops) for p in (loop_plan(bptt, SPEC, s) for s in STEPS))


def test_old_configs_load_and_round_trip():
    old = {k: v for k, v in TrainConfig(loops_min=2, loops_max=3).to_dict().items()
           if k not in ("loop_plan", "loops_extra", "progressive_k")}
    cfg = TrainConfig.from_dict(old)
    assert (cfg.loop_plan, cfg.loops_extra, cfg.progressive_k) == ("random", 0, None)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    plan = TrainConfig(loop_plan="difficulty", loops_extra=2)
    assert TrainConfig.from_dict(plan.to_dict()) == plan


def test_difficulty_plan_ties_the_loops_to_one_difficulty_per_batch():
    cfg = TrainConfig(loop_plan="difficulty", loops_extra=2, seed=3)
    plans = [loop_plan(cfg, SPEC, s, (1, 10)) for s in STEPS]
    assert plans == [loop_plan(cfg, SPEC, s, (1, 10)) for s in STEPS]  # pure: the same again (resume)
    assert {p.difficulty for p in plans} == set(range(1, 11))
    assert {p.n_loops - p.difficulty for p in plans} == {0, 1, 2}
    assert all(p.no_grad_steps == 0 for p in plans)
    assert len({(p.difficulty, p.n_loops) for p in plans}) > 20  # the extra steps vary within a difficulty
    assert plans != [loop_plan(TrainConfig(loop_plan="difficulty", loops_extra=2, seed=4), SPEC, s, (1, 10))
                     for s in STEPS]
    exact = TrainConfig(loop_plan="difficulty")
    assert all(p.n_loops == p.difficulty for p in (loop_plan(exact, SPEC, s, (3, 5)) for s in STEPS))
    with pytest.raises(ValueError, match="difficulty range"):
        loop_plan(cfg, SPEC, 0)
    # the batch of a step has that one difficulty: every row, and the sequence length of d
    run = PT.Run(SPEC, cfg, "pparity", (1, 10), "torch")
    task = get_task("pparity")
    for step in range(5):
        b, n, k = PT.step_batch(run, task, step)
        p = loop_plan(cfg, SPEC, step, (1, 10))
        assert (b.difficulty == p.difficulty).all() and b.ids.shape == (cfg.batch_size, task.seq_len(p.difficulty))
        assert (n, k) == (p.n_loops, 0)


@pytest.mark.parametrize("cfg, N", [(TrainConfig(loop_plan="progressive", progressive_k=2), lambda p: 6),
                                    (TrainConfig(loop_plan="difficulty", loops_extra=1, progressive_k=3),
                                     lambda p: None)])
def test_progressive_runs_some_steps_without_gradient_then_k_with(cfg, N):
    plans = [loop_plan(cfg, SPEC, s, (2, 8)) for s in STEPS]
    k = cfg.progressive_k
    for p in plans:
        assert p.n_loops - p.no_grad_steps == k or (p.no_grad_steps == 0 and p.n_loops < k)
        if N(p) is not None:  # fixed N: n ~ U{0..N-k}
            assert 0 <= p.no_grad_steps <= N(p) - k
    frees = {p.no_grad_steps for p in plans}
    if cfg.loop_plan == "progressive":
        assert frees == {0, 1, 2, 3, 4}
    else:  # N = d + U{0..1} <= 9: n in 0..N-k, the most 6
        assert frees == set(range(0, 7)) and {p.difficulty for p in plans} == set(range(2, 9))
        assert all(p.n_loops <= p.difficulty + 1 for p in plans)


@pytest.mark.parametrize("kwargs, match", [
    (dict(loop_plan="sometimes"), "loop_plan='sometimes' is not allowed; allowed: fixed, random"),
    (dict(loop_plan="random"), "loop_plan 'random' needs loops_min and loops_max"),
    (dict(loop_plan="difficulty", loops_min=1, loops_max=2), "loops_min=1, loops_max=2 draw the loop count"),
    (dict(loops_extra=2), "loops_extra=2 applies to loop_plan 'difficulty' only"),
    (dict(loop_plan="difficulty", loops_extra=-1), "loops_extra=-1 must be an integer >= 0"),
    (dict(loop_plan="progressive"), "loop_plan 'progressive' needs progressive_k"),
    (dict(progressive_k=0), "progressive_k=0 must be an integer >= 1"),
    (dict(progressive_k=2, bptt=2), "progressive_k=2 and bptt=2: give one"),
])
def test_bad_plans_are_refused_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_check_run_bounds_the_plan_by_the_spec():
    with pytest.raises(PT.TrainError, match="difficulty high \\+ loops_extra=309 must be an integer in"):
        PT.check_run(PT.Run(SPEC, TrainConfig(loop_plan="difficulty", loops_extra=300), "pparity", (1, 9), "torch"),
                     get_task("pparity"))
    with pytest.raises(PT.TrainError, match="progressive_k=7 must be <= the most loop steps"):
        PT.check_run(PT.Run(SPEC, TrainConfig(loop_plan="progressive", progressive_k=7), "pparity", (1, 9), "torch"),
                     get_task("pparity"))


def test_a_difficulty_run_resumes_bitwise_and_an_old_checkpoint_resumes(tmp_path):
    cfg = TrainConfig(steps=4, batch_size=2, warmup_steps=1, loop_plan="difficulty", loops_extra=1, dtype="float64")
    run = PT.Run(SPEC, cfg, "pparity", (1, 4), "torch")
    whole = PT.train(run, None)
    PT.train(run, tmp_path, stop_at=2)
    # a checkpoint written before the new fields: its stored config lacks them (and uses the default plan)
    old_run = PT.Run(SPEC, TrainConfig(steps=4, batch_size=2, warmup_steps=1, dtype="float64"), "pparity", (1, 4),
                     "torch")
    PT.train(old_run, tmp_path / "old", stop_at=1)
    state = PT.checkpoints(tmp_path / "old")[-1][1] / "optimizer.safetensors"
    arrays, meta = read_state(state)
    meta["config"] = {k: v for k, v in meta["config"].items() if k not in ("loop_plan", "loops_extra", "progressive_k")}
    write_state(state, arrays, meta)
    assert PT.train(old_run, tmp_path / "old", stop_at=2).step == 2  # resumed, not refused
    with pytest.raises(PT.TrainError, match="loop_plan checkpoint 'fixed' vs 'difficulty'"):
        PT.train(PT.Run(SPEC, cfg, "pparity", (1, 4), "torch"), tmp_path / "old")
    resumed = PT.train(run, tmp_path)
    import mythos_torch as mt

    A, B = mt.dump_arrays(whole.model), mt.dump_arrays(resumed.model)
    assert all(np.array_equal(A[k], B[k]) for k in A)
    logged = [__import__("json").loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [(x["n_loops"], x["tokens"]) for x in logged] == [
        (p.n_loops, 2 * (p.difficulty + 1)) for p in (loop_plan(cfg, SPEC, s, (1, 4)) for s in range(4))]


@pytest.mark.parametrize("args, match", [
    (["--loop-plan", "often"], "--loop-plan='often' is not allowed"),
    (["--loop-plan", "difficulty", "--loops-extra", "-2"], "--loops-extra=-2 must be an integer >= 0"),
    (["--loops-extra", "2"], "--loops-extra=2 applies to --loop-plan 'difficulty' only"),
    (["--loop-plan", "progressive"], "--loop-plan 'progressive' needs --progressive-k"),
    (["--progressive-k", "2", "--bptt", "2"], "--progressive-k=2 and --bptt=2: give one"),
    (["--loop-plan", "progressive", "--progressive-k", "9"], "--progressive-k=9 must be"),
])
def test_mythos_train_refuses_bad_plan_flags(args, match):
    r = CliRunner().invoke(app, ["train", "tiny", "--task", "pparity", "--steps", "1"] + args)
    assert r.exit_code == 2, r.output
    assert match in " ".join(r.output.split()), r.output
    assert "Traceback" not in r.output
