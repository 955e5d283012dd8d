"""The loss helpers (issue #5): both twins against a float64 NumPy reference written here, position by
position, from ARCHITECTURE.md 4 and 5e; the ponder cost's gradient flows through R only; the total
on real model outputs is the same number in both twins."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import mythos_jax as mj
import mythos_torch as mt
import spec as S
from mythos_jax import losses as JL
from mythos_torch import losses as TL
from reference import act_reference


@pytest.fixture(scope="module")
def acts():
    rng = np.random.default_rng(0)
    N, B, T, V = 5, 3, 7, 11
    p = rng.uniform(0.02, 0.6, (N, B, T))
    _, cum, running, counts, _ = act_reference(p, 0.9, graves=True)  # Graves ACT, N = 5
    assert len(set(counts.ravel().tolist())) >= 3, "the example should halt at several different steps"
    return dict(p=p, cum=cum, running=running, counts=counts, logits=rng.normal(size=(B, T, V)) * 3,
                targets=rng.integers(0, V, (B, T)), mask=rng.random((B, T)) < 0.6,
                value_steps=rng.normal(size=(N, B, T)), values=rng.normal(size=(B, T)))


def reference(a: dict) -> dict[str, float]:
    """Every loss term by its definition, one position at a time."""
    N, B, T = a["p"].shape
    nll = []
    for b in range(B):
        for i in range(T):
            if a["mask"][b, i]:
                z = a["logits"][b, i]
                nll.append(math.log(sum(math.exp(v) for v in z)) - z[a["targets"][b, i]])
    ponder, H, cons = [], [], []
    for b in range(B):
        for i in range(T):
            n = int(a["counts"][b, i])
            before = sum(a["p"][t, b, i] for t in range(n - 1))  # c before the halting step
            ponder.append(n + 1.0 - before)
            for t in range(N):
                if a["running"][t, b, i]:
                    q = a["p"][t, b, i]
                    H.append(-q * math.log(q) - (1 - q) * math.log(1 - q))
                    cons.append((a["value_steps"][t, b, i] - a["values"][b, i]) ** 2)
    return {"ce": np.mean(nll), "ponder": np.mean(ponder), "halting_entropy": np.mean(H), "consistency": np.mean(cons)}


def twin_terms(L, to) -> dict[str, float]:
    return lambda a: {
        "ce": float(L.cross_entropy(to(a["logits"]), to(a["targets"]), to(a["mask"]))),
        "ponder": float(L.ponder_cost(to(a["cum"]), to(a["counts"]))),
        "halting_entropy": float(L.halting_entropy(to(a["p"]), to(a["running"]))),
        "consistency": float(L.consistency(to(a["value_steps"]), to(a["values"]), to(a["running"]))),
    }


@pytest.mark.parametrize("twin", ["torch", "jax"])
def test_terms_equal_the_numpy_reference(acts, twin):
    want = reference(acts)
    got = twin_terms(TL, torch.from_numpy)(acts) if twin == "torch" else twin_terms(JL, jnp.asarray)(acts)
    for k in want:
        err = abs(got[k] - want[k]) / abs(want[k])
        print(f"{twin} {k}: {got[k]:.15f} vs reference {want[k]:.15f}, rel err {err:.1e}")
        assert err < 1e-13, k


def test_ponder_gradient_flows_through_the_remainder_only(acts):
    """d ponder / d p_t = -1/(B T) for the steps before the halting step, 0 at and after it."""
    p = torch.from_numpy(acts["p"]).requires_grad_()
    running = torch.from_numpy(acts["running"])
    cum = torch.cumsum(torch.where(running, p, 0.0), dim=0)  # c after each step, differentiable
    TL.ponder_cost(cum, torch.from_numpy(acts["counts"])).backward()
    N, B, T = p.shape
    want = np.zeros((N, B, T))
    for b in range(B):
        for i in range(T):
            want[: acts["counts"][b, i] - 1, b, i] = -1.0 / (B * T)
    np.testing.assert_allclose(p.grad.numpy(), want, rtol=0, atol=1e-15)
    # the same gradient in the JAX twin
    g = jax.grad(lambda q: JL.ponder_cost(jnp.cumsum(jnp.where(acts["running"], q, 0.0), axis=0),
                                          jnp.asarray(acts["counts"])))(jnp.asarray(acts["p"]))
    np.testing.assert_allclose(np.asarray(g), want, rtol=0, atol=1e-15)


def test_consistency_does_not_move_the_anchor(acts):
    v = torch.from_numpy(acts["values"]).requires_grad_()
    vs = torch.from_numpy(acts["value_steps"]).requires_grad_()
    TL.consistency(vs, v, torch.from_numpy(acts["running"])).backward()
    assert v.grad is None or not v.grad.any()
    assert vs.grad.abs().sum() > 0
    g = jax.grad(lambda x: JL.consistency(jnp.asarray(acts["value_steps"]), x, jnp.asarray(acts["running"])))(
        jnp.asarray(acts["values"]))
    assert not np.asarray(g).any()


def test_entropy_is_finite_at_saturated_halting():
    p = np.array([[[0.0, 1.0, 0.5]]])
    running = np.ones_like(p, dtype=bool)
    t = float(TL.halting_entropy(torch.from_numpy(p), torch.from_numpy(running)))
    j = float(JL.halting_entropy(jnp.asarray(p), jnp.asarray(running)))
    assert math.isfinite(t) and abs(t - j) < 1e-15
    assert abs(t - math.log(2) / 3) < 1e-12  # the saturated entries contribute ~0


def twin_total_losses(s: S.Spec, ids: np.ndarray, targets: np.ndarray, mask: np.ndarray):
    """total_loss of both twins' float64 forwards (seed 0, 3 loop steps): torch output, torch and jax (loss, parts)."""
    pt, jx = mt.build(s, seed=0, dtype="float64"), mj.build(s, seed=0, dtype="float64")
    with torch.no_grad():
        to = pt(torch.from_numpy(ids), 3, early_exit=False)
    jo = mj.forward(jx, ids, 3, early_exit=False)
    return (to, TL.total_loss(s, to, torch.from_numpy(targets), torch.from_numpy(mask)),
            JL.total_loss(s, jo, jnp.asarray(targets), jnp.asarray(mask)))


def test_total_loss_on_model_outputs_is_equal_in_both_twins():
    s = S.preset("tiny", overrides={"loss.ponder": 0.05, "loss.halting_entropy": 0.02})
    rng = np.random.default_rng(1)
    ids = rng.integers(0, s.vocab_size, (2, 9))
    targets, mask = rng.integers(0, s.vocab_size, (2, 9)), rng.random((2, 9)) < 0.5
    to, (lt, pt_parts), (lj, pj_parts) = twin_total_losses(s, ids, targets, mask)
    assert abs(float(lt) - float(lj)) <= 1e-13 * abs(float(lt))
    for k in pt_parts:
        assert abs(float(pt_parts[k]) - float(pj_parts[k])) <= 1e-13 * max(1.0, abs(float(pt_parts[k]))), k
    # the weights of spec.loss: ce + w_p * ponder - w_h * entropy
    want = float(pt_parts["ce"]) + 0.05 * float(pt_parts["ponder"]) - 0.02 * float(pt_parts["halting_entropy"])
    assert abs(float(lt) - want) < 1e-13
    assert float(pt_parts["loops"]) == float(to.loop_counts.double().mean())


def test_consistency_in_total_loss_with_the_value_head():
    s = S.preset("tiny", overrides={"value_head.enabled": True, "loss.consistency": 0.5})
    ids = np.random.default_rng(2).integers(0, s.vocab_size, (2, 6))
    _, (lt, parts), (lj, _) = twin_total_losses(s, ids, ids, np.ones((2, 6), dtype=bool))
    assert abs(float(lt) - float(lj)) <= 1e-13 * abs(float(lt))
    assert abs(float(lt) - float(parts["ce"]) - 0.5 * float(parts["consistency"])) < 1e-13
    assert float(parts["consistency"]) > 0


def test_jax_cross_entropy_gradient_is_softmax_minus_onehot(acts):
    """The JAX cross-entropy's hand-written VJP: its gradient against the formula (softmax - onehot) times
    mask / count, computed in float64 NumPy here, and against torch's autograd through log_softmax; its value
    is the log_softmax value bit for bit (float32)."""
    logits, targets, mask = acts["logits"], acts["targets"], acts["mask"]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = (p - np.eye(logits.shape[-1])[targets]) * (mask / mask.sum())[..., None]
    g_jax = jax.grad(JL.cross_entropy)(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(g_jax), expected, rtol=1e-12, atol=1e-15)
    x = torch.tensor(logits, requires_grad=True)
    TL.cross_entropy(x, torch.tensor(targets), torch.tensor(mask)).backward()
    np.testing.assert_allclose(np.asarray(g_jax), x.grad.numpy(), rtol=1e-12, atol=1e-15)
    x32 = jnp.asarray(logits, jnp.float32)
    autodiff = -jnp.take_along_axis(jax.nn.log_softmax(x32, axis=-1), jnp.asarray(targets)[..., None], -1)[..., 0]
    assert np.array_equal(np.asarray(JL._nll(x32, jnp.asarray(targets, jnp.int32))), np.asarray(autodiff))
    steps = jnp.asarray(np.stack([logits, -logits]))  # step_nll: (N, B, T, V), the same VJP per step
    g_steps = jax.grad(lambda s: JL.step_nll(s, jnp.asarray(targets)).sum())(steps)
    onehot = np.eye(logits.shape[-1])[targets]
    q = np.exp(-logits - (-logits).max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(g_steps), np.stack([p - onehot, q - onehot]), rtol=1e-12, atol=1e-15)
