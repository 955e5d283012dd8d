"""Synthetic reasoning tasks, generated here (nothing to download), each with a difficulty knob.

NumPy only, so both twins train on the same batches: `make_batch(task, seed, step, batch_size,
difficulty)` depends on nothing but its arguments. Every task has its own small vocabulary (a spec
needs vocab_size >= task.vocab_size); sequences of a batch are right-padded with `task.pad_id`
(causal attention: padding after a sequence never changes it). The loss and the metric use the
answer positions only (`mask`); exact match = every answer position of an example predicted right.

| task | an example (difficulty d) | answers |
|---|---|---|
| `pointer` | M edge tokens "x->f(x)" of a random permutation f of M nodes, shuffled; a start node s; d query tokens | query j: f^j(s) (k-hop pointer chasing, one hop per query) |
| `modadd` | d digits in 0..p-1 separated by "+", then "=" | after digit j (at its "+", or "="): the sum of digits 1..j mod p; the last answer is the whole sum |
| `parity` | d bits, then "=" | at "=": their parity (XOR) |
| `pparity` | BOS, then d bits (tokens 0 and 1) | at bit i: the parity of bits 1..i (prefix parity, one answer per bit; exact match = all d right) |

    >>> from mythos.tasks import get_task, make_batch
    >>> task = get_task("pointer")                       # 8 nodes: vocab 74
    >>> b = make_batch(task, seed=0, step=0, batch_size=4, difficulty=(1, 4))   # hops drawn in 1..4 per row
    >>> b.ids.shape, b.targets.shape, b.mask.shape       # (4, T) each, T = task.seq_len(4)

`pparity` is the depth task (issue #14): answer i needs the parity of i bits, so a model whose attention
sees a bounded window must carry it along one step per position (its difficulty is depth, not length).
`position_accuracy` scores answer index j (the j-th answer of a row) over the rows that have one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Batch:
    ids: np.ndarray  # (B, T) int64 inputs
    targets: np.ndarray  # (B, T) int64, the answer at answer positions (pad_id elsewhere)
    mask: np.ndarray  # (B, T) bool, answer positions
    difficulty: np.ndarray  # (B,) int64, the difficulty of each row


@dataclass(frozen=True)
class PointerChase:
    """k-hop pointer chasing over a random permutation of n_nodes nodes; difficulty = hops k."""
    n_nodes: int = 8
    name: str = "pointer"

    @property
    def vocab_size(self) -> int:
        return self.n_nodes + self.n_nodes ** 2 + 2  # nodes, edges, query, pad

    @property
    def query_id(self) -> int:
        return self.n_nodes + self.n_nodes ** 2

    @property
    def pad_id(self) -> int:
        return self.query_id + 1

    def seq_len(self, difficulty: int) -> int:
        return self.n_nodes + 1 + difficulty

    def example(self, rng: np.random.Generator, d: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids (seq_len(d),), targets with -1 off the answers)."""
        M = self.n_nodes
        f = rng.permutation(M)
        edges = M + np.arange(M) * M + f  # edge token of x -> f(x)
        s = int(rng.integers(M))
        ids = np.concatenate([rng.permutation(edges), [s], np.full(d, self.query_id)])
        targets = np.full(ids.shape, -1)
        x = s
        for j in range(d):
            x = int(f[x])
            targets[M + 1 + j] = x
        return ids, targets


@dataclass(frozen=True)
class ModularAddition:
    """Sum of d digits modulo `modulus`, answered as running sums; difficulty = number of operands d."""
    modulus: int = 10
    name: str = "modadd"

    @property
    def vocab_size(self) -> int:
        return self.modulus + 3  # digits, "+", "=", pad

    @property
    def pad_id(self) -> int:
        return self.modulus + 2

    def seq_len(self, difficulty: int) -> int:
        return 2 * difficulty

    def example(self, rng: np.random.Generator, d: int) -> tuple[np.ndarray, np.ndarray]:
        p = self.modulus
        a = rng.integers(0, p, d)
        ids = np.empty(2 * d, dtype=np.int64)
        ids[0::2] = a
        ids[1::2] = p  # "+"
        ids[-1] = p + 1  # "="
        targets = np.full(ids.shape, -1)
        targets[1::2] = np.cumsum(a) % p  # the running sum after each digit; the last is the answer
        return ids, targets


@dataclass(frozen=True)
class BitParity:
    """Parity of d random bits; difficulty = number of bits d."""
    name: str = "parity"

    @property
    def vocab_size(self) -> int:
        return 4  # 0, 1, "=", pad

    @property
    def pad_id(self) -> int:
        return 3

    def seq_len(self, difficulty: int) -> int:
        return difficulty + 1

    def example(self, rng: np.random.Generator, d: int) -> tuple[np.ndarray, np.ndarray]:
        bits = rng.integers(0, 2, d)
        ids = np.concatenate([bits, [2]])
        targets = np.full(ids.shape, -1)
        targets[-1] = int(bits.sum() % 2)
        return ids, targets


@dataclass(frozen=True)
class PrefixParity:
    """Prefix parity: BOS then d random bits; after bit i, the parity of bits 1..i; difficulty = bits d."""
    name: str = "pparity"

    @property
    def vocab_size(self) -> int:
        return 4  # 0, 1, BOS, pad

    @property
    def bos_id(self) -> int:
        return 2

    @property
    def pad_id(self) -> int:
        return 3

    def seq_len(self, difficulty: int) -> int:
        return difficulty + 1

    def example(self, rng: np.random.Generator, d: int) -> tuple[np.ndarray, np.ndarray]:
        bits = rng.integers(0, 2, d)
        ids = np.concatenate([[self.bos_id], bits])
        targets = np.concatenate([[-1], np.cumsum(bits) % 2])  # at bit i (position i): parity of bits 1..i
        return ids, targets


Task = PointerChase | ModularAddition | BitParity | PrefixParity
TASKS: dict[str, type] = {"pointer": PointerChase, "modadd": ModularAddition, "parity": BitParity,
                          "pparity": PrefixParity}


def get_task(name: str) -> Task:
    """A task by name (`pointer`, `modadd`, `parity`, `pparity`), with its default parameters."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return TASKS[name]()


def parse_difficulty(text: str | int | tuple[int, int]) -> tuple[int, int]:
    """"4" -> (4, 4); "1-4" -> (1, 4); a clear ValueError otherwise."""
    if isinstance(text, tuple):
        lo, hi = text
    elif isinstance(text, int):
        lo = hi = text
    else:
        try:
            lo, _, hi = str(text).partition("-")
            lo, hi = int(lo), int(hi or lo)
        except ValueError:
            raise ValueError(f"difficulty {text!r} must be an integer or a range like 1-4") from None
    if not 1 <= lo <= hi:
        raise ValueError(f"difficulty {text!r} must satisfy 1 <= low <= high")
    return int(lo), int(hi)


def make_batch(task: Task, seed: int, step: int, batch_size: int, difficulty: int | tuple[int, int] | str) -> Batch:
    """The batch of training step `step`: the same arrays for the same arguments, in any process.

    Args:
        task: from get_task.
        seed: the run's seed; step: the step (or evaluation batch) index.
        batch_size: rows B.
        difficulty: d, or (low, high): each row's difficulty drawn uniformly in low..high.
    Returns:
        Batch with ids/targets/mask (B, T), T = task.seq_len(high), rows right-padded with pad_id.
    """
    lo, hi = parse_difficulty(difficulty)
    rng = np.random.default_rng([seed, step, 0])  # stream 0: data (spec.training.loop_plan draws stream 1)
    T = task.seq_len(hi)
    ids = np.full((batch_size, T), task.pad_id, dtype=np.int64)
    targets = np.full((batch_size, T), task.pad_id, dtype=np.int64)
    mask = np.zeros((batch_size, T), dtype=bool)
    ds = rng.integers(lo, hi + 1, batch_size)
    for b, d in enumerate(ds):
        x, y = task.example(rng, int(d))
        ids[b, :len(x)] = x
        answer = y >= 0
        targets[b, :len(x)][answer] = y[answer]
        mask[b, :len(x)] = answer
    return Batch(ids, targets, mask, ds.astype(np.int64))


def exact_match(predictions: np.ndarray, batch: Batch) -> np.ndarray:
    """(B,) bool: every answer position of the row predicted right (predictions (B, T) int: argmax of the logits)."""
    right = (np.asarray(predictions) == batch.targets) | ~batch.mask
    return right.all(axis=1)


def answer_index(mask: np.ndarray) -> np.ndarray:
    """(B, T) int: j of the j-th answer position of its row (0-based, in order), -1 off the answers."""
    mask = np.asarray(mask, dtype=bool)
    return np.where(mask, np.cumsum(mask, axis=-1) - 1, -1)


def position_accuracy(predictions: np.ndarray, targets: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Accuracy at answer index j over the rows that have a j-th answer.

    Args:
        predictions: (..., B, T) int (argmax of the logits; leading axes e.g. the inference step N).
        targets, mask: (B, T), as in a Batch.
    Returns:
        (..., J) float64, J = the most answers of any row; entry j = (right j-th answers) / (rows with one).
    """
    predictions, targets, mask = np.asarray(predictions), np.asarray(targets), np.asarray(mask, dtype=bool)
    if predictions.shape[-2:] != targets.shape or targets.shape != mask.shape:
        raise ValueError(f"predictions {predictions.shape} must end in targets/mask's shape {targets.shape} "
                         f"(mask {mask.shape})")
    j = answer_index(mask)
    J = int(j.max(initial=-1)) + 1
    onehot = (j[..., None] == np.arange(J)).astype(np.float64)  # (B, T, J)
    right = (predictions == targets) & mask  # (..., B, T)
    hits = np.einsum("...bt,btj->...j", right.astype(np.float64), onehot)
    return hits / np.maximum(onehot.sum(axis=(0, 1)), 1.0)
