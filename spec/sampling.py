"""Host-side token choice for generate: the same float64 NumPy code serves both twins.

Keeping sampling framework-free is what makes the same seed give the same tokens in both twins
whenever their logits agree (design.md, "Decoding with a cache").
"""

from __future__ import annotations

import numbers

import numpy as np

from .schema import Spec


def sample_next(logits: np.ndarray, rng: np.random.Generator, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None) -> np.ndarray:
    """The next token of each row from its last-position logits (B, V), in float64 NumPy on the host.

    temperature 0: argmax, ties to the lower id, no random draw. Else logits / temperature, then top-k,
    then top-p (the smallest set of ids, by descending probability with ties to lower ids, whose
    probability reaches top_p), then the inverse CDF over ids in ascending order at one uniform per row
    from rng. The same code in both twins: the same seed gives the same tokens when the logits agree.
    """
    z = np.asarray(logits, dtype=np.float64)
    if temperature == 0:
        return np.argmax(z, axis=-1)
    B, V = z.shape
    z = z / temperature
    order = np.argsort(-z, axis=-1, kind="stable")  # (B, V) descending, ties to the lower id
    keep_sorted = np.ones((B, V), dtype=bool)
    if top_k is not None:
        keep_sorted[:, top_k:] = False
    keep = np.zeros((B, V), dtype=bool)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    z = np.where(keep, z, -np.inf)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p = p / p.sum(axis=-1, keepdims=True)
    if top_p is not None:
        cum = np.cumsum(np.take_along_axis(p, order, axis=-1), axis=-1)
        n_keep = np.minimum((cum < top_p).sum(axis=-1) + 1, V)  # entries before the first that reaches top_p, and it
        keep = np.zeros((B, V), dtype=bool)
        np.put_along_axis(keep, order, np.arange(V)[None, :] < n_keep[:, None], axis=-1)
        p = np.where(keep, p, 0.0)
    cdf = np.cumsum(p, axis=-1)
    u = rng.random(B)  # one uniform per row per step
    return np.minimum((cdf <= (u * cdf[:, -1])[:, None]).sum(axis=-1), V - 1)  # first id with cdf > u * total


def check_generate(s: Spec, T: int, max_new_tokens: int, temperature: float, top_k: int | None,
                    top_p: float | None, seed: int, eos_id: int | None) -> None:
    """generate's arguments, checked before any work, or a clear ValueError."""
    def is_int(x: object) -> bool:
        return isinstance(x, numbers.Integral) and not isinstance(x, bool)

    if not is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    if T + max_new_tokens > s.max_seq_len:
        raise ValueError(f"the prompt's {T} tokens + max_new_tokens={max_new_tokens} = {T + max_new_tokens} "
                         f"positions exceed max_seq_len={s.max_seq_len}")
    if not isinstance(temperature, numbers.Real) or not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0: greedy)")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be an integer >= 1 or None")
    if top_p is not None and (not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} must lie in (0, 1] or be None")
    if not is_int(seed) or seed < 0:
        raise ValueError(f"seed={seed!r} must be an integer >= 0")
    if eos_id is not None and (not is_int(eos_id) or not 0 <= eos_id < s.vocab_size):
        raise ValueError(f"eos_id={eos_id!r} must be a token id in [0, vocab_size={s.vocab_size}) or None")


def check_stop(stop: object, vocab_size: int) -> tuple[tuple[int, ...], ...]:
    """generate's `stop` as a tuple of token-id tuples, or a clear ValueError.

    stop: None (no stop sequences), or a sequence of non-empty sequences of token ids in
    [0, vocab_size), e.g. [[10], [46, 46]]; an empty sequence means none.
    """
    if stop is None:
        return ()
    example = "e.g. stop=[[10], [46, 46]]"
    if isinstance(stop, (str, bytes)) or not isinstance(stop, (list, tuple, np.ndarray)):
        raise ValueError(f"stop must be a sequence of token-id sequences ({example}), got {type(stop).__name__}")
    out = []
    for j, seq in enumerate(stop):
        if isinstance(seq, (str, bytes)) or not isinstance(seq, (list, tuple, np.ndarray)):
            raise ValueError(f"stop must be a sequence of token-id sequences ({example}); stop[{j}]={seq!r} is "
                             "not a sequence (a single token is [id])")
        seq = list(np.asarray(seq).reshape(-1)) if isinstance(seq, np.ndarray) else list(seq)
        if not seq:
            raise ValueError(f"stop[{j}] is empty: every stop sequence needs at least one token id")
        for i in seq:
            if isinstance(i, (bool, np.bool_)) or not isinstance(i, numbers.Integral) or not 0 <= i < vocab_size:
                raise ValueError(f"stop[{j}]={seq!r}: every entry must be a token id in [0, vocab_size={vocab_size}), "
                                 f"got {i!r}")
        out.append(tuple(int(i) for i in seq))
    return tuple(out)


def ends_with_stop(new: np.ndarray, stop: tuple[tuple[int, ...], ...]) -> np.ndarray:
    """Rows whose generated tokens new (B, n) end with any of the stop sequences (check_stop's form) -> (B,) bool."""
    B, n = new.shape
    hit = np.zeros(B, dtype=bool)
    for seq in stop:
        if len(seq) <= n:
            hit |= (new[:, n - len(seq):] == np.asarray(seq)).all(axis=1)
    return hit


def finish_step(tok: np.ndarray, new: list[np.ndarray], done: np.ndarray, eos_id: int | None,
                stop: tuple[tuple[int, ...], ...]) -> tuple[np.ndarray, np.ndarray]:
    """One decode step's bookkeeping, the same in both twins: rows already done get the fill (eos_id, or -1
    without one); then a row is done once it emits eos_id or its generated tokens (new, the earlier steps'
    tokens (B,) each, then tok) end with a stop sequence (kept in the output, like eos_id).

    tok (B,) the sampled tokens, done (B,) bool -> (tok with the fill on done rows, the new done).
    """
    tok = np.where(done, -1 if eos_id is None else eos_id, tok)
    if eos_id is not None:
        done = done | (tok == eos_id)
    if stop:  # only the last max(len(seq)) tokens can end with a stop sequence
        recent = new[max(0, len(new) + 1 - max(len(seq) for seq in stop)):]
        done = done | ends_with_stop(np.stack([*recent, tok], axis=1), stop)
    return tok, done
