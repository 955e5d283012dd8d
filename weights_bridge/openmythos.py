"""open-mythos 0.5.0 <-> Mythos: one config map, one name map, one list of layout changes.

Every other direction is derived from the three tables below: import (open-mythos state dict ->
manifest arrays), export (the inverse), and the expected open-mythos names and shapes for a spec.

What an import ignores, and why:
- ``dropout``: training only; inference (and open-mythos in ``eval()``) never applies it.
- ``max_output_tokens``: a ``generate()`` default, not part of the model.
- ``freqs_cis``/``freqs_cis_mla``: buffers open-mythos recomputes from its config; checked (shape,
  and the first positions against our RoPE table, which catches a wrong ``rope_theta``), then dropped.
- ``head.weight``: tied to ``embed.weight`` in open-mythos; checked equal, then dropped.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import ml_dtypes
import numpy as np

import spec as spec_lib

from .fileformat import NP_DTYPES, BridgeError, dtype_name, raise_if

if TYPE_CHECKING:
    import torch


# --------------------------------------------------------------------------- the three tables

# MythosConfig field -> spec field path (None: not part of the model; see the module docstring).
CONFIG_MAP: dict[str, str | None] = {
    "vocab_size": "vocab_size",
    "dim": "dim",
    "n_heads": "attention.n_heads",
    "n_kv_heads": "attention.n_kv_heads",
    "max_seq_len": "max_seq_len",
    "max_loop_iters": "recurrent.max_loop_iters",
    "prelude_layers": "prelude_layers",
    "coda_layers": "coda_layers",
    "attn_type": "attention.type",
    "kv_lora_rank": "attention.kv_lora_rank",
    "q_lora_rank": "attention.q_lora_rank",
    "qk_rope_head_dim": "attention.qk_rope_head_dim",
    "qk_nope_head_dim": "attention.qk_nope_head_dim",
    "v_head_dim": "attention.v_head_dim",
    "n_experts": "moe.n_experts",
    "n_shared_experts": "moe.n_shared_experts",
    "n_experts_per_tok": "moe.top_k",
    "expert_dim": "moe.expert_dim",
    "act_threshold": "halting.threshold",
    "rope_theta": "rope_theta",
    "lora_rank": "recurrent.lora_rank",
    "max_output_tokens": None,
    "dropout": None,
}
# MythosConfig defaults in open-mythos 0.5.0 (tests compare them with the installed package).
CONFIG_DEFAULTS: dict[str, object] = {
    "vocab_size": 32000, "dim": 2048, "n_heads": 16, "n_kv_heads": 4, "max_seq_len": 4096,
    "max_loop_iters": 16, "prelude_layers": 2, "coda_layers": 2, "attn_type": "mla",
    "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
    "v_head_dim": 128, "n_experts": 64, "n_shared_experts": 2, "n_experts_per_tok": 4,
    "expert_dim": 512, "act_threshold": 0.99, "rope_theta": 500000.0, "lora_rank": 16,
    "max_output_tokens": 4096, "dropout": 0.0,
}
# What open-mythos hard-codes, stated in the spec (its RMSNorm eps, its init std).
FIXED_SPEC_FIELDS = {"semantics": "openmythos-0.5", "norm_eps": 1e-6, "init.std": 0.02}
# open_mythos.variants function -> our preset reproducing it.
VARIANTS = {
    "mythos_1b": "openmythos-1b", "mythos_3b": "openmythos-3b", "mythos_10b": "openmythos-10b",
    "mythos_50b": "openmythos-50b", "mythos_100b": "openmythos-100b", "mythos_500b": "openmythos-500b",
    "mythos_1t": "openmythos-1t",
}

# open-mythos state-dict name -> manifest path, where they differ; every other name is the same.
NAME_MAP = {
    "recurrent.lora.scale.weight": "recurrent.lora.scale",  # an nn.Embedding there, a plain tensor here
    "recurrent.block.ffn.routed_experts.{e}.gate.weight": "recurrent.block.ffn.experts.gate",
    "recurrent.block.ffn.routed_experts.{e}.up.weight": "recurrent.block.ffn.experts.up",
    "recurrent.block.ffn.routed_experts.{e}.down.weight": "recurrent.block.ffn.experts.down",
}
# Layout changes, by manifest path: open-mythos keeps one nn.Linear per routed expert, [out, in];
# we stack them on a new leading axis and transpose each, [E, in, out].
STACKED_TRANSPOSED = ("recurrent.block.ffn.experts.gate", "recurrent.block.ffn.experts.up",
                      "recurrent.block.ffn.experts.down")
TIED = {"head.weight": "embed.weight"}  # open-mythos name -> the manifest path it is tied to
DERIVED = ("freqs_cis", "freqs_cis_mla")  # RoPE buffers, recomputed from the config
EMPTY_WITHOUT_LORA = ("recurrent.lora.down.weight", "recurrent.lora.B", "recurrent.lora.scale.weight")
ROPE_CHECK_POSITIONS = 64  # float32 RoPE tables agree to ~4e-6 here; a wrong rope_theta is off by far more

_MANIFEST_TO_OM = {v: k for k, v in NAME_MAP.items()}


def open_mythos_name(path: str) -> str:
    """The open-mythos name of a manifest path (with ``{e}`` for a stacked expert tensor)."""
    return _MANIFEST_TO_OM.get(path, path)


# --------------------------------------------------------------------------- config


def spec_from_config(config: object) -> spec_lib.Spec:
    """Our spec (``semantics: openmythos-0.5``) for an open-mythos config.

    Args:
        config: a ``MythosConfig``; a mapping of its fields (missing ones take open-mythos'
            defaults); a path to a YAML or JSON file of that mapping; an ``open_mythos.variants``
            name (``"mythos_1b"``) or our preset for it (``"openmythos-1b"``); or a Spec.
    Returns:
        The validated Spec.
    Raises:
        BridgeError: unknown fields, or a config our spec cannot represent (the message says why).
    """
    if isinstance(config, spec_lib.Spec):
        if config.semantics != "openmythos-0.5":
            raise BridgeError(f"spec has semantics={config.semantics!r}; open-mythos weights need 'openmythos-0.5'")
        return config
    if isinstance(config, (str, os.PathLike)):
        name = str(config)
        if name in VARIANTS or name in VARIANTS.values():
            return spec_lib.preset(VARIANTS.get(name, name))
        path = Path(config)
        if not path.exists():
            raise BridgeError(f"config {name!r} is neither an open-mythos variant ({', '.join(VARIANTS)}) nor a file")
        try:  # bounded UTF-8 text; YAML without anchors, aliases or duplicate keys (spec.safe_yaml)
            text = spec_lib.read_text(path, "config file")
            fields = json.loads(text) if path.suffix == ".json" else spec_lib.safe_yaml(text, f"config file {path}")
        except spec_lib.SpecError as e:
            raise BridgeError(str(e)) from None
        except (ValueError, RecursionError) as e:  # json.JSONDecodeError is a ValueError
            raise BridgeError(f"config file {path}: cannot parse it as JSON: {str(e)[:200]}") from None
        if not isinstance(fields, dict):
            raise BridgeError(f"config file {path}: expected a mapping of MythosConfig fields")
        return _spec_from_fields(fields, str(path))
    if isinstance(config, Mapping):
        return _spec_from_fields(dict(config), "config")
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return _spec_from_fields(dataclasses.asdict(config), type(config).__name__)
    raise BridgeError(f"cannot read an open-mythos config from {type(config).__name__}; pass a MythosConfig, a mapping, a file or a variant name")


def _spec_from_fields(fields: dict, where: str) -> spec_lib.Spec:
    unknown = [k for k in fields if k not in CONFIG_MAP]
    if unknown:
        hints = "".join(f"; {k!r}: did you mean {m[0]!r}?" for k in unknown if (m := difflib.get_close_matches(str(k), list(CONFIG_MAP), n=1)))
        raise BridgeError(f"{where}: unknown MythosConfig field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                          f"(open-mythos 0.5.0 has: {', '.join(CONFIG_MAP)}){hints}")
    cfg = {**CONFIG_DEFAULTS, **fields}
    if cfg["attn_type"] not in ("gqa", "mla"):
        raise BridgeError(f"{where}: attn_type={cfg['attn_type']!r}: open-mythos builds GQA for anything but 'mla'; say 'gqa' or 'mla'")
    dropout = cfg["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise BridgeError(f"{where}: dropout={dropout!r} must be a number in [0, 1) (it is ignored at inference)")
    raw: dict = {}
    for key, path in CONFIG_MAP.items():
        if path is not None:
            _put(raw, path, cfg[key])
    for path, value in FIXED_SPEC_FIELDS.items():
        _put(raw, path, value)
    try:
        return spec_lib.load(raw)
    except spec_lib.SpecError as e:
        raise BridgeError(f"{where}: this open-mythos config cannot be represented as a Mythos spec: {e} "
                          f"(spec fields map from MythosConfig as {_mapped_names(str(e))})") from None


def _put(raw: dict, path: str, value: object) -> None:
    *parents, leaf = path.split(".")
    for p in parents:
        raw = raw.setdefault(p, {})
    raw[leaf] = value


def _mapped_names(message: str) -> str:
    """The MythosConfig names of the spec fields a SpecError mentions, for the error message."""
    named = [f"{k} -> {path}" for k, path in CONFIG_MAP.items() if path and re.search(rf"(?<![\w.]){re.escape(path)}=", message)]
    return ", ".join(named) if named else "see CONFIG_MAP"


def config_from_spec(s: spec_lib.Spec) -> dict[str, object]:
    """The MythosConfig fields (a plain dict) that build the open-mythos twin of spec ``s``."""
    if s.semantics != "openmythos-0.5":
        raise BridgeError(f"semantics={s.semantics!r}: only an openmythos-0.5 spec has an open-mythos equivalent")
    for path, want in FIXED_SPEC_FIELDS.items():
        if path != "init.std" and _get(s, path) != want:
            raise BridgeError(f"{path}={_get(s, path)!r}: open-mythos hard-codes {want!r}")
    cfg = {k: _get(s, path) if path else CONFIG_DEFAULTS[k] for k, path in CONFIG_MAP.items()}
    return cfg


def _get(s: spec_lib.Spec, path: str) -> object:
    node: object = s
    for part in path.split("."):
        node = getattr(node, part)
    return node


# --------------------------------------------------------------------------- names and layouts


def open_mythos_names(s: spec_lib.Spec) -> dict[str, tuple[str | None, int | None, tuple[int, ...]]]:
    """Every open-mythos state-dict tensor for spec ``s``: name -> (manifest path, expert, shape there).

    The manifest path is None for tensors that are checked and dropped (tied head, RoPE buffers,
    the empty LoRA tensors of ``lora_rank: 0``); ``expert`` is the routed-expert index of a stacked one.
    """
    out: dict[str, tuple[str | None, int | None, tuple[int, ...]]] = {}
    for p in spec_lib.manifest(s):
        om = open_mythos_name(p.path)
        if p.path in STACKED_TRANSPOSED:
            for e in range(p.shape[0]):
                out[om.format(e=e)] = (p.path, e, p.shape[1:][::-1])  # [out, in] each
        else:
            out[om] = (p.path, None, p.shape)
    for om, ours in TIED.items():
        out[om] = (None, None, next(shape for path, _, shape in out.values() if path == ours))
    r = s.recurrent
    if r.lora_rank == 0:  # open-mythos still registers the adapter, with zero-size tensors
        for om, shape in zip(EMPTY_WITHOUT_LORA, [(0, s.dim), (0, s.dim), (r.max_loop_iters, 0)]):
            out[om] = (None, None, shape)
    gqa_head = s.dim // s.attention.n_heads
    out["freqs_cis"] = (None, None, (s.max_seq_len, gqa_head // 2))
    out["freqs_cis_mla"] = (None, None, (s.max_seq_len, s.attention.qk_rope_head_dim // 2))
    return out


CONTAINER_KEYS = ("model", "state_dict", "model_state_dict")  # checkpoints that wrap the state dict


def read_state_dict(path: str | os.PathLike) -> dict[str, "torch.Tensor"]:
    """An open-mythos state dict from a ``.pt`` file: tensors only, never code.

    Read with ``torch.load(weights_only=True)``; a file holding anything that would need unpickling
    arbitrary Python objects is refused, with our reason and what to do instead (never a hint to
    switch the check off). A dict wrapping the state dict under one of CONTAINER_KEYS is unwrapped.

    Raises:
        BridgeError: a missing path, a directory, a corrupt or foreign file, a refused object, or a
            value that is not a mapping of tensors.
    """
    import torch

    path = Path(path)
    if path.is_dir():
        raise BridgeError(f"{path} is a directory, not a torch checkpoint (give the .pt file inside it)")
    if not path.is_file():
        raise BridgeError(f"{path}: no such file" if not path.exists() else f"{path} is not a regular file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the weights-only unpickler's refusal, a truncated zip, a foreign file
        if type(e).__name__ == "UnpicklingError":  # pickle.UnpicklingError, without importing pickle here
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f" (it names {found.group(1)})" if found else ""
            raise BridgeError(
                f"{path}: refused: it holds Python objects, not only tensors{what}, and loading it would run code "
                f"stored in the file. Only plain state dicts are read. If you trust the file, load it in a separate, "
                f"trusted environment, save model.state_dict() (tensors only) with torch.save, and convert that file") from None
        reason = str(e).split(". ")[0][:200]
        raise BridgeError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {reason})") from None
    if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = [k for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)]
        if len(inner) == 1:
            obj = obj[inner[0]]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise BridgeError(f"{path}: expected a state dict (names -> tensors), or one under {', '.join(CONTAINER_KEYS)}")
    return dict(obj)


def to_numpy(t: object) -> np.ndarray:
    """A torch tensor (or array) as NumPy; bfloat16 through its 16-bit pattern, exactly."""
    import torch

    if isinstance(t, np.ndarray):
        return t
    if not isinstance(t, torch.Tensor):
        raise BridgeError(f"expected a tensor, got {type(t).__name__}")
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def arrays_from_open_mythos(state_dict: Mapping[str, object], s: spec_lib.Spec) -> tuple[dict[str, np.ndarray], str]:
    """Manifest arrays (torch layout) from an open-mythos state dict, and the dtype of its weights.

    Raises:
        BridgeError: listing every missing, unexpected, misshapen or mistyped tensor, an untied head,
            mixed dtypes, or RoPE buffers that do not match the spec.
    """
    names = open_mythos_names(s)
    errors = [f"{n}: missing from the open-mythos state dict" for n in names if n not in state_dict]
    errors += [f"{n}: not an open-mythos 0.5.0 tensor for this config" for n in state_dict if n not in names]
    sd = {n: to_numpy(state_dict[n]) for n in names if n in state_dict}

    # the weights' dtype: that of the embedding, else the most common one
    kinds = [dtype_name(a) for n, a in sd.items() if n not in DERIVED]
    dtype = dtype_name(sd["embed.weight"]) if "embed.weight" in sd else max(set(kinds), key=kinds.count, default="float32")
    if dtype not in NP_DTYPES:
        raise BridgeError(f"open-mythos weights in {dtype}; supported: {', '.join(NP_DTYPES)}")
    good: set[str] = set()  # tensors with the right shape and dtype, whose values can be checked
    for n, a in sd.items():
        shape = names[n][2]
        want = "complex64" if n in DERIVED else dtype
        if a.shape != shape:
            errors.append(f"{n}: shape {a.shape} but the config implies {shape}")
        elif dtype_name(a) != want and not (n.endswith(".router_bias") and dtype_name(a) == "float32"):
            errors.append(f"{n}: dtype {dtype_name(a)} but expected {want} (the dtype of the weights)")
        else:
            good.add(n)

    for n, ours in TIED.items():
        if {n, open_mythos_name(ours)} <= good and not np.array_equal(sd[n], sd[open_mythos_name(ours)]):
            errors.append(f"{n}: differs from {ours}; open-mythos ties them, our spec ties them too")
    k = min(ROPE_CHECK_POSITIONS, s.max_seq_len)
    for n, table in zip(DERIVED, _rope_tables(s)):
        if table is not None and n in good:
            err = max(np.abs(sd[n].real[:k] - table[0]).max(initial=0), np.abs(sd[n].imag[:k] - table[1]).max(initial=0))
            if err > 1e-5:
                errors.append(f"{n}: differs from the RoPE table of this config by {err:.2e} (wrong rope_theta?)")
    raise_if(errors, "open-mythos state dict does not match its config")

    arrays: dict[str, np.ndarray] = {}
    stacks: dict[str, list[np.ndarray]] = {}
    for n, (path, e, _) in names.items():
        if path is None:
            continue
        if e is None:
            arrays[path] = sd[n]
        else:
            stacks.setdefault(path, []).append(sd[n].T)  # [out, in] -> [in, out]; names are in expert order
    for path, mats in stacks.items():
        arrays[path] = np.stack(mats)
    for p in spec_lib.manifest(s):
        if p.kind == "buffer" and dtype == "bfloat16":
            arrays[p.path] = arrays[p.path].astype(np.float32)  # router_bias: float32 in a bf16 model (exact)
    return {p.path: arrays[p.path] for p in spec_lib.manifest(s)}, dtype


def _rope_tables(s: spec_lib.Spec) -> tuple:
    """Our (cos, sin) for the buffer open-mythos' forward uses, None for the other one."""
    table = spec_lib.rope_table(s, min(ROPE_CHECK_POSITIONS, s.max_seq_len))
    return (table, None) if s.attention.type == "gqa" else (None, table)


def arrays_to_open_mythos(arrays: Mapping[str, np.ndarray], s: spec_lib.Spec) -> dict[str, np.ndarray]:
    """The inverse of ``arrays_from_open_mythos`` for the weights: open-mythos names and layout.

    Dropped tensors come back as follows: the tied head as the embedding, the empty LoRA tensors as
    empty arrays; the RoPE buffers are left out (``to_open_mythos`` adds them).
    """
    dtype = dtype_name(np.asarray(arrays["embed.weight"]))
    out: dict[str, np.ndarray] = {}
    for n, (path, e, shape) in open_mythos_names(s).items():
        if n in DERIVED:
            continue
        if n in TIED:
            out[n] = np.asarray(arrays[TIED[n]])
        elif path is None:
            out[n] = np.zeros(shape, NP_DTYPES[dtype])
        elif e is None:
            out[n] = np.asarray(arrays[path]).astype(NP_DTYPES[dtype], copy=False)  # router_bias back to the model dtype
        else:
            out[n] = np.ascontiguousarray(np.asarray(arrays[path])[e].T)  # [in, out] -> [out, in]
    return out


def torch_rope_buffer(head_dim: int, max_len: int, theta: float) -> "torch.Tensor":
    """open-mythos' RoPE buffer: complex64 phasors of float32 angles t * theta^(-2i/d), computed by torch."""
    import torch

    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
    return torch.polar(torch.ones_like(angles), angles)
