"""The parameter manifest: every tensor of the model, computed from the spec alone.

A path is the torch state-dict name (``recurrent.block.attn.wq.weight``). The JAX twin uses the same
module path; only the leaf differs for ``kind="linear"`` (``.kernel``, transposed to [in, out]) and
``kind="embedding"`` (``.embedding``). Shapes are given in the torch layout.

The manifest order is the module registration order of the torch twin, and it is the order in which
``init_arrays`` draws from one NumPy generator, so both twins get bit-identical weights.

Init rules (the whole table; ``std`` is ``spec.init.std``):

| tensor                                   | init                          |
|------------------------------------------|-------------------------------|
| every Linear weight, embed, experts, LoRA B and scale | N(0, std)        |
| RMSNorm weights                          | ones                          |
| halting bias (last layer of the head)    | U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (torch's Linear default) |
| halting MLP hidden bias                  | zeros                         |
| injection log_A, log_dt                  | zeros (so A = exp(-1))        |
| injection B                              | 0.1                           |
| router_bias (buffer)                     | zeros                         |
| cross-loop / compressor RMSNorm weights  | ones                          |
| compressor queries, null_k, null_v       | N(0, std)                     |
| memory gate forget_gate.bias             | recurrent.memory_gate.forget_bias |
| memory gate input_gate.bias              | recurrent.memory_gate.input_bias  |
| value_head.weight (1, dim)               | N(0, std)                     |
| value_head.bias                          | zeros                         |
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .schema import Spec


@dataclass(frozen=True)
class Param:
    path: str
    shape: tuple[int, ...]
    init: tuple  # ("normal", std) | ("zeros",) | ("ones",) | ("const", v) | ("uniform", lo, hi)
    kind: str  # "linear" | "embedding" | "param" | "buffer"
    group: str  # component, for parameter tables

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def manifest(s: Spec) -> list[Param]:
    """Every parameter and buffer of the model, in registration (and init-draw) order."""
    out: list[Param] = []
    std = ("normal", s.init.std)

    def add(path: str, shape: tuple[int, ...], init: tuple, kind: str, group: str) -> None:
        out.append(Param(path, tuple(int(d) for d in shape), init, kind, group))

    def linear(path: str, d_in: int, d_out: int, group: str) -> None:
        add(f"{path}.weight", (d_out, d_in), std, "linear", group)

    def norm(path: str, d: int, group: str) -> None:
        add(f"{path}.weight", (d,), ("ones",), "param", group)

    def swiglu(path: str, d: int, hidden: int, group: str) -> None:
        linear(f"{path}.gate", d, hidden, group)
        linear(f"{path}.up", d, hidden, group)
        linear(f"{path}.down", hidden, d, group)

    def attention(path: str, group: str) -> None:
        a, d = s.attention, s.dim
        if a.type == "gqa":
            hd = s.head_dim
            linear(f"{path}.wq", d, a.n_heads * hd, group)
            linear(f"{path}.wk", d, a.n_kv_heads * hd, group)
            linear(f"{path}.wv", d, a.n_kv_heads * hd, group)
            linear(f"{path}.wo", a.n_heads * hd, d, group)
        else:
            linear(f"{path}.q_down", d, a.q_lora_rank, group)
            norm(f"{path}.q_norm", a.q_lora_rank, group)
            linear(f"{path}.q_up_nope", a.q_lora_rank, a.n_heads * a.qk_nope_head_dim, group)
            linear(f"{path}.q_up_rope", a.q_lora_rank, a.n_heads * a.qk_rope_head_dim, group)
            linear(f"{path}.kv_down", d, a.kv_lora_rank + a.qk_rope_head_dim, group)
            norm(f"{path}.kv_norm", a.kv_lora_rank, group)
            linear(f"{path}.kv_up", a.kv_lora_rank, a.n_heads * (a.qk_nope_head_dim + a.v_head_dim), group)
            linear(f"{path}.wo", a.n_heads * a.v_head_dim, d, group)

    def block(path: str, group: str, moe: bool) -> None:
        norm(f"{path}.attn_norm", s.dim, group)
        attention(f"{path}.attn", group)
        norm(f"{path}.ffn_norm", s.dim, group)
        if not moe:
            swiglu(f"{path}.ffn", s.dim, s.ffn_hidden, group)
            return
        m, d = s.moe, s.dim
        linear(f"{path}.ffn.router", d, m.n_experts, group)
        add(f"{path}.ffn.router_bias", (m.n_experts,), ("zeros",), "buffer", group)
        # routed experts stacked as [expert, in, out], the same layout in both twins
        add(f"{path}.ffn.experts.gate", (m.n_experts, d, m.expert_dim), std, "param", "recurrent.experts")
        add(f"{path}.ffn.experts.up", (m.n_experts, d, m.expert_dim), std, "param", "recurrent.experts")
        add(f"{path}.ffn.experts.down", (m.n_experts, m.expert_dim, d), std, "param", "recurrent.experts")
        for j in range(m.n_shared_experts):
            swiglu(f"{path}.ffn.shared_experts.{j}", d, s.shared_expert_dim, group)

    add("embed.weight", (s.vocab_size, s.dim), std, "embedding", "embed")
    for i in range(s.prelude_layers):
        block(f"prelude.{i}", "prelude", moe=False)

    r, h = s.recurrent, s.halting
    norm("recurrent.norm", s.dim, "recurrent")
    block("recurrent.block", "recurrent", moe=r.ffn == "moe")
    if r.lora_rank > 0:
        # a module's own tensors come before its children's in torch's order
        add("recurrent.lora.B", (r.lora_rank, s.dim), std, "param", "recurrent")
        add("recurrent.lora.scale", (r.max_loop_iters, r.lora_rank), std, "param", "recurrent")
        linear("recurrent.lora.down", s.dim, r.lora_rank, "recurrent")
    add("recurrent.injection.log_A", (s.dim,), ("zeros",), "param", "recurrent")
    add("recurrent.injection.log_dt", (1,), ("zeros",), "param", "recurrent")
    add("recurrent.injection.B", (s.dim,), ("const", 0.1), "param", "recurrent")
    if h.head == "linear":
        linear("recurrent.act.halt", s.dim, 1, "recurrent")
        bound = 1.0 / math.sqrt(s.dim)
        add("recurrent.act.halt.bias", (1,), ("uniform", -bound, bound), "param", "recurrent")
    else:
        linear("recurrent.act.halt.fc1", s.dim, h.mlp_hidden, "recurrent")
        add("recurrent.act.halt.fc1.bias", (h.mlp_hidden,), ("zeros",), "param", "recurrent")
        linear("recurrent.act.halt.fc2", h.mlp_hidden, 1, "recurrent")
        bound = 1.0 / math.sqrt(h.mlp_hidden)
        add("recurrent.act.halt.fc2.bias", (1,), ("uniform", -bound, bound), "param", "recurrent")
    # the hypothesised components (docs/components.md), registered after `act` in RecurrentBlock
    d = s.dim
    if r.cross_loop_attention.enabled:
        g = "recurrent.cross_loop"
        norm("recurrent.cross_loop.q_norm", d, g)
        norm("recurrent.cross_loop.kv_norm", d, g)
        for name in ("wq", "wk", "wv", "wo"):
            linear(f"recurrent.cross_loop.{name}", d, d, g)
    if r.compressor.enabled:
        g = "recurrent.compressor"
        add("recurrent.compressor.queries", (r.compressor.n_summaries, d), std, "param", g)
        add("recurrent.compressor.null_k", (d,), std, "param", g)
        add("recurrent.compressor.null_v", (d,), std, "param", g)
        norm("recurrent.compressor.write_norm", d, g)
        linear("recurrent.compressor.write_k", d, d, g)
        linear("recurrent.compressor.write_v", d, d, g)
        norm("recurrent.compressor.read_norm", d, g)
        for name in ("read_q", "read_k", "read_v", "read_o"):
            linear(f"recurrent.compressor.{name}", d, d, g)
    if r.memory_gate.enabled:
        g, mg = "recurrent.memory_gate", r.memory_gate
        norm("recurrent.memory_gate.norm", d, g)
        linear("recurrent.memory_gate.forget_gate", d, d, g)
        add("recurrent.memory_gate.forget_gate.bias", (d,), ("const", mg.forget_bias), "param", g)
        linear("recurrent.memory_gate.input_gate", d, d, g)
        add("recurrent.memory_gate.input_gate.bias", (d,), ("const", mg.input_bias), "param", g)

    for i in range(s.coda_layers):
        block(f"coda.{i}", "coda", moe=False)
    norm("norm", s.dim, "head")
    if not s.tie_embeddings:
        linear("head", s.dim, s.vocab_size, "head")
    if s.value_head.enabled:
        linear("value_head", s.dim, 1, "value_head")
        add("value_head.bias", (1,), ("zeros",), "param", "value_head")
    return out


def init_arrays(s: Spec, seed: int = 0) -> dict[str, np.ndarray]:
    """Initial values of every manifest tensor, float64, drawn in manifest order from one generator."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for p in manifest(s):
        rule = p.init[0]
        if rule == "normal":
            a = rng.standard_normal(p.shape) * p.init[1]
        elif rule == "uniform":
            a = rng.uniform(p.init[1], p.init[2], p.shape)
        elif rule == "zeros":
            a = np.zeros(p.shape)
        elif rule == "ones":
            a = np.ones(p.shape)
        elif rule == "const":
            a = np.full(p.shape, float(p.init[1]))
        else:  # pragma: no cover - the manifest only emits the rules above
            raise ValueError(f"unknown init rule {rule!r} for {p.path}")
        arrays[p.path] = a
    return arrays


def count_params(s: Spec) -> dict[str, int]:
    """Parameter counts per component, plus ``total`` and ``active`` (per token); buffers excluded."""
    counts: dict[str, int] = {}
    for p in manifest(s):
        if p.kind != "buffer":
            counts[p.group] = counts.get(p.group, 0) + p.numel
    total = sum(counts.values())
    active = total
    if s.recurrent.ffn == "moe":
        m = s.moe
        active -= (m.n_experts - m.top_k) * 3 * s.dim * m.expert_dim
    counts["total"] = total
    counts["active"] = active
    return counts
