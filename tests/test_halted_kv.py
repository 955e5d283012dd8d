"""decode.halted_kv (docs/semantics.md "Halted tokens at deeper loop steps"): `compute` runs every position at
every loop step, `freeze` keeps a halted position's state and its last step's looped-attention rows.

References: the other twin, the same twin's full forward (no cache) under the same mode, `compute` where no
position halts early, and the cache itself (a halted position's rows at every deeper layer equal those of
the last step it ran). float64 tiny models whose halting head is sharpened so loop counts spread over 1..N.
JAX compiles dominate the time: every JAX model here decodes B=2 rows of one 16-token sequence with a
16-position cache (the prefill and the warm chunk T=6, single tokens T=1), the shapes generate reuses.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch

import mythos_jax as mj
import mythos_torch as mt
import spec as S
from helpers import spread_halting

B, L, P, NEW = 2, 16, 6, 10  # batch, sequence length, prompt length, new tokens (P + NEW = L)
TOL = 1e-10  # float64, twin against twin and cache against full forward
CONFIGS = {
    "gqa-moe": {},
    "mla-dense": {"attention.type": "mla", "recurrent.ffn": "dense"},
    # every hypothesised component that reads other positions or steps: compressor (chunks of 4),
    # cross-loop memory, memory gate, and the value head (a traced column)
    "components": {"recurrent.compressor.enabled": True, "recurrent.compressor.chunk": 4,
                   "recurrent.cross_loop_attention.enabled": True, "recurrent.memory_gate.enabled": True,
                   "value_head.enabled": True},
}
SLOW = pytest.mark.slow  # JAX compiles cost seconds each: the default tier runs the JAX cases that matter most

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: tiny tensors run fastest on one thread


def tiny(config: str, mode: str = "freeze", **more: object) -> S.Spec:
    return S.load("tiny", overrides={**CONFIGS[config], "decode.halted_kv": mode, **more})


@functools.lru_cache(maxsize=None)
def spread_weights(config: str) -> dict[str, np.ndarray]:
    """init_arrays with the halting head x40 and its bias centred, so loop counts vary by position."""
    return spread_halting(tiny(config, "compute"), ids_for(99))


@functools.lru_cache(maxsize=None)
def model(twin: str, config: str, mode: str = "freeze"):
    """A cached float64 tiny model (do not mutate it)."""
    return (mt if twin == "torch" else mj).build(tiny(config, mode), 0, "float64", weights=spread_weights(config))


def ids_for(seed: int, T: int = L) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 64, (B, T))


def run(twin: str, m, ids: np.ndarray, **kw) -> dict[str, object]:
    """One forward (with or without a cache) -> its outputs as NumPy (logits float64), n_steps an int, the cache."""
    if twin == "torch":
        kw = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
        with torch.no_grad():
            out = m(torch.from_numpy(ids), **kw)
    else:
        out = mj.forward(m, ids, **kw)
    tr = {k: None if v is None else np.asarray(v) for k, v in out.traces._asdict().items()}
    return dict(logits=np.asarray(out.logits, np.float64), counts=np.asarray(out.loop_counts),
                halted=np.asarray(out.halted), n_steps=int(out.n_steps), traces=tr, cache=out.cache)


def cache_arrays(cache) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, np.float64) for k, v in cache.arrays.items()}


def decode_by_chunks(twin: str, m, ids: np.ndarray, **kw) -> list[dict[str, object]]:
    """Prefill 0..5, a warm chunk 6..11, then 12..15 one by one; each call's outputs (the cache threads through)."""
    cache = m.init_cache(B, L)
    outs = []
    for a, b in [(0, P), (P, 2 * P)] + [(i, i + 1) for i in range(2 * P, L)]:
        out = run(twin, m, ids[:, a:b], cache=cache, start_pos=a, **kw)
        out["span"] = (a, b)
        cache = out["cache"]
        outs.append(out)
    return outs


# ----------------------------------------------------------------------------- the full forward


@pytest.mark.parametrize("config", ["gqa-moe", "components", pytest.param("mla-dense", marks=SLOW)])
def test_twins_agree_under_freeze(config):
    """Full forward, both twins, float64: logits, loop counts, halted and expert choices identical."""
    ids = ids_for(0)
    t, j = run("torch", model("torch", config), ids), run("jax", model("jax", config), ids)
    N = tiny(config).recurrent.max_loop_iters
    assert (t["counts"] < N).any() and len(np.unique(t["counts"])) >= 2, f"loop counts {np.unique(t['counts'])}"
    err = float(np.abs(t["logits"] - j["logits"]).max())
    print(f"{config}: torch vs jax max |dlogit| {err:.2e}, loop counts {np.bincount(t['counts'].ravel())}")
    assert err <= TOL
    np.testing.assert_array_equal(t["counts"], j["counts"])
    np.testing.assert_array_equal(t["halted"], j["halted"])
    np.testing.assert_array_equal(t["traces"]["expert_idx"], j["traces"]["expert_idx"])
    assert t["n_steps"] == j["n_steps"] == t["counts"].max()


@pytest.mark.parametrize("twin", ["torch", pytest.param("jax", marks=SLOW)])
def test_frozen_positions_trace_the_fill_values(twin):
    """All N steps (early_exit=False): at a step a position does not run, its Traces entries are the fills
    (state_norm, halt_p, value 0, expert_idx -1, router_margin +inf), cum_p keeps c, running False."""
    config = "components" if twin == "jax" else "gqa-moe"
    m = model(twin, config)
    tr = run(twin, m, ids_for(0), early_exit=False)["traces"]
    off = ~tr["running"]  # (N, B, T): not running before the step
    assert off[1:].any() and not off[0].any()
    for name, fill in [("state_norm", 0), ("halt_p", 0), ("router_margin", np.inf), ("value", 0)]:
        if tr[name] is not None:
            assert (tr[name][off] == fill).all(), name
            assert (tr[name][~off] != fill).all(), name  # running positions computed
    if tr["expert_idx"].shape[-1]:
        assert (tr["expert_idx"][off] == -1).all() and (tr["expert_idx"][~off] >= 0).all()
    cum = tr["cum_p"]
    np.testing.assert_array_equal(cum[1:][off[1:]], cum[:-1][off[1:]])  # c kept


@pytest.mark.parametrize("twin", ["torch", pytest.param("jax", marks=SLOW)])
def test_freeze_differs_from_compute_only_when_a_position_halts_early(twin):
    """Loop counts spread: the modes differ (later positions read other keys/values). force_halt 0 (no
    position halts before N) or every position forced to N: the modes are the same computation."""
    config = "gqa-moe"
    ids = ids_for(0)
    fz, cp = model(twin, config, "freeze"), model(twin, config, "compute")
    d = float(np.abs(run(twin, fz, ids)["logits"] - run(twin, cp, ids)["logits"]).max())
    print(f"{twin}: freeze vs compute with early halts: max |dlogit| {d:.2e}")
    assert d > 1e-6
    N = tiny(config).recurrent.max_loop_iters
    for force in (np.zeros((B, L), np.int64), np.full((B, L), N, np.int64)):
        a, b = run(twin, fz, ids, force_halt=force), run(twin, cp, ids, force_halt=force)
        assert (a["counts"] == N).all()
        assert float(np.abs(a["logits"] - b["logits"]).max()) <= 1e-12
    # one position halted at step 1: positions after it differ, positions before it do not
    force = np.full((B, L), -1, np.int64)
    force[:, 5] = 1
    a, b = run(twin, fz, ids, force_halt=force), run(twin, cp, ids, force_halt=force)
    first = min(int(np.argmax(a["counts"][r] < N)) for r in range(B))  # the first position halting before N
    assert np.abs(a["logits"][:, :min(first, 5) + 1] - b["logits"][:, :min(first, 5) + 1]).max() <= 1e-12
    assert np.abs(a["logits"][:, 6:] - b["logits"][:, 6:]).max() > 1e-6


def test_torch_while_loop_form_equals_the_for_loop_under_freeze():
    """loop_form="while" (one torch.while_loop, the ONNX form) implements freeze: the same logits and traces."""
    m = mt.build(tiny("components"), 0, "float64", weights=spread_weights("components"))
    ids = ids_for(0)
    ref = run("torch", m, ids)
    m.loop_form = "while"
    out = run("torch", m, ids)
    assert np.abs(out["logits"] - ref["logits"]).max() == 0
    np.testing.assert_array_equal(out["counts"], ref["counts"])
    assert out["n_steps"] == ref["n_steps"]
    for k, v in ref["traces"].items():
        if v is not None:
            np.testing.assert_array_equal(out["traces"][k], v, err_msg=k)


# ----------------------------------------------------------------------------- decoding with a cache


DECODE_CASES = [("torch", c, md) for c in CONFIGS for md in ("freeze", "compute")] + [
    ("jax", "gqa-moe", "freeze"), pytest.param("jax", "components", "freeze", marks=SLOW),
    pytest.param("jax", "gqa-moe", "compute", marks=SLOW)]


@pytest.mark.parametrize("twin,config,mode", DECODE_CASES)
def test_decode_equals_the_full_forward(twin, config, mode):
    """Prefill, warm chunk, token by token: every call's logits and loop counts equal the full forward's under
    the same mode; a call runs n_steps = the largest loop count of its tokens under freeze, N under compute."""
    m = model(twin, config, mode)
    ids = ids_for(0)
    ref = run(twin, m, ids)
    N = m.spec.recurrent.max_loop_iters
    steps = []
    for out in decode_by_chunks(twin, m, ids):
        a, b = out["span"]
        err = float(np.abs(out["logits"] - ref["logits"][:, a:b]).max())
        assert err <= TOL, f"positions {a}..{b - 1}: max |dlogit| {err:.3e}"
        np.testing.assert_array_equal(out["counts"], ref["counts"][:, a:b], err_msg=f"positions {a}..{b - 1}")
        assert out["n_steps"] == (out["counts"].max() if mode == "freeze" else N), (a, b)
        steps.append(out["n_steps"])
    print(f"{twin} {config} {mode}: n_steps per call {steps}")


@pytest.mark.parametrize("twin,config", [("torch", "gqa-moe"), ("torch", "mla-dense"),
                                         pytest.param("jax", "gqa-moe", marks=SLOW)])
def test_frozen_rows_fill_the_deeper_cache_layers(twin, config):
    """After a prefill under freeze, a position with loop count c < N holds, at every looped layer P + t with
    t >= c, its rows of layer P + c - 1 (the last step it ran); its rows at layers < P + c differ step to step."""
    m = model(twin, config)
    out = run(twin, m, ids_for(0), cache=m.init_cache(B, L), start_pos=0)
    counts, arrays = out["counts"], cache_arrays(out["cache"])
    Pre, N = m.spec.prelude_layers, m.spec.recurrent.max_loop_iters
    names = ("k", "v") if m.spec.attention.type == "gqa" else ("c_kv", "k_r")
    early = np.argwhere(counts < N)
    assert len(early), "no position halted early"
    for b, i in early:
        c = int(counts[b, i])
        for name in names:
            rows = arrays[name][Pre:Pre + N, b, i]  # (N, ...) this position's looped rows
            for t in range(c, N):
                np.testing.assert_array_equal(rows[t], rows[c - 1], err_msg=f"{name} row ({b}, {i}) layer P+{t}")
            if c >= 2:
                assert np.abs(rows[c - 1] - rows[c - 2]).max() > 0  # it ran: the rows moved
    # early_exit=False runs every step (frozen where halted): the same logits and cache
    full = run(twin, m, ids_for(0), cache=m.init_cache(B, L), start_pos=0, early_exit=False)
    assert full["n_steps"] == N and out["n_steps"] == counts.max()
    assert np.abs(full["logits"] - out["logits"]).max() == 0
    for k, a in cache_arrays(full["cache"]).items():
        assert np.abs(a - arrays[k]).max() == 0, k


@pytest.mark.parametrize("twin", ["torch", "jax"])
def test_a_decode_step_stops_at_its_token_loop_count(twin):
    """A decode step (T = 1) under freeze runs exactly its tokens' largest loop count, under compute N."""
    config = "gqa-moe"
    ids = ids_for(0)
    N = tiny(config).recurrent.max_loop_iters
    seen = set()
    # jax compute: test_decode_equals_the_full_forward[jax-gqa-moe-compute] (slow tier) checks its N steps
    for mode in ("freeze", "compute") if twin == "torch" else ("freeze",):
        m = model(twin, config, mode)
        cache = run(twin, m, ids[:, :2 * P], cache=m.init_cache(B, L), start_pos=0)["cache"]
        for i in range(2 * P, L):
            out = run(twin, m, ids[:, i:i + 1], cache=cache, start_pos=i)
            cache = out["cache"]
            want = int(out["counts"].max()) if mode == "freeze" else N
            assert out["n_steps"] == want, (mode, i, out["n_steps"], out["counts"])
            seen.add((mode, out["n_steps"]))
    assert any(mode == "freeze" and n < N for mode, n in seen)


def test_greedy_tokens_identical_across_twins_under_freeze():
    """generate (prefill, then one-token steps that stop early) gives the same tokens in both twins, float64."""
    prompt = ids_for(3, P)
    t = model("torch", "gqa-moe").generate(torch.from_numpy(prompt), NEW).numpy()
    j = np.asarray(model("jax", "gqa-moe").generate(prompt, NEW))
    np.testing.assert_array_equal(t, j)
    # and the tokens are the full forward's greedy choices (decode == full forward under freeze)
    m = model("torch", "gqa-moe")
    with torch.no_grad():
        logits = m(torch.from_numpy(t[:, :-1])).logits.numpy()
    np.testing.assert_array_equal(logits[:, P - 1:].argmax(-1), t[:, P:])
    print(f"greedy tokens under freeze: {t[0, P:].tolist()}")


@pytest.mark.parametrize("twin", ["torch", pytest.param("jax", marks=SLOW)])
def test_left_padding_under_freeze(twin):
    """A left-padded row decodes as it would alone under freeze (pads keep their step-0 rows, seen by no
    real token), and the padded decode equals the padded full forward."""
    config = "mla-dense" if twin == "torch" else "gqa-moe"
    m = model(twin, config)
    ids = ids_for(5)
    mask = np.ones((B, L), np.int64)
    mask[1, :3] = 0  # row 1: 3 pads, then 13 real tokens
    ref = run(twin, m, ids, attention_mask=mask)
    alone = run(twin, m, np.concatenate([ids[1:, 3:], ids[1:, 3:]]))  # row 1 unpadded (batch 2: shapes reused)
    assert np.abs(ref["logits"][1, 3:] - alone["logits"][0]).max() <= TOL
    np.testing.assert_array_equal(ref["counts"][1, 3:], alone["counts"][0])
    assert (ref["counts"][1, :3] == 0).all()
    cache = m.init_cache(B, L)
    for a, b in [(0, P), (P, 2 * P)] + [(i, i + 1) for i in range(2 * P, L)]:
        out = run(twin, m, ids[:, a:b], cache=cache, start_pos=a, attention_mask=mask[:, :b])
        cache = out["cache"]
        assert np.abs(out["logits"] - ref["logits"][:, a:b]).max() <= TOL, (a, b)
        np.testing.assert_array_equal(out["counts"], ref["counts"][:, a:b])


# ----------------------------------------------------------------------------- the spec field


def test_spec_field_round_trips_and_is_checked():
    s = tiny("gqa-moe")
    assert s.decode.halted_kv == "freeze" and S.preset("tiny").decode.halted_kv == "compute"
    assert S.loads(S.dump(s)) == s and "halted_kv: freeze" in S.dump(s)
    with pytest.raises(S.SpecError, match=r"decode\.halted_kv='frozen' is not allowed; allowed: compute, freeze"):
        S.load("tiny", overrides={"decode.halted_kv": "frozen"})
    with pytest.raises(S.SpecError, match=r"decode\.halted_kv='freeze' conflicts with semantics=openmythos-0\.5"):
        S.load("tiny", overrides={"semantics": "openmythos-0.5", "decode.halted_kv": "freeze"})
    om = S.load("tiny", overrides={"semantics": "openmythos-0.5"})
    assert om.decode.halted_kv == "compute"
    built = dataclasses.replace(om, decode=dataclasses.replace(om.decode, halted_kv="freeze"))  # not through load
    with pytest.raises(S.SpecError, match=r"decode\.halted_kv='freeze' conflicts with semantics=openmythos-0\.5"):
        S.validate(built)
    # no new parameters: the manifest is the same under both modes
    assert S.manifest(s) == S.manifest(tiny("gqa-moe", "compute"))
