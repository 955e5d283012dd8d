"""Hypothesis strategies for twin parity: specs from a small fixed set of shapes, the rest drawn freely.

JAX compiles one forward per (spec, batch, tokens, loops, dtype), and compiling dominates test time,
so specs come from `SHAPES`, a fixed list covering every option the parity suite must exercise; what
does not change the compiled program is drawn freely: weight seeds, halting-bias shifts (which move
p across the threshold, the way a different threshold would), router biases (which move the top-k),
token ids (with the vocabulary edges 0 and V-1 drawn often) and, under the `thorough` profile, the
batch/sequence shape (under `ci`, two input shapes per spec shape: see CI_INPUT_SHAPES).

    SHAPE          attention  ffn       loops run  halting                   head    other
    gqa-moe        gqa 4/2    moe 4 k2  4          graves 0.99, linear       tied    (the tiny preset)
    mla-moe-mlp    mla        moe 4 k1  3          openmythos 0.9, mlp       untied  no LoRA
    gqa-dense-1    gqa 4/4    dense     1          graves 0.5, linear        tied    no loop embedding
    mla-dense-8    mla        dense     8          graves 0.8, mlp           untied  dim 16, vocab 17
    gqa-moe-all-k  gqa 2/1    moe 3 k3  6 (2 trained) openmythos 0.99, linear tied  k = E, no shared expert
    om-0.5         mla        moe 4 k2  5          openmythos-0.5 semantics  tied    float32 RoPE
"""

from __future__ import annotations

import os

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import spec as S
from parity import ADVERSARIAL_KINDS, adversarial_weights, make_ids

_SMALL = {"max_seq_len": 64, "prelude_layers": 1, "coda_layers": 1}

# name -> (overrides on the tiny preset, n_loops passed to forward (None: max_loop_iters))
SHAPE_TABLE: dict[str, tuple[dict, int | None]] = {
    "gqa-moe": ({}, None),
    "mla-moe-mlp": ({"attention.type": "mla", "moe.top_k": 1, "recurrent.max_loop_iters": 3, "recurrent.lora_rank": 0,
                     "halting.remainder": "openmythos", "halting.threshold": 0.9, "halting.head": "mlp",
                     "halting.mlp_hidden": 8, "tie_embeddings": False}, None),
    "gqa-dense-1": ({"attention.n_kv_heads": 4, "recurrent.ffn": "dense", "recurrent.max_loop_iters": 1,
                     "recurrent.loop_embedding.enabled": False, "halting.threshold": 0.5}, None),
    "mla-dense-8": ({"vocab_size": 17, "dim": 16, "attention.type": "mla", "attention.n_heads": 2,
                     "attention.q_lora_rank": 8, "attention.kv_lora_rank": 8, "recurrent.ffn": "dense",
                     "recurrent.max_loop_iters": 8, "recurrent.lora_rank": 2, "halting.threshold": 0.8,
                     "halting.head": "mlp", "halting.mlp_hidden": 4, "tie_embeddings": False, "dense_hidden": 24}, None),
    "gqa-moe-all-k": ({"vocab_size": 33, "attention.n_heads": 2, "attention.n_kv_heads": 1, "moe.n_experts": 3,
                       "moe.top_k": 3, "moe.n_shared_experts": 0, "moe.expert_dim": 8, "recurrent.max_loop_iters": 2,
                       "halting.remainder": "openmythos"}, 6),
    "om-0.5": ({"semantics": "openmythos-0.5", "attention.type": "mla", "recurrent.max_loop_iters": 5,
                "halting.remainder": None, "recurrent.loop_embedding.theta": None}, None),
}


def _shape_spec(name: str) -> S.Spec:
    overrides, _ = SHAPE_TABLE[name]
    raw = S.to_dict(S.preset("tiny"))
    for k, v in {**_SMALL, **overrides}.items():
        node = raw
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        if v is None:  # let the semantics fill it in
            node.pop(leaf, None)
        else:
            node[leaf] = v
    if raw.get("semantics") == "openmythos-0.5":  # fields openmythos-0.5 fixes: take its values
        raw.pop("dense_hidden", None)
        raw["recurrent"]["loop_embedding"].pop("dim", None)
        raw["halting"].pop("head", None)
    return S.load(raw)


SHAPES: dict[str, S.Spec] = {name: _shape_spec(name) for name in SHAPE_TABLE}
MOE_SHAPES = [n for n, s in SHAPES.items() if s.recurrent.ffn == "moe"]

# `thorough` draws (batch, tokens) from the whole range 1-3 x 1-64. `ci` gives each shape two input
# shapes, so each compiled program serves several examples (a JAX compile costs 1-6 s on 2 cores, a
# cached call ~0.1 s); over the shapes they still cover batch 1-3 and tokens 1 to 64. The first is the
# shape's fixed input (adversarial and replay tests use it, reusing its compiled program).
THOROUGH = os.environ.get("MYTHOS_HYPOTHESIS", "ci") == "thorough"
CI_INPUT_SHAPES: dict[str, tuple[tuple[int, int], ...]] = {
    "gqa-moe": ((2, 16), (1, 64)),  # (2, 16): the CLI's default input on the tiny preset, one program
    "mla-moe-mlp": ((3, 7), (1, 1)),
    "gqa-dense-1": ((1, 1), (3, 33)),
    "mla-dense-8": ((3, 64), (2, 3)),
    "gqa-moe-all-k": ((1, 37), (3, 12)),
    "om-0.5": ((2, 5), (1, 50)),
}
CI_INPUT_SHAPE = {name: shapes[0] for name, shapes in CI_INPUT_SHAPES.items()}


class Case:
    """One parity example: a spec shape, weights (manifest arrays) and token ids.

    A plain class, not a dataclass: hypothesis prints dataclasses field by field, weights included.
    """

    def __init__(self, shape: str, spec: S.Spec, n_loops: int | None, seed: int, ids: np.ndarray,
                 weights: dict[str, np.ndarray], edits: str = ""):
        self.shape, self.spec, self.n_loops, self.seed = shape, spec, n_loops, seed
        self.ids, self.weights, self.edits = ids, weights, edits  # edits: what was changed in the weights

    def __repr__(self) -> str:
        return (f"Case(shape={self.shape!r}, seed={self.seed}, ids.shape={self.ids.shape}, n_loops={self.n_loops}, "
                f"edits={self.edits!r}, ids={self.ids.tolist()!r})")


def fixed_case(shape: str, seed: int, weights: dict[str, np.ndarray] | None = None, edits: str = "") -> Case:
    """A deterministic case: the shape's ci input with `parity.make_ids` tokens."""
    s = SHAPES[shape]
    w = S.init_arrays(s, seed) if weights is None else weights
    return Case(shape, s, SHAPE_TABLE[shape][1], seed, make_ids(s, *CI_INPUT_SHAPE[shape], seed), w, edits)


def input_shapes(name: str) -> st.SearchStrategy[tuple[int, int]]:
    """(batch 1-3, tokens 1-64) for the shape `name`: free under `thorough`, fixed under `ci`."""
    if THOROUGH:
        return st.tuples(st.integers(1, 3), st.integers(1, min(64, SHAPES[name].max_seq_len)))
    return st.sampled_from(CI_INPUT_SHAPES[name])


@st.composite
def token_ids(draw, spec: S.Spec, shape: tuple[int, int]) -> np.ndarray:
    """(B, T) int64 ids; the edges 0 and V-1 come up often, and at least once each when T*B >= 2."""
    B, T = shape
    V = spec.vocab_size
    ids = draw(hnp.arrays(np.int64, (B, T), elements=st.one_of(st.sampled_from([0, V - 1]), st.integers(0, V - 1))))
    flat = ids.reshape(-1)
    if flat.size >= 2 and not ((flat == 0).any() and (flat == V - 1).any()):
        i = draw(st.integers(0, flat.size - 1))
        flat[i] = 0
        flat[(i + 1 + draw(st.integers(0, flat.size - 2))) % flat.size] = V - 1
    return ids


def halt_bias_path(spec: S.Spec) -> str:
    return "recurrent.act.halt.bias" if spec.halting.head == "linear" else "recurrent.act.halt.fc2.bias"


@st.composite
def weights(draw, spec: S.Spec) -> tuple[int, dict[str, np.ndarray], str]:
    """(seed, manifest arrays, description): init_arrays of a drawn seed, halting bias and router bias moved."""
    seed = draw(st.integers(0, 2**31 - 1))
    w = S.init_arrays(spec, seed)
    edits = []
    # the halting bias sets where c + p crosses the threshold: from "halt at step 1" to "never"
    shift = draw(st.floats(-4.0, 4.0, allow_nan=False, width=32))
    w[halt_bias_path(spec)] = w[halt_bias_path(spec)] + shift
    edits.append(f"halt bias {shift:+.3f}")
    if spec.recurrent.ffn == "moe":
        E = spec.moe.n_experts
        # router bias of the size aux-loss-free balancing reaches (router logits are O(0.1) at init)
        b = draw(st.one_of(st.just([0.0] * E), st.lists(st.floats(-0.25, 0.25, allow_nan=False, width=32), min_size=E, max_size=E)))
        w["recurrent.block.ffn.router_bias"] = np.asarray(b, dtype=np.float64)
        if any(b):
            edits.append(f"router bias {np.round(b, 3).tolist()}")
    return seed, w, ", ".join(edits)


@st.composite
def cases(draw, shapes: list[str] | None = None) -> Case:
    """A spec from SHAPES, weights and token ids drawn freely."""
    name = draw(st.sampled_from(shapes or list(SHAPES)))
    s = SHAPES[name]
    seed, w, edits = draw(weights(s))
    return Case(name, s, SHAPE_TABLE[name][1], seed, draw(token_ids(s, draw(input_shapes(name)))), w, edits)


@st.composite
def adversarial_cases(draw, kinds: tuple[str, ...] = ADVERSARIAL_KINDS, shapes: list[str] | None = None) -> tuple[str, Case]:
    """(kind, case) with `parity.adversarial_weights(spec, seed, kind)`; zero_router on MoE shapes only."""
    kind = draw(st.sampled_from(kinds))
    pool = [n for n in (shapes or list(SHAPES)) if kind != "zero_router" or n in MOE_SHAPES]
    name = draw(st.sampled_from(pool))
    s = SHAPES[name]
    seed = draw(st.integers(0, 2**31 - 1))
    return kind, Case(name, s, SHAPE_TABLE[name][1], seed, draw(token_ids(s, CI_INPUT_SHAPE[name])),
                      adversarial_weights(s, seed, kind), kind)


# --------------------------------------------------------------------------- the hypothesised components
# Each component alone on the tiny shape, and all of them at once on an MLA / MLP-halting / openmythos-
# remainder shape (straight-through then also covers positions that never halt). The compressor's chunk
# of 3 makes several chunks complete inside the fixed input of 10 tokens. One input shape per spec, so
# each compiles once.
_COMPONENTS = {"recurrent.max_loop_iters": 3}
COMPONENT_TABLE: dict[str, dict] = {
    "cross-loop": {"recurrent.cross_loop_attention.enabled": True, "recurrent.cross_loop_attention.n_heads": 2},
    "compressor": {"recurrent.compressor.enabled": True, "recurrent.compressor.chunk": 3,
                   "recurrent.compressor.n_summaries": 2, "recurrent.compressor.n_heads": 2},
    "memory-gate": {"recurrent.memory_gate.enabled": True, "recurrent.memory_gate.forget_bias": 2.0,
                    "recurrent.memory_gate.input_bias": 0.5},
    "value-head": {"value_head.enabled": True},
    "straight-through": {"halting.straight_through": True},
    "all": {"recurrent.cross_loop_attention.enabled": True, "recurrent.compressor.enabled": True,
            "recurrent.compressor.chunk": 3, "recurrent.compressor.n_summaries": 2, "recurrent.compressor.n_heads": 2,
            "recurrent.memory_gate.enabled": True, "value_head.enabled": True, "halting.straight_through": True,
            "attention.type": "mla", "halting.head": "mlp", "halting.mlp_hidden": 8, "halting.remainder": "openmythos",
            "halting.threshold": 0.9},
}
COMPONENT_SHAPES: dict[str, S.Spec] = {
    name: S.load("tiny", overrides={**_SMALL, **_COMPONENTS, **ov}) for name, ov in COMPONENT_TABLE.items()}
COMPONENT_INPUT = (2, 10)


@st.composite
def component_cases(draw, shapes: list[str] | None = None) -> Case:
    """A spec from COMPONENT_SHAPES, weights drawn as `weights` does (halting and router biases moved; the
    component parameters too: memory-gate biases and the compressor's null slot), token ids (2, 10)."""
    name = draw(st.sampled_from(shapes or list(COMPONENT_SHAPES)))
    s = COMPONENT_SHAPES[name]
    seed, w, edits = draw(weights(s))
    if s.recurrent.memory_gate.enabled:
        fb = draw(st.floats(-2.0, 6.0, allow_nan=False, width=32))
        w["recurrent.memory_gate.forget_gate.bias"] = np.full(s.dim, fb)
        edits += f", forget bias {fb:.3f}"
    if s.recurrent.compressor.enabled:  # larger null-slot key: attention moves between summaries and the slot
        w["recurrent.compressor.null_k"] = w["recurrent.compressor.null_k"] * draw(st.sampled_from([1.0, 50.0]))
    return Case(name, s, None, seed, draw(token_ids(s, COMPONENT_INPUT)), w, edits)
