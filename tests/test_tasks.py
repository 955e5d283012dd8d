"""mythos/tasks.py: batches are deterministic, answers are right (checked by decoding the inputs
independently), the difficulty knob changes what it says, exact match counts whole rows."""

from __future__ import annotations

import numpy as np
import pytest

from mythos.tasks import (ModularAddition, PointerChase, answer_index, exact_match, get_task, make_batch,
                          parse_difficulty, position_accuracy)

TASKS = ["pointer", "modadd", "parity", "pparity"]


@pytest.mark.parametrize("name", TASKS)
def test_batches_depend_only_on_seed_and_step(name):
    task = get_task(name)
    a, b = make_batch(task, 3, 7, 16, (1, 4)), make_batch(task, 3, 7, 16, (1, 4))
    for f in ("ids", "targets", "mask", "difficulty"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    c = make_batch(task, 3, 8, 16, (1, 4))
    d = make_batch(task, 4, 7, 16, (1, 4))
    assert not np.array_equal(a.ids, c.ids) and not np.array_equal(a.ids, d.ids)


def test_pointer_answers_follow_the_edges():
    task = PointerChase()
    M = task.n_nodes
    b = make_batch(task, 0, 0, 64, (1, 6))
    for ids, tgt, mask, d in zip(b.ids, b.targets, b.mask, b.difficulty):
        # decode the edge tokens back into a table, independently of the generator
        edges = ids[:M] - M
        table = {int(e) // M: int(e) % M for e in edges}
        assert sorted(table) == list(range(M)), "one edge per source node"
        assert sorted(table.values()) == list(range(M)), "a permutation"
        x = int(ids[M])
        assert 0 <= x < M
        answers = tgt[mask]
        assert len(answers) == d and (ids[mask] == task.query_id).all()
        for j in range(d):
            x = table[x]
            assert answers[j] == x
        assert (ids[M + 1 + d:] == task.pad_id).all() and not mask[M + 1 + d:].any()


def test_modadd_and_parity_answers():
    add = ModularAddition(modulus=7)
    b = make_batch(add, 1, 2, 32, (2, 5))
    for ids, tgt, mask, d in zip(b.ids, b.targets, b.mask, b.difficulty):
        digits = ids[0:2 * d:2]
        assert len(digits) == d and (digits < 7).all()
        assert mask.sum() == d and ids[2 * d - 1] == 8  # "=" is modulus + 1
        assert tgt[2 * d - 1] == sum(int(x) for x in digits) % 7
        assert [int(t) for t in tgt[mask]] == [sum(int(x) for x in digits[:j + 1]) % 7 for j in range(d)]
    par = get_task("parity")
    b = make_batch(par, 1, 2, 32, (3, 9))
    for ids, tgt, mask, d in zip(b.ids, b.targets, b.mask, b.difficulty):
        bits = ids[:d]
        assert set(bits.tolist()) <= {0, 1} and ids[d] == 2
        assert tgt[mask][0] == sum(bits.tolist()) % 2


@pytest.mark.parametrize("name", TASKS)
def test_difficulty_knob(name):
    task = get_task(name)
    fixed = make_batch(task, 0, 0, 32, 5)
    assert (fixed.difficulty == 5).all() and fixed.ids.shape == (32, task.seq_len(5))
    assert (fixed.ids != task.pad_id).all()  # one difficulty: no padding
    ranged = make_batch(task, 0, 0, 256, (2, 6))
    assert set(ranged.difficulty.tolist()) == {2, 3, 4, 5, 6}
    assert ranged.ids.shape[1] == task.seq_len(6) > task.seq_len(2)
    for ids, d in zip(ranged.ids, ranged.difficulty):
        n = task.seq_len(int(d))
        assert (ids[:n] != task.pad_id).all() and (ids[n:] == task.pad_id).all()
        assert ids.max() < task.vocab_size


def test_exact_match_counts_whole_rows_on_answers_only():
    task = get_task("pointer")
    b = make_batch(task, 0, 0, 8, 3)
    pred = np.where(b.mask, b.targets, 0)  # right answers, junk elsewhere
    assert exact_match(pred, b).all()
    rows, cols = np.nonzero(b.mask)
    pred[rows[0], cols[0]] = (pred[rows[0], cols[0]] + 1) % task.n_nodes  # one wrong answer in row rows[0]
    em = exact_match(pred, b)
    assert not em[rows[0]] and em.sum() == 7


def test_parse_difficulty():
    assert parse_difficulty("4") == (4, 4) and parse_difficulty("1-4") == (1, 4) and parse_difficulty(3) == (3, 3)
    for bad in ("0", "4-2", "x"):
        with pytest.raises(ValueError, match="difficulty"):
            parse_difficulty(bad)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        get_task("nope")


def test_pparity_answers_are_prefix_parities():
    task = get_task("pparity")
    assert task.vocab_size == 4 and task.seq_len(20) == 21
    b = make_batch(task, 5, 1, 64, (1, 12))
    for ids, tgt, mask, d in zip(b.ids, b.targets, b.mask, b.difficulty):
        d = int(d)
        assert ids[0] == task.bos_id and not mask[0]
        bits = [int(x) for x in ids[1:d + 1]]
        assert set(bits) <= {0, 1} and (ids[d + 1:] == task.pad_id).all()
        assert mask[1:d + 1].all() and mask.sum() == d  # one answer per bit, none on BOS or pads
        running = 0
        for i, bit in enumerate(bits, start=1):  # an independent loop, not cumsum
            running ^= bit
            assert tgt[i] == running, (i, bits)
    # not a constant: both answers occur at every position that has rows
    assert set(b.targets[:, 6][b.mask[:, 6]].tolist()) == {0, 1}


def test_position_accuracy_scores_the_jth_answer_over_rows_that_have_it():
    task = get_task("pparity")
    b = make_batch(task, 0, 3, 8, (2, 4))
    j = answer_index(b.mask)
    assert (j[~b.mask] == -1).all() and all(sorted(r[r >= 0].tolist()) == list(range(int(d)))
                                            for r, d in zip(j, b.difficulty))
    pred = b.targets.copy()
    np.testing.assert_array_equal(position_accuracy(pred, b.targets, b.mask), np.ones(int(b.difficulty.max())))
    # wrong at the last answer of every row: index j is wrong in the rows whose last answer it is
    last = np.array([int(d) - 1 for d in b.difficulty])
    pred[np.arange(8), last + 1] ^= 1
    acc = position_accuracy(pred, b.targets, b.mask)
    for jj in range(int(b.difficulty.max())):
        has = b.difficulty > jj
        assert acc[jj] == pytest.approx(1 - (last[has] == jj).mean())
    assert not exact_match(pred, b).any()
    # leading axes: a stack of predictions is scored step by step
    both = np.stack([b.targets, pred])
    np.testing.assert_array_equal(position_accuracy(both, b.targets, b.mask)[1], acc)
    with pytest.raises(ValueError, match="predictions"):
        position_accuracy(pred[:, :-1], b.targets, b.mask)
