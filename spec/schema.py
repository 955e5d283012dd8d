"""The Mythos architecture spec: a frozen dataclass tree, loaded from YAML and validated once.

Every field is documented in spec/README.md. Loading goes raw mapping -> semantics defaults ->
dotted overrides -> typed parse (unknown keys are errors with a did-you-mean) -> ranges (RANGES, one
table for every numeric field) -> cross-field validation. Each error names the field path, the value
and what is allowed. YAML comes through one hardened loader (size bound, UTF-8, no anchors, aliases,
merge or duplicate keys, bounded nesting); a preset is a name, never a path; `loads` reads text only.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import numbers
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Mapping

import numpy as np
import yaml

PRESET_DIR = Path(__file__).parent / "presets"
PRESET_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")  # a preset is a name, never a path
SEMANTICS = ("mythos", "openmythos-0.5")
MAX_SPEC_BYTES = 1 << 20  # a spec file, YAML text or override value; real specs are about 1 KB
MAX_YAML_DEPTH = 16  # nesting of YAML mappings and lists; a spec is 3 deep
FIELD_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


class SpecError(ValueError):
    """A spec that cannot be built; the message names the field, the value and what is allowed."""


@dataclass(frozen=True)
class Range:
    """A closed or half-open interval of allowed values: ``Range(0, 10, lo_open=True)`` is (0, 10]."""
    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v: float) -> bool:
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return above and below

    def __str__(self) -> str:
        def show(x: float) -> str:
            return str(x) if isinstance(x, int) else f"{x:g}"
        return f"{'(' if self.lo_open else '['}{show(self.lo)}, {show(self.hi)}{')' if self.hi_open else ']'}"


# Every numeric field's allowed values, the one table (spec/README.md lists it). The bounds catch
# absurd or hostile values (an inf std, norm_eps=1e300, a 2**40 vocabulary), never a real model's:
# every shipped preset, openmythos-1t included, lies well inside them. Cross-field rules (divisibility,
# top_k <= n_experts, loop_embedding.dim <= dim) are in validate().
RANGES: dict[str, Range] = {
    "vocab_size": Range(2, 2**24),
    "dim": Range(1, 2**16),
    "max_seq_len": Range(1, 2**24),
    "norm_eps": Range(0, 1, lo_open=True),
    "rope_theta": Range(1, 1e12, lo_open=True),
    "prelude_layers": Range(0, 1024),
    "coda_layers": Range(0, 1024),
    "dense_hidden": Range(1, 2**20),
    "attention.n_heads": Range(1, 4096),
    "attention.n_kv_heads": Range(1, 4096),
    "attention.q_lora_rank": Range(1, 2**16),
    "attention.kv_lora_rank": Range(1, 2**16),
    "attention.qk_rope_head_dim": Range(1, 4096),
    "attention.qk_nope_head_dim": Range(1, 4096),
    "attention.v_head_dim": Range(1, 4096),
    "attention.window": Range(1, 2**24),
    "recurrent.max_loop_iters": Range(1, 1024),
    "recurrent.loop_embedding.dim": Range(2, 2**16),
    "recurrent.loop_embedding.theta": Range(1, 1e12, lo_open=True),
    "recurrent.lora_rank": Range(0, 4096),
    "recurrent.cross_loop_attention.n_heads": Range(1, 4096),
    "recurrent.compressor.chunk": Range(1, 2**24),
    "recurrent.compressor.n_summaries": Range(1, 4096),
    "recurrent.compressor.n_heads": Range(1, 4096),
    "recurrent.memory_gate.forget_bias": Range(-100, 100),
    "recurrent.memory_gate.input_bias": Range(-100, 100),
    "moe.n_experts": Range(1, 2**16),
    "moe.n_shared_experts": Range(0, 1024),
    "moe.top_k": Range(1, 2**16),
    "moe.expert_dim": Range(1, 2**20),
    "moe.bias_update_rate": Range(0, 1),
    "halting.threshold": Range(0, 1, lo_open=True),
    "halting.mlp_hidden": Range(1, 2**20),
    "halting.ponder_lambda": Range(0, 1, lo_open=True, hi_open=True),
    "halting.ponder_beta": Range(0, 1000),
    "loss.ponder": Range(0, 1000),
    "loss.halting_entropy": Range(0, 1000),
    "loss.consistency": Range(0, 1000),
    "init.std": Range(0, 10, lo_open=True),
}
# Loop counts a caller may ask for (check_loops): up to max(MAX_LOOPS_FLOOR, MAX_LOOPS_FACTOR x
# recurrent.max_loop_iters). Recurrent depth extrapolates past N_train, but not without bound.
MAX_LOOPS_FACTOR = 4
MAX_LOOPS_FLOOR = 256


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
    rope: bool = True  # False = NoPE: rope_table gives cos = 1, sin = 0 (the identity rotation) everywhere
    window: int | None = None  # causal sliding window: query i sees keys j with i - window < j <= i; None = all


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
    # the update h' = A*h + B*e + o takes o = the looped block's output, its residual input n = RMSNorm(h~ + e)
    # included (open-mythos); False: o = block(n) - n, the attention and FFN updates only (the recurrence of
    # looped transformers that extrapolate in depth, docs/semantics.md "Readout modes, NoPE and the window")
    block_residual: bool = True


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
    # readout (docs/semantics.md "Readout modes, NoPE and the attention window"): act = ACT's mixture of
    # states; last = the state after step n_loops (no position halts); ponder = PonderNet (hard readout at
    # the first step with C_t >= threshold, training loss sum_t P_t nll_t + ponder_beta KL(P || geometric))
    mode: Literal["act", "last", "ponder"] = "act"
    ponder_lambda: float = 0.2  # the geometric prior's per-step halting probability, in (0, 1)
    ponder_beta: float = 0.01  # weight of KL(P || prior) in the ponder training loss, >= 0


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
class DecodeSpec:
    """What a halted position contributes at deeper loop steps (docs/semantics.md "Halted tokens at deeper
    loop steps"): `compute` runs every position at every step (its state evolves, later tokens read its
    deeper keys/values); `freeze` keeps its state and its last step's keys/values, so it needs no computation."""
    halted_kv: Literal["compute", "freeze"] = "compute"


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
    decode: DecodeSpec = field(default_factory=DecodeSpec)

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
        "recurrent.block_residual": True,
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
        "decode.halted_kv": "compute",  # open-mythos runs every position at every step
        # the science knobs of issue #14 are not in open-mythos 0.5
        "attention.rope": True,
        "attention.window": None,
        "halting.mode": "act",
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
    return _build(_raw(source), overrides)


def loads(text: str, overrides: Mapping[str, object] | None = None, *, where: str = "<yaml text>") -> Spec:
    """A spec from YAML text only: never a preset name or a path (for specs stored inside files).

    Args:
        text: the spec as YAML (``dump(s)``).
        where: what to call the text in error messages (``"m.safetensors: metadata spec"``).
    Raises:
        SpecError: not text, not a YAML mapping, or not a valid spec.
    """
    if not isinstance(text, str):
        raise SpecError(f"{where}: a spec must be YAML text, got {type(text).__name__}")
    return _build(_yaml(text, where), overrides)


def _build(raw: dict, overrides: Mapping[str, object] | None) -> Spec:
    raw = _apply_overrides(raw, overrides or {})
    raw = _apply_semantics(raw)
    spec = _parse(Spec, raw, "")
    validate(spec)
    return spec


def preset(name: str, overrides: Mapping[str, object] | None = None) -> Spec:
    """Load a shipped preset by name (see ``preset_names()``); a name, never a path."""
    return load(_preset_path(name), overrides)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if PRESET_NAME.fullmatch(p.stem))


def _preset_path(name: object) -> Path:
    names = preset_names()
    if not isinstance(name, str) or not PRESET_NAME.fullmatch(name) or name not in names:
        shape = "" if isinstance(name, str) and PRESET_NAME.fullmatch(name) else " (a preset name matches [a-z0-9][a-z0-9._-]*)"
        raise SpecError(f"unknown preset {name!r}{shape}; shipped presets: {', '.join(names)}"
                        f"{_did_you_mean(str(name), names)}")
    return PRESET_DIR / f"{name}.yaml"


def to_dict(spec: Spec) -> dict:
    """The spec as a plain nested dict (every field explicit)."""
    return dataclasses.asdict(spec)


def dump(spec: Spec) -> str:
    """The spec as YAML text; ``load(dump(s)) == s``."""
    return yaml.safe_dump(to_dict(spec), sort_keys=False, default_flow_style=False)


def parse_override(text: str) -> tuple[str, object]:
    """``"attention.type=mla"`` -> ``("attention.type", "mla")``; the value is read as YAML.

    Raises:
        SpecError: no ``=``, a key that is not a dotted field path, or a value that is not valid YAML.
    """
    if not isinstance(text, str) or "=" not in text:
        raise SpecError(f"override {_show(text)} must look like field.path=value (e.g. attention.type=mla)")
    key, value = text.split("=", 1)
    key = key.strip()
    if not FIELD_PATH.fullmatch(key):
        raise SpecError(f"override {_show(text)}: {_show(key)} is not a field path; it must look like field.path=value "
                        f"(dotted names, e.g. attention.n_heads=4)")
    return key, safe_yaml(value, f"override {_show(text)}")


def check_loops(s: Spec, n: object, *, what: str = "n_loops") -> int:
    """``n`` as an int when it is a loop count this spec may run, else a SpecError naming ``what``.

    Allowed: 1 <= n <= max(MAX_LOOPS_FLOOR, MAX_LOOPS_FACTOR * recurrent.max_loop_iters).
    """
    hi = max(MAX_LOOPS_FLOOR, MAX_LOOPS_FACTOR * s.recurrent.max_loop_iters)
    return _check_count(n, 1, hi, f"{what}={_show(n)} must be an integer in [1, {hi}] (at most max({MAX_LOOPS_FLOOR}, "
                                  f"{MAX_LOOPS_FACTOR} x recurrent.max_loop_iters={s.recurrent.max_loop_iters}))")


def check_length(s: Spec, n: object, *, what: str = "length", minimum: int = 1) -> int:
    """``n`` as an int when ``minimum <= n <= max_seq_len`` (a token count or a position), else a SpecError."""
    return _check_count(n, minimum, s.max_seq_len,
                        f"{what}={_show(n)} must be an integer in [{minimum}, {s.max_seq_len}] (max_seq_len={s.max_seq_len})")


def _check_count(n: object, lo: int, hi: int, message: str) -> int:
    if not _is_int(n) or not lo <= n <= hi:
        raise SpecError(message)
    return int(n)


# --------------------------------------------------------------------------- reading YAML safely


def _raw(source) -> dict:
    if isinstance(source, Spec):
        return to_dict(source)
    if isinstance(source, Mapping):
        return _plain(source, "spec")
    if isinstance(source, os.PathLike) or (isinstance(source, str) and "\n" not in source and source.endswith((".yaml", ".yml"))):
        return _yaml(read_text(source, "spec file"), str(source))
    if isinstance(source, str):
        if "\n" not in source and ":" not in source:
            if PRESET_NAME.fullmatch(source) and source in preset_names():
                return _yaml(read_text(_preset_path(source), "preset"), source)
            raise SpecError(f"{source!r} is neither a preset ({', '.join(preset_names())}) nor a .yaml path{_did_you_mean(source, preset_names())}")
        return _yaml(source, "<yaml text>")
    raise SpecError(f"cannot load a spec from {type(source).__name__}; pass a preset name, a path, YAML text or a dict")


def read_text(path: str | os.PathLike, what: str = "spec file", limit: int = MAX_SPEC_BYTES) -> str:
    """The UTF-8 text of a small file (at most ``limit`` bytes), or a SpecError saying what is wrong."""
    path = Path(path)
    try:
        if path.is_dir():
            raise SpecError(f"{what} {str(path)!r} is a directory, not a YAML file")
        if not path.exists():
            raise SpecError(f"{what} {str(path)!r} does not exist")
        if not path.is_file():
            raise SpecError(f"{what} {str(path)!r} is not a regular file")
        with open(path, "rb") as f:
            data = f.read(limit + 1)  # never more, whatever the file claims
    except SpecError:
        raise
    except (OSError, ValueError) as e:  # no permission, a name too long, a NUL byte in the path
        raise SpecError(f"{what} {str(path)!r} cannot be read: {getattr(e, 'strerror', None) or e}") from None
    if len(data) > limit:
        raise SpecError(f"{what} {str(path)!r} is larger than {limit} bytes; a spec is a few KB")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SpecError(f"{what} {str(path)!r} is not UTF-8 text (byte {e.start} is {data[e.start:e.start + 1]!r}); save it as UTF-8") from None


class _SpecLoader(yaml.SafeLoader):
    """yaml.SafeLoader refusing anchors, aliases, merge keys and duplicate keys, with a nesting bound."""

    def __init__(self, text: str, where: str):
        super().__init__(text)
        self.name = where  # marks in PyYAML's own messages name the file
        self.depth = 0

    def _fail(self, mark: yaml.Mark, message: str) -> None:
        raise SpecError(f"{self.name}, line {mark.line + 1}: {message}")

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            self._fail(event.start_mark, f"YAML aliases (*{event.anchor}) are not allowed in a spec; write the value out")
        if getattr(event, "anchor", None) is not None:
            self._fail(event.start_mark, f"YAML anchors (&{event.anchor}) are not allowed in a spec; write the value out")
        self.depth += 1
        if self.depth > MAX_YAML_DEPTH:
            self._fail(event.start_mark, f"nested deeper than {MAX_YAML_DEPTH} levels; a spec is 3 levels deep")
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                self._fail(key_node.start_mark, "YAML merge keys (<<) are not allowed in a spec; write the fields out")
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: PyYAML's own error below says so
                continue
            if first is not None:
                self._fail(key_node.start_mark, f"duplicate key {key!r} (first on line {first}); each field appears once")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def safe_yaml(text: str, where: str) -> object:
    """Any YAML value from text of at most MAX_SPEC_BYTES: no anchors, aliases, merge or duplicate keys,
    at most MAX_YAML_DEPTH deep (safe tags only). Every failure is a SpecError naming ``where`` and the line."""
    if not isinstance(text, str):
        raise SpecError(f"{where}: expected YAML text, got {type(text).__name__}")
    if len(text) > MAX_SPEC_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_SPEC_BYTES:
        raise SpecError(f"{where}: {len(text)} characters is larger than {MAX_SPEC_BYTES} bytes; a spec is a few KB")
    loader = None
    try:
        loader = _SpecLoader(text, where)  # the reader already refuses unprintable characters
        return loader.get_single_data()
    except SpecError:
        raise
    except yaml.YAMLError as e:
        raise SpecError(f"{where}: not valid YAML: {e}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as e:  # e.g. an integer of 5000 digits
        raise SpecError(f"{where}: not valid YAML: {type(e).__name__}: {str(e)[:200]}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _yaml(text: str, where: str) -> dict:
    data = safe_yaml(text, where)
    if not isinstance(data, dict):
        raise SpecError(f"{where}: a spec must be a YAML mapping of fields, got {type(data).__name__}")
    return data


def _plain(m: Mapping, where: str, depth: int = 0) -> dict:
    if depth > MAX_YAML_DEPTH:
        raise SpecError(f"{where}: nested deeper than {MAX_YAML_DEPTH} levels; a spec is 3 levels deep")
    return {k: _plain(v, f"{where}.{k}", depth + 1) if isinstance(v, Mapping) else v for k, v in m.items()}


def _apply_overrides(raw: dict, overrides: Mapping[str, object]) -> dict:
    raw = _plain(raw, "spec")
    if not isinstance(overrides, Mapping):
        raise SpecError(f"overrides must be a mapping of field.path -> value, got {type(overrides).__name__}")
    for path, value in overrides.items():
        if not isinstance(path, str) or not FIELD_PATH.fullmatch(path):
            raise SpecError(f"override {_show(path)}={_show(value)}: the key must be a dotted field path (e.g. attention.n_heads)")
        keys = path.split(".")
        node = raw
        for i, k in enumerate(keys[:-1]):
            if node.get(k) is None:
                node[k] = {}
            node = node[k]
            if not isinstance(node, dict):
                raise SpecError(f"override {path}={_show(value)}: {'.'.join(keys[:i + 1])}={_show(node)} is a value, not a "
                                f"section, so it has no field {keys[i + 1]!r}")
        node[keys[-1]] = _plain(value, f"override {path}") if isinstance(value, Mapping) else value
    return raw


def _apply_semantics(raw: dict) -> dict:
    sem = raw.get("semantics", "mythos")
    if not isinstance(sem, str) or sem not in SEMANTICS:
        raise SpecError(f"semantics={_show(sem)} is not allowed; allowed: {', '.join(SEMANTICS)}{_did_you_mean(str(sem)[:80], SEMANTICS)}")
    for path, want in SEMANTICS_FIXED[sem].items():
        *parents, leaf = path.split(".")
        node = raw
        for k in parents:
            if node.get(k) is None:
                node[k] = {}
            node = node[k]
            if not isinstance(node, dict):
                break  # _parse reports the section that is not a mapping
        else:
            if leaf not in node:
                node[leaf] = want
            elif not _equal(node[leaf], want):
                raise SpecError(f"{path}={_show(node[leaf])} conflicts with semantics={sem} (which fixes it to {want!r})")
    return raw


def _equal(value: object, want: object) -> bool:
    """``value == want`` for the plain values SEMANTICS_FIXED holds; False for anything else (an array)."""
    if want is None or isinstance(want, (str, bool)):
        return type(value) is type(want) and value == want
    return _is_real(value) and float(value) == want


def _parse(cls, raw: object, prefix: str):
    where = prefix.rstrip(".") or "spec"
    if not isinstance(raw, dict):
        raise SpecError(f"{where} must be a mapping of fields, got {raw!r}"[:300])
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            raise SpecError(f"unknown field {prefix}{str(key)[:80]}{_did_you_mean(str(key)[:80], names)}; fields of {where}: {', '.join(names)}")
    values = {}
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SpecError(f"{path} is required")
            continue
        values[f.name] = _coerce(hints[f.name], raw[f.name], path)
    return cls(**values)


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _is_int(v: object) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _is_real(v: object) -> bool:
    """A Python or NumPy real number (integers included), not a bool."""
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _show(value: object) -> str:
    """``repr`` of a value for a message, cut short (a hostile spec may hold a megabyte string)."""
    r = repr(value.item() if isinstance(value, np.generic) else value)
    return r if len(r) <= 80 else r[:77] + "..."


def _coerce(tp, value, path: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _parse(tp, {} if value is None else value, path + ".")
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(args[0], value, path)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if not isinstance(value, str) or value not in allowed:
            raise SpecError(f"{path}={_show(value)} is not allowed; allowed: {', '.join(map(str, allowed))}{_did_you_mean(str(value)[:100], [str(a) for a in allowed])}")
        return str(value)
    if tp is bool:
        if not isinstance(value, (bool, np.bool_)):
            raise SpecError(f"{path}={_show(value)} must be true or false")
        return bool(value)
    if tp is int:
        if not _is_int(value):
            raise SpecError(f"{path}={_show(value)} must be an integer in {RANGES[path]}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise SpecError(f"{path}={_show(value)} must be a number in {RANGES[path]}") from None
        if not _is_real(value):
            raise SpecError(f"{path}={_show(value)} must be a number in {RANGES[path]}")
        try:
            return float(value)
        except OverflowError:  # an integer beyond float range
            raise SpecError(f"{path}={_show(value)} must be a finite number in {RANGES[path]}") from None
    raise TypeError(f"unsupported spec field type {tp} at {path}")


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# --------------------------------------------------------------------------- validation


def validate(s: Spec) -> None:
    """Every field's type and range (RANGES), then the cross-field rules; SpecError on the first violation."""
    _check_fields(s, "")
    a, r, m, h = s.attention, s.recurrent, s.moe, s.halting

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise SpecError(msg)

    if s.dense_hidden is None:
        need(s.ffn_hidden >= 1, f"dim={s.dim} gives dense_hidden=floor(4*dim/3)=0; set dense_hidden or a larger dim")

    if a.type == "gqa":
        need(s.dim % a.n_heads == 0, f"attention.n_heads={a.n_heads} must divide dim={s.dim}")
        need(a.n_heads % a.n_kv_heads == 0, f"attention.n_kv_heads={a.n_kv_heads} must divide attention.n_heads={a.n_heads}")
        need(s.head_dim % 2 == 0, f"head dim = dim/attention.n_heads = {s.dim}/{a.n_heads} = {s.head_dim} must be even (RoPE rotates pairs)")
    else:
        need(a.qk_rope_head_dim % 2 == 0, f"attention.qk_rope_head_dim={a.qk_rope_head_dim} must be even (RoPE rotates pairs)")

    le = r.loop_embedding
    if le.enabled:
        need(s.loop_dim >= 2 and s.loop_dim % 2 == 0,
             f"recurrent.loop_embedding.dim={s.loop_dim}{' (dim // 8)' if le.dim is None else ''} must be even and >= 2; set it explicitly or disable the loop embedding")
        need(s.loop_dim <= s.dim, f"recurrent.loop_embedding.dim={s.loop_dim} must be <= dim={s.dim}")

    if r.ffn == "moe":
        need(m.top_k <= m.n_experts, f"moe.top_k={m.top_k} must be between 1 and moe.n_experts={m.n_experts}")

    cl, cp = r.cross_loop_attention, r.compressor
    if cl.enabled:
        need(s.dim % cl.n_heads == 0, f"recurrent.cross_loop_attention.n_heads={cl.n_heads} must divide dim={s.dim}")
    if cp.enabled:
        need(s.dim % cp.n_heads == 0, f"recurrent.compressor.n_heads={cp.n_heads} must divide dim={s.dim}")
    # a Spec built directly (not through load) skips SEMANTICS_FIXED; this one field is checked here too
    need(s.semantics != "openmythos-0.5" or s.decode.halted_kv == "compute",
         f"decode.halted_kv={s.decode.halted_kv!r} conflicts with semantics=openmythos-0.5 "
         "(which fixes it to 'compute')")
    for path, value in (("attention.rope", a.rope), ("attention.window", a.window), ("halting.mode", h.mode)):
        want = SEMANTICS_FIXED["openmythos-0.5"][path]
        need(s.semantics != "openmythos-0.5" or value == want,
             f"{path}={value!r} conflicts with semantics=openmythos-0.5 (which fixes it to {want!r})")
    need(s.loss.consistency == 0 or s.value_head.enabled,
         f"loss.consistency={s.loss.consistency} needs value_head.enabled=true (the loss compares value-head outputs)")


def _check_fields(node: object, prefix: str) -> None:
    """Each leaf of a Spec (also one built directly, not through load) has its type and lies in RANGES."""
    for f in dataclasses.fields(node):
        path, v, tp = prefix + f.name, getattr(node, f.name), _hints(type(node))[f.name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(v, tp):
                raise SpecError(f"{path} must be a {tp.__name__}, got {_show(v)}")
            _check_fields(v, path + ".")
            continue
        if typing.get_origin(tp) in (types.UnionType, typing.Union):
            if v is None:
                continue
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if tp is int:
            if not _is_int(v) or v not in RANGES[path]:
                raise SpecError(f"{path}={_show(v)} must be an integer in {RANGES[path]}")
        elif tp is float:
            if not _is_real(v) or not math.isfinite(v) or v not in RANGES[path]:
                raise SpecError(f"{path}={_show(v)} must be a finite number in {RANGES[path]}")
        else:
            _coerce(tp, v, path)  # bools and literals: the parse check, which raises with the field's message
