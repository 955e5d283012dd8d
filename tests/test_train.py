"""Training (issue #6): the twins take the same optimizer steps (float64, 20 steps, 1e-9 relative, with
randomised loop counts and, once the models take no_grad_steps, truncated backpropagation); resuming
from a checkpoint gives the uninterrupted run's weights bit for bit; checkpoints are atomic and refuse
another run; the schedule and the clipping match torch's formulas; `mythos train` runs."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import mythos_jax as mj
import mythos_torch as mt
import spec as S
import weights_bridge as wb
from mythos_jax import train as JT
from mythos_torch import train as TT
from mythos import train as PT
from mythos.cli import app
from mythos.tasks import get_task, make_batch
from mythos.checkpoints import read_state, write_state
from spec.training import TrainConfig, loop_plan, lr_factor

# tiny (MoE, LoRA, LTI, ACT) with the ponder and entropy terms on; modadd rows of 2..4 operands (T = 8)
SPEC = S.preset("tiny", overrides={"loss.ponder": 0.01, "loss.halting_entropy": 0.01})
TASK, DIFFICULTY = "modadd", (2, 4)
# loop counts drawn per batch in 2..3; with truncated backprop the first n - 2 steps run without gradient
CFG = TrainConfig(steps=20, batch_size=2, lr=3e-3, warmup_steps=4, weight_decay=0.1, grad_clip=1.0, loops_min=2,
                  loops_max=3, bptt=2, seed=0, dtype="float64")


def batches(cfg: TrainConfig, steps: range):
    task = get_task(TASK)
    for step in steps:
        b = make_batch(task, cfg.seed, step, cfg.batch_size, DIFFICULTY)
        yield b, loop_plan(cfg, SPEC, step)[:2]  # (n_loops, no_grad_steps); per-row difficulties


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to max |a| of the tensor."""
    scale = float(np.abs(a).max())
    return float(np.abs(a - b).max()) / (scale if scale > 0 else 1.0)


@pytest.fixture(scope="module")
def twenty_steps():
    pt, jx = mt.build(SPEC, seed=0, dtype="float64"), mj.build(SPEC, seed=0, dtype="float64")
    init = mt.dump_arrays(pt)
    tt, jt = TT.Trainer(pt, CFG), JT.Trainer(jx, CFG)
    log = []
    for b, (n, k) in batches(CFG, range(CFG.steps)):
        log.append((TT.train_step(tt, b.ids, b.targets, b.mask, n, k), JT.train_step(jt, b.ids, b.targets, b.mask, n, k)))
    return init, tt, jt, log


def test_twenty_float64_steps_agree_between_the_twins(twenty_steps):
    init, tt, jt, log = twenty_steps
    loops = {r.n_loops for r, _ in log}
    assert loops == {2, 3}, f"the draw should exercise both loop counts, got {loops}"
    for step, (a, b) in enumerate(log):
        assert (a.n_loops, a.no_grad_steps) == (b.n_loops, b.no_grad_steps)
        assert abs(a.loss - b.loss) <= 1e-10 * abs(a.loss), (step, a.loss, b.loss)
        assert a.parts["loops"] == b.parts["loops"], step  # the same ACT decisions
        assert abs(a.grad_norm - b.grad_norm) <= 1e-10 * a.grad_norm
        assert abs(a.lr - b.lr) <= 1e-15 * a.lr
    A, B = mt.dump_arrays(tt.model), mj.dump_arrays(jt.model)
    errs = {k: rel(A[k], B[k]) for k in A}
    worst = max(errs, key=errs.get)
    print(f"parameters after 20 steps: worst relative error {errs[worst]:.2e} ({worst}), "
          f"mean {np.mean(list(errs.values())):.2e}")
    assert errs[worst] < 1e-9
    # the steps did something: every trainable tensor moved, and the router bias was updated
    moved = [k for k in A if not np.array_equal(A[k], init[k])]
    assert len(moved) == len(A), sorted(set(A) - set(moved))
    bias = A["recurrent.block.ffn.router_bias"]
    np.testing.assert_array_equal(bias, B["recurrent.block.ffn.router_bias"])
    assert np.abs(bias).max() > 0 and np.allclose(bias / SPEC.moe.bias_update_rate, np.round(bias / SPEC.moe.bias_update_rate))
    # Adam's moments agree too
    oa, ob = TT.optimizer_arrays(tt), JT.optimizer_arrays(jt)
    assert sorted(oa) == sorted(ob) and int(oa["step"]) == int(ob["step"]) == 20
    assert max(rel(oa[k], ob[k]) for k in oa if k != "step") < 1e-9


def test_truncated_backprop_changes_the_gradient():
    b, _ = next(batches(CFG, range(1)))
    grads = {}
    for k in (0, 2):
        m = mt.build(SPEC, seed=0, dtype="float64")
        out = m(torch.from_numpy(b.ids), 3, early_exit=False, no_grad_steps=k)
        mt.total_loss(SPEC, out, torch.from_numpy(b.targets), torch.from_numpy(b.mask))[0].backward()
        grads[k] = m.recurrent.block.attn.wq.weight.grad.clone()
    assert not torch.allclose(grads[0], grads[2])


def test_schedule_is_the_same_in_torch_jax_and_the_reference():
    cfg = TrainConfig(steps=30, lr=2e-3, warmup_steps=5, min_lr_ratio=0.1)
    model = mt.build(SPEC, seed=0, dtype="float64")
    opt, sched, _ = TT.make_optimizer(model, cfg)
    torch_lrs = []
    for _ in range(cfg.steps):
        torch_lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    jax_lrs = [float(JT.schedule(cfg)(jnp.int32(s))) for s in range(cfg.steps)]
    ref = [cfg.lr * lr_factor(cfg, s) for s in range(cfg.steps)]
    np.testing.assert_allclose(torch_lrs, ref, rtol=1e-15)
    np.testing.assert_allclose(jax_lrs, ref, rtol=1e-14)
    # by hand: warmup 1/5 .. 5/5 of the peak, the peak right after, min_lr at the end of the run
    assert ref[0] == pytest.approx(2e-3 / 5) and ref[4] == pytest.approx(2e-3) and ref[5] == pytest.approx(2e-3)
    assert ref[-1] == pytest.approx(2e-4 + 1.8e-3 * 0.5 * (1 + math.cos(math.pi * 24 / 25)))


@pytest.mark.parametrize("scale", [0.01, 100.0])
def test_clipping_matches_torch_clip_grad_norm(scale):
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=s) * scale for s in ((3, 4), (5,), (2, 2, 2))]
    params = [torch.zeros(a.shape, dtype=torch.float64, requires_grad=True) for a in arrays]
    for p, a in zip(params, arrays):
        p.grad = torch.from_numpy(a.copy())
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    tx = JT.clip_by_global_norm(1.0)
    clipped, _ = tx.update([jnp.asarray(a) for a in arrays], tx.init(None))
    for p, c in zip(params, clipped):
        np.testing.assert_allclose(np.asarray(c), p.grad.numpy(), rtol=1e-14, atol=0)
    norm = math.sqrt(sum(float((a ** 2).sum()) for a in arrays))
    want = min(1.0, 1.0 / (norm + 1e-6))  # by hand: torch's coefficient, 1e-6 included
    np.testing.assert_allclose(params[0].grad.numpy(), arrays[0] * want, rtol=1e-14)


def test_weight_decay_is_on_matrices_only():
    model = mt.build(SPEC, seed=0, dtype="float64")
    opt, _, names = TT.make_optimizer(model, TrainConfig())
    decay = {n for n, p in zip(names, opt.param_groups[0]["params"])}
    assert "embed.weight" in decay and "recurrent.block.ffn.experts.gate" in decay
    assert "recurrent.injection.log_A" not in decay and "norm.weight" not in decay
    jx = mj.build(SPEC, seed=0, dtype="float64")
    tx = JT.make_optimizer(TrainConfig())
    # the optax mask, read back by path: the same set as torch's decay group
    from flax import nnx
    _, params, _ = nnx.split(jx, nnx.Param, ...)
    mask = jax.tree.map(lambda p: p.ndim >= 2, params)
    jax_decay = {k for k, v in JT._flat(mask).items() if bool(v)}
    assert jax_decay == decay and tx is JT.make_optimizer(TrainConfig())


# --------------------------------------------------------------------------- checkpoints and resume


def run_of(backend: str, cfg: TrainConfig = CFG, s: S.Spec = SPEC) -> PT.Run:
    return PT.Run(s, cfg, TASK, DIFFICULTY, backend)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_resume_gives_the_uninterrupted_weights_bitwise(backend, tmp_path, twenty_steps):
    # the same config and batches as the parity run (its fixture first), so the JAX steps are compiled already
    whole = PT.train(run_of(backend), None, stop_at=6)
    PT.train(run_of(backend), tmp_path, stop_at=3)
    assert [s for s, _ in PT.checkpoints(tmp_path)] == [3]
    resumed = PT.train(run_of(backend), tmp_path, stop_at=6)
    assert resumed.step == whole.step == 6
    twin = mt if backend == "torch" else mj
    train = TT if backend == "torch" else JT
    A, B = twin.dump_arrays(whole.model), twin.dump_arrays(resumed.model)
    for k in A:
        np.testing.assert_array_equal(A[k], B[k], err_msg=k)
    oa, ob = train.optimizer_arrays(whole), train.optimizer_arrays(resumed)
    for k in oa:
        np.testing.assert_array_equal(oa[k], ob[k], err_msg=k)


def test_checkpoint_refuses_another_run(tmp_path):
    PT.train(run_of("torch"), tmp_path, stop_at=1)
    with pytest.raises(PT.TrainError, match="backend: checkpoint 'torch', this run 'jax'"):
        PT.train(run_of("jax"), tmp_path, stop_at=2)
    with pytest.raises(PT.TrainError, match="spec"):
        PT.train(run_of("torch", s=S.preset("tiny")), tmp_path, stop_at=2)
    with pytest.raises(PT.TrainError, match="lr checkpoint 0.003 vs 0.001"):
        PT.train(run_of("torch", cfg=TrainConfig(**{**CFG.to_dict(), "lr": 1e-3})), tmp_path, stop_at=2)
    # nothing was written by the refused runs
    assert [s for s, _ in PT.checkpoints(tmp_path)] == [1]


def test_checkpoints_are_atomic(tmp_path, monkeypatch):
    tr = PT.train(run_of("torch"), None, stop_at=1)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PT, "write_state", crash)
    with pytest.raises(OSError, match="disk full"):
        PT.save_checkpoint(tmp_path, run_of("torch"), tr)
    assert PT.checkpoints(tmp_path) == []  # the half-written one is not a checkpoint
    monkeypatch.undo()
    PT.save_checkpoint(tmp_path, run_of("torch"), tr)
    assert [s for s, _ in PT.checkpoints(tmp_path)] == [1]
    assert not list(tmp_path.glob(".step-*"))
    # write_state replaces a file only once the new one is complete
    path = tmp_path / "state.safetensors"
    write_state(path, {"a": np.arange(3.0)}, {"step": 1})
    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(wb.BridgeError, match="cannot write .*nothing was written"):  # the OSError, named
        write_state(path, {"a": np.arange(5.0)}, {"step": 2})
    arrays, meta = read_state(path)
    assert meta == {"step": 1} and arrays["a"].shape == (3,)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["state.safetensors"]


def test_optimizer_state_refuses_another_model():
    tr = TT.Trainer(mt.build(SPEC, seed=0, dtype="float64"), CFG)
    with pytest.raises(ValueError, match="missing 'step'"):
        TT.load_optimizer_arrays(tr, {})
    with pytest.raises(ValueError, match="missing exp_avg/embed.weight"):
        TT.load_optimizer_arrays(tr, {"step": np.asarray(3)})


# --------------------------------------------------------------------------- the command


def test_mythos_train_runs_checkpoints_and_resumes(tmp_path):
    runner = CliRunner()
    args = ["train", "tiny", "--task", "modadd", "--difficulty", "2-3", "--backend", "torch", "--steps", "4",
            "--batch-size", "4", "--warmup", "1", "--out", str(tmp_path), "--checkpoint-every", "2",
            "--eval-examples", "8"]
    r = runner.invoke(app, args + ["--stop-at", "2"])
    assert r.exit_code == 0, r.output
    assert [s for s, _ in PT.checkpoints(tmp_path)] == [2]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "exact match" in r.output and "tok/s" in r.output
    assert [s for s, _ in PT.checkpoints(tmp_path)] == [2, 4]
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(lines) == 4  # steps 0, 1, then 2, 3 after the resume
    r = runner.invoke(app, args[:-4] + ["--lr", "0.1", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "refusing to resume" in r.output
    r = runner.invoke(app, ["train", "tiny", "--task", "pointer", "--steps", "1"])
    assert r.exit_code == 2 and "vocab_size" in r.output
