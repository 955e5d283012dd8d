"""mythos/stopping.py against hand-made step logits: each rule picks the step its definition says (values
computed independently, scalar by scalar), mask and direction matter, and bad rules are refused."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mythos import stopping as ST


def probs_to_logits(p: np.ndarray) -> np.ndarray:
    return np.log(np.asarray(p, dtype=np.float64))


def test_sweep_and_position_sweep_score_every_step():
    # N=3 steps, B=2 rows, T=3 positions, V=2; row 0 answers at positions 1, 2; row 1 at 0, 1, 2
    targets = np.array([[9, 1, 0], [1, 1, 0]])
    mask = np.array([[False, True, True], [True, True, True]])
    pred = np.array([[[0, 1, 1], [1, 0, 1]],    # step 1: row 0 wrong at 2; row 1 wrong at 1 and 2
                     [[0, 1, 0], [1, 1, 1]],    # step 2: row 0 right (position 0 is no answer); row 1 wrong at 2
                     [[1, 1, 0], [1, 1, 0]]])   # step 3: both right
    z = np.where(pred[..., None] == np.arange(2), 2.0, -1.0)  # argmax = pred
    np.testing.assert_array_equal(ST.sweep(z, targets, mask), [[False, False], [True, False], [True, True]])
    acc = ST.position_sweep(z, targets, mask)  # answer index j: row 0's j-th answer is at position j + 1
    np.testing.assert_allclose(acc, [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])


def test_confidence_is_the_mean_max_probability_over_answers():
    p = np.array([[[[0.75, 0.25], [0.4, 0.6], [0.5, 0.5]]]])  # N=1, B=1, T=3
    mask = np.array([[True, True, False]])
    np.testing.assert_allclose(ST.confidence(probs_to_logits(p), mask), [[(0.75 + 0.6) / 2]], rtol=1e-14)
    # shifting logits changes nothing (softmax), scaling does
    z = probs_to_logits(p)
    np.testing.assert_allclose(ST.confidence(z + 100.0, mask), ST.confidence(z, mask), rtol=1e-12)


def test_max_confidence_picks_the_most_confident_step():
    conf = {0: [0.6, 0.9, 0.7, 0.8], 1: [0.55, 0.6, 0.65, 0.99], 2: [0.8, 0.8, 0.7, 0.6]}  # row -> per step
    N, B = 4, 3
    p = np.zeros((N, B, 2, 2))
    for b, cs in conf.items():
        for t, c in enumerate(cs):
            p[t, b] = [[c, 1 - c], [1 - c, c]]  # both answers equally confident
    steps = ST.max_confidence(probs_to_logits(p), np.ones((B, 2), bool))
    np.testing.assert_array_equal(steps, [2, 4, 1])  # row 2: a tie between steps 1 and 2 -> the earliest


def kl_scalar(p: list[float], q: list[float]) -> float:
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q))


def test_kl_rule_stops_at_the_first_small_successive_kl():
    # row 0 converges: p_t -> [0.9, 0.1]; row 1 keeps flipping (never below); row 2's non-answer position churns
    seq0 = [[0.5, 0.5], [0.8, 0.2], [0.88, 0.12], [0.89, 0.11], [0.9, 0.1]]
    seq1 = [[0.9, 0.1], [0.1, 0.9]] * 2 + [[0.9, 0.1]]
    N = 5
    p = np.zeros((N, 3, 2, 2))
    for t in range(N):
        p[t, 0] = [seq0[t], seq0[t]]
        p[t, 1] = [seq1[t], seq1[t]]
        p[t, 2] = [seq0[t], seq1[t]]  # position 1 of row 2 is not an answer
    mask = np.array([[True, True], [True, True], [True, False]])
    z = probs_to_logits(p)
    d = ST.step_kl(z, mask)
    for t in range(1, N):
        assert d[t - 1, 0] == pytest.approx(kl_scalar(seq0[t], seq0[t - 1]), rel=1e-12)
        assert d[t - 1, 1] == pytest.approx(kl_scalar(seq1[t], seq1[t - 1]), rel=1e-12)
    eps = (kl_scalar(seq0[2], seq0[1]) + kl_scalar(seq0[3], seq0[2])) / 2  # between steps 3's and 4's KL
    assert kl_scalar(seq0[3], seq0[2]) < eps < kl_scalar(seq0[2], seq0[1])
    np.testing.assert_array_equal(ST.kl(z, mask, eps), [4, N, 4])
    np.testing.assert_array_equal(ST.kl(z, mask, 10.0), [2, 2, 2])  # everything is below: the first t >= 2


def test_kl_is_kl_of_the_new_step_against_the_old():
    # KL(p || q) and KL(q || p) differ: the rule must use p = step t, q = step t - 1
    q, p = [0.5, 0.5], [0.99, 0.01]
    forward, backward = kl_scalar(p, q), kl_scalar(q, p)
    assert forward < backward
    mask = np.ones((1, 1), bool)
    eps = (forward + backward) / 2
    z = probs_to_logits(np.array([[[q]], [[p]], [[p]]]))  # N=3, B=1, T=1: q, p, p
    assert ST.kl(z, mask, eps)[0] == 2  # KL(p || q) = forward < eps at step 2
    z_rev = probs_to_logits(np.array([[[p]], [[q]], [[q]]]))  # p, q, q
    assert ST.kl(z_rev, mask, eps)[0] == 3  # KL(q || p) = backward > eps at step 2; 0 at step 3
    assert ST.step_kl(z_rev, mask)[0, 0] == pytest.approx(backward, rel=1e-12)


def test_cumulative_takes_the_slowest_answer_of_the_row():
    # cum_p (N=4, B=2, T=3)
    c = np.array([[[0.2, 0.5, 0.0], [0.1, 0.1, 0.1]],
                  [[0.5, 0.9, 0.0], [0.2, 0.3, 0.1]],
                  [[0.9, 0.95, 0.0], [0.3, 0.4, 0.1]],
                  [[0.95, 1.0, 0.0], [0.4, 0.5, 0.1]]])
    np.testing.assert_array_equal(ST.cumulative_positions(c, 0.9), [[3, 2, 4], [4, 4, 4]])  # >= counts; none -> N
    mask = np.array([[True, True, False], [True, False, False]])  # row 0's third position never halts: ignored
    np.testing.assert_array_equal(ST.cumulative(c, mask, 0.9), [3, 4])
    np.testing.assert_array_equal(ST.cumulative(c, mask, 0.5), [2, 4])
    np.testing.assert_array_equal(ST.cumulative(c, np.ones((2, 3), bool), 0.5), [4, 4])


def test_at_steps_gathers_each_rows_step():
    z = np.arange(3 * 2 * 2 * 1, dtype=np.float64).reshape(3, 2, 2, 1)
    np.testing.assert_array_equal(ST.at_steps(z, np.array([3, 1])), np.stack([z[2, 0], z[0, 1]]))
    per_pos = ST.at_steps(z, np.array([[1, 2], [3, 3]]))
    np.testing.assert_array_equal(per_pos[:, :, 0], [[z[0, 0, 0, 0], z[1, 0, 1, 0]], [z[2, 1, 0, 0], z[2, 1, 1, 0]]])
    with pytest.raises(ValueError, match="in 1..3"):
        ST.at_steps(z, np.array([0, 1]))


def test_choose_parses_the_command_line_rules():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(5, 4, 3, 2))
    mask = rng.random((4, 3)) < 0.7
    cum = np.cumsum(rng.random((5, 4, 3)) / 3, axis=0)
    np.testing.assert_array_equal(ST.choose("fixed:3", z, mask), [3] * 4)
    np.testing.assert_array_equal(ST.choose("max_confidence", z, mask), ST.max_confidence(z, mask))
    np.testing.assert_array_equal(ST.choose("kl:1e-2", z, mask), ST.kl(z, mask, 1e-2))
    np.testing.assert_array_equal(ST.choose("cumulative:0.5", z, mask, cum), ST.cumulative(cum, mask, 0.5))
    for bad, match in [("often", "unknown rule 'often'"), ("kl", "kl needs a number"), ("kl:-1", "> 0"),
                       ("cumulative:1.5", r"\(0, 1\]"), ("fixed:2.5", "integer"), ("max_confidence:3", "no value")]:
        with pytest.raises(ValueError, match=match):
            ST.parse_rule(bad)
    with pytest.raises(ValueError, match="needs the model's halting trace"):
        ST.choose("cumulative:0.9", z, mask)
    with pytest.raises(ValueError, match="fixed step 9 must lie in 1..5"):
        ST.choose("fixed:9", z, mask)
    with pytest.raises(ValueError, match="mask"):
        ST.sweep(z, np.zeros((4, 3), int), mask[:, :2])
