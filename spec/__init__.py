"""The Mythos spec: one YAML file that says exactly what the model is.

    >>> import spec
    >>> s = spec.preset("tiny")
    >>> s2 = spec.load("tiny", overrides={"attention.type": "mla"})
    >>> spec.count_params(s)["total"]
"""

from .costs import cache_shapes, flops_per_token, kv_cache_bytes_per_token
from .manifest import Param, count_params, init_arrays, manifest
from .schema import (
    AttentionSpec,
    HaltingSpec,
    InitSpec,
    LoopEmbeddingSpec,
    MoESpec,
    RecurrentSpec,
    Spec,
    SpecError,
    dump,
    load,
    parse_override,
    preset,
    preset_names,
    to_dict,
    validate,
)
from .tables import loop_table, rope_table

__all__ = [
    "Spec", "AttentionSpec", "RecurrentSpec", "LoopEmbeddingSpec", "MoESpec", "HaltingSpec", "InitSpec",
    "SpecError", "load", "preset", "preset_names", "dump", "to_dict", "parse_override", "validate",
    "Param", "manifest", "init_arrays", "count_params", "flops_per_token", "kv_cache_bytes_per_token", "cache_shapes",
    "rope_table", "loop_table",
]
