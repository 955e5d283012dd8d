"""The mutants of the mutation tier (tests/test_mutation.py, issue 17: "the default check has power").

Each Mutation plants one one-line semantic bug into one twin: `old` must occur exactly once in
mythos_<twin>/<file> (a refactor that removes it fails the tier loudly, it is never skipped), `new`
replaces it. `needs` names what a preset must have for the mutated line to run in the default
`mythos parity PRESET` (float64, probe weights, a full forward without a cache, both directions):

| needs        | the mutated code runs when                                                     |
|--------------|--------------------------------------------------------------------------------|
| ""           | always                                                                         |
| gqa / mla    | attention.type is gqa / mla                                                    |
| halt_linear  | halting.head is linear (halt_mlp: it is mlp)                                   |
| value_head, memory_gate, compressor, cross_loop | that component is enabled (all off in the shipped presets) |
| float32      | never in the default check (a float32/bfloat16-only path; the default is float64) |
| decode       | never in the default check (a decoding-only path: `mythos parity` runs no cache)  |
| replay       | never in the default check when every decision agrees (float64 under mythos semantics: |
|              | the replay of forced decisions runs below float64, on near ties, or with --replay) |
| exact_tie    | the line runs, but the bug shows only at an exact tie, which no continuous     |
|              | probe draw produces (tests/test_verdicts.py attacks the tie rules with exact-tie weights) |

The kill rate counts only the (mutant, preset) pairs whose code runs (`uses`); a mutant whose code
does not run on a preset is still run once, on the first such preset, as a witness that it survives
there for the stated reason. SURVIVORS lists every (mutant, preset) that survives, with why.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutation:
    name: str
    twin: str  # "torch" | "jax"
    file: str  # inside mythos_<twin>/
    old: str  # exact snippet, occurs exactly once in the file
    new: str  # the one-line bug
    what: str  # the bug, in words
    needs: str = ""  # see the module docstring


MUTATIONS: list[Mutation] = [
    # ------------------------------------------------------------------ leaf layers
    Mutation("t-rmsnorm-no-weight", "torch", "layers.py",
             "return F.rms_norm(x, (x.shape[-1],), w.to(x.dtype), eps)",
             "return F.rms_norm(x, (x.shape[-1],), None, eps)",
             "every RMSNorm ignores its weight"),
    Mutation("j-rmsnorm-no-weight", "jax", "layers.py",
             "return (xf * rms * w.astype(xf.dtype)).astype(x.dtype)",
             "return (xf * rms).astype(x.dtype)",
             "every RMSNorm ignores its weight"),
    Mutation("t-rope-sin-sign", "torch", "layers.py",
             "out = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1)",
             "out = torch.stack([x0 * c + x1 * s, -x0 * s + x1 * c], dim=-1)",
             "RoPE rotates by -angle (sin sign flipped)"),
    Mutation("j-rope-pair-order", "jax", "layers.py",
             "xr = x.astype(cos.dtype).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)",
             "xr = x.astype(cos.dtype).reshape(*x.shape[:-1], 2, x.shape[-1] // 2).swapaxes(-1, -2)",
             "RoPE rotates half-split pairs (x[k], x[k+K/2]) instead of adjacent ones"),
    Mutation("t-swiglu-gate-up-swapped", "torch", "layers.py",
             "return self.down(F.silu(self.gate(x)) * self.up(x)), None",
             "return self.down(F.silu(self.up(x)) * self.gate(x)), None",
             "dense SwiGLU (prelude, coda, shared experts): gate and up swapped"),
    Mutation("j-swiglu-gelu", "jax", "layers.py",
             "return self.down(jax.nn.silu(self.gate(x)) * self.up(x)), None",
             "return self.down(jax.nn.gelu(self.gate(x)) * self.up(x)), None",
             "dense SwiGLU uses GELU instead of SiLU"),
    # ------------------------------------------------------------------ attention
    Mutation("t-attn-scale-1pct", "torch", "attention.py",
             "out, probs = causal_attention(q, k, v, hd**-0.5, q_start, attn_probs=attn_probs, pad=pad, window=self.window)",
             "out, probs = causal_attention(q, k, v, hd**-0.5 * 1.01, q_start, attn_probs=attn_probs, pad=pad, "
             "window=self.window)",
             "GQA attention scale 1% too large", needs="gqa"),
    Mutation("t-causal-mask-off-by-one", "torch", "attention.py",
             "out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)",
             "out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=_causal_mask(T, S, start + 1, q.device), "
             "scale=scale, enable_gqa=True)",
             "causal mask off by one: query i also sees key i + 1"),
    Mutation("t-gqa-kv-head-modulo", "torch", "attention.py",
             "out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)",
             "out = F.scaled_dot_product_attention(qt, kt.repeat(1, qt.shape[1] // kt.shape[1], 1, 1), "
             "vt.repeat(1, qt.shape[1] // kt.shape[1], 1, 1), is_causal=True, scale=scale)",
             "GQA: query head j reads kv head j % H_kv instead of j // (H / H_kv)", needs="gqa"),
    Mutation("j-causal-mask-diagonal", "jax", "attention.py",
             "mask = j <= i  # (T, S)",
             "mask = j < i  # (T, S)",
             "causal mask off by one: query i does not see its own key"),
    Mutation("j-gqa-kv-head-modulo", "jax", "attention.py",
             "qg = q.reshape(B, T, Hkv, G, K)",
             "qg = q.reshape(B, T, G, Hkv, K).swapaxes(2, 3)",
             "GQA: query head j reads kv head j % H_kv instead of j // (H / H_kv)", needs="gqa"),
    Mutation("t-mla-rope-key-unrotated", "torch", "attention.py",
             "k_r = apply_rope(k_r.view(B, T, 1, rope), cos, sin)",
             "k_r = k_r.view(B, T, 1, rope)",
             "MLA: the shared RoPE key is not rotated", needs="mla"),
    Mutation("t-mla-kv-down-split-swapped", "torch", "attention.py",
             "c_kv, k_r = self.kv_down(x).split([self.kv_lora_rank, rope], dim=-1)",
             "k_r, c_kv = self.kv_down(x).split([rope, self.kv_lora_rank], dim=-1)",
             "MLA: kv_down split as [k_r; c_kv] instead of [c_kv; k_r]", needs="mla"),
    Mutation("t-mla-no-q-norm", "torch", "attention.py",
             "c_q = self.q_norm(self.q_down(x))",
             "c_q = self.q_down(x)",
             "MLA: the query latent is not normalised", needs="mla"),
    Mutation("j-mla-scale-nope-only", "jax", "attention.py",
             "out, p = causal_attention(q, k, v, (nope + rope) ** -0.5, q_start, attn_probs=attn_probs, pad=pad,",
             "out, p = causal_attention(q, k, v, nope ** -0.5, q_start, attn_probs=attn_probs, pad=pad,",
             "MLA: scale 1/sqrt(d_nope) instead of 1/sqrt(d_nope + d_rope)", needs="mla"),
    Mutation("j-mla-kv-up-split-global", "jax", "attention.py",
             "k_nope, v = jnp.split(self.kv_up(self.kv_norm(c_kv)).reshape(B, S, H, nope + vd), [nope], axis=-1)",
             "k_nope, v = (a.reshape(B, S, H, -1) for a in jnp.split(self.kv_up(self.kv_norm(c_kv)), [H * nope], "
             "axis=-1))",
             "MLA: kv_up output split [all k_nope; all v] instead of per head", needs="mla"),
    Mutation("j-mla-q-concat-order", "jax", "attention.py",
             "q = jnp.concatenate([q_nope, q_rope], axis=-1)",
             "q = jnp.concatenate([q_rope, q_nope], axis=-1)",
             "MLA: query parts concatenated [rope; nope] against keys [nope; rope]", needs="mla"),
    Mutation("j-fused-attn-not-causal", "jax", "attention.py",
             "causal = j <= i  # (t, s)",
             "causal = j <= i + 1  # (t, s)",
             "blocked attention (float32/bfloat16 without a cache) lets query i see key i + 1", needs="float32"),
    # ------------------------------------------------------------------ block
    Mutation("j-block-ffn-reads-attn-norm", "jax", "block.py",
             "f, route = self.ffn(self.ffn_norm(x), force_idx)",
             "f, route = self.ffn(self.attn_norm(x), force_idx)",
             "every block's FFN reads attn_norm(x) instead of ffn_norm(x)"),
    # ------------------------------------------------------------------ experts (dispatch)
    Mutation("t-experts-padded-gate-up-swapped", "torch", "experts.py",
             "hg = F.silu(torch.bmm(xg, gate)) * torch.bmm(xg, up)",
             "hg = F.silu(torch.bmm(xg, up)) * torch.bmm(xg, gate)",
             "routed experts (padded dispatch, the float64 path): gate and up swapped"),
    Mutation("j-experts-tile-expert-left", "jax", "experts.py",
             'expert = jnp.minimum(jnp.searchsorted(ends, j, side="right"), E - 1).astype(jnp.int32)',
             'expert = jnp.minimum(jnp.searchsorted(ends, j, side="left"), E - 1).astype(jnp.int32)',
             "expert tiles: a tile at an expert boundary is given the previous expert"),
    Mutation("j-experts-unsort-wrong-permutation", "jax", "experts.py",
             "return ys[inverse].reshape(N, k, D)",
             "return ys[order].reshape(N, k, D)",
             "expert outputs un-sorted with the sort permutation instead of its inverse"),
    Mutation("j-experts-gathered-gate-up-swapped", "jax", "experts.py",
             'hs = jax.nn.silu(jnp.einsum("md,mdh->mh", xs, gate[flat])) * jnp.einsum("md,mdh->mh", xs, up[flat])',
             'hs = jax.nn.silu(jnp.einsum("md,mdh->mh", xs, up[flat])) * jnp.einsum("md,mdh->mh", xs, gate[flat])',
             "routed experts, gathered path (<= 4 rows: decoding at batch 1): gate and up swapped", needs="decode"),
    # ------------------------------------------------------------------ MoE / router
    Mutation("t-router-bias-ignored", "torch", "moe.py",
             "ranked, order = torch.sort(logits + bias, dim=-1, descending=True, stable=True)",
             "ranked, order = torch.sort(logits, dim=-1, descending=True, stable=True)",
             "router bias ignored in the top-k selection"),
    Mutation("j-router-not-renormalised", "jax", "moe.py",
             "w = w / w.sum(-1, keepdims=True)",
             "w = w",
             "router weights: softmax scores of the chosen experts not renormalised"),
    Mutation("j-router-scores-biased", "jax", "moe.py",
             "scores = jax.nn.softmax(logits, axis=-1)",
             "scores = jax.nn.softmax(logits + bias, axis=-1)",
             "router weights from softmax(z + b) instead of softmax(z)"),
    Mutation("t-forced-router-not-renormalised", "torch", "moe.py",
             "w = s / s.sum(-1, keepdim=True)",
             "w = s",
             "router weights under force_idx (the replay of forced decisions) not renormalised", needs="replay"),
    Mutation("t-last-expert-zeroed", "torch", "moe.py",
             "y = experts(flat, idx.reshape(B * T, k))  # (B*T, k, D)",
             "y = experts(flat, idx.reshape(B * T, k)) * (idx.reshape(B * T, k, 1) != self.n_experts - 1)",
             "the last routed expert's output is zeroed"),
    Mutation("t-last-shared-expert-dropped", "torch", "moe.py",
             "for shared in self.shared_experts:",
             "for shared in self.shared_experts[:-1]:",
             "the last shared expert is dropped"),
    Mutation("j-expert-slot-order-reversed", "jax", "moe.py",
             "out = out + w[:, j, None] * y[:, j]",
             "out = out + w[:, j, None] * y[:, k - 1 - j]",
             "slot j's router weight multiplies slot k-1-j's expert output"),
    # ------------------------------------------------------------------ recurrent block
    Mutation("t-lora-clamp-off-by-one", "torch", "recurrent.py",
             "s = self.scale[min(t, self.scale.shape[0] - 1)]",
             "s = self.scale[min(t, self.scale.shape[0])]",
             "depth-LoRA clamp scale[min(t, N_train)] instead of N_train - 1 (torch: an IndexError at t = N_train)"),
    Mutation("j-lora-clamp-early", "jax", "recurrent.py",
             "s = self.scale[...][jnp.minimum(t, self.scale.shape[0] - 1)]",
             "s = self.scale[...][jnp.minimum(t, self.scale.shape[0] - 2)]",
             "depth-LoRA clamp one row early: scale[min(t, N_train - 2)]"),
    Mutation("j-lora-reads-block-input", "jax", "recurrent.py",
             "o = o + self.lora(o, t)",
             "o = o + self.lora(n, t)",
             "depth-LoRA applied to the block input n instead of its output o"),
    Mutation("t-lti-log-dt-sign", "torch", "recurrent.py",
             "A = torch.exp(-torch.exp((self.log_dt + self.log_A).clamp(-20, 20)))",
             "A = torch.exp(-torch.exp((self.log_A - self.log_dt).clamp(-20, 20)))",
             "LTI decay uses -log_dt"),
    Mutation("j-lti-clip-2", "jax", "recurrent.py",
             "A = jnp.exp(-jnp.exp(jnp.clip(self.log_dt[...] + self.log_A[...], -20, 20)))",
             "A = jnp.exp(-jnp.exp(jnp.clip(self.log_dt[...] + self.log_A[...], -2, 2)))",
             "LTI clip bounds +-2 instead of +-20"),
    Mutation("t-lti-b-dropped", "torch", "recurrent.py",
             "return self.decay() * h + self.B * e + o",
             "return self.decay() * h + e + o",
             "LTI injection drops B (h' = A h + e + o)"),
    Mutation("j-lti-b-reversed", "jax", "recurrent.py",
             "return self.decay() * h + self.B[...] * e + o",
             "return self.decay() * h + self.B[...][::-1] * e + o",
             "LTI injection with B's channels reversed"),
    Mutation("j-loop-embedding-skipped", "jax", "recurrent.py",
             "n = self.norm(x + e)",
             "n = self.norm(h + e)",
             "the block reads RMSNorm(h + e): the loop embedding never reaches it"),
    Mutation("j-loop-embedding-in-injection", "jax", "recurrent.py",
             "h_new = self.injection(h, e, o)",
             "h_new = self.injection(h, e + row, o)",
             "the loop embedding is also added to the injected input (B (e + emb_t))"),
    Mutation("t-halt-bias-dropped", "torch", "recurrent.py",
             "return torch.sigmoid(self.halt(h).squeeze(-1).to(acc_dtype(h.dtype)))",
             "return torch.sigmoid(F.linear(h, self.halt.weight).squeeze(-1).to(acc_dtype(h.dtype)))",
             "linear halting head drops its bias", needs="halt_linear"),
    Mutation("j-halt-bias-dropped", "jax", "recurrent.py",
             "return jax.nn.sigmoid(self.halt(h)[..., 0].astype(acc_dtype(h.dtype)))",
             "return jax.nn.sigmoid((h @ self.halt.kernel[...])[..., 0].astype(acc_dtype(h.dtype)))",
             "linear halting head drops its bias", needs="halt_linear"),
    Mutation("t-halt-mlp-relu", "torch", "recurrent.py",
             "return self.fc2(F.silu(self.fc1(h)))",
             "return self.fc2(F.relu(self.fc1(h)))",
             "MLP halting head uses ReLU instead of SiLU", needs="halt_mlp"),
    Mutation("j-act-remainder-is-p", "jax", "recurrent.py",
             "w = jnp.where(running, jnp.where(halts, 1.0 - c, p), 0.0)",
             "w = jnp.where(running, p, 0.0)",
             "ACT: the halting step weighs p instead of the remainder 1 - c"),
    Mutation("t-act-cum-counts-halted", "torch", "recurrent.py",
             "c = c + torch.where(running, p, 0.0)",
             "c = c + p",
             "ACT: cumulative halting keeps adding p at halted positions"),
    Mutation("t-act-no-graves-remainder", "torch", "recurrent.py",
             'graves = (halting.remainder == "graves") & last',
             "graves = False",
             "ACT: no Graves remainder at the last step (never-halted weights sum below 1)"),
    Mutation("j-act-halt-strict", "jax", "recurrent.py",
             "decide = c + p >= threshold",
             "decide = c + p > threshold",
             "ACT: halts on c + p > threshold instead of >=", needs="exact_tie"),
    # ------------------------------------------------------------------ model
    Mutation("t-final-norm-no-weight", "torch", "model.py",
             "        y = self.norm(y)\n",
             "        y = F.rms_norm(y, (y.shape[-1],), None, self.norm.eps)\n",
             "the final norm ignores its weight"),
    Mutation("t-loop-embedding-row-t-plus-1", "torch", "model.py",
             "args = (rec, state, t, e, rows[t], cos, sin, fx, force_halt)",
             "args = (rec, state, t, e, rows[min(t + 1, N - 1)], cos, sin, fx, force_halt)",
             "loop step t gets the loop embedding of step t + 1"),
    Mutation("t-value-head-tanh", "torch", "model.py",
             "values = None if self.value_head is None else self.value_head(y).squeeze(-1)",
             "values = None if self.value_head is None else self.value_head(y).squeeze(-1).tanh()",
             "value head output squashed by tanh", needs="value_head"),
    # ------------------------------------------------------------------ hypothesised components
    Mutation("j-memory-gate-no-input-gate", "jax", "components.py",
             "return _open_unit(f * A) * h + B * e + g * o",
             "return _open_unit(f * A) * h + B * e + o",
             "memory gate drops the input gate g", needs="memory_gate"),
    Mutation("t-compressor-null-value-is-key", "torch", "components.py",
             "out = p[..., :1] * null_v",
             "out = p[..., :1] * null_k",
             "compressor read: the null slot's value is its key", needs="compressor"),
    Mutation("j-cross-loop-unscaled", "jax", "components.py",
             'scores = jnp.einsum("bthk,mbthk->bthm", q, k_mem) * q.shape[-1] ** -0.5',
             'scores = jnp.einsum("bthk,mbthk->bthm", q, k_mem)',
             "cross-loop attention scores not scaled by 1/sqrt(K)", needs="cross_loop"),
]


# Why each surviving (mutant, preset) cannot change what the default `mythos parity PRESET` compares.
# "*": every preset the mutant runs on. A survivor missing here fails the tier; so does an entry
# whose mutant gets killed (the list is kept honest both ways).
SURVIVORS: dict[tuple[str, str], str] = {
    ("j-fused-attn-not-causal", "*"):
        "float32/bfloat16-only path: the default check runs float64, where the JAX twin takes the explicit "
        "attention (`q.dtype != jnp.float64`); `mythos parity --dtype float32` exercises it",
    ("j-experts-gathered-gate-up-swapped", "*"):
        "decoding-only path (<= 4 (token, slot) rows): `mythos parity` runs a full forward of 2 x 16 tokens "
        "without a cache; tests/test_decode.py and tests/test_moe_dispatch.py exercise it",
    ("t-forced-router-not-renormalised", "*"):
        "replay-only branch (force_idx): in float64 under mythos semantics every decision must agree and no "
        "replay runs; `mythos parity --replay` or a float32 check with near ties exercises it",
    ("j-act-halt-strict", "*"):
        "> and >= differ only at an exact tie c + p == threshold, which no continuous probe draw gives "
        "(min halting margin ~4e-4 on tiny); tests/test_verdicts.py catches it with at_threshold weights",
    # BLIND SPOT of the probe weights: the mutated code runs, but the probe never reaches the values where it
    # matters. Remove the entry once parity/probe.py covers it. (The LTI clip, another one, is covered since
    # the probe puts two log_A channels at +-24.)
    ("t-last-expert-zeroed", "bench-s-mla"):
        "blind spot: the probe's routing spread (parity/probe.py, 6 balancing runs) reaches 7 of bench-s-mla's "
        "8 experts on the default 2 x 16 tokens; the last expert is among the unrouted ones",
    ("t-mla-rope-key-unrotated", "tiny"): "GQA preset: the MLA code does not run",
    ("t-mla-kv-down-split-swapped", "tiny"): "GQA preset: the MLA code does not run",
    ("t-mla-no-q-norm", "tiny"): "GQA preset: the MLA code does not run",
    ("j-mla-scale-nope-only", "tiny"): "GQA preset: the MLA code does not run",
    ("j-mla-kv-up-split-global", "tiny"): "GQA preset: the MLA code does not run",
    ("j-mla-q-concat-order", "tiny"): "GQA preset: the MLA code does not run",
    ("t-attn-scale-1pct", "bench-s-mla"): "MLA preset: the mutated line is in GQAttention, which does not run",
    ("t-gqa-kv-head-modulo", "bench-s-mla"):
        "MLA expands its shared key to all H heads (H_kv = H, one query head per kv head): j % H_kv and "
        "j // (H / H_kv) are both j",
    ("j-gqa-kv-head-modulo", "bench-s-mla"):
        "MLA expands its shared key to all H heads (G = 1): reshaping (Hkv, G) as (G, Hkv) is the identity",
    ("t-halt-mlp-relu", "tiny"): "halting.head is linear in every shipped preset: HaltMLP does not run",
    ("t-value-head-tanh", "tiny"): "value_head is off in every shipped preset",
    ("j-memory-gate-no-input-gate", "tiny"): "memory_gate is off in every shipped preset",
    ("t-compressor-null-value-is-key", "tiny"): "compressor is off in every shipped preset",
    ("j-cross-loop-unscaled", "tiny"): "cross_loop_attention is off in every shipped preset",
}
