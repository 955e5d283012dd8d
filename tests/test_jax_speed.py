"""The JAX twin's speed paths (issue 18) against the computations they replace.

- the blocked causal attention (no cache, float32/bfloat16: query blocks that skip the masked keys)
  against the explicit masked softmax, forward and gradients, with and without attention.window, block
  edges that do not divide T, GQA and MLA-like K_v != K;
- bfloat16 dots on the matrix units (precision.bf16_dot_general: bf16 operands, float32 sums, one rounding)
  against the float32 product of the same bf16 values rounded once, and a bfloat16 model whose every
  nnx.Linear runs them (and whose compiled forward has bf16-operand dots), while a float32 model is untouched;
- forward(..., autocast=True): a float32 model's matmuls on bf16 operands (bf16-operand dots in its program,
  float32 logits within bf16 error of the plain forward, which stays bitwise what it was), refused for a
  bfloat16 model and with a cache.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mythos_jax as mj
from helpers import report, tiny
from mythos_jax import attention as A
from mythos_jax import model as M
from mythos_jax import precision as P


def _qkv(seed: int, B: int, T: int, H: int, Hkv: int, K: int, Kv: int, dtype: jnp.dtype = jnp.float32
         ) -> tuple[jax.Array, jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal(s), dtype) for s in ((B, T, H, K), (B, T, Hkv, K), (B, T, Hkv, Kv)))
    return q, k, v


def _explicit(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, window: int | None) -> jax.Array:
    return A._weighted_values(A.attention_probs(q, k, scale, 0, None, window).astype(v.dtype), v)


@pytest.mark.parametrize("T,window,H,Hkv,K,Kv", [(150, None, 4, 2, 16, 16), (150, 40, 4, 4, 16, 16),
                                                 (64, None, 2, 1, 8, 8), (97, 5, 4, 2, 12, 8), (7, None, 2, 2, 4, 4)])
def test_blocked_attention_matches_the_explicit_softmax(T: int, window: int | None, H: int, Hkv: int, K: int,
                                                        Kv: int) -> None:
    q, k, v = _qkv(T, 2, T, H, Hkv, K, Kv)
    scale = K ** -0.5
    assert A.Q_BLOCK < 150  # the 150-token cases run several blocks, the last one partial
    got = A.causal_attention(q, k, v, scale, window=window)[0]
    want = _explicit(q, k, v, scale, window)
    assert report("blocked vs explicit", got, want) < 2e-6

    def loss(f):
        return lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
    g_got = jax.grad(loss(lambda q, k, v: A.causal_attention(q, k, v, scale, window=window)[0]), (0, 1, 2))(q, k, v)
    g_want = jax.grad(loss(lambda q, k, v: _explicit(q, k, v, scale, window)), (0, 1, 2))(q, k, v)
    for a, b in zip(g_got, g_want):
        assert report("blocked vs explicit grad", a, b) < 2e-5


def test_blocked_attention_bfloat16_keeps_float32_logits() -> None:
    """bfloat16: logits and softmax in float32, p in bfloat16 (as XLA's fused attention computed them)."""
    q, k, v = _qkv(1, 2, 130, 4, 2, 16, 16, jnp.bfloat16)
    got = A.causal_attention(q, k, v, 0.25)[0]
    assert got.dtype == jnp.bfloat16
    want = jax.nn.dot_product_attention(q, k, v, scale=0.25, is_causal=True, implementation="xla")
    # the same arithmetic up to the float32 summation order: at most a few bf16 ulps apart
    assert report("blocked bf16 vs fused", got, want) < 2e-2


def test_bf16_dot_general_is_one_rounding_of_the_float32_product() -> None:
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((33, 70)), jnp.bfloat16)
    b = jnp.asarray(rng.standard_normal((70, 20)), jnp.bfloat16)
    got = P.bf16_dot_general(a, b, (((1,), (0,)), ((), ())))
    assert got.dtype == jnp.bfloat16
    exact = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    # one rounding to bf16 (2^-8 relative) of float32 sums
    assert np.all(np.abs(np.asarray(got, np.float64) - exact) <= 2 ** -8 * np.abs(exact) + 1e-4)
    assert P.mm_einsum("ij,jk->ik", a, b).dtype == jnp.bfloat16
    f = jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)
    np.testing.assert_array_equal(P.bf16_dot_general(f, f.T, (((1,), (0,)), ((), ()))), f @ f.T)  # float32 untouched


def _linears(model: nnx.Module) -> list[nnx.Linear]:
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear)]


def _bf16_dots(model: nnx.Module, ids: jax.Array, autocast: bool = False) -> list[str]:
    """The computations of the compiled forward whose dot reads bf16 parameters: the matrix-unit path (a
    plain bf16 dot is converted to float32 first on XLA:CPU, so none of its fusions reads bf16)."""
    hlo = M._forward.lower(model, ids, model._check_loops(None), True, None, None, autocast=autocast
                           ).compile().as_text()
    heads = [c.strip().splitlines()[0] for c in hlo.split("\n\n") if " dot(" in c]  # computations with a dot
    return [h for h in heads if re.search(r"param[\w.]*: bf16\[", h)]


def test_bfloat16_model_runs_its_dots_on_bf16_operands() -> None:
    s = tiny()
    m16, m32 = mj.build(s, 0, "bfloat16"), mj.build(s, 0, "float32")
    assert _linears(m16) and all(m.dot_general is P.bf16_dot_general for m in _linears(m16))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, s.vocab_size, (2, 12)), jnp.int32)
    assert _bf16_dots(m16, ids), "no bf16-operand dot in the compiled bfloat16 forward"
    assert not _bf16_dots(m32, ids), "the float32 forward (no autocast) has a bf16-operand dot"
    l16 = np.asarray(mj.forward(m16, ids).logits, np.float64)
    l32 = np.asarray(mj.forward(m32, ids).logits, np.float64)
    assert np.isfinite(l16).all() and report("bf16 vs f32 logits", l16, l32) < 0.1 * np.abs(l32).max() + 0.05


def test_autocast_runs_a_float32_model_on_bf16_operands_and_leaves_the_plain_forward_alone() -> None:
    s = tiny()
    m = mj.build(s, 0, "float32")
    ids = jnp.asarray(np.random.default_rng(1).integers(0, s.vocab_size, (2, 16)), jnp.int32)
    plain = mj.forward(m, ids, early_exit=False)
    # the bf16 parity rule: replay the float32 run's halting and routing, so near ties cannot flip
    ac = mj.forward(m, ids, early_exit=False, autocast=True, force_halt=plain.loop_counts,
                    force_experts=plain.traces.expert_idx)
    assert ac.logits.dtype == jnp.float32
    l32, lac = np.asarray(plain.logits, np.float64), np.asarray(ac.logits, np.float64)
    err = report("autocast vs float32 logits", lac, l32)
    assert 0 < err < 0.03 * np.abs(l32).max() + 1e-3  # bf16 operands: a few bf16 ulps, and not the float32 program
    assert _bf16_dots(m, ids, autocast=True), "no bf16-operand dot in the compiled autocast forward"
    # the autocast program is cached apart: the plain forward is bitwise what it was
    np.testing.assert_array_equal(np.asarray(mj.forward(m, ids, early_exit=False).logits), np.asarray(plain.logits))


def test_autocast_is_refused_for_a_bfloat16_model_and_with_a_cache() -> None:
    s = tiny()
    ids = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="autocast=True .*bfloat16"):
        mj.forward(mj.build(s, 0, "bfloat16"), ids, autocast=True)
    m = mj.build(s, 0, "float32")
    with pytest.raises(ValueError, match="autocast=True: the forward without a cache only"):
        mj.forward(m, ids, cache=m.init_cache(1), autocast=True)
    with pytest.raises(ValueError, match="autocast='yes' must be True or False"):
        mj.forward(m, ids, autocast="yes")


@pytest.mark.parametrize("T,window", [(150, None), (97, 5)])
def test_attention_core_vjp_equals_autodiff_of_the_formula_float64(T: int, window: int | None) -> None:
    """The blocked core's hand-written backward (from the saved log-sum-exp) against JAX's autodiff of the plain
    masked-softmax formula, in float64, with cotangents on both outputs (out and the log-sum-exp)."""
    B, Hkv, G, K, Kv, scale = 2, 2, 2, 8, 6, 0.3
    rng = np.random.default_rng(T)
    qh, kh, vh = (jnp.asarray(rng.standard_normal(s), jnp.float64)
                  for s in ((B, Hkv, G, T, K), (B, Hkv, T, K), (B, Hkv, T, Kv)))
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    mask = (j <= i) & ((j > i - window) if window is not None else True)

    def formula(qh, kh, vh):
        s = jnp.where(mask, jnp.einsum("bngtk,bnsk->bngts", qh, kh) * scale, -jnp.inf)
        lse = jax.nn.logsumexp(s, axis=-1)
        return jnp.einsum("bngts,bnsk->bngtk", jnp.exp(s - lse[..., None]), vh), lse

    w_out, w_lse = (jnp.asarray(rng.standard_normal(s)) for s in ((B, Hkv, G, T, Kv), (B, Hkv, G, T)))

    def loss(f):
        def value(qh, kh, vh):
            out, lse = f(qh, kh, vh)
            return jnp.sum(out * w_out) + jnp.sum(jnp.tanh(lse) * w_lse)
        return value
    got_val = A._attention_core(qh, kh, vh, scale, window)
    want_val = formula(qh, kh, vh)
    for a, b in zip(got_val, want_val):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)
    got = jax.grad(loss(lambda *a: A._attention_core(*a, scale, window)), (0, 1, 2))(qh, kh, vh)
    want = jax.grad(loss(formula), (0, 1, 2))(qh, kh, vh)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-11)
