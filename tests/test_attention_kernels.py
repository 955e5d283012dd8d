"""Attention kernels of both twins against a float64 NumPy reference written head by head.

torch runs `F.scaled_dot_product_attention` (plain causal, one query at the last key, or an
absolute-position mask); jax runs its blocked causal attention (attention._blocked_attention: query blocks
that read only the keys up to their last query) without a cache or padding in float32 and bfloat16, and the
explicit computation otherwise. `attn_probs=True` takes the explicit path in both
and also returns the probabilities (B, H, T, S) in the acc dtype: torch with a cache sees positions
0..start_pos+T-1, jax all S positions of its cache (masked ones 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import mythos_jax as mj
import mythos_torch as mt
import spec as S
from helpers import report
from strategies import SHAPES


def reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float, start: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """(out (B, T, H, K_v), probs (B, H, T, S)) in float64, one query head at a time."""
    B, T, H, _ = q.shape
    S_, Hkv = k.shape[1], k.shape[2]
    probs = np.zeros((B, H, T, S_))
    out = np.zeros((B, T, H, v.shape[-1]))
    for b, j in np.ndindex(B, H):
        n = j // (H // Hkv)  # the kv head of query head j
        s = q[b, :, j] @ k[b, :, n].T * scale  # (T, S)
        s[np.arange(S_)[None, :] > start + np.arange(T)[:, None]] = -np.inf
        p = np.exp(s - s.max(-1, keepdims=True))
        probs[b, j] = p / p.sum(-1, keepdims=True)
        out[b, :, j] = probs[b, j] @ v[b, :, n]
    return out, probs


def inputs(T: int, S_: int, H: int, Hkv: int, seed: int = 0, Kv: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q (2, T, H, 8), k (2, S, H_kv, 8), v (2, S, H_kv, Kv): Kv != 8 as MLA may have."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((2, T, H, 8)), rng.standard_normal((2, S_, Hkv, 8)),
            rng.standard_normal((2, S_, Hkv, Kv)))


def jax_attention(q, k, v, scale, q_start, attn_probs=False):
    """mj.causal_attention compiled, q_start traced (as in the cached decode step) unless None: out, or (out, probs)."""
    if q_start is None:
        out = jax.jit(lambda q, k, v: mj.causal_attention(q, k, v, scale, attn_probs=attn_probs))(q, k, v)
    else:
        out = jax.jit(lambda q, k, v, p: mj.causal_attention(q, k, v, scale, p, attn_probs=attn_probs))(
            q, k, v, jnp.int32(q_start))
    return out if attn_probs else out[0]


# (T, S, q_start): no cache; the last T of S keys; one query at the last key; a chunk inside a cache
CASES = [(7, 7, None), (4, 9, None), (1, 9, 8), (3, 9, 5), (1, 9, 2)]


@pytest.mark.parametrize("T_, S_, q_start", CASES)
@pytest.mark.parametrize("H, Hkv", [(6, 2), (4, 4)])
def test_fused_attention_float64_equals_the_reference(T_, S_, q_start, H, Hkv):
    q, k, v = inputs(T_, S_, H, Hkv)
    start = S_ - T_ if q_start is None else q_start
    want, _ = reference(q, k, v, 0.3, start)
    t, none = mt.causal_attention(*(torch.from_numpy(a) for a in (q, k, v)), 0.3, q_start)
    assert none is None  # always (out, probs): no probabilities unless asked for
    j = jax_attention(*(jnp.asarray(a) for a in (q, k, v)), 0.3, q_start)
    assert t.dtype == torch.float64 and j.dtype == jnp.float64
    assert report("torch", t, want) < 1e-13 and report("jax", j, want) < 1e-13


@pytest.mark.parametrize("T_, S_, q_start", CASES)
def test_probs_sum_to_one_are_causal_and_equal_in_both_twins(T_, S_, q_start):
    q, k, v = inputs(T_, S_, 6, 2, seed=1)
    start = S_ - T_ if q_start is None else q_start
    want_out, want_p = reference(q, k, v, 0.3, start)
    t_out, t_p = mt.causal_attention(*(torch.from_numpy(a) for a in (q, k, v)), 0.3, q_start, attn_probs=True)
    j_out, j_p = jax_attention(*(jnp.asarray(a) for a in (q, k, v)), 0.3, q_start, attn_probs=True)
    for name, p in (("torch", t_p.numpy()), ("jax", np.asarray(j_p))):
        assert p.shape == (2, 6, T_, S_) and p.dtype == np.float64, name
        np.testing.assert_allclose(p.sum(-1), 1.0, rtol=0, atol=1e-14, err_msg=name)
        above = np.arange(S_)[None, :] > start + np.arange(T_)[:, None]  # (T, S): keys after the query
        assert (p[..., above] == 0).all() and (p[..., ~above] > 0).all(), name
    assert report("torch probs", t_p, want_p) < 1e-14 and report("jax probs", j_p, want_p) < 1e-14
    assert report("probs, torch vs jax", t_p, np.asarray(j_p)) < 1e-14
    # the explicit path's output equals the fused one's
    assert report("torch out", t_out, want_out) < 1e-13 and report("jax out", j_out, want_out) < 1e-13


def test_return_probs_is_keyword_only():
    q, k, v = (torch.from_numpy(a) for a in inputs(3, 3, 2, 1))
    with pytest.raises(TypeError):
        mt.causal_attention(q, k, v, 0.3, None, True)
    with pytest.raises(TypeError):
        mj.causal_attention(*(jnp.asarray(a.numpy()) for a in (q, k, v)), 0.3, None, True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_low_precision_kernels_follow_the_reference(dtype):
    """float32: both fused kernels within float32 rounding; bfloat16: softmax in float32, probs float32.

    K_v != K: jax's blocked path takes unequal head dims too.
    """
    q, k, v = inputs(16, 16, 6, 2, seed=2, Kv=8)
    want, want_p = reference(q, k, v, 0.3, 0)
    tdt, jdt = {"float32": (torch.float32, jnp.float32), "bfloat16": (torch.bfloat16, jnp.bfloat16)}[dtype]
    tol = 1e-5 if dtype == "float32" else 3e-2
    tq = [torch.from_numpy(a).to(tdt) for a in (q, k, v)]
    jq = [jnp.asarray(a, jdt) for a in (q, k, v)]
    t, j = mt.causal_attention(*tq, 0.3)[0], jax_attention(*jq, 0.3, None)
    assert t.dtype == tdt and j.dtype == jdt
    assert report(f"torch {dtype}", t.float(), want) < tol and report(f"jax {dtype}", j.astype(jnp.float32), want) < tol
    (_, t_p), (_, j_p) = mt.causal_attention(*tq, 0.3, attn_probs=True), jax_attention(*jq, 0.3, None, True)
    assert t_p.dtype == torch.float32 and j_p.dtype == jnp.float32  # the acc dtype
    assert report(f"torch probs {dtype}", t_p, want_p) < tol and report(f"jax probs {dtype}", j_p, want_p) < tol


@pytest.mark.parametrize("shape", ["gqa-moe", "mla-moe-mlp"])
def test_module_probs_with_a_cache(shape):
    """GQAttention / MLAttention(attn_probs=True) on a chunk at start_pos 5 of a cache: the output is the
    one without probs; torch's probs cover positions 0..7, jax's the 12 of its capacity (8.. are 0)."""
    s = SHAPES[shape]
    w = S.init_arrays(s, 0)
    tm, jm = mt.build(s, 0, "float64", weights=w), mj.build(s, 0, "float64", weights=w)
    start, T_, cap = 5, 3, 12
    x = np.random.default_rng(3).standard_normal((2, T_, s.dim))
    cos, sin = (a[start:start + T_] for a in S.rope_table(s, cap))
    layer = s.prelude_layers  # the first loop step's entry
    tc = tm.init_cache(2, cap)
    tc.arrays = {n: torch.from_numpy(np.random.default_rng(4).standard_normal(a.shape)) for n, a in tc.arrays.items()}
    jc = mj.KVCache({n: jnp.asarray(a.numpy()) for n, a in tc.arrays.items()}, tc.n_loops)
    ta, ja = tm.recurrent.block.attn, jm.recurrent.block.attn
    targs = (torch.from_numpy(x), torch.from_numpy(cos), torch.from_numpy(sin))
    with torch.no_grad():
        t_out, t_p = ta(*targs, cache=tc, layer=layer, start_pos=start, attn_probs=True)
        t_plain, _ = ta(*targs, cache=tc, layer=layer, start_pos=start)
    j_out, j_p = ja(*(jnp.asarray(a) for a in (x, cos, sin)), cache=jc, layer=layer, start_pos=start,
                    attn_probs=True)
    H = s.attention.n_heads
    assert tuple(t_p.shape) == (2, H, T_, start + T_) and j_p.shape == (2, H, T_, cap)
    assert (np.asarray(j_p)[..., start + T_:] == 0).all()
    assert report("module probs, torch vs jax", t_p, np.asarray(j_p)[..., :start + T_]) < 1e-13
    np.testing.assert_allclose(t_p.sum(-1).numpy(), 1.0, rtol=0, atol=1e-14)
    assert report("module out with probs vs without", t_out, t_plain.numpy()) < 1e-13
    assert report("module out, torch vs jax", t_out, np.asarray(j_out)) < 1e-12
