"""Left padding (`attention_mask`) and stop sequences, both twins (docs/semantics.md "Padding").

The property: every real position of a left-padded row computes what the row computes alone, unpadded:
its logits, loop counts, halting and expert choices. References are independent of the padding code:
each row run alone (torch: a (1, L) call per row; jax: the rows unpadded and right-filled in one call,
which by causality gives the same first L positions and keeps one compiled shape), the padded full
forward for the cached decode, the other twin, and NumPy recomputations of the losses and loads.

Compiling dominates JAX time, so its calls keep to few shapes: forwards (B, T) = (3, 8), and the
decode/generate prompt (3, 6) with a 16-position cache; torch draws B <= 3, T <= 10 freely.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import helpers
import spec as S
from spec.sampling import check_stop, ends_with_stop

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V = 64
# tiny (MoE + GQA) overrides by name; init std 0.2 (not 0.02), so greedy decoding varies its tokens (at
# 0.02 a tiny model repeats one token, and padding bugs would not show in generate)
BASE = {"init.std": 0.2}
CONFIGS = {
    "gqa": {**BASE, "tie_embeddings": False},
    "mla": {**BASE, "attention.type": "mla"},
    "om-mla": {**BASE, "attention.type": "mla", "semantics": "openmythos-0.5", "halting.remainder": "openmythos"},
}
TOL = {"float64": 1e-12, "float32": 2e-5}  # logits, relative to max(1, |logit|)
TIE = 1e-4  # float32: a decision this close to its threshold may flip (excused, reported)
JB, JT = 3, 8  # the JAX forward shape
P, NEW, CAP = 6, 6, 16  # decode / generate: prompt, new tokens, cache capacity (generate's for P + NEW)
LENS = [6, 2, 4]  # real tokens per row of the decode / generate prompt
FORWARD_CASES = [("torch", c, d) for c in CONFIGS for d in ("float64", "float32")] + [
    ("jax", "gqa", "float64"), ("jax", "mla", "float64"), ("jax", "gqa", "float32")]


def spec_of(config: str, **more: object) -> S.Spec:
    return S.load("tiny", overrides={**CONFIGS[config], **more})


@functools.lru_cache(maxsize=None)
def weights(config: str) -> dict[str, np.ndarray]:
    """init_arrays with the halting head x40 and its bias centred, so loop counts vary by position."""
    s = spec_of(config)
    w = S.init_arrays(s, 0)
    w["recurrent.act.halt.weight"] = w["recurrent.act.halt.weight"] * 40.0
    out = helpers.twin("torch").forward(helpers.twin("torch").build(s, 0, "float64", weights=w),
                                        np.random.default_rng(99).integers(0, V, (2, 12)), early_exit=False)
    p = np.clip(out.traces.halt_p, 1e-12, 1 - 1e-12)
    w["recurrent.act.halt.bias"] = w["recurrent.act.halt.bias"] - np.log(p / (1 - p)).mean() - 0.5
    return w


@functools.lru_cache(maxsize=None)
def model(twin_name: str, config: str, dtype: str):
    """A cached tiny model (do not mutate it)."""
    return helpers.twin(twin_name).build(spec_of(config), 0, dtype, weights=weights(config))


def left_padded(rows: list[np.ndarray], T: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """rows right-aligned in (B, T) ids (pads: random ids, which must not matter) and their 0/1 mask."""
    ids = rng.integers(0, V, (len(rows), T))
    mask = np.zeros((len(rows), T), dtype=np.int64)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = r
        mask[b, T - len(r):] = 1
    return ids, mask


def alone(twin, m, rows: list[np.ndarray], T: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """Each row's outputs unpadded: torch one (1, L) call per row; jax the rows right-filled to (B, T) in one
    call, first L positions (causal: positions < L never see the fill). Traces keep only the first L columns."""
    if twin.name == "torch":
        outs = [(twin.forward(m, r[None]), 0) for r in rows]
    else:
        filled = rng.integers(0, V, (len(rows), T))
        for b, r in enumerate(rows):
            filled[b, :len(r)] = r
        out = twin.forward(m, filled)
        outs = [(out, b) for b in range(len(rows))]
    return [{"logits": o.logits[b, :len(r)], "loop_counts": o.loop_counts[b, :len(r)], "halted": o.halted[b, :len(r)],
             "n_steps": int(o.n_steps), **{f: getattr(o.traces, f)[:, b, :len(r)] for f in
                                           ("running", "expert_idx", "cum_p", "halt_p", "router_margin")}}
            for (o, b), r in zip(outs, rows)]


def near_tie(ref: dict[str, np.ndarray], threshold: float) -> float:
    """The smallest decision margin of a row over its running steps: halting |c + p - threshold| and the router's."""
    r = ref["running"]
    if not r.any():
        return np.inf
    return float(min(np.abs(ref["cum_p"] - threshold)[r].min(), ref["router_margin"][r].min()))


def assert_row_is_alone(out, b: int, ref: dict[str, np.ndarray], dtype: str, threshold: float) -> bool:
    """Row b of a padded output (NumPy ModelOutput) against the row alone, at its real positions; pads checked
    too. False when a float32 near tie excuses the row (reported)."""
    L = len(ref["loop_counts"])
    T = out.logits.shape[1]
    pad = T - L
    assert np.isfinite(out.logits[b]).all(), "pads' logits must be finite"
    assert (out.loop_counts[b, :pad] == 0).all() and not out.halted[b, :pad].any(), "pads never run nor halt"
    assert not out.traces.running[:, b, :pad].any(), "pads never run"
    if dtype == "float32" and near_tie(ref, threshold) < TIE:
        print(f"row {b}: a float32 decision margin {near_tie(ref, threshold):.1e} < {TIE}: excused")
        return False
    got = helpers.as_float64(out.logits[b, pad:])
    want = helpers.as_float64(ref["logits"])
    err = float(np.abs(got - want).max())
    assert err <= TOL[dtype] * max(1.0, float(np.abs(want).max())), f"row {b}: max |dlogit| {err:.3e}"
    np.testing.assert_array_equal(out.loop_counts[b, pad:], ref["loop_counts"], err_msg=f"row {b} loop counts")
    np.testing.assert_array_equal(out.halted[b, pad:], ref["halted"], err_msg=f"row {b} halted")
    run = ref["running"]  # (N, L): the steps at which the row's own positions took weight
    np.testing.assert_array_equal(out.traces.running[:, b, pad:][:ref["n_steps"]], run[:ref["n_steps"]],
                                  err_msg=f"row {b} running")
    np.testing.assert_array_equal(out.traces.expert_idx[:, b, pad:][run], ref["expert_idx"][run],
                                  err_msg=f"row {b} experts")
    return True


def draw_rows(data, twin, rng: np.random.Generator) -> tuple[list[np.ndarray], int]:
    """Rows of drawn lengths (B <= 3, T <= 10; the jax twin keeps its compiled (3, 8))."""
    if twin.name == "torch":
        B, T = data.draw(st.integers(1, 3), label="B"), data.draw(st.integers(1, 10), label="T")
    else:
        B, T = JB, JT
    lens = data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B), label="lengths")
    return [rng.integers(0, V, L) for L in lens], T


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("twin,config,dtype", FORWARD_CASES, indirect=["twin"])
@settings(max_examples=5, deadline=None)
@given(data=st.data())
def test_padded_forward_rows_equal_each_row_alone(twin, config, dtype, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    m = model(twin.name, config, dtype)
    rows, T = draw_rows(data, twin, rng)
    ids, mask = left_padded(rows, T, rng)
    out = twin.forward(m, ids, attention_mask=mask)
    refs = alone(twin, m, rows, T, rng)
    for b, ref in enumerate(refs):
        assert_row_is_alone(out, b, ref, dtype, m.spec.halting.threshold)
    if twin.name == "torch":  # pads never keep the loop alive: it runs as long as the longest-running row alone
        assert int(out.n_steps) == max(r["n_steps"] for r in refs)


@pytest.mark.parametrize("twin", ["torch", "jax"], indirect=True)
def test_an_all_ones_mask_is_the_unpadded_model_bit_for_bit(twin):
    m = model(twin.name, "gqa", "float64")
    ids = np.random.default_rng(1).integers(0, V, (JB, JT))
    a, b = twin.forward(m, ids), twin.forward(m, ids, attention_mask=np.ones((JB, JT), dtype=bool))
    np.testing.assert_array_equal(a.logits, b.logits)
    np.testing.assert_array_equal(a.traces.halt_p, b.traces.halt_p)
    np.testing.assert_array_equal(a.loop_counts, b.loop_counts)


@pytest.mark.parametrize("config", ["gqa", "mla"])
def test_twins_agree_on_a_padded_batch(config):
    rng = np.random.default_rng(3)
    ids, mask = left_padded([rng.integers(0, V, L) for L in (8, 3, 5)], JT, rng)
    t, j = (helpers.twin(n).forward(model(n, config, "float64"), ids, attention_mask=mask) for n in ("torch", "jax"))
    real = mask.astype(bool)
    err = helpers.report(f"{config} padded logits torch vs jax", t.logits[real], j.logits[real])
    assert err <= 1e-12 * max(1.0, float(np.abs(t.logits[real]).max()))
    assert np.isfinite(j.logits).all() and np.isfinite(t.logits).all()
    np.testing.assert_array_equal(t.loop_counts, j.loop_counts)
    np.testing.assert_array_equal(t.halted, j.halted)
    np.testing.assert_array_equal(t.traces.running, j.traces.running)
    run = t.traces.running
    np.testing.assert_array_equal(t.traces.expert_idx[run], j.traces.expert_idx[run])
    assert int(t.n_steps) == int(j.n_steps)


@pytest.mark.parametrize("twin", ["torch", "jax"], indirect=True)
def test_pads_never_run_and_count_in_no_load_or_loss(twin):
    """expert_load of a padded batch is the sum of its rows' loads alone; ponder cost, halting entropy and
    the mean loop count are the means over the real positions alone (NumPy from the rows' outputs)."""
    rng = np.random.default_rng(4)
    m = model(twin.name, "gqa", "float64")
    rows = [rng.integers(0, V, L) for L in (8, 3, 5)]
    ids, mask = left_padded(rows, JT, rng)
    out = twin.forward(m, ids, attention_mask=mask, early_exit=False)
    refs = alone(twin, m, rows, JT, rng)
    pkg, arr, E = twin.pkg, twin.array, m.spec.moe.n_experts
    assert not out.traces.running[:, ~mask.astype(bool)].any() and (out.loop_counts[mask == 0] == 0).all()
    load = helpers.to_numpy(pkg.expert_load(arr(out.traces.expert_idx), arr(out.traces.running), E))
    want = sum(np.bincount(r["expert_idx"][r["running"]].reshape(-1), minlength=E) for r in refs)
    np.testing.assert_array_equal(load, want)
    # the losses over real positions only: count + R (R = 1 - c before the halting step), H(p) at running steps
    counts = np.concatenate([r["loop_counts"] for r in refs])
    c_before = [np.concatenate([np.zeros((1, len(r["loop_counts"]))), r["cum_p"][:-1]]) for r in refs]
    R = np.concatenate([1 - cb[r["loop_counts"] - 1, np.arange(len(r["loop_counts"]))]
                        for cb, r in zip(c_before, refs)])
    eps = np.finfo(np.float64).eps  # H(p) of p clipped into [eps, 1 - eps], as the loss (a saturated p is 1.0)
    p = np.clip(np.concatenate([r["halt_p"][r["running"]] for r in refs]), eps, 1 - eps)
    H = -(p * np.log(p) + (1 - p) * np.log1p(-p))
    ponder = float(helpers.to_numpy(pkg.ponder_cost(arr(out.traces.cum_p), arr(out.loop_counts))))
    entropy = float(helpers.to_numpy(pkg.halting_entropy(arr(out.traces.halt_p), arr(out.traces.running))))
    np.testing.assert_allclose([ponder, entropy], [np.mean(counts + R), H.mean()], rtol=1e-12)
    as_twin = type(out)(arr(out.logits), arr(out.loop_counts), arr(out.halted), out.n_steps,
                        type(out.traces)(*(arr(x) for x in out.traces)))
    _, parts = pkg.total_loss(m.spec, as_twin, arr(ids), arr(mask.astype(bool)))
    np.testing.assert_allclose(float(helpers.to_numpy(parts["loops"])), counts.mean(), rtol=1e-12)


# ----------------------------------------------------------------------------- cache and generate


def padded_prompt(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return left_padded([rng.integers(0, V, L) for L in LENS], P, rng)


def cached_call(twin, m, ids: np.ndarray, cache, start_pos: int, mask: np.ndarray | None):
    """One forward with a cache -> (NumPy logits, loop counts, the updated cache)."""
    kw = {} if mask is None else {"attention_mask": twin.array(mask)}
    if twin.name == "torch":
        with torch.no_grad():
            out = twin.pkg.forward(m, torch.from_numpy(ids), cache=cache, start_pos=start_pos, **kw)
    else:
        out = twin.pkg.forward(m, ids, cache=cache, start_pos=start_pos, **kw)
    return helpers.as_float64(out.logits), helpers.to_numpy(out.loop_counts), out.cache


@pytest.mark.parametrize("twin,config", [("torch", "gqa"), ("torch", "mla"), ("torch", "om-mla"), ("jax", "gqa"),
                                         ("jax", "mla")], indirect=["twin"])
def test_cached_decode_with_padding_equals_the_padded_full_forward(twin, config):
    """A padded prefill, a warm 3-token chunk (HF-style mask of start_pos + T columns), then one token at a
    time (mask omitted, then passed): every call equals those columns of the padded full forward."""
    m = model(twin.name, config, "float64")
    prompt, mask = padded_prompt(0)
    ids = np.concatenate([prompt, np.random.default_rng(1).integers(0, V, (len(LENS), 6))], axis=1)  # (3, 12)
    full_mask = np.concatenate([mask, np.ones((len(LENS), 6), dtype=np.int64)], axis=1)
    ref = twin.forward(m, ids, attention_mask=full_mask)
    cache = m.init_cache(len(LENS), CAP)
    calls = [(0, P, mask), (P, P + 3, full_mask[:, :P + 3]), (9, 10, None), (10, 11, full_mask[:, :11]), (11, 12, None)]
    for a, b, msk in calls:
        logits, counts, cache = cached_call(twin, m, ids[:, a:b], cache, a, msk)
        real = full_mask[:, a:b].astype(bool)
        err = float(np.abs(logits - ref.logits[:, a:b])[real].max())
        assert err <= 1e-10, f"positions {a}..{b - 1}: max |dlogit| {err:.3e}"
        np.testing.assert_array_equal(counts, ref.loop_counts[:, a:b], err_msg=f"positions {a}..{b - 1}")
    np.testing.assert_array_equal(helpers.to_numpy(cache.pad), P - np.array(LENS))


def generate(twin, m, prompt: np.ndarray, n: int, **kw) -> np.ndarray:
    kw = {k: twin.array(v) for k, v in kw.items()}
    if twin.name == "torch":
        return m.generate(torch.from_numpy(prompt), n, **kw).numpy()
    return np.asarray(m.generate(prompt, n, **kw))


def test_padded_greedy_generate_rows_equal_each_row_alone():
    """torch: each padded row's greedy tokens equal the row's own generate; jax: its padded generate equals
    torch's rows alone (the JAX row-alone runs would each compile a new prompt shape)."""
    prompt, mask = padded_prompt(2)
    tt, jt = helpers.twin("torch"), helpers.twin("jax")
    got = {t.name: generate(t, model(t.name, "gqa", "float64"), prompt, NEW, attention_mask=mask) for t in (tt, jt)}
    for b, L in enumerate(LENS):
        solo = generate(tt, model("torch", "gqa", "float64"), prompt[b:b + 1, P - L:], NEW)[0]
        for name, toks in got.items():
            np.testing.assert_array_equal(toks[b, P - L:], solo, err_msg=f"{name} row {b}")


# ----------------------------------------------------------------------------- refusals and bad masks


@pytest.mark.parametrize("twin", ["torch", "jax"], indirect=True)
def test_the_compressor_refuses_padding(twin):
    s = spec_of("gqa", **{"recurrent.compressor.enabled": True, "recurrent.compressor.chunk": 2})
    m = twin.build(s, 0, "float64")
    prompt, mask = padded_prompt(3)
    with pytest.raises(ValueError, match=r"refused by recurrent\.compressor"):
        twin.forward(m, prompt, attention_mask=mask)
    with pytest.raises(ValueError, match=r"refused by recurrent\.compressor"):
        generate(twin, m, prompt, 2, attention_mask=mask)
    if twin.name == "torch":  # an unpadded mask is no padding: accepted, the unpadded model
        ones = twin.forward(m, prompt, attention_mask=np.ones_like(mask))
        np.testing.assert_array_equal(ones.logits, twin.forward(m, prompt).logits)


@pytest.mark.parametrize("twin", ["torch", "jax"], indirect=True)
def test_bad_masks_are_clear_errors_before_any_work(twin, monkeypatch):
    m = model(twin.name, "gqa", "float64")
    prompt, mask = padded_prompt(0)
    bad = {
        "right-padded": (np.array([[1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [1] * 6]), r"row 1 is not left-padded"),
        "all-zero row": (np.array([[1] * 6, [0] * 6, [1] * 6]), r"row 1 is all zeros"),
        "wrong shape": (np.ones((3, 5), dtype=np.int64), r"shape \(B, start_pos \+ T\) = \(3, 6\)"),
        "not 0/1": (np.array([[1] * 6, [0, 0, 2, 2, 2, 2], [1] * 6]), r"0/1 values"),
        "float": (np.ones((3, 6)), r"bool or integer"),
    }
    for name, (msk, msg) in bad.items():
        with pytest.raises(ValueError, match=msg):
            twin.forward(m, prompt, attention_mask=msk)
    # a decode call whose mask disagrees with the cache's prefill
    cache = m.init_cache(3, CAP)
    _, _, cache = cached_call(twin, m, prompt, cache, 0, mask)
    other = mask.copy()
    other[2, 2] = 0  # row 2: 3 leading zeros, its prefill had 2
    for msk, msg in [(np.concatenate([other, np.ones((3, 1), np.int64)], 1), r"disagrees with the cache: row 2"),
                     (np.concatenate([mask, [[1], [0], [1]]], 1), r"row 1 is not left-padded")]:
        with pytest.raises(ValueError, match=msg):
            cached_call(twin, m, prompt[:, :1], cache, P, msk)
    # generate checks the mask and stop before running the model
    if twin.name == "torch":
        monkeypatch.setattr(m, "_forward", lambda *a, **k: pytest.fail("generate ran the model"))
    else:
        monkeypatch.setattr(twin.pkg.generate, "_cached_forward", lambda *a: pytest.fail("generate ran the model"))
    with pytest.raises(ValueError, match=r"row 1 is not left-padded"):
        generate(twin, m, prompt, 2, attention_mask=bad["right-padded"][0])
    for stop, msg in [([10, 46], r"stop\[0\]=10 is not a sequence"), ([[]], r"stop\[0\] is empty"),
                      ([[3], [V]], r"stop\[1\]=\[64\]: every entry must be a token id in \[0, vocab_size=64\)"),
                      ("ab", "stop must be a sequence of token-id sequences")]:
        with pytest.raises(ValueError, match=msg):
            generate(twin, m, prompt, 2, stop=stop)


# ----------------------------------------------------------------------------- stop sequences


def expected_stop(greedy_new: np.ndarray, stop: list[list[int]], fill: int, eos_id: int | None
                  ) -> tuple[np.ndarray, list[int]]:
    """Each row's new tokens cut after the first point where they end with a stop sequence (or eos_id), then
    fill; and the steps each row needs (the stop's, or all)."""
    out = greedy_new.copy()
    steps = []
    for row in out:
        steps.append(len(row))
        for k in range(len(row)):
            tail = [int(x) for x in row[:k + 1]]
            if any(tail[-len(s):] == s for s in stop if len(s) <= k + 1) or row[k] == eos_id:
                row[k + 1:] = fill
                steps[-1] = k + 1
                break
    return out, steps


@functools.lru_cache(maxsize=None)
def stop_run(twin_name: str, stop: tuple[tuple[int, ...], ...], eos_id: int | None) -> tuple[np.ndarray, int]:
    """(generate's output, number of on_token calls) for the padded prompt (cached for the cross-twin check)."""
    twin = helpers.twin(twin_name)
    prompt, mask = padded_prompt(2)
    calls: list[np.ndarray] = []
    out = generate(twin, model(twin_name, "gqa", "float64"), prompt, NEW, attention_mask=mask, eos_id=eos_id,
                   stop=[list(s) for s in stop], on_token=calls.append)
    return out, len(calls)


@pytest.mark.parametrize("twin", ["torch", "jax"], indirect=True)
def test_stop_sequences_stop_the_right_rows(twin):
    prompt, mask = padded_prompt(2)
    greedy = generate(twin, model(twin.name, "gqa", "float64"), prompt, NEW, attention_mask=mask)[:, P:]
    # row 0 stops at its 3rd new token (one token); row 1 at its 2nd-3rd (two tokens); row 2 only if it meets them
    stop = ((int(greedy[0, 2]),), (int(greedy[1, 1]), int(greedy[1, 2])))
    for eos_id in (None, int(greedy[2, 4])):
        out, n_calls = stop_run(twin.name, stop, eos_id)
        fill = -1 if eos_id is None else eos_id
        want, steps = expected_stop(greedy, [list(s) for s in stop], fill, eos_id)
        np.testing.assert_array_equal(out[:, :P], prompt)
        np.testing.assert_array_equal(out[:, P:], want)
        assert steps[0] <= 3 and steps[1] <= 3, "rows 0 and 1 must stop by step 3"
        assert n_calls == max(steps), (n_calls, steps)  # decoding ends once every row is done


def test_stop_outputs_identical_across_twins():
    prompt, mask = padded_prompt(2)
    greedy = generate(helpers.twin("torch"), model("torch", "gqa", "float64"), prompt, NEW, attention_mask=mask)[:, P:]
    stop = ((int(greedy[0, 2]),), (int(greedy[1, 1]), int(greedy[1, 2])))
    for eos_id in (None, int(greedy[2, 4])):
        np.testing.assert_array_equal(stop_run("torch", stop, eos_id)[0], stop_run("jax", stop, eos_id)[0])


def test_stop_helpers():
    assert check_stop(None, V) == () and check_stop([], V) == ()
    assert check_stop([[10], (46, 46), np.array([1, 2])], V) == ((10,), (46, 46), (1, 2))
    new = np.array([[1, 46, 46], [46, 46, 1], [5, 6, 10]])
    np.testing.assert_array_equal(ends_with_stop(new, ((10,), (46, 46))), [True, False, True])
    np.testing.assert_array_equal(ends_with_stop(new[:, :1], ((46, 46),)), [False, False, False])  # too short
    with pytest.raises(ValueError, match="stop"):
        check_stop([[True]], V)
