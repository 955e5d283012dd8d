"""Component parity, bottom up (STYLE 14): build both twins from the same weights in float64, call the
same submodule of each on the same NumPy input, and compare (reporting max and mean error) before the
whole model is compared in test_parity.py. Runs eagerly: no JAX compilation of the whole model."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import mythos_jax as mj
import mythos_torch as mt
import spec as S
from helpers import as_float64 as _np
from strategies import SHAPES

ATOL = RTOL = 1e-12  # float64, O(1) values: the twins differ by a few ulps per op


def assert_close(name: str, ref, got, atol: float = ATOL, rtol: float = RTOL) -> None:
    """Compare twin outputs as float64; the message reports max and mean absolute error."""
    a = _np(ref)
    b = _np(got)
    assert a.shape == b.shape, f"{name}: shapes {a.shape} (torch) vs {b.shape} (jax)"
    with np.errstate(invalid="ignore"):  # inf - inf: equal infinities count as equal below
        err = np.where(a == b, 0.0, np.abs(a - b))
    ok = err <= atol + rtol * np.abs(a)
    assert ok.all(), (f"{name}: max abs error {err.max():.3e}, mean {err.mean():.3e}, "
                      f"{int((~ok).sum())}/{ok.size} elements beyond {atol:.0e} + {rtol:.0e}*|torch|")


def T(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def J(a: np.ndarray) -> jnp.ndarray:
    return jnp.asarray(a)


# Eager JAX compiles every op for every new shape (seconds per module call); one jit per call is faster.
@nnx.jit
def _call(module, *args):
    return module(*args)


def jcall(module, *args):
    """module(*args) for an NNX submodule, compiled once per module structure and argument shapes."""
    return _call(module, *args)


@nnx.jit
def _decay(injection):
    return injection.decay()


def jfun(fn, *args, static: tuple[int, ...] = ()):
    """fn(*args) for a free JAX function, compiled; `static` positions are Python values (eps, k, ...)."""
    return _jit(fn, static)(*args)


@functools.lru_cache(maxsize=None)
def _jit(fn, static):
    return jax.jit(fn, static_argnums=static)


class Twins:
    """Both twins of one spec, float64, holding the same manifest arrays."""

    def __init__(self, s: S.Spec, seed: int = 0, weights: dict | None = None):
        self.spec = s
        w = S.init_arrays(s, seed) if weights is None else weights
        self.torch = mt.build(s, seed=seed, dtype="float64", weights=w)
        self.jax = mj.build(s, seed=seed, dtype="float64", weights=w)
        self.rng = np.random.default_rng(seed + 100)

    def x(self, *shape: int, scale: float = 1.0) -> np.ndarray:
        return self.rng.standard_normal(shape) * scale

    def rope(self, T_: int) -> tuple[np.ndarray, np.ndarray]:
        return S.rope_table(self.spec, T_)

    def sub(self, path: str):
        """The submodule at a manifest-style path ("recurrent.block.attn") in each twin."""
        out = []
        for m in (self.torch, self.jax):
            for name in path.split("."):
                m = m[int(name)] if name.isdigit() else getattr(m, name)
            out.append(m)
        return out


def _loosen_weights(s: S.Spec, seed: int) -> dict:
    """init_arrays with RMSNorm weights, injection and router bias moved off their constant inits."""
    w = S.init_arrays(s, seed)
    rng = np.random.default_rng(seed + 7)
    for k, v in w.items():
        if k.endswith("norm.weight") or k.endswith("kv_norm.weight") or k.endswith("q_norm.weight"):
            w[k] = 1.0 + 0.2 * rng.standard_normal(v.shape)
    w["recurrent.injection.log_A"] = rng.uniform(-3, 3, w["recurrent.injection.log_A"].shape)
    w["recurrent.injection.log_dt"] = np.array([0.5])
    if s.recurrent.ffn == "moe":
        w["recurrent.block.ffn.router_bias"] = 0.05 * rng.standard_normal(s.moe.n_experts)
    return w


@pytest.fixture(scope="module")
def gqa() -> Twins:
    s = SHAPES["gqa-moe"]  # gqa, moe k=2 of 4, LoRA, linear halting head
    return Twins(s, 0, _loosen_weights(s, 0))


@pytest.fixture(scope="module")
def mla() -> Twins:
    s = SHAPES["mla-moe-mlp"]  # mla, moe k=1, mlp halting head, untied
    return Twins(s, 1, _loosen_weights(s, 1))


@pytest.fixture(scope="module")
def om() -> Twins:
    s = SHAPES["om-0.5"]  # openmythos-0.5: mla with RoPE in float32
    return Twins(s, 2)


# --------------------------------------------------------------------------- leaf layers


def test_rms_norm(gqa):
    x = gqa.x(2, 5, 32, scale=3.0)
    w = 1.0 + 0.1 * gqa.x(32)
    assert_close("rms_norm", mt.rms_norm(T(x), T(w), 1e-6), jfun(mj.rms_norm, J(x), J(w), 1e-6, static=(2,)))
    tn, jn = gqa.sub("norm")
    assert_close("RMSNorm (final norm)", tn(T(x)), jcall(jn, J(x)))
    tiny = gqa.x(1, 3, 32, scale=1e-5)  # eps dominates
    assert_close("rms_norm, |x|~eps", mt.rms_norm(T(tiny), T(w), 1e-6), jfun(mj.rms_norm, J(tiny), J(w), 1e-6, static=(2,)))


@pytest.mark.parametrize("twins", ["gqa", "om"])
def test_rope(twins, request):
    tw = request.getfixturevalue(twins)
    s = tw.spec
    T_, K = 64, s.rope_dim
    x = tw.x(2, T_, 3, K)
    cos, sin = tw.rope(T_)
    if s.semantics == "openmythos-0.5":  # the rotation runs in float32 (open-mythos' x.float())
        cos, sin = cos.astype(np.float32), sin.astype(np.float32)
    # a float32 rotation: XLA may fuse x0*c - x1*s into one FMA, so allow a float32 ulp or two
    tol = 1e-12 if cos.dtype == np.float64 else 1e-6
    assert_close(f"apply_rope ({s.semantics})", mt.apply_rope(T(x), T(cos), T(sin)), jfun(mj.apply_rope, J(x), J(cos), J(sin)),
                 atol=tol, rtol=tol)
    # position 0 is the identity
    np.testing.assert_array_equal(_np(mt.apply_rope(T(x), T(cos), T(sin)))[:, 0], x[:, 0].astype(cos.dtype))


def test_swiglu(gqa):
    tf, jf = gqa.sub("prelude.0.ffn")
    x = gqa.x(2, 7, 32)
    assert_close("SwiGLU (prelude.0.ffn)", tf(T(x))[0], jcall(jf, J(x))[0])


def test_causal_attention():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, 6, 3, 8)) for _ in range(3))
    kk, vv = rng.standard_normal((2, 9, 3, 8)), rng.standard_normal((2, 9, 3, 8))  # queries are the last 6 of 9 keys
    assert_close("causal_attention", mt.causal_attention(T(q), T(k), T(v), 0.3)[0], jfun(mj.causal_attention, J(q), J(k), J(v), 0.3, static=(3,))[0])
    assert_close("causal_attention, S > T", mt.causal_attention(T(q), T(kk), T(vv), 0.3)[0],
                 jfun(mj.causal_attention, J(q), J(kk), J(vv), 0.3, static=(3,))[0])


# --------------------------------------------------------------------------- attention


@pytest.mark.parametrize("T_", [1, 16, 64])
def test_gqa_attention(gqa, T_):
    ta, ja = gqa.sub("recurrent.block.attn")
    x = gqa.x(2, T_, 32)
    cos, sin = gqa.rope(T_)
    assert_close(f"GQAttention T={T_}", ta(T(x), T(cos), T(sin))[0], jcall(ja, J(x), J(cos), J(sin))[0])


@pytest.mark.parametrize("T_", [1, 16, 64])
def test_mla_attention(mla, T_):
    ta, ja = mla.sub("prelude.0.attn")
    x = mla.x(2, T_, 32)
    cos, sin = mla.rope(T_)
    assert_close(f"MLAttention T={T_}", ta(T(x), T(cos), T(sin))[0], jcall(ja, J(x), J(cos), J(sin))[0])


def test_mla_attention_openmythos_float32_rope(om):
    ta, ja = om.sub("recurrent.block.attn")
    x = om.x(2, 16, 32)
    cos, sin = (a.astype(np.float32) for a in om.rope(16))
    # float32 rotation inside a float64 model: the twins round the same float32 products
    assert_close("MLAttention (openmythos-0.5)", ta(T(x), T(cos), T(sin))[0], jcall(ja, J(x), J(cos), J(sin))[0], atol=1e-9, rtol=1e-9)


# --------------------------------------------------------------------------- MoE


def test_route_breaks_ties_to_the_lower_index():
    rng = np.random.default_rng(5)
    logits = np.round(rng.standard_normal((4, 7, 6)), 1)  # rounded: many exact ties
    logits[0, 0] = 0.0  # all tie
    bias = np.zeros(6)
    for k in (1, 2, 3, 6):
        ti, tw, tm = mt.route(T(logits), T(bias), k)
        ji, jw, jm = jfun(mj.route, J(logits), J(bias), k, static=(2,))
        np.testing.assert_array_equal(_np(ti), _np(ji), err_msg=f"route k={k}: expert indices")
        assert_close(f"route k={k} weights", tw, jw)
        assert_close(f"route k={k} margin", tm, jm)
        np.testing.assert_array_equal(_np(ti)[0, 0], np.arange(k))


def test_moe(gqa):
    tm, jm = gqa.sub("recurrent.block.ffn")
    x = gqa.x(3, 16, 32)
    to, (ti, tg) = tm(T(x))
    jo, (ji, jg) = jcall(jm, J(x))
    np.testing.assert_array_equal(_np(ti), _np(ji), err_msg="MoE expert indices")
    assert_close("MoE margin", tg, jg)
    assert_close("MoE out", to, jo)
    # forced experts (the replay path): the reversed choice, through both twins
    forced = np.ascontiguousarray(_np(ti)[..., ::-1]).astype(np.int64)
    fo, (fi, _) = tm(T(x), T(forced))
    go, (gi, _) = jcall(jm, J(x), J(forced))
    np.testing.assert_array_equal(_np(fi), forced)
    np.testing.assert_array_equal(_np(gi), forced)
    assert_close("MoE out, forced experts", fo, go)


def test_moe_top1(mla):
    tm, jm = mla.sub("recurrent.block.ffn")
    x = mla.x(2, 9, 32)
    to, (ti, tg) = tm(T(x))
    jo, (ji, jg) = jcall(jm, J(x))
    np.testing.assert_array_equal(_np(ti), _np(ji))
    assert_close("MoE k=1 margin", tg, jg)
    assert_close("MoE k=1 out", to, jo)


def test_block_with_moe(gqa):
    tb, jb = gqa.sub("recurrent.block")
    x = gqa.x(2, 16, 32)
    cos, sin = gqa.rope(16)
    (tx, (ti, tg), _), (jx, (ji, jg), _) = tb(T(x), T(cos), T(sin)), jcall(jb, J(x), J(cos), J(sin))
    np.testing.assert_array_equal(_np(ti), _np(ji))
    assert_close("Block (recurrent.block) out", tx, jx)
    assert_close("Block margin", tg, jg)


# --------------------------------------------------------------------------- recurrent parts


def test_loop_embedding(gqa):
    rows = S.loop_table(gqa.spec, 6)
    h = gqa.x(2, 5, 32)
    for t in range(6):
        assert_close(f"add_loop_embedding t={t}", mt.add_loop_embedding(T(h), T(rows[t])), jfun(mj.add_loop_embedding, J(h), J(rows[t])))


def test_lora_including_steps_beyond_training_depth(gqa):
    tl, jl = gqa.sub("recurrent.lora")
    o = gqa.x(2, 7, 32)
    for t in range(gqa.spec.recurrent.max_loop_iters + 3):
        assert_close(f"LoRA t={t}", tl(T(o), t), jcall(jl, J(o), t))


def test_lti_injection(gqa):
    ti, ji = gqa.sub("recurrent.injection")
    A = _np(ti.decay())
    assert_close("LTIInjection.decay", ti.decay(), _decay(ji))
    assert ((A > 0) & (A < 1)).all()
    h, e, o = gqa.x(2, 5, 32), gqa.x(2, 5, 32), gqa.x(2, 5, 32)
    assert_close("LTIInjection", ti(T(h), T(e), T(o)), jcall(ji, J(h), J(e), J(o)))


def test_lti_injection_at_the_clip():
    s = SHAPES["gqa-moe"]
    w = S.init_arrays(s, 0)
    w["recurrent.injection.log_A"] = np.linspace(-40, 40, s.dim)  # beyond +-20 on both ends
    tw = Twins(s, 0, w)
    ti, ji = tw.sub("recurrent.injection")
    assert_close("LTIInjection.decay, clipped", ti.decay(), _decay(ji), atol=1e-15, rtol=1e-15)
    A = _np(ti.decay())
    assert ((A > 0) & (A < 1)).all()


@pytest.mark.parametrize("twins", ["gqa", "mla"])
def test_halting_head(twins, request):
    tw = request.getfixturevalue(twins)
    ta, ja = tw.sub("recurrent.act")
    h = tw.x(3, 11, 32, scale=2.0)
    assert_close(f"ACT halting p ({tw.spec.halting.head} head)", ta(T(h)), jcall(ja, J(h)))


def test_act_step():
    rng = np.random.default_rng(9)
    p = rng.uniform(0, 1, (3, 8))
    c = rng.uniform(0, 1, (3, 8))
    running = rng.uniform(size=(3, 8)) < 0.7
    forced = rng.uniform(size=(3, 8)) < 0.3
    p[0, 0], c[0, 0] = 0.49, 0.5  # c + p just below 0.99
    p[0, 1], c[0, 1] = 0.5, 0.49  # ... and exactly at it
    for last in (False, True):
        for f in (None, forced):
            ft = None if f is None else T(f)
            fj = None if f is None else J(f)
            tr = mt.act_step(T(p), T(c), T(running), 0.99, last, ft)
            jr = jfun(mj.act_step, J(p), J(c), J(running), 0.99, last, fj, static=(3, 4))
            for name, a, b in zip(("weight", "c", "running", "halts"), tr, jr):
                if name in ("running", "halts"):
                    np.testing.assert_array_equal(_np(a), _np(b), err_msg=f"act_step {name} last={last} forced={f is not None}")
                else:
                    assert_close(f"act_step {name}", a, b)
