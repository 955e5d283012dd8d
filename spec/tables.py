"""Framework-free constant tables that both twins start from (RoPE angles, loop-index embedding).

Computing them once in NumPy means the twins rotate by bit-identical angles. Under
``semantics: mythos`` angles are float64; under ``openmythos-0.5`` they are float32, as open-mythos
computes them (see docs/semantics.md).
"""

from __future__ import annotations

import numpy as np

from .schema import Spec


def rope_table(s: Spec, n_pos: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)`` of shape (n_pos, rope_dim // 2) for positions 0..n_pos-1 (default max_seq_len).

    ``attention.rope: false`` (NoPE) gives cos = 1, sin = 0 at every position: the rotation
    ``x cos - y sin, x sin + y cos`` is then exactly the identity, so every attention layer (prelude,
    loop, coda; GQA q/k, MLA q_rope/k_r), the KV caches, paged decoding and ONNX export run without
    positions in both twins with no twin code of their own.
    """
    n = s.max_seq_len if n_pos is None else n_pos
    d = s.rope_dim
    if not s.attention.rope:
        dt = np.float32 if s.semantics == "openmythos-0.5" else np.float64
        return np.ones((n, d // 2), dtype=dt), np.zeros((n, d // 2), dtype=dt)
    if s.semantics == "openmythos-0.5":
        # float32 frequencies and angles, as open-mythos' precompute_rope_freqs
        f32 = np.float32
        freqs = f32(1.0) / (f32(s.rope_theta) ** (np.arange(0, d, 2, dtype=f32) / f32(d)))
        angles = np.outer(np.arange(n, dtype=f32), freqs).astype(f32)
        return np.cos(angles), np.sin(angles)
    # float64 angles: both twins start from the same table
    freqs = s.rope_theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    angles = np.outer(np.arange(n, dtype=np.float64), freqs)
    return np.cos(angles), np.sin(angles)


def loop_table(s: Spec, n_loops: int, dtype: str = "float64") -> np.ndarray:
    """Loop-index embedding rows ``[sin(t w); cos(t w)]`` for t = 0..n_loops-1, shape (n_loops, loop_dim).

    ``dtype`` is the activation dtype; it matters only under openmythos-0.5, where the angles are
    computed in it (bfloat16 is approximated by float32 there).
    """
    L = s.loop_dim
    theta = s.recurrent.loop_embedding.theta
    if L == 0:
        return np.zeros((n_loops, 0))
    if s.semantics == "openmythos-0.5":
        dt = np.float64 if dtype == "float64" else np.float32
        freqs = dt(1.0) / (dt(theta) ** (np.arange(0, L, 2, dtype=dt) / dt(L)))
        angles = np.arange(n_loops, dtype=dt)[:, None] * freqs[None, :]
    else:
        freqs = theta ** (-np.arange(0, L, 2, dtype=np.float64) / L)
        angles = np.arange(n_loops, dtype=np.float64)[:, None] * freqs[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)[:, :L]
