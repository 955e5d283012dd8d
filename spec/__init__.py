"""The Mythos spec: one YAML file that says exactly what the model is.

    >>> import spec
    >>> s = spec.preset("tiny")
    >>> s2 = spec.load("tiny", overrides={"attention.type": "mla"})
    >>> spec.count_params(s)["total"]
"""

from .costs import cache_shapes, flops_per_token, kv_cache_bytes_per_token
from .manifest import Param, count_params, init_arrays, manifest
from .schema import (
    MAX_SPEC_BYTES,
    RANGES,
    AttentionSpec,
    HaltingSpec,
    InitSpec,
    LoopEmbeddingSpec,
    MoESpec,
    RecurrentSpec,
    Spec,
    Range,
    SpecError,
    check_length,
    check_loops,
    dump,
    load,
    loads,
    parse_override,
    preset,
    preset_names,
    read_text,
    safe_yaml,
    to_dict,
    validate,
)
from .tables import loop_table, rope_table

__all__ = [
    "Spec", "AttentionSpec", "RecurrentSpec", "LoopEmbeddingSpec", "MoESpec", "HaltingSpec", "InitSpec",
    "SpecError", "load", "loads", "preset", "preset_names", "dump", "to_dict", "parse_override", "validate",
    "check_loops", "check_length", "RANGES", "Range", "MAX_SPEC_BYTES", "read_text", "safe_yaml",
    "Param", "manifest", "init_arrays", "count_params", "flops_per_token", "kv_cache_bytes_per_token", "cache_shapes",
    "rope_table", "loop_table",
]
