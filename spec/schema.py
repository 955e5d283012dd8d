"""The Mythos architecture spec: a frozen dataclass tree, loaded from YAML and validated once.

Every field is documented in spec/README.md. Loading goes raw mapping -> semantics defaults ->
dotted overrides -> typed parse (unknown keys are errors with a did-you-mean) -> cross-field
validation. Each error names the field path, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping

import yaml

PRESET_DIR = Path(__file__).parent / "presets"
SEMANTICS = ("mythos", "openmythos-0.5")


class SpecError(ValueError):
    """A spec that cannot be built; the message names the field, the value and what is allowed."""


@dataclass(frozen=True)
class AttentionSpec:
    type: Literal["gqa", "mla"] = "gqa"
    n_heads: int = 8
    n_kv_heads: int = 2  # gqa only
    q_lora_rank: int = 128  # mla only, from here down
    kv_lora_rank: int = 64
    qk_rope_head_dim: int = 16
    qk_nope_head_dim: int = 16
    v_head_dim: int = 32


@dataclass(frozen=True)
class LoopEmbeddingSpec:
    enabled: bool = True
    dim: int | None = None  # channels that receive it; None -> model dim // 8
    theta: float = 10000.0


@dataclass(frozen=True)
class CrossLoopSpec:
    """Cross-loop attention (ARCHITECTURE.md 5a): each position attends over its own earlier loop states."""
    enabled: bool = False
    n_heads: int = 4  # must divide dim


@dataclass(frozen=True)
class CompressorSpec:
    """Context compressor (ARCHITECTURE.md 5b): per-chunk latent summaries written after each step."""
    enabled: bool = False
    chunk: int = 16  # positions per chunk (c)
    n_summaries: int = 2  # summary vectors per chunk (m)
    n_heads: int = 4  # must divide dim


@dataclass(frozen=True)
class MemoryGateSpec:
    """Memory gate (ARCHITECTURE.md 5c): h' = f*A*h + B*e + g*o with per-channel sigmoid gates."""
    enabled: bool = False
    forget_bias: float = 3.0  # initial b_f: sigmoid(3) ~ 0.95, start by remembering
    input_bias: float = 0.0  # initial b_i


@dataclass(frozen=True)
class RecurrentSpec:
    max_loop_iters: int = 8  # N_train: default loop count and size of the LoRA scale table
    ffn: Literal["moe", "dense"] = "moe"
    loop_embedding: LoopEmbeddingSpec = field(default_factory=LoopEmbeddingSpec)
    lora_rank: int = 8  # 0 turns the depth-wise LoRA off
    injection: Literal["lti"] = "lti"
    cross_loop_attention: CrossLoopSpec = field(default_factory=CrossLoopSpec)
    compressor: CompressorSpec = field(default_factory=CompressorSpec)
    memory_gate: MemoryGateSpec = field(default_factory=MemoryGateSpec)
    checkpoint: bool = False  # recompute each loop step in the backward pass (5f); same gradients


@dataclass(frozen=True)
class MoESpec:
    n_experts: int = 8
    n_shared_experts: int = 1
    top_k: int = 2
    expert_dim: int = 128
    bias_update_rate: float = 1e-3  # gamma of the aux-loss-free balancing


@dataclass(frozen=True)
class HaltingSpec:
    threshold: float = 0.99
    remainder: Literal["graves", "openmythos"] = "graves"
    head: Literal["linear", "mlp"] = "linear"
    mlp_hidden: int = 64  # head=mlp only
    straight_through: bool = False  # forward uses hard weights 1[t == count], backward the soft ACT weights


@dataclass(frozen=True)
class ValueHeadSpec:
    """Value head (ARCHITECTURE.md 5d): values = RMSNorm_f(y) w_v + b_v, one scalar per position."""
    enabled: bool = False


@dataclass(frozen=True)
class LossSpec:
    """Weights of the training loss terms beside cross-entropy (all 0: plain cross-entropy)."""
    ponder: float = 0.0  # ponder cost mean(count + R), gradient through R
    halting_entropy: float = 0.0  # beta of -beta * mean H(p_t) over running steps
    consistency: float = 0.0  # value drift across loop steps (needs value_head.enabled)


@dataclass(frozen=True)
class InitSpec:
    std: float = 0.02  # every Linear, Embedding, expert, LoRA weight ~ N(0, std)


@dataclass(frozen=True)
class Spec:
    vocab_size: int
    dim: int
    max_seq_len: int
    semantics: Literal["mythos", "openmythos-0.5"] = "mythos"
    norm_eps: float = 1e-6
    rope_theta: float = 500000.0
    prelude_layers: int = 1
    coda_layers: int = 1
    dense_hidden: int | None = None  # prelude/coda SwiGLU width; None -> floor(4 * dim / 3)
    tie_embeddings: bool = True
    attention: AttentionSpec = field(default_factory=AttentionSpec)
    recurrent: RecurrentSpec = field(default_factory=RecurrentSpec)
    moe: MoESpec = field(default_factory=MoESpec)
    halting: HaltingSpec = field(default_factory=HaltingSpec)
    value_head: ValueHeadSpec = field(default_factory=ValueHeadSpec)
    loss: LossSpec = field(default_factory=LossSpec)
    init: InitSpec = field(default_factory=InitSpec)

    # Derived values: computed from the fields above, never stored in YAML.
    @property
    def ffn_hidden(self) -> int:
        """Hidden width of the dense SwiGLU (prelude, coda, and a dense recurrent FFN)."""
        return self.dense_hidden if self.dense_hidden is not None else 4 * self.dim // 3

    @property
    def head_dim(self) -> int:
        """GQA per-head width."""
        return self.dim // self.attention.n_heads

    @property
    def rope_dim(self) -> int:
        """Width of the rotated part of each query/key head."""
        a = self.attention
        return a.qk_rope_head_dim if a.type == "mla" else self.head_dim

    @property
    def loop_dim(self) -> int:
        """Channels that receive the loop-index embedding (0 when it is off)."""
        le = self.recurrent.loop_embedding
        if not le.enabled:
            return 0
        return le.dim if le.dim is not None else self.dim // 8

    @property
    def shared_expert_dim(self) -> int:
        return self.moe.expert_dim * self.moe.top_k


# --------------------------------------------------------------------------- loading

# Fields that the openmythos-0.5 semantics fixes: filled in when absent, an error when contradicted.
SEMANTICS_FIXED: dict[str, dict[str, object]] = {
    "openmythos-0.5": {
        "halting.remainder": "openmythos",
        "halting.head": "linear",
        "recurrent.ffn": "moe",
        "recurrent.injection": "lti",
        "recurrent.loop_embedding.enabled": True,
        "recurrent.loop_embedding.dim": None,
        "recurrent.loop_embedding.theta": 10000.0,
        "tie_embeddings": True,
        "dense_hidden": None,
        # the hypothesised components are not in open-mythos 0.5
        "recurrent.cross_loop_attention.enabled": False,
        "recurrent.compressor.enabled": False,
        "recurrent.memory_gate.enabled": False,
        "halting.straight_through": False,
        "value_head.enabled": False,
    },
    "mythos": {},
}


def load(source: str | os.PathLike | Mapping | Spec, overrides: Mapping[str, object] | None = None) -> Spec:
    """Load a spec from a preset name, a YAML path, YAML text, a mapping or a Spec.

    Args:
        source: preset name (``"tiny"``), path to a ``.yaml`` file, YAML text, a mapping, or a Spec.
        overrides: ``{"attention.type": "mla", ...}``; dotted paths into the YAML tree, applied last.
    Returns:
        A frozen, validated Spec.
    Raises:
        SpecError: naming the field path, the value and what is allowed.
    """
    raw = _raw(source)
    raw = _apply_overrides(raw, overrides or {})
    raw = _apply_semantics(raw)
    spec = _parse(Spec, raw, "")
    validate(spec)
    return spec


def preset(name: str, overrides: Mapping[str, object] | None = None) -> Spec:
    """Load a shipped preset by name (see ``preset_names()``)."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise SpecError(f"unknown preset {name!r}; shipped presets: {', '.join(preset_names())}{_did_you_mean(name, preset_names())}")
    return load(path, overrides)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def to_dict(spec: Spec) -> dict:
    """The spec as a plain nested dict (every field explicit)."""
    return dataclasses.asdict(spec)


def dump(spec: Spec) -> str:
    """The spec as YAML text; ``load(dump(s)) == s``."""
    return yaml.safe_dump(to_dict(spec), sort_keys=False, default_flow_style=False)


def parse_override(text: str) -> tuple[str, object]:
    """``"attention.type=mla"`` -> ``("attention.type", "mla")``; the value is read as YAML."""
    if "=" not in text:
        raise SpecError(f"override {text!r} must look like field.path=value")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def _raw(source) -> dict:
    if isinstance(source, Spec):
        return to_dict(source)
    if isinstance(source, Mapping):
        return _plain(source)
    if isinstance(source, os.PathLike) or (isinstance(source, str) and "\n" not in source and source.endswith((".yaml", ".yml"))):
        path = Path(source)
        if not path.is_file():
            raise SpecError(f"spec file {str(path)!r} does not exist")
        return _yaml(path.read_text(), str(path))
    if isinstance(source, str):
        if "\n" not in source and ":" not in source:
            if (PRESET_DIR / f"{source}.yaml").is_file():
                return _yaml((PRESET_DIR / f"{source}.yaml").read_text(), source)
            raise SpecError(f"{source!r} is neither a preset ({', '.join(preset_names())}) nor a .yaml path{_did_you_mean(source, preset_names())}")
        return _yaml(source, "<yaml text>")
    raise SpecError(f"cannot load a spec from {type(source).__name__}; pass a preset name, a path, YAML text or a dict")


def _yaml(text: str, where: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{where}: a spec must be a YAML mapping, got {type(data).__name__}")
    return data


def _plain(m: Mapping) -> dict:
    return {k: _plain(v) if isinstance(v, Mapping) else v for k, v in m.items()}


def _apply_overrides(raw: dict, overrides: Mapping[str, object]) -> dict:
    raw = _plain(raw)
    for path, value in overrides.items():
        keys = path.split(".")
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise SpecError(f"override {path}: {k} is not a section")
        node[keys[-1]] = _plain(value) if isinstance(value, Mapping) else value
    return raw


def _apply_semantics(raw: dict) -> dict:
    sem = raw.get("semantics", "mythos")
    if sem not in SEMANTICS:
        raise SpecError(f"semantics={sem!r} is not allowed; allowed: {', '.join(SEMANTICS)}{_did_you_mean(str(sem), SEMANTICS)}")
    for path, want in SEMANTICS_FIXED[sem].items():
        *parents, leaf = path.split(".")
        node = raw
        for k in parents:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                break
        else:
            if leaf not in node:
                node[leaf] = want
            elif node[leaf] != want:
                raise SpecError(f"{path}={node[leaf]!r} conflicts with semantics={sem} (which fixes it to {want!r})")
    return raw


def _parse(cls, raw: object, prefix: str):
    where = prefix.rstrip(".") or "spec"
    if not isinstance(raw, dict):
        raise SpecError(f"{where} must be a mapping of fields, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            raise SpecError(f"unknown field {prefix}{key}{_did_you_mean(str(key), names)}; fields of {where}: {', '.join(names)}")
    values = {}
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SpecError(f"{path} is required")
            continue
        values[f.name] = _coerce(hints[f.name], raw[f.name], path)
    return cls(**values)


def _coerce(tp, value, path: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _parse(tp, {} if value is None else value, path + ".")
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(args[0], value, path)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise SpecError(f"{path}={value!r} is not allowed; allowed: {', '.join(map(str, allowed))}{_did_you_mean(str(value), [str(a) for a in allowed])}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{path}={value!r} must be true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{path}={value!r} must be an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise SpecError(f"{path}={value!r} must be a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{path}={value!r} must be a number")
        return float(value)
    raise TypeError(f"unsupported spec field type {tp} at {path}")


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------- validation


def validate(s: Spec) -> None:
    """Cross-field rules; raise SpecError on the first violation."""
    a, r, m, h = s.attention, s.recurrent, s.moe, s.halting

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise SpecError(msg)

    for path, v in [("vocab_size", s.vocab_size), ("dim", s.dim), ("max_seq_len", s.max_seq_len),
                    ("attention.n_heads", a.n_heads), ("recurrent.max_loop_iters", r.max_loop_iters)]:
        need(v >= 1, f"{path}={v} must be >= 1")
    need(s.vocab_size >= 2, f"vocab_size={s.vocab_size} must be >= 2")
    for path, v in [("prelude_layers", s.prelude_layers), ("coda_layers", s.coda_layers), ("recurrent.lora_rank", r.lora_rank)]:
        need(v >= 0, f"{path}={v} must be >= 0")
    need(s.norm_eps > 0, f"norm_eps={s.norm_eps} must be > 0")
    need(s.rope_theta > 1, f"rope_theta={s.rope_theta} must be > 1")
    need(s.init.std > 0, f"init.std={s.init.std} must be > 0")
    need(s.dense_hidden is None or s.dense_hidden >= 1, f"dense_hidden={s.dense_hidden} must be >= 1 (or null for floor(4*dim/3))")
    if s.dense_hidden is None:
        need(s.ffn_hidden >= 1, f"dim={s.dim} gives dense_hidden=floor(4*dim/3)=0; set dense_hidden or a larger dim")

    if a.type == "gqa":
        need(s.dim % a.n_heads == 0, f"attention.n_heads={a.n_heads} must divide dim={s.dim}")
        need(a.n_kv_heads >= 1, f"attention.n_kv_heads={a.n_kv_heads} must be >= 1")
        need(a.n_heads % a.n_kv_heads == 0, f"attention.n_kv_heads={a.n_kv_heads} must divide attention.n_heads={a.n_heads}")
        need(s.head_dim % 2 == 0, f"head dim = dim/attention.n_heads = {s.dim}/{a.n_heads} = {s.head_dim} must be even (RoPE rotates pairs)")
    else:
        for name in ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
            v = getattr(a, name)
            need(v >= 1, f"attention.{name}={v} must be >= 1 for attention.type=mla")
        need(a.qk_rope_head_dim % 2 == 0, f"attention.qk_rope_head_dim={a.qk_rope_head_dim} must be even (RoPE rotates pairs)")

    le = r.loop_embedding
    if le.enabled:
        need(s.loop_dim >= 2 and s.loop_dim % 2 == 0,
             f"recurrent.loop_embedding.dim={s.loop_dim}{' (dim // 8)' if le.dim is None else ''} must be even and >= 2; set it explicitly or disable the loop embedding")
        need(s.loop_dim <= s.dim, f"recurrent.loop_embedding.dim={s.loop_dim} must be <= dim={s.dim}")
        need(le.theta > 1, f"recurrent.loop_embedding.theta={le.theta} must be > 1")

    if r.ffn == "moe":
        need(m.n_experts >= 1, f"moe.n_experts={m.n_experts} must be >= 1")
        need(1 <= m.top_k <= m.n_experts, f"moe.top_k={m.top_k} must be between 1 and moe.n_experts={m.n_experts}")
        need(m.n_shared_experts >= 0, f"moe.n_shared_experts={m.n_shared_experts} must be >= 0")
        need(m.expert_dim >= 1, f"moe.expert_dim={m.expert_dim} must be >= 1")
        need(m.bias_update_rate >= 0, f"moe.bias_update_rate={m.bias_update_rate} must be >= 0")

    cl, cp = r.cross_loop_attention, r.compressor
    if cl.enabled:
        need(cl.n_heads >= 1 and s.dim % cl.n_heads == 0,
             f"recurrent.cross_loop_attention.n_heads={cl.n_heads} must be >= 1 and divide dim={s.dim}")
    if cp.enabled:
        need(cp.n_heads >= 1 and s.dim % cp.n_heads == 0,
             f"recurrent.compressor.n_heads={cp.n_heads} must be >= 1 and divide dim={s.dim}")
        need(cp.chunk >= 1, f"recurrent.compressor.chunk={cp.chunk} must be >= 1")
        need(cp.n_summaries >= 1, f"recurrent.compressor.n_summaries={cp.n_summaries} must be >= 1")
    for path, v in [("loss.ponder", s.loss.ponder), ("loss.halting_entropy", s.loss.halting_entropy),
                    ("loss.consistency", s.loss.consistency)]:
        need(v >= 0, f"{path}={v} must be >= 0")
    need(s.loss.consistency == 0 or s.value_head.enabled,
         f"loss.consistency={s.loss.consistency} needs value_head.enabled=true (the loss compares value-head outputs)")

    need(0 < h.threshold <= 1, f"halting.threshold={h.threshold} must be in (0, 1]")
    if h.head == "mlp":
        need(h.mlp_hidden >= 1, f"halting.mlp_hidden={h.mlp_hidden} must be >= 1 for halting.head=mlp")
