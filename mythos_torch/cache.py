"""The decoding cache (ARCHITECTURE.md section 6): every attention layer's keys and values, and the
compressor's per-step summaries, preallocated to a capacity of S positions and updated in place."""

from __future__ import annotations

import torch

from spec import Spec, cache_shapes


class KVCache:
    """Decoding cache, updated in place: for each attention layer (prelude 0..P-1, loop steps 0..N-1,
    coda 0..C-1, on the leading axis L) the rows of positions 0..S-1 (S = capacity).

    GQA: `k` (after RoPE) and `v`, (L, B, S, H_kv, K) each. MLA: `c_kv` (L, B, S, R) and the rotated
    `k_r` (L, B, S, 1, rope), one per token; (L, B, S, H, rope) under openmythos-0.5, as upstream.
    With the compressor, per loop step: `summaries` (N, B, C, m, D) of every chunk and the rows of the
    chunk still open, `chunk_states` (N, B, c, D) (docs/components.md).
    `pad` (B,) int64: each row's left padding, set by the prefill's attention_mask (docs/semantics.md
    "Padding"); zeros: no padding.
    """

    def __init__(self, arrays: dict[str, torch.Tensor], n_loops: int, pad: torch.Tensor | None = None):
        self.arrays = dict(arrays)
        self.n_loops = n_loops
        first = next(iter(self.arrays.values()))
        self.pad = torch.zeros(first.shape[1], dtype=torch.int64, device=first.device) if pad is None else pad

    @property
    def batch(self) -> int:
        return next(iter(self.arrays.values())).shape[1]

    @property
    def capacity(self) -> int:
        return next(iter(self.arrays.values())).shape[2]

    @property
    def n_layers(self) -> int:
        return next(iter(self.arrays.values())).shape[0]

    def bytes_per_token(self) -> int:
        """Bytes held per cached token, all layers together (spec.kv_cache_bytes_per_token's total)."""
        return sum(a.numel() * a.element_size() for a in self.arrays.values()) // (self.batch * self.capacity)

    def write(self, layer: int, start_pos: int, **rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store rows (B, T, ...) at positions start_pos.. of `layer`; return its rows at 0..start_pos+T-1."""
        out = []
        for name, r in rows.items():
            buf = self.arrays[name][layer]  # (B, S, ...), a view
            end = start_pos + r.shape[1]
            buf[:, start_pos:end] = r  # in place; a (B, T, 1, rope) key broadcasts to a per-head layout
            out.append(buf[:, :end])
        return tuple(out)

    def summaries(self, step: int) -> torch.Tensor:
        """Loop step `step`'s compressor summaries of every chunk, (B, C, m, D), a view."""
        return self.arrays["summaries"][step]

    def chunk_states(self, step: int) -> torch.Tensor:
        """Loop step `step`'s rows of the chunk still open, (B, c, D), a view (slot = position mod c)."""
        return self.arrays["chunk_states"][step]

    def write_summaries(self, step: int, first: int, rows: torch.Tensor, n: int) -> None:
        """Store rows[:, :n] (rows (B, J, m, D)) as the summaries of chunks first..first+n-1 of loop step `step`."""
        self.arrays["summaries"][step, :, first:first + n] = rows[:, :n]

    def write_chunk_states(self, step: int, rows: torch.Tensor) -> None:
        """Store the open chunk's rows (B, r, D) at slots 0..r-1 of loop step `step`, in place."""
        self.arrays["chunk_states"][step, :, :rows.shape[1]] = rows


def init_cache(spec: Spec, batch: int, max_len: int, n_loops: int, dtype: torch.dtype,
               device: torch.device | None = None) -> KVCache:
    """A zero KVCache for `batch` sequences of max_len positions and n_loops loop steps (spec.cache_shapes)."""
    shapes = cache_shapes(spec, batch, max_len, n_loops)
    return KVCache({n: torch.zeros(shape, dtype=dtype, device=device) for n, shape in shapes.items()}, n_loops)
