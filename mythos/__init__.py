"""The Mythos application: the `mythos` command line, training driver, tasks, tokenizer, trace pictures.

    >>> import mythos
    >>> model = mythos.load_model("bench-s-gqa", "jax", dtype="float32", seed=0)   # or a .safetensors file
    >>> import mythos.tasks, mythos.tokenizer, mythos.train, mythos.trace

The top of the layers (docs/design.md, "Layers"): it uses spec, the twins, weights_bridge and parity,
and nothing below imports it; it is the only layer that prints. Importing `mythos` loads no framework.
"""

from .load import LoadError, Source, load_model, resolve

__all__ = ["load_model", "resolve", "Source", "LoadError"]
