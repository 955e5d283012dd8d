"""The routed experts' dispatch kernels (ARCHITECTURE.md section 2): tokens sorted by expert, tiles of
sorted rows multiplied by their expert's weights; decoding-sized calls take a gathered path. This is the
one file in which the twins differ beyond the framework (docs/design.md)."""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from .precision import mm, mm_einsum

# the name under which the tiles' output is saved for the backward pass (jax.checkpoint policies)
EXPERT_OUT = "expert_out"


class Experts(nnx.Module):
    """E routed SwiGLU experts, weights stacked [E, in, out] (`gate`, `up`, `down`)."""

    def __init__(self, n_experts: int, dim: int, hidden: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        # values come from load_arrays
        self.gate = nnx.Param(jnp.zeros((n_experts, dim, hidden), dtype=dtype))
        self.up = nnx.Param(jnp.zeros((n_experts, dim, hidden), dtype=dtype))
        self.down = nnx.Param(jnp.zeros((n_experts, hidden, dim), dtype=dtype))

    def __call__(self, x: jax.Array, expert: jax.Array) -> jax.Array:
        """Token n of x (N, D) through each of its experts expert[n] (N, k) -> (N, k, D), slot by slot.

        The N*k (token, slot) rows are sorted by expert (stable) and cut into tiles of sorted rows,
        each multiplied by its own expert's weights in a loop (`expert_tiles`): an expert's rows
        fill whole big tiles first, then small ones, the last partly; only the tiles in use run.
        (lax.ragged_dot lowers on the CPU to a masked matmul over all E experts; batched matmuls over
        per-tile gathered weights copy the weight stack once per tile.) At most SMALL_ROWS rows
        (decoding at batch 1) skip the sorting and tiling, which cost more than the products
        (`_gathered`).
        """
        N, k = expert.shape
        D = x.shape[-1]
        E = self.gate.shape[0]
        if N * k <= SMALL_ROWS:  # static: one compiled program per shape
            return _gathered(x, expert, self.gate[...], self.up[...], self.down[...])
        sizes = _tile_sizes(N * k, E)
        flat = expert.reshape(-1)  # (M,), row m = (token m // k, slot m % k)
        order = jnp.argsort(flat, stable=True).astype(jnp.int32)  # (M,) rows sorted by expert
        counts = jnp.bincount(flat, length=E).astype(jnp.int32)  # (E,)
        # sorted rows, then zero rows, so that every tile's window lies inside
        src = jnp.concatenate([order // k, jnp.full((sizes[-1],), N, dtype=jnp.int32)])
        xs = jnp.concatenate([x, jnp.zeros((1, D), x.dtype)])[src]  # (M + b, D); token N is the zero row
        tiles = _tiles(counts, sizes, N * k)
        ys = expert_tiles(xs, self.gate[...], self.up[...], self.down[...], tiles, sizes)  # (M + b, D)
        ys = checkpoint_name(ys, EXPERT_OUT)  # a loop step's backward keeps it (model.py's remat policy)
        inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32))
        return ys[inverse].reshape(N, k, D)  # back to (token, slot) order


# (token, slot) rows up to which Experts skips the tiles: a decoding token at batch 1 (k = 2) spent
# about half of the decode step in the argsort/bincount/tile loop; 3.2x -> 4.2x open-mythos' decode
SMALL_ROWS = 4


def _gathered(x: jax.Array, expert: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """Token n of x (N, D) through each of its experts expert[n] (N, k) -> (N, k, D): each row's expert
    weights gathered, batched (1, D) products (differentiable as it stands)."""
    N, k = expert.shape
    flat = expert.reshape(-1)  # (M,), row m = (token m // k, slot m % k)
    xs = jnp.repeat(x, k, axis=0)  # (M, D)
    hs = jax.nn.silu(mm_einsum("md,mdh->mh", xs, gate[flat])) * mm_einsum("md,mdh->mh", xs, up[flat])  # (M, hidden)
    return mm_einsum("mh,mhd->md", hs, down[flat]).reshape(N, k, -1)


def _tile_sizes(M: int, E: int) -> tuple[int, ...]:
    """Rows per tile, big then small: small ~ M / E (a power of two in 16..64), big = 8 x small if M holds one.

    Measured on XLA:CPU: a (64, D) x (D, hidden) product runs at about half the rate of a (512, D)
    one, so hot experts take big tiles, while small tiles bound every expert's padding.
    """
    small = min(64, max(16, 1 << max(0, -(-M // E) - 1).bit_length()))
    return (8 * small, small) if M >= 8 * small else (small,)


# per tile size: (expert, first sorted row, rows of that expert in the window: each (bound,); tiles in use ())
Tiles = tuple[tuple[jax.Array, jax.Array, jax.Array, jax.Array], ...]


def _tiles(counts: jax.Array, sizes: tuple[int, ...], M: int) -> Tiles:
    """The tiles of each size for experts with counts (E,) of the M sorted rows.

    An expert's rows take as many whole tiles of the first size as fit, then of the next, ...; the
    last size also takes a partly filled tile, whose window runs on into later experts' rows. Tiles
    in use come first, in sorted-row order.
    """
    E = counts.shape[0]
    start = jnp.cumsum(counts) - counts  # first sorted row of each expert not yet in a tile
    left = counts  # rows of each expert not yet in a tile
    out = []
    for level, b in enumerate(sizes):
        last = level == len(sizes) - 1
        n = (left + b - 1) // b if last else left // b  # (E,) tiles of this size per expert
        ends = jnp.cumsum(n)
        bound = -(-M // b) + E if last else M // b  # static: the most tiles of this size there can be
        j = jnp.arange(bound, dtype=jnp.int32)
        expert = jnp.minimum(jnp.searchsorted(ends, j, side="right"), E - 1).astype(jnp.int32)
        q = j - (ends[expert] - n[expert])  # tile index within its expert
        rows = jnp.clip(left[expert] - q * b, 0, b).astype(jnp.int32)
        out.append((expert, start[expert] + q * b, rows, ends[-1]))
        start, left = start + n * b, left - n * b
    return tuple(out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def expert_tiles(xs: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, tiles: Tiles,
                 sizes: tuple[int, ...]) -> jax.Array:
    """Sorted rows xs (M + b, D) through their experts' SwiGLU, tile by tile -> (M + b, D).

    A tile of size b reads the b rows from its first row and writes only those of its expert (the
    others belong to later experts, whose own tiles write them).
    """
    ys = jnp.zeros((xs.shape[0], down.shape[-1]), dtype=xs.dtype)
    for b, level in zip(sizes, tiles):
        def body(i: jax.Array, ys: jax.Array, b: int = b, level: tuple[jax.Array, ...] = level) -> jax.Array:
            x, e, put = _tile(xs, level, i, b)
            h = jax.nn.silu(mm(x, gate[e])) * mm(x, up[e])  # (b, hidden)
            return put(ys, mm(h, down[e]))

        # a loop, not batched matmuls: each tile reads its expert's weights in place, and the trip
        # count is the tiles in use (a scan would need a static count to be differentiable: hence the VJP)
        ys = jax.lax.fori_loop(0, level[3], body, ys)
    return ys


def _tile(xs: jax.Array, level: tuple[jax.Array, ...], i: jax.Array, b: int
          ) -> tuple[jax.Array, jax.Array, Callable[[jax.Array, jax.Array], jax.Array]]:
    """Tile i of a size-b level: its rows of xs (b, D), its expert, and put(buf, rows) writing only its own rows."""
    expert, start, rows, _ = level
    s = start[i]
    mine = (jnp.arange(b) < rows[i])[:, None]  # (b, 1)

    def put(buf: jax.Array, new: jax.Array) -> jax.Array:
        old = jax.lax.dynamic_slice_in_dim(buf, s, b)
        return jax.lax.dynamic_update_slice_in_dim(buf, jnp.where(mine, new, old), s, 0)

    return jax.lax.dynamic_slice_in_dim(xs, s, b), expert[i], put


def _expert_tiles_fwd(xs: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array, tiles: Tiles,
                      sizes: tuple[int, ...]) -> tuple[jax.Array, tuple[jax.Array | Tiles, ...]]:
    return expert_tiles(xs, gate, up, down, tiles, sizes), (xs, gate, up, down, tiles)


def _expert_tiles_bwd(sizes: tuple[int, ...], res: tuple[jax.Array | Tiles, ...], g: jax.Array
                      ) -> tuple[jax.Array | None, ...]:
    """Gradients of expert_tiles, tile by tile: dx of each tile's own rows, dW summed per expert.

    The hidden activations are recomputed (keeping them from the forward measured no faster).
    """
    xs, gate, up, down, tiles = res
    grads = tuple(jnp.zeros_like(a) for a in (xs, gate, up, down))
    for b, level in zip(sizes, tiles):
        def body(i: jax.Array, grads: tuple[jax.Array, ...], b: int = b, level: tuple[jax.Array, ...] = level
                 ) -> tuple[jax.Array, ...]:
            dxs, dgate, dup, ddown = grads
            x, e, put = _tile(xs, level, i, b)
            mine = (jnp.arange(b) < level[2][i])[:, None]
            gy = jnp.where(mine, jax.lax.dynamic_slice_in_dim(g, level[1][i], b), 0)  # only this expert's rows count
            a, u = mm(x, gate[e]), mm(x, up[e])  # (b, hidden)
            sig = jax.nn.sigmoid(a)
            act = a * sig  # silu(a)
            dh = mm(gy, down[e].T)  # (b, hidden)
            du = dh * act
            da = dh * u * (sig * (1 + a * (1 - sig)))  # silu'(a) = sigmoid(a) (1 + a (1 - sigmoid(a)))
            return (put(dxs, mm(da, gate[e].T) + mm(du, up[e].T)), dgate.at[e].add(mm(x.T, da)),
                    dup.at[e].add(mm(x.T, du)), ddown.at[e].add(mm((act * u).T, gy)))

        grads = jax.lax.fori_loop(0, level[3], body, grads)
    no_grad = tuple((None, None, None, None) for _ in tiles)  # integer tile tables
    return (*grads, no_grad)


expert_tiles.defvjp(_expert_tiles_fwd, _expert_tiles_bwd)


def dense_reference(x: jax.Array, expert: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """Token n of x (N, D) through each of its experts expert[n] (N, k) -> (N, k, D), by the plain formula
    (every row's expert weights gathered, then einsum): the reference the dispatch paths are tested against."""
    g, u, d = gate[expert], up[expert], down[expert]  # (N, k, D, hidden), (N, k, D, hidden), (N, k, hidden, D)
    h = jax.nn.silu(jnp.einsum("nd,nkdh->nkh", x, g)) * jnp.einsum("nd,nkdh->nkh", x, u)  # (N, k, hidden)
    return jnp.einsum("nkh,nkhd->nkd", h, d)
