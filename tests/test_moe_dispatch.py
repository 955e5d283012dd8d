"""Grouped MoE dispatch (`Experts`) of both twins against a float64 NumPy row-by-row loop.

The dispatch paths are: torch `F.grouped_mm` over expert-sorted rows (float32, bfloat16), torch's
padded batched matmuls (float64 and rows grouped_mm refuses), and JAX's loops over big and small
tiles of sorted rows with its own VJP (every dtype); and, for at most SMALL_ROWS (token, slot) rows
(decoding at batch 1), torch row by row and both twins through gathered weights. Routing patterns
cover what the benchmarks see at random init (a few experts take most rows, many take none), tiles
that are exactly full, one expert taking big tiles and small ones, and a single token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import helpers
import mythos_jax as mj
import mythos_torch as mt
import spec as S
from reference import silu
from strategies import SHAPES

D, HIDDEN = 8, 16  # rows of 16-byte multiples in float32 and bfloat16: torch takes its grouped_mm path


def naive(x: np.ndarray, expert: np.ndarray, w: dict[str, np.ndarray]) -> np.ndarray:
    """(N, k, D): token n through expert[n, j], one row at a time, float64."""
    out = np.zeros((*expert.shape, x.shape[1]))
    for n, j in np.ndindex(*expert.shape):
        e = expert[n, j]
        out[n, j] = (silu(x[n] @ w["gate"][e]) * (x[n] @ w["up"][e])) @ w["down"][e]
    return out


def routing(pattern: str, N: int, k: int, E: int, rng: np.random.Generator) -> np.ndarray:
    """(N, k) expert ids following a named pattern."""
    if pattern == "uniform":
        return rng.integers(0, E, (N, k))
    if pattern == "skewed":  # like random init: most rows on two experts, a few elsewhere, many empty
        p = np.full(E, 0.02 / (E - 2))
        p[[1, E - 2]] = 0.49
        return rng.choice(E, size=(N, k), p=p / p.sum())
    if pattern == "one":  # every row on the last expert
        return np.full((N, k), E - 1)
    if pattern == "full-tiles":  # every used expert gets exactly a multiple of 16 rows
        return (np.arange(N * k) // 16 % E).reshape(N, k)[rng.permutation(N)]
    raise ValueError(pattern)


CASES = [  # (pattern, N tokens, k, E)
    ("uniform", 37, 2, 5), ("skewed", 300, 4, 64), ("skewed", 130, 2, 8), ("one", 50, 3, 6),
    ("full-tiles", 64, 2, 4), ("uniform", 1, 4, 64), ("skewed", 512, 1, 16), ("one", 400, 2, 4),
]


def weights(E: int, rng: np.random.Generator, hidden: int = HIDDEN) -> dict[str, np.ndarray]:
    return {"gate": rng.normal(size=(E, D, hidden)), "up": rng.normal(size=(E, D, hidden)),
            "down": rng.normal(size=(E, hidden, D))}


def torch_experts(w: dict[str, np.ndarray], dtype: torch.dtype) -> mt.Experts:
    E, _, hidden = w["gate"].shape
    ex = mt.Experts(E, D, hidden, dtype=dtype)
    with torch.no_grad():
        for n, a in w.items():
            getattr(ex, n).copy_(torch.from_numpy(a))
    return ex


def jax_experts(w: dict[str, np.ndarray], dtype: jnp.dtype) -> mj.Experts:
    E, _, hidden = w["gate"].shape
    ex = nnx.eval_shape(lambda: mj.Experts(E, D, hidden, dtype=dtype, rngs=nnx.Rngs(0)))
    for n, a in w.items():
        getattr(ex, n).set_value(jnp.asarray(a, dtype=dtype))
    return ex


@nnx.jit
def _jcall(ex: mj.Experts, x: jax.Array, expert: jax.Array) -> jax.Array:
    return ex(x, expert)


def report(name: str, got, ref: np.ndarray) -> float:
    """helpers.report's max abs error relative to max(1, max |ref|)."""
    return helpers.report(name, got, ref) / max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("hidden", [HIDDEN, 5])  # 5: 20-byte float32 rows, torch's padded fallback
@pytest.mark.parametrize("pattern, N, k, E", CASES)
def test_experts_equal_a_row_by_row_loop(pattern, N, k, E, hidden):
    rng = np.random.default_rng(N * 7 + E)
    w, x = weights(E, rng, hidden), rng.normal(size=(N, D))
    expert = routing(pattern, N, k, E, rng)
    ref = naive(x, expert, w)
    idx = expert.astype(np.int32)
    T = torch.from_numpy
    # float64: torch's padded batched matmuls and JAX's tile loop
    assert report("torch float64", torch_experts(w, torch.float64)(T(x), T(idx)), ref) < 1e-12
    assert report("jax float64", _jcall(jax_experts(w, jnp.float64), jnp.asarray(x), jnp.asarray(idx)), ref) < 1e-12
    # float32: torch's grouped_mm (its padded fallback for hidden=5)
    x32 = x.astype(np.float32)
    assert report("torch float32", torch_experts(w, torch.float32)(T(x32), T(idx)), ref) < 1e-5
    assert report("jax float32", _jcall(jax_experts(w, jnp.float32), jnp.asarray(x32), jnp.asarray(idx)), ref) < 1e-5


def test_bfloat16_dispatch_runs_in_both_twins():
    rng = np.random.default_rng(3)
    w, x = weights(8, rng), rng.normal(size=(40, D))
    expert = routing("skewed", 40, 2, 8, rng).astype(np.int32)
    ref = naive(x, expert, w)
    t = torch_experts(w, torch.bfloat16)(torch.from_numpy(x).bfloat16(), torch.from_numpy(expert))
    j = _jcall(jax_experts(w, jnp.bfloat16), jnp.asarray(x, jnp.bfloat16), jnp.asarray(expert))
    assert t.dtype == torch.bfloat16 and j.dtype == jnp.bfloat16
    scale = np.abs(ref).max()
    assert report("torch bfloat16", t, ref) < 5e-2 * scale and report("jax bfloat16", j, ref) < 5e-2 * scale


@pytest.mark.parametrize("pattern, N, k, E", CASES[:5])
def test_jax_tile_vjp_equals_autodiff_of_a_dense_reference(pattern, N, k, E):
    """The hand-written VJP of the tile loop against jax.grad of an all-experts masked computation."""
    rng = np.random.default_rng(11 + N)
    w, x = weights(E, rng), rng.normal(size=(N, D))
    expert = jnp.asarray(routing(pattern, N, k, E, rng).astype(np.int32))
    ct = jnp.asarray(rng.normal(size=(N, k, D)))

    def dense(x, gate, up, down):  # every expert on every row, then the chosen one kept: (N, k, D)
        h = jax.nn.silu(jnp.einsum("nd,edh->neh", x, gate)) * jnp.einsum("nd,edh->neh", x, up)
        y = jnp.einsum("neh,ehd->ned", h, down)  # (N, E, D)
        return jnp.take_along_axis(y, expert[..., None], axis=1)  # (N, k, D)

    def tiles(x, gate, up, down):
        ex = jax_experts({"gate": gate, "up": up, "down": down}, jnp.float64)
        return ex(x, expert)

    args = (jnp.asarray(x), *(jnp.asarray(w[n]) for n in ("gate", "up", "down")))
    want = jax.grad(lambda *a: jnp.vdot(dense(*a), ct), argnums=(0, 1, 2, 3))(*args)
    got = jax.jit(jax.grad(lambda *a: jnp.vdot(tiles(*a), ct), argnums=(0, 1, 2, 3)))(*args)
    for name, g, r in zip(("x", "gate", "up", "down"), got, want):
        assert report(f"d{name}", g, np.asarray(r)) < 1e-12, name


def test_torch_grouped_mm_gradients_equal_the_float64_padded_path():
    rng = np.random.default_rng(5)
    E, N, k = 16, 96, 4
    w, x = weights(E, rng), rng.normal(size=(N, D))
    expert = torch.from_numpy(routing("skewed", N, k, E, rng).astype(np.int32))
    ct = rng.normal(size=(N, k, D))
    grads = {}
    for dtype in (torch.float64, torch.float32):
        ex = torch_experts(w, dtype)
        xt = torch.from_numpy(x).to(dtype).requires_grad_()
        ex(xt, expert).backward(torch.from_numpy(ct).to(dtype))
        grads[dtype] = [xt.grad] + [getattr(ex, n).grad for n in ("gate", "up", "down")]
    for name, g32, g64 in zip(("x", "gate", "up", "down"), grads[torch.float32], grads[torch.float64]):
        assert report(f"d{name} float32 vs float64", g32, g64.numpy()) < 1e-5, name


# --------------------------------------------------------------------------- small batches (decoding)


@pytest.mark.parametrize("N, k", [(1, 1), (1, 2), (2, 2), (1, 4)])
def test_small_batch_paths_equal_a_row_by_row_loop(N, k):
    """At most SMALL_ROWS rows: torch row by row (CPU), through gathered weights (GPU, compile) and all
    experts densely (compile), jax through gathered weights; each against the NumPy loop, and torch's
    gradients against the padded path."""
    assert N * k <= mt.experts.SMALL_ROWS and N * k <= mj.experts.SMALL_ROWS
    rng = np.random.default_rng(20 + N * k)
    E = 6
    w, x = weights(E, rng), rng.normal(size=(N, D))
    expert = rng.integers(0, E, (N, k)).astype(np.int32)
    expert[0, -1] = expert[0, 0]  # one expert twice in a row
    ref = naive(x, expert, w)
    T = torch.from_numpy
    ex = torch_experts(w, torch.float64)
    args = (ex.gate, ex.up, ex.down)
    assert report("torch Experts", ex(T(x), T(expert)), ref) < 1e-12
    assert report("torch _gathered", mt.experts._gathered(T(x), T(expert), *args), ref) < 1e-12
    assert report("torch _dense", mt.experts._dense(T(x), T(expert), *args), ref) < 1e-12
    assert report("torch dense_reference", mt.experts.dense_reference(T(x), T(expert), *args), ref) < 1e-12
    assert report("jax Experts", _jcall(jax_experts(w, jnp.float64), jnp.asarray(x), jnp.asarray(expert)), ref) < 1e-12
    jw = [jnp.asarray(w[n]) for n in ("gate", "up", "down")]
    assert report("jax dense_reference", mj.experts.dense_reference(jnp.asarray(x), jnp.asarray(expert), *jw), ref) < 1e-12
    x32 = x.astype(np.float32)
    assert report("torch float32", torch_experts(w, torch.float32)(T(x32), T(expert)), ref) < 1e-5
    assert report("jax float32", _jcall(jax_experts(w, jnp.float32), jnp.asarray(x32), jnp.asarray(expert)), ref) < 1e-5
    ct = T(rng.normal(size=(N, k, D)))
    grads = []
    for fn in (mt.experts._row_by_row, mt.experts._gathered, mt.experts._dense, lambda x, e, *a: mt.experts._padded(
            x.repeat_interleave(k, dim=0), e.reshape(-1).long(), *a).view(N, k, -1)):
        ex = torch_experts(w, torch.float64)
        xt = T(x).requires_grad_()
        fn(xt, T(expert), ex.gate, ex.up, ex.down).backward(ct)
        grads.append([xt.grad] + [getattr(ex, n).grad for n in ("gate", "up", "down")])
    for g in grads[:3]:
        for name, a, b in zip(("x", "gate", "up", "down"), g, grads[2]):
            assert report(f"d{name}", a, b.numpy()) < 1e-12, name


@pytest.mark.parametrize("tie", [False, True])
def test_moe_routes_a_lone_token_as_within_a_batch(tie):
    """A decoding token (small path) gets the same experts, margin and output as the same token inside a
    batch (grouped path), in both twins; with all router logits tied the experts are 0..k-1."""
    s = SHAPES["gqa-moe"]
    arrays = S.init_arrays(s, 0)
    tm, jm = mt.build(s, 0, "float64", weights=arrays), mj.build(s, 0, "float64", weights=arrays)
    t_moe, j_moe = tm.recurrent.block.ffn, jm.recurrent.block.ffn
    if tie:
        with torch.no_grad():
            t_moe.router.weight.zero_()
        j_moe.router.kernel[...] = jnp.zeros_like(j_moe.router.kernel[...])
    x = np.random.default_rng(6).normal(size=(1, 9, s.dim))
    with torch.no_grad():
        t_all, t_lone = t_moe(torch.from_numpy(x)), t_moe(torch.from_numpy(x[:, 4:5]))
    j_all, j_lone = _jmoe(j_moe, jnp.asarray(x)), _jmoe(j_moe, jnp.asarray(x[:, 4:5]))
    k = s.moe.top_k
    for name, (out, (idx, margin)), (out1, (idx1, margin1)) in (("torch", t_all, t_lone), ("jax", j_all, j_lone)):
        np.testing.assert_array_equal(np.asarray(idx1), np.asarray(idx)[:, 4:5], err_msg=name)
        # the router's (1, D) product may round differently from the (9, D) one: an ulp, not a routing change
        np.testing.assert_allclose(np.asarray(margin1), np.asarray(margin)[:, 4:5], rtol=1e-13, err_msg=name)
        assert report(f"{name} lone vs batch", np.asarray(out1), np.asarray(out)[:, 4:5]) < 1e-12
        if tie:
            assert (np.asarray(idx) == np.arange(k)).all(), name
    assert report("lone token, torch vs jax", t_lone[0], np.asarray(j_lone[0])) < 1e-12


@nnx.jit
def _jmoe(moe: mj.MoE, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    return moe(x)
