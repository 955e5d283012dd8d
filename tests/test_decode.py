"""Incremental decoding with a KV cache (docs/design.md "Decoding with a cache"), both twins.

References: each twin's own full forward over the same sequence (no cache), the other twin, and
open-mythos' own incremental decode (interop). Compiling dominates JAX time, so every JAX model
here decodes B=2 rows of one 16-token sequence with a 16-position cache: the prefill (T=6), the warm
chunk (T=6 at start_pos 6), the single-token steps and generate (prompt 6 + 10 new, capacity 16) all
reuse the same three compiled programs per model (full forward, cached T=6, cached T=1).
"""

from __future__ import annotations

import functools
import re
import warnings

import jax
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import mythos_jax as mj
import mythos_torch as mt
import spec as S
from helpers import spread_halting
from mythos.tokenizer import ByteTokenizer

B, L, P, NEW = 2, 16, 6, 10  # batch, sequence length, prompt length, new tokens (P + NEW = L)
TOL = {"float64": 1e-10, "float32": 1e-5}
CONFIGS = {
    "gqa": {},
    "mla": {"attention.type": "mla"},
    # open-mythos' layout: the rope key cached once per head, no ACT remainder
    "om-mla": {"attention.type": "mla", "semantics": "openmythos-0.5", "halting.remainder": "openmythos"},
}
# (twin, config, dtype); JAX compiles cost seconds each, so it runs the three that matter most
CASES = [("torch", c, d) for c in CONFIGS for d in ("float64", "float32")] + [
    ("jax", "gqa", "float64"), ("jax", "gqa", "float32"), ("jax", "om-mla", "float64")]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: tiny tensors run fastest on one thread


def tiny(config: str, **more: object) -> S.Spec:
    return S.load("tiny", overrides={**CONFIGS[config], **more})


@functools.lru_cache(maxsize=None)
def spread_weights(config: str) -> dict[str, np.ndarray]:
    """init_arrays with the halting head x40 and its bias centred, so loop counts vary by position."""
    return spread_halting(tiny(config), ids_for(99))


@functools.lru_cache(maxsize=None)
def model(twin: str, config: str, dtype: str):
    """A cached tiny model (do not mutate it)."""
    return (mt if twin == "torch" else mj).build(tiny(config), 0, dtype, weights=spread_weights(config))


def ids_for(seed: int, T: int = L) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 64, (B, T))


def full(twin: str, m, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Logits (float64) and loop counts of the full forward, no cache."""
    if twin == "torch":
        with torch.no_grad():
            out = m(torch.from_numpy(ids))
        return out.logits.double().numpy(), out.loop_counts.numpy()
    out = mj.forward(m, ids)
    return np.asarray(out.logits, np.float64), np.asarray(out.loop_counts)


def cached(twin: str, m, ids: np.ndarray, cache, start_pos: int):
    """One call with a cache -> logits (float64), loop counts, n_steps, the updated cache."""
    if twin == "torch":
        with torch.no_grad():
            out = m(torch.from_numpy(ids), cache=cache, start_pos=start_pos)
        return out.logits.double().numpy(), out.loop_counts.numpy(), out.n_steps, out.cache
    out = mj.forward(m, ids, cache=cache, start_pos=start_pos)
    return np.asarray(out.logits, np.float64), np.asarray(out.loop_counts), int(out.n_steps), out.cache


def generate(twin: str, m, prompt: np.ndarray, n: int, **kw) -> np.ndarray:
    if twin == "torch":
        return m.generate(torch.from_numpy(prompt), n, **kw).numpy()
    return np.asarray(m.generate(prompt, n, **kw))


def cache_arrays(cache) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.float() if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16 else v, np.float64)
            for k, v in cache.arrays.items()}


# ----------------------------------------------------------------------------- cache == full forward


@pytest.mark.parametrize("twin,config,dtype", CASES)
def test_prefill_warm_chunk_and_decode_equal_the_full_forward(twin, config, dtype):
    """Prefill 0..5, a warm 6-token chunk at start_pos 6 (open-mythos fails here), then 12..15 one by
    one: every row equals the full forward's, and so do the loop counts; every call runs all N steps."""
    m = model(twin, config, dtype)
    ids = ids_for(0)
    ref, ref_counts = full(twin, m, ids)
    assert len(np.unique(ref_counts)) >= 2, f"loop counts do not vary: {np.unique(ref_counts)}"
    cache = m.init_cache(B, L)
    N = m.spec.recurrent.max_loop_iters
    errs = []
    for a, b in [(0, P), (P, 2 * P)] + [(i, i + 1) for i in range(2 * P, L)]:
        logits, counts, n_steps, cache = cached(twin, m, ids[:, a:b], cache, a)
        err = float(np.abs(logits - ref[:, a:b]).max())
        errs.append(err)
        assert err <= TOL[dtype], f"positions {a}..{b - 1}: max |dlogit| {err:.3e} > {TOL[dtype]}"
        np.testing.assert_array_equal(counts, ref_counts[:, a:b], err_msg=f"loop counts at positions {a}..{b - 1}")
        assert n_steps == N  # with a cache every loop step runs
    print(f"{twin} {config} {dtype}: max |dlogit| per call {['%.1e' % e for e in errs]}")


@pytest.mark.parametrize("twin,config", [("torch", "gqa"), ("torch", "mla"), ("jax", "gqa")])
def test_chunked_prefill_equals_one_shot_prefill(twin, config):
    m = model(twin, config, "float64")
    ids = ids_for(1)
    one = m.init_cache(B, L)
    one_logits, _, _, one = cached(twin, m, ids[:, :2 * P], one, 0)
    chunked = m.init_cache(B, L)
    first, _, _, chunked = cached(twin, m, ids[:, :P], chunked, 0)
    second, _, _, chunked = cached(twin, m, ids[:, P:2 * P], chunked, P)
    assert np.abs(np.concatenate([first, second], 1) - one_logits).max() <= 1e-12
    a, b = cache_arrays(one), cache_arrays(chunked)
    for k in a:
        d = np.abs(a[k][:, :, :2 * P] - b[k][:, :, :2 * P]).max()
        print(f"{twin} {config} cache {k}: max diff {d:.1e}")
        assert d <= 1e-12, k


def test_all_loop_steps_run_with_a_cache_even_when_every_position_halted():
    s = tiny("gqa")
    w = S.init_arrays(s, 0)
    w["recurrent.act.halt.bias"] = np.full(1, 12.0)  # p ~ 1: every position halts at step 1
    m = mt.build(s, 0, "float64", weights=w)
    ids = torch.from_numpy(ids_for(2))
    with torch.no_grad():
        ref = m(ids)
        out = m(ids, cache=m.init_cache(B, L))
    assert ref.n_steps == 1 and out.n_steps == s.recurrent.max_loop_iters
    assert (out.loop_counts == 1).all()
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-12)
    assert not out.traces.running[1:].any()  # later steps ran, with weight 0


# ----------------------------------------------------------------------------- generate


@pytest.mark.parametrize("config", ["gqa", "om-mla"])
def test_greedy_tokens_identical_across_twins_float64(config):
    prompt = ids_for(3, P)
    toks = {t: generate(t, model(t, config, "float64"), prompt, NEW) for t in ("torch", "jax")}
    np.testing.assert_array_equal(toks["torch"], toks["jax"])
    assert toks["torch"].shape == (B, L) and (toks["torch"][:, :P] == prompt).all()
    # each new token is the argmax of the full forward over the generated sequence
    for t in ("torch", "jax"):
        logits, _ = full(t, model(t, config, "float64"), toks[t])
        np.testing.assert_array_equal(logits[:, P - 1:-1].argmax(-1), toks[t][:, P:])


def test_greedy_float32_twins_agree_or_diverge_only_at_a_near_tie():
    prompt = ids_for(4, P)
    toks = {t: generate(t, model(t, "gqa", "float32"), prompt, NEW) for t in ("torch", "jax")}
    diff = np.argwhere(toks["torch"] != toks["jax"])
    if len(diff) == 0:
        print("float32 greedy: torch and jax tokens identical")
        return
    row, pos = diff[np.lexsort((diff[:, 0], diff[:, 1]))][0]  # the first divergence
    logits, _ = full("torch", model("torch", "gqa", "float32"), toks["torch"])
    top2 = np.sort(logits[row, pos - 1])[-2:]
    margin = float(top2[1] - top2[0])
    print(f"float32 greedy: twins diverge at row {row}, step {pos - P + 1} (position {pos}); "
          f"top-1 minus top-2 logit {margin:.2e}")
    assert margin < 1e-4, f"twins diverge at step {pos - P + 1} although the top-1 margin is {margin:.2e}"


def test_sampling_same_seed_same_tokens_in_both_twins():
    prompt = ids_for(5, P)
    kw = dict(temperature=0.9, top_k=20, top_p=0.95)
    a = {t: generate(t, model(t, "gqa", "float64"), prompt, NEW, seed=7, **kw) for t in ("torch", "jax")}
    np.testing.assert_array_equal(a["torch"], a["jax"])
    other = generate("torch", model("torch", "gqa", "float64"), prompt, NEW, seed=8, **kw)
    assert (other != a["torch"]).any(), "another seed should sample other tokens"
    greedy = generate("torch", model("torch", "gqa", "float64"), prompt, NEW)
    np.testing.assert_array_equal(generate("torch", model("torch", "gqa", "float64"), prompt, NEW, temperature=2.0,
                                           top_k=1, seed=3), greedy)


def test_eos_stops_a_row_and_pads_it():
    m = model("torch", "gqa", "float64")
    prompt = ids_for(6, P)
    greedy = generate("torch", m, prompt, NEW)
    eos = int(greedy[0, P + 2])  # row 0 emits it at its third new token
    out = generate("torch", m, prompt, NEW, eos_id=eos)
    first = [int(np.argmax(r[P:] == eos)) if (r[P:] == eos).any() else NEW for r in greedy]
    for r in range(B):
        np.testing.assert_array_equal(out[r, :P + first[r] + 1], greedy[r, :P + first[r] + 1])
        assert (out[r, P + first[r]:] == eos).all()


def test_sample_next():
    sample = mt.sample_next
    # greedy: argmax, ties to the lower id, no random draw
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(sample(np.array([[1.0, 3.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]]), rng), [1, 0])
    assert rng.random() == np.random.default_rng(0).random()
    # one uniform per row per step, inverse CDF over ids in ascending order
    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]]))
    u = np.random.default_rng(1).random(3)
    want = [int(np.searchsorted(np.cumsum(np.exp(row)), x, side="right")) for row, x in zip(logits, u)]
    rng = np.random.default_rng(1)
    np.testing.assert_array_equal(sample(logits, rng, temperature=1.0), want)
    assert rng.random() == np.random.default_rng(1).random(4)[3]
    # top-k (ties to lower ids) and top-p (smallest set reaching p) keep only their ids
    draws = np.random.default_rng(2)
    z = np.log(np.array([[0.1, 0.3, 0.3, 0.2, 0.1]] * 400))
    for kw, allowed in [({"top_k": 2}, {1, 2}), ({"top_p": 0.55}, {1, 2}), ({"top_p": 0.25}, {1}),
                        ({"top_k": 3, "top_p": 0.99}, {1, 2, 3})]:
        got = set(sample(z, draws, temperature=1.0, **kw).tolist())
        assert got == allowed, (kw, got)
    # the twins run the same code
    for seed in range(3):
        np.testing.assert_array_equal(sample(z[:8], np.random.default_rng(seed), 0.7, 3, 0.9),
                                      mj.sample_next(z[:8], np.random.default_rng(seed), 0.7, 3, 0.9))


# ----------------------------------------------------------------------------- errors, compiles, sizes


@pytest.mark.parametrize("twin", ["torch", "jax"])
def test_errors_come_before_any_work(twin, monkeypatch):
    m = model(twin, "gqa", "float64")
    if twin == "torch":
        monkeypatch.setattr(m, "_forward", lambda *a: pytest.fail("generate ran the model"))
    else:
        monkeypatch.setattr(mj.generate, "_cached_forward", lambda *a: pytest.fail("generate ran the model"))
    prompt = ids_for(7, 60)
    with pytest.raises(ValueError, match=r"60 tokens \+ max_new_tokens=5 = 65 positions exceed max_seq_len=64"):
        generate(twin, m, prompt, 5)
    for kw, msg in [({"temperature": -1.0}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 1.5}, "top_p"),
                    ({"eos_id": 64}, "eos_id"), ({"n_loops": 0}, "n_loops")]:
        with pytest.raises(ValueError, match=msg):
            generate(twin, m, prompt[:, :P], 2, **kw)
    with pytest.raises(ValueError, match="max_len"):
        m.init_cache(B, 65)
    ids = ids_for(7, 4)
    fwd = (lambda *a, **k: m(torch.from_numpy(a[0]), *a[1:], **k)) if twin == "torch" else \
        (lambda *a, **k: mj.forward(m, *a, **k))
    with pytest.raises(ValueError, match="capacity of 8 positions"):
        fwd(ids, cache=m.init_cache(B, 8), start_pos=6)
    with pytest.raises(ValueError, match="n_loops=4 loop steps but the call runs n_loops=3"):
        fwd(ids, 3, cache=m.init_cache(B, 8))
    with pytest.raises(ValueError, match="batch=1"):
        fwd(ids, cache=m.init_cache(1, 8))
    with pytest.raises(ValueError, match="needs a cache"):
        fwd(ids, start_pos=3)


def test_jax_one_compiled_step_serves_every_position():
    """Batch 1 is a shape no other test compiles: a greedy generate is two programs (the prefill and the
    on-device greedy loop, which serves other token counts too); a sampled one adds the decode step, which
    then serves every position through forward()."""
    m = model("jax", "gqa", "float64")
    count = lambda: (mj.generate.TRACE_COUNTS["cached_forward"], mj.generate.TRACE_COUNTS["greedy_steps"])  # noqa: E731
    c0, g0 = count()
    generate("jax", m, ids_for(8, P)[:1], NEW)  # a prefill, then NEW - 1 steps in one loop on the device
    assert count() == (c0 + 1, g0 + 1), f"{count()} traces for one greedy generate, from {(c0, g0)}"
    generate("jax", m, ids_for(7, P)[:1], NEW - 3)  # other tokens, fewer steps: the same two programs
    assert count() == (c0 + 1, g0 + 1)
    generate("jax", m, ids_for(9, P)[:1], NEW, temperature=1.0, seed=1)  # sampled on the host: the decode step
    assert count() == (c0 + 2, g0 + 1)
    cache = m.init_cache(1, L)
    for i in range(L):  # every position through forward(..., cache=...): the decode step's program
        cache = mj.forward(m, ids_for(9)[:1, i:i + 1], cache=cache, start_pos=i).cache
    assert count() == (c0 + 2, g0 + 1)
    print(f"jax: 3 compiled programs for {3 * NEW + L} calls at {L} positions")


@pytest.mark.parametrize("config", ["gqa", "om-mla"])
@pytest.mark.parametrize("with_eos", [False, True])
def test_jax_greedy_loop_on_the_device_gives_the_host_loops_tokens(config, with_eos):
    """generate's greedy path without a per-token callback (one lax.while_loop on the device) against its
    host loop (taken when on_token is given): the same tokens, and the streamed ones are those tokens.
    With eos_id: the token row 0 emits at step 3 without one, so that row finishes inside the loop."""
    m = model("jax", config, "float32")
    prompt = ids_for(11, P)
    eos_id = int(generate("jax", m, prompt, NEW)[0, P + 3]) if with_eos else None
    device = generate("jax", m, prompt, NEW, eos_id=eos_id)
    streamed: list[np.ndarray] = []
    host = generate("jax", m, prompt, NEW, eos_id=eos_id, on_token=streamed.append)
    np.testing.assert_array_equal(device, host)
    np.testing.assert_array_equal(np.stack(streamed, axis=1), host[:, P:P + len(streamed)])
    if with_eos:  # row 0 emitted eos_id by step 3 and holds it to the end
        first = int(np.argmax(device[0, P:] == eos_id))
        assert first <= 3 and (device[0, P + first:] == eos_id).all()


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16"])
def test_cache_bytes_equal_mythos_info(config, dtype):
    """What init_cache allocates is what `mythos info` (spec.kv_cache_bytes_per_token) reports."""
    s = tiny(config)
    want = S.kv_cache_bytes_per_token(s, dtype, 6)
    if dtype == "float32":  # the number `mythos info` prints is this function's
        from mythos.cli import app
        res = CliRunner().invoke(app, ["info", "tiny", "--loops", "6", "--dtype", dtype]
                                 + [f"--set={k}={v}" for k, v in CONFIGS[config].items()])
        assert res.exit_code == 0, res.output
        assert re.search(rf"total per token\s*.\s*{want['total']:,}", res.output), res.output
    for mod in (mt, mj):
        m = mod.build(s, 0, dtype) if mod is mt else _jax_abstract(s, dtype)
        cache = m.init_cache(3, 10, 6)
        assert cache.n_layers == want["layers"] and cache.capacity == 10 and cache.batch == 3
        assert cache.bytes_per_token() == want["total"], (mod.__name__, cache.bytes_per_token(), want)


def _jax_abstract(s: S.Spec, dtype: str):
    """A JAX model without weights (init_cache needs only its spec and embedding dtype)."""
    from flax import nnx
    return nnx.eval_shape(lambda: mj.Mythos(s, dtype=mj.model.DTYPES[dtype], rngs=nnx.Rngs(0)))


def test_model_output_fields_and_cache_default():
    # the same fields in the same order in both twins; the fields added after the first release
    # (cache, values, step_logits) come last, so positional unpacking of the first five keeps working
    assert mt.ModelOutput._fields == mj.ModelOutput._fields
    assert mt.ModelOutput._fields[:5] == ("logits", "loop_counts", "halted", "n_steps", "traces")
    assert mt.ModelOutput._fields[5:] == ("cache", "values", "step_logits")
    with torch.no_grad():
        assert model("torch", "gqa", "float64")(torch.from_numpy(ids_for(0, 3))).cache is None


# ----------------------------------------------------------------------------- tokenizer and CLI


def test_byte_tokenizer():
    tok = ByteTokenizer()
    text = "héllo, wörld ✓"
    ids = tok.encode(text, eos=True)
    assert ids[0] == tok.bos_id == 256 and ids[-1] == tok.eos_id == 257 and max(ids[1:-1]) < 256
    assert tok.decode(ids) == text
    feed = tok.stream_decoder()
    pieces = [feed(i) for i in ids]
    assert "".join(pieces) == text and "" in pieces  # a multi-byte character waits for its last byte
    assert tok.decode([0xFF, 300]) == "\ufffd"
    with pytest.raises(ValueError, match="vocab_size=64 is too small for the byte tokenizer: it needs 258"):
        ByteTokenizer.for_spec(S.preset("tiny"))
    assert ByteTokenizer.for_spec(S.preset("bench-s-gqa")).vocab_size == 258


def test_cli_generate(tmp_path):
    import weights_bridge as wb
    from mythos.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["generate", "tiny", "--set", "vocab_size=260", "--prompt", "hi",
                              "--max-new-tokens", "5", "--temperature", "0.8", "--top-k", "50", "--seed", "1"])
    assert res.exit_code == 0, res.output
    assert "prompt tokens" in res.output and "decode tokens/s" in res.output and "new tokens" in res.output
    path = tmp_path / "m.safetensors"
    wb.save(mt.build(tiny("gqa", vocab_size=260), 0, "float32"), path)
    res = runner.invoke(app, ["generate", str(path), "--prompt", "ab", "--max-new-tokens", "3", "--loops", "2"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["generate", "tiny", "--prompt", "hi"])
    assert res.exit_code == 2 and "too small for the byte tokenizer" in res.output
    res = runner.invoke(app, ["generate", "tiny", "--set", "vocab_size=260", "--prompt", "x" * 60,
                              "--max-new-tokens", "10"])
    assert res.exit_code == 2 and "max_seq_len=64" in res.output, res.output


# ----------------------------------------------------------------------------- open-mythos


@pytest.mark.interop
def test_decode_matches_open_mythos_own_incremental_decode():
    """Imported open-mythos weights: our token-by-token logits equal open-mythos' own KV-cache decode;
    its warm multi-token prefill fails (a documented upstream defect), ours equals the full forward."""
    import weights_bridge as wb
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from open_mythos.main import MythosConfig, OpenMythos

    cfg = MythosConfig(vocab_size=96, dim=64, n_heads=4, n_kv_heads=2, max_seq_len=32, max_loop_iters=4,
                       prelude_layers=1, coda_layers=1, attn_type="gqa", n_experts=4, n_shared_experts=1,
                       n_experts_per_tok=2, expert_dim=24, lora_rank=4)
    torch.manual_seed(0)
    om = OpenMythos(cfg).eval()
    _, ours = wb.from_open_mythos(om, cfg, backend="torch")
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 96, (2, 12)))
    with torch.no_grad():
        kv: dict = {}
        ref = [om(ids[:, :4], kv_cache=kv, start_pos=0)] + [om(ids[:, i:i + 1], kv_cache=kv, start_pos=i)
                                                            for i in range(4, 12)]
        cache = ours.init_cache(2, 12)
        got = [ours(ids[:, :4], cache=cache).logits] + [ours(ids[:, i:i + 1], cache=cache, start_pos=i).logits
                                                        for i in range(4, 12)]
        err = max(float((a - b).abs().max()) for a, b in zip(ref, got))
        print(f"decode vs open-mythos' own: max |dlogit| {err:.2e}")
        assert err <= 1e-5
        warm_om: dict = {}
        om(ids[:, :4], kv_cache=warm_om, start_pos=0)
        with pytest.raises(RuntimeError):  # open-mythos: a (T, T) mask against (T, S) scores
            om(ids[:, 4:8], kv_cache=warm_om, start_pos=4)
        warm = ours.init_cache(2, 12)
        ours(ids[:, :4], cache=warm)
        torch.testing.assert_close(ours(ids[:, 4:8], cache=warm, start_pos=4).logits, ours(ids[:, :8]).logits[:, 4:8],
                                   rtol=0, atol=1e-5)


@pytest.mark.slow
def test_torch_compiled_decode_steps_give_the_eager_tokens():
    # generate(compile=True) runs the decode steps through torch.compile: the same greedy tokens
    m = model("torch", "gqa", "float64")
    ids = torch.from_numpy(ids_for(0, 5))
    eager = m.generate(ids, 6)
    compiled = m.generate(ids, 6, compile=True)
    assert torch.equal(eager, compiled)
