"""The torch twin's speed paths (issue 18) give the results of the plain paths.

Default tier (a few seconds): the eager RoPE fast path (one complex multiply, float32 and bfloat16) against
the real-valued formula it replaces and a float64 NumPy rotation, gradients included; the GQA attention
without its cat/split against a float64 model; generate's compile default (MYTHOS_COMPILE) and the
inductor cache directory. `slow` (torch.compile, tens of seconds each on 2 cores): the compiled forward and
the default compiled decode against the eager ones, and a second process reusing the compile cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import spec as S
from helpers import tiny
from mythos_torch import build, layers
from mythos_torch import generate as G

ROOT = Path(__file__).resolve().parents[1]


def rope_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The real-valued rotation of adjacent pairs (the float64 / compiled / exported path of apply_rope)."""
    x0, x1 = x.to(cos.dtype).unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., None, :], sin[..., None, :]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2).to(x.dtype)


def rope_numpy(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """The same rotation in float64 NumPy, written out pair by pair (an independent reference)."""
    x = x.astype(np.float64)
    out = np.empty_like(x)
    c, s = cos[..., None, :].astype(np.float64), sin[..., None, :].astype(np.float64)
    out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
    out[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
    return out


def tables(T: int, half: int, batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 RoPE tables (T, K/2), or (B, T, K/2) per row, of random angles."""
    rng = np.random.default_rng(3)
    ang = rng.uniform(-np.pi, np.pi, size=(T, half) if batch is None else (batch, T, half))
    return torch.from_numpy(np.cos(ang)).float(), torch.from_numpy(np.sin(ang)).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_row", [False, True])
def test_rope_fast_path_equals_the_real_formula(dtype, per_row):
    B, T, H, K = 3, 7, 4, 16
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((B, T, H, K))).to(dtype)
    cos, sin = tables(T, K // 2, B if per_row else None)
    fast = layers.apply_rope(x, cos, sin)
    assert fast.dtype == dtype and fast.shape == x.shape
    real = rope_real(x, cos, sin)
    # the same products and sums: equal up to an FMA the compiler may fuse (bitwise on this CPU)
    tol = dict(rtol=0, atol=0) if dtype == torch.bfloat16 else dict(rtol=1e-6, atol=1e-6)
    err = (fast.double() - real.double()).abs().max().item()
    torch.testing.assert_close(fast, real, **tol, msg=lambda m: f"fast vs real RoPE, max err {err:.3g}: {m}")
    ref = rope_numpy(x.double().numpy(), cos.numpy(), sin.numpy())  # the bf16 input values, exactly
    atol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # bf16: one output rounding (|x| < ~5)
    np.testing.assert_allclose(fast.double().numpy(), ref, rtol=0, atol=atol)


def test_rope_fast_path_takes_strided_input_and_keeps_float64_on_the_real_path():
    T, K = 5, 8
    cos, sin = tables(T, K // 2)
    base = torch.randn(2, T, 3 * K)
    x = base[..., K:2 * K].unflatten(-1, (1, K))  # (B, T, 1, K) not contiguous, as MLA's k_r after its split
    assert not x.is_contiguous()
    torch.testing.assert_close(layers.apply_rope(x, cos, sin), rope_real(x, cos, sin), rtol=1e-6, atol=1e-6)
    x64, c64, s64 = torch.randn(2, T, 2, K, dtype=torch.float64), cos.double(), sin.double()
    # float64 (parity runs) is the real formula itself, bitwise
    assert torch.equal(layers.apply_rope(x64, c64, s64), rope_real(x64, c64, s64))


def test_rope_fast_path_gradients_equal_the_real_formulas():
    T, K = 6, 8
    cos, sin = tables(T, K // 2)
    x = torch.randn(2, T, 3, K, requires_grad=True)
    w = torch.randn(2, T, 3, K)
    (g_fast,) = torch.autograd.grad((layers.apply_rope(x, cos, sin) * w).sum(), x)
    (g_real,) = torch.autograd.grad((rope_real(x, cos, sin) * w).sum(), x)
    torch.testing.assert_close(g_fast, g_real, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_float32_forward_with_the_fast_paths_matches_float64(attention):
    # GQA without its cat/split and the fast RoPE (float32) against the same weights in float64 (real RoPE)
    s = tiny(**{"attention.type": attention})
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, s.vocab_size, size=(2, 11)))
    with torch.no_grad():
        lo = build(s, 0, "float32")(ids, early_exit=False).logits
        hi = build(s, 0, "float64")(ids, early_exit=False).logits
    err = (lo.double() - hi).abs().max().item()
    assert err < 1e-4 * max(1.0, hi.abs().max().item()), f"float32 vs float64 logits: max err {err:.3g}"


def test_compile_default_follows_mythos_compile(monkeypatch):
    m = build(S.preset("tiny"), 0, "float32")
    n = G.COMPILE_MIN_TOKENS
    monkeypatch.setenv(G.COMPILE_ENV, "1")
    assert G.compile_by_default(m, n)
    assert not G.compile_by_default(m, n - 1)  # too few tokens to repay a compilation
    m._compiled = m._forward  # a step compiled before (stand-in): used for any length
    assert G.compile_by_default(m, 1)
    monkeypatch.setenv(G.COMPILE_ENV, "0")
    assert not G.compile_by_default(m, n)
    monkeypatch.setenv(G.COMPILE_ENV, "yes")
    with pytest.raises(ValueError, match="MYTHOS_COMPILE='yes' must be 0"):
        G.compile_by_default(m, n)


def test_tests_decode_eagerly_by_default():
    # conftest sets MYTHOS_COMPILE=0: generate(compile=None) builds no compiled step
    assert os.environ[G.COMPILE_ENV] == "0"
    m = build(S.preset("tiny"), 0, "float32")
    ids = torch.from_numpy(np.random.default_rng(2).integers(0, m.spec.vocab_size, size=(1, 5)))
    t0 = time.perf_counter()
    out = G.generate(m, ids, G.COMPILE_MIN_TOKENS)
    assert m._compiled is None and out.shape == (1, 5 + G.COMPILE_MIN_TOKENS)
    assert time.perf_counter() - t0 < 10, "an eager tiny decode took > 10 s: did it compile?"


def test_compile_cache_dir_is_under_the_user_cache(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv(G.CACHE_ENV, default_cache_dir())  # what importing torch._dynamo writes there
    assert G.compile_cache_dir() == str(tmp_path / "mythos" / "inductor") == os.environ[G.CACHE_ENV]
    monkeypatch.delenv(G.CACHE_ENV)
    assert G.compile_cache_dir() == str(tmp_path / "mythos" / "inductor")
    monkeypatch.setenv(G.CACHE_ENV, str(tmp_path / "mine"))  # a user's own directory is kept
    assert G.compile_cache_dir() == str(tmp_path / "mine")


def test_compile_dispatch_leaves_eager_experts_unchanged():
    m = build(S.preset("tiny"), 0, "float32")
    moe = m.recurrent.block.ffn
    x = torch.randn(2, 40, m.spec.dim)  # 80 * k rows: more than COMPILED_ROWS
    with torch.no_grad():
        before = moe(x)[0]
        G._eager_large_experts(m)
        assert moe.dispatch is G._dispatch
        assert torch.equal(moe(x)[0], before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_grouped_experts_equal_the_dense_reference_and_the_grouped_path(dtype):
    from mythos_torch.experts import dense_reference

    m = build(tiny(**{"moe.n_experts": 8, "moe.top_k": 2}), 0, "float32")
    ex = m.recurrent.block.ffn.experts.to(dtype)
    rng = np.random.default_rng(6)
    x = torch.from_numpy(rng.standard_normal((40, m.spec.dim))).to(dtype)
    idx = torch.from_numpy(rng.integers(0, 8, size=(40, 2))).int()
    idx[:, 1] = torch.where(idx[:, 1] == idx[:, 0], (idx[:, 0] + 1) % 8, idx[:, 1])  # distinct slots per token
    idx[:5] = 3  # one crowded expert; some experts may get no row at all
    idx[:5, 1] = 4
    with torch.no_grad():
        got = G._grouped_static(ex, x, idx)
        ref = dense_reference(x, idx, ex.gate, ex.up, ex.down)
        assert torch.equal(got, ex(x, idx))  # the grouped path's rows, groups and products: bitwise
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)


# --------------------------------------------------------------------------- slow: torch.compile


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_forward_matches_eager(dtype, monkeypatch, tmp_path):
    monkeypatch.setenv(G.CACHE_ENV, str(tmp_path))
    s = S.preset("tiny")
    m = build(s, 0, dtype)
    ids = torch.from_numpy(np.random.default_rng(4).integers(0, s.vocab_size, size=(2, 24)))
    with torch.no_grad():
        eager = m(ids, early_exit=False)
        # bfloat16: near-tie halting / routing decisions may flip under inductor's reordered sums; the
        # compiled run replays eager's decisions (the bf16 parity rule) so the continuous outputs compare
        replay = {} if dtype == "float32" else dict(force_halt=eager.loop_counts, force_experts=eager.traces.expert_idx)
        out = G.compiled_forward(m)(ids, early_exit=False, **replay)
    assert out.n_steps == eager.n_steps and torch.equal(out.loop_counts, eager.loop_counts)
    tol = 1e-4 if dtype == "float32" else 5e-2
    err = (out.logits.float() - eager.logits.float()).abs().max().item()
    assert err <= tol * max(1.0, eager.logits.abs().max().item()), f"compiled vs eager logits: max err {err:.3g}"


@pytest.mark.slow
def test_default_decode_compiles_and_gives_the_eager_tokens(monkeypatch, tmp_path):
    monkeypatch.setenv(G.CACHE_ENV, str(tmp_path))
    s = S.preset("tiny")
    m = build(s, 0, "float32")
    ids = torch.from_numpy(np.random.default_rng(5).integers(0, s.vocab_size, size=(2, 6)))
    n = G.COMPILE_MIN_TOKENS
    eager = G.generate(m, ids, n, compile=False)
    monkeypatch.setenv(G.COMPILE_ENV, "1")
    compiled = G.generate(m, ids, n)  # compile=None: the default
    assert m._compiled is not None
    assert torch.equal(eager, compiled)


@pytest.mark.slow
def test_second_process_reuses_the_compile_cache(tmp_path):
    # the same compiled decode in two fresh processes sharing one cache directory: the second compiles faster
    script = textwrap.dedent("""
        import time, numpy as np, torch, spec, mythos_torch as mt
        m = mt.build(spec.preset("tiny"), 0, "float32")
        ids = torch.from_numpy(np.arange(6)[None] % m.spec.vocab_size)
        t0 = time.perf_counter()
        m.generate(ids, 3, compile=True)
        print(time.perf_counter() - t0)
    """)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    env.pop(G.CACHE_ENV, None)
    times = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        times.append(float(r.stdout.strip().splitlines()[-1]))
    assert any((tmp_path / "mythos" / "inductor").iterdir()), "nothing was written to the cache"
    print(f"first process {times[0]:.1f} s, second {times[1]:.1f} s")
    assert times[1] < 0.7 * times[0], f"the second process compiled as long as the first: {times}"
