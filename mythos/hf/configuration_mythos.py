"""MythosConfig: a transformers config that carries the whole Mythos spec (docs/huggingface.md).

This file is also copied into every exported directory (the `trust_remote_code` layout), so it imports
only transformers and the installed `spec` package, never `mythos`.

    >>> cfg = MythosConfig.from_spec(spec.preset("tiny", {"vocab_size": 258}), dtype="float32")
    >>> cfg.mythos_spec                    # the validated spec.Spec
    >>> cfg.vocab_size, cfg.n_loops        # (258, None): derived from the spec; None = recurrent.max_loop_iters
"""

from __future__ import annotations

import spec as spec_lib
from transformers import PreTrainedConfig

# The byte tokenizer's ids (mythos/tokenizer.py): bytes 0..255, then BOS and EOS; the pad id is EOS.
BOS_ID, EOS_ID, BYTE_VOCAB = 256, 257, 258
DTYPE_NAMES = ("float32", "float64", "bfloat16")
# Fields derived from the spec and written for readers that look for them (lm-eval, the Hub's widgets);
# config.json may hold them, but never in disagreement with the spec.
DERIVED = ("vocab_size", "hidden_size", "num_attention_heads", "max_position_embeddings")


class MythosConfig(PreTrainedConfig):
    """The spec (``spec.to_dict``, validated on construction), the default loop count, the token ids.

    Args:
        spec: the spec as a dict (``spec.to_dict(s)``, as config.json stores it) or YAML text
            (``spec.dump(s)``); None: the ``tiny`` preset.
        n_loops: loop steps N of every forward and ``generate``; None: ``recurrent.max_loop_iters``.
        dtype: the model dtype, float32 | float64 | bfloat16 (None: float32).
        bos_token_id, eos_token_id, pad_token_id: default 256, 257, 257 (the byte tokenizer; the pad is
            EOS) when the vocabulary holds them (vocab_size >= 258), else None.
    """

    model_type = "mythos"

    spec: dict | str | None = None
    n_loops: int | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    max_position_embeddings: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        s = self._load_spec()
        self.spec = spec_lib.to_dict(s)  # stored every field explicit, as spec.to_dict writes it
        derived = {"vocab_size": s.vocab_size, "hidden_size": s.dim, "num_attention_heads": s.attention.n_heads,
                   "max_position_embeddings": s.max_seq_len}
        for name, value in derived.items():
            given = getattr(self, name)
            if given is not None and given != value:
                raise ValueError(f"MythosConfig: {name}={given!r} disagrees with the spec, which gives {value} "
                                 f"(the field is derived from spec; drop it or fix the spec)")
            setattr(self, name, value)
        if self.n_loops is not None:
            try:
                self.n_loops = spec_lib.check_loops(s, self.n_loops, what="MythosConfig n_loops")
            except spec_lib.SpecError as e:
                raise ValueError(str(e)) from None
        fits = s.vocab_size >= BYTE_VOCAB
        for name, default in (("bos_token_id", BOS_ID), ("eos_token_id", EOS_ID), ("pad_token_id", EOS_ID)):
            value = getattr(self, name)
            if value is None:
                setattr(self, name, default if fits else None)
            elif isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < s.vocab_size:
                raise ValueError(f"MythosConfig: {name}={value!r} must be a token id in [0, vocab_size={s.vocab_size})")
        super().__post_init__(**kwargs)
        if self.dtype is None:
            self.dtype = "float32"
            super().__post_init__()  # turns the name into a torch.dtype, as for a given dtype
        if self.dtype_name not in DTYPE_NAMES:
            raise ValueError(f"MythosConfig: dtype={self.dtype!r} is not supported; allowed: {', '.join(DTYPE_NAMES)}")

    def _load_spec(self) -> spec_lib.Spec:
        """The spec field as a validated Spec (a dict, YAML text, or None for the tiny preset)."""
        try:
            if self.spec is None:
                return spec_lib.preset("tiny")
            if isinstance(self.spec, str):  # YAML text only, never a preset name or a path
                return spec_lib.loads(self.spec, where="MythosConfig spec")
            return spec_lib.load(dict(self.spec))
        except spec_lib.SpecError as e:
            raise ValueError(f"MythosConfig: the spec is not valid: {e}") from None

    @property
    def mythos_spec(self) -> spec_lib.Spec:
        """The spec as a frozen, validated ``spec.Spec``."""
        return self._load_spec()

    @property
    def dtype_name(self) -> str:
        """The model dtype as a name: float32 | float64 | bfloat16."""
        return str(self.dtype).removeprefix("torch.")

    @property
    def loops(self) -> int:
        """Loop steps N of every call: ``n_loops``, or the spec's ``recurrent.max_loop_iters``."""
        return self.n_loops if self.n_loops is not None else self.mythos_spec.recurrent.max_loop_iters

    @classmethod
    def from_spec(cls, s: spec_lib.Spec, *, dtype: str = "float32", n_loops: int | None = None,
                  **kwargs) -> MythosConfig:
        """The config of a spec in a dtype, with the default loop count (None: recurrent.max_loop_iters)."""
        return cls(spec=spec_lib.to_dict(s), dtype=dtype, n_loops=n_loops, **kwargs)
