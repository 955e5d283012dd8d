"""MythosForCausalLM: the torch twin behind transformers' PreTrainedModel and GenerationMixin (docs/huggingface.md).

    >>> model = MythosForCausalLM.from_twin(mythos_torch.build(s, seed=0))    # or AutoModelForCausalLM.from_pretrained
    >>> out = model(input_ids, attention_mask=mask, labels=input_ids)         # CausalLMOutputWithPast (+ loop_counts)
    >>> model.generate(input_ids, max_new_tokens=16, num_beams=3)              # greedy, beam, sampling: HF's own loops
    >>> model.save_pretrained(dir)         # config.json, model.safetensors (the project's file), tokenizer, card, code

Only the twin's public API is used: ``model(ids, n_loops, cache=, start_pos=, attention_mask=)``,
``model.init_cache(B, max_len, n_loops)``, ``load_arrays``, ``weights_bridge.save``. This file is copied into
every exported directory (the `trust_remote_code` layout) with configuration_mythos.py and hub_mythos.py,
so it imports the installed spec / mythos_torch / weights_bridge packages, never `mythos`.

transformers 5.24 calls the cache argument and output field ``cache``; 5.19 calls both ``past_key_values``.
Both names are accepted; the output uses the one this transformers' CausalLMOutputWithPast has.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

import mythos_torch
import spec as spec_lib
import torch
import torch.nn.functional as F
import weights_bridge
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from weights_bridge.atomic import atomic_write

from .configuration_mythos import MythosConfig
from .hub_mythos import README_NAME, generation_config, model_card, tokenizer_files

WEIGHTS_NAME = "model.safetensors"  # the project's own file (weights_bridge format), under the name HF looks for
CODE_FILES = ("configuration_mythos.py", "modeling_mythos.py", "hub_mythos.py")
AUTO_MAP = {"AutoConfig": "configuration_mythos.MythosConfig",
            "AutoModelForCausalLM": "modeling_mythos.MythosForCausalLM"}
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
REBUILT_BUFFERS = ("rope_cos", "rope_sin")  # the twin's non-persistent buffers: spec.rope_table, recomputed
MIN_CAPACITY = 16  # positions of a fresh cache; it doubles (up to max_seq_len) when a call needs more


@dataclasses.dataclass
class MythosCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus the twin's loop counts (B, T) int32: the step at which each position halted."""
    loop_counts: torch.Tensor | None = None


class MythosCache(Cache):
    """The twin's KVCache behind transformers' Cache: every attention layer of every loop step, the compressor's
    summaries and each row's left padding (KVCache.pad, set by the prefill), for batch B and n_loops N.

    Allocated at the first call (``reserve``), grown by doubling (the old rows copied into the new arrays) up to
    max_seq_len, reordered along the batch for beam search. ``get_seq_length`` = positions written.
    """

    def __init__(self, model: mythos_torch.Mythos, n_loops: int):
        super().__init__(layers=[])
        self.model = model
        self.n_loops = n_loops
        self.kv: mythos_torch.KVCache | None = None
        self.seen = 0  # positions 0..seen-1 are written

    def reserve(self, batch: int, n_new: int) -> mythos_torch.KVCache:
        """The KVCache for a call writing positions seen..seen+n_new-1, allocated or grown to hold them."""
        need, limit = self.seen + n_new, self.model.spec.max_seq_len
        if need > limit:
            raise ValueError(f"positions 0..{need - 1} exceed max_seq_len={limit} of this model (the cache holds "
                             f"{self.seen}, the call adds {n_new}); generate fewer tokens or use a shorter prompt")
        if self.kv is not None and self.kv.batch != batch:
            raise ValueError(f"the cache holds batch={self.kv.batch} sequences but input_ids has {batch}")
        if self.kv is None or need > self.kv.capacity:
            capacity = MIN_CAPACITY if self.kv is None else self.kv.capacity
            while capacity < need:
                capacity *= 2
            grown = self.model.init_cache(batch, min(capacity, limit), self.n_loops)
            if self.kv is not None:
                for name, old in self.kv.arrays.items():
                    # every axis that grows (positions, compressor chunks) keeps its leading rows
                    grown.arrays[name][tuple(slice(0, n) for n in old.shape)] = old
                grown.pad.copy_(self.kv.pad)  # each row's left padding, set by the prefill
            self.kv = grown
        return self.kv

    def advance(self, n_new: int) -> None:
        self.seen += n_new

    def _map_batch(self, fn: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
        """Apply fn(tensor, axis) to every cache array (batch axis 1: (L, B, ...) and (N, B, ...)) and to pad (B,)."""
        if self.kv is not None:
            self.kv = mythos_torch.KVCache({name: fn(a, 1) for name, a in self.kv.arrays.items()}, self.kv.n_loops,
                                           fn(self.kv.pad, 0))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row b of the cache becomes row beam_idx[b]."""
        self._map_batch(lambda a, axis: a.index_select(axis, beam_idx.to(a.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda a, axis: a.index_select(axis, torch.as_tensor(indices, device=a.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda a, axis: a.repeat_interleave(repeats, dim=axis))

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last -tokens_to_remove positions (a positive value: keep that many, transformers' legacy form)."""
        keep = self.seen + tokens_to_remove if tokens_to_remove <= 0 else min(tokens_to_remove, self.seen)
        if keep == self.seen:
            return
        if self.model.spec.recurrent.compressor.enabled:
            raise ValueError("MythosCache.crop: the context compressor's cache keeps only the open chunk's rows, so "
                             "positions cannot be taken back; assisted decoding and cropping need "
                             "compressor.enabled=false")
        self.seen = max(keep, 0)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.model.spec.max_seq_len

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen + query_length, 0

    def reset(self) -> None:
        self.kv, self.seen = None, 0

    @property
    def batch_size(self) -> int:
        return -1 if self.kv is None else self.kv.batch

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return not self.model.spec.recurrent.compressor.enabled

    @property
    def is_sliding(self) -> list[bool]:
        return [False]

    @property
    def is_linear(self) -> list[bool]:
        return [False]  # attention with a sequence length: generate slices a continued prompt by get_seq_length


class MythosPreTrainedModel(PreTrainedModel):
    config_class = MythosConfig
    base_model_prefix = "model"  # the project's file names tensors by manifest path; HF adds "model."
    main_input_name = "input_ids"
    _no_split_modules = ["Mythos"]  # one looped block serves every step: keep the twin on one device
    _supports_attention_backend = False
    _can_compile_fullgraph = False

    def _init_weights(self, module: torch.nn.Module) -> None:
        """Only the twin's non-persistent buffers (the RoPE tables): its parameters come from the project's init
        (``spec.init_arrays``, in __init__) or from the checkpoint; transformers' own init would replace them."""
        if isinstance(module, mythos_torch.Mythos):
            rebuild_buffers(module)


def rebuild_buffers(twin: mythos_torch.Mythos) -> None:
    """Recompute the twin's non-persistent buffers (from_pretrained leaves them as uninitialised memory).

    rope_cos/rope_sin: ``spec.rope_table`` cast into the buffer's own dtype, which is the twin's rotation dtype
    (float64 only for a float64 mythos-semantics model), exactly the values the twin builds.
    """
    named = {name: b for name, b in twin.named_buffers() if name in REBUILT_BUFFERS}
    if any(b.is_meta for b in named.values()):
        return  # still on the meta device: transformers materialises them later, then calls this again
    cos, sin = spec_lib.rope_table(twin.spec)
    with torch.no_grad():
        named["rope_cos"].copy_(torch.from_numpy(cos))
        named["rope_sin"].copy_(torch.from_numpy(sin))


def non_persistent_buffers(twin: torch.nn.Module) -> list[str]:
    """Names of the module's buffers that are not saved (torch keeps them in each module's non-persistent set)."""
    return [f"{prefix}.{name}".lstrip(".") for prefix, m in twin.named_modules()
            for name in m._non_persistent_buffers_set]


class MythosForCausalLM(MythosPreTrainedModel, GenerationMixin):
    """The torch twin as a causal LM: logits, the shifted cross-entropy with labels, transformers' generate.

    Args:
        config: a MythosConfig (the spec, dtype, default n_loops, token ids).
        model: a built ``mythos_torch.Mythos`` of that spec and dtype (``from_twin``); None builds one with the
            project's initial weights (``spec.init_arrays(spec, seed=0)``), except on the meta device
            (``from_pretrained``), where the checkpoint fills it.
    """

    def __init__(self, config: MythosConfig, model: mythos_torch.Mythos | None = None):
        super().__init__(config)
        s = config.mythos_spec
        if model is None:
            model = mythos_torch.Mythos(s, dtype=getattr(torch, config.dtype_name))
            if not model.embed.weight.is_meta:
                mythos_torch.load_arrays(model, spec_lib.init_arrays(s, 0))
        elif model.spec != s or model.embed.weight.dtype != getattr(torch, config.dtype_name):
            raise ValueError(f"the twin (dtype {model.embed.weight.dtype}) does not match the config (dtype "
                             f"{config.dtype_name}, spec {'equal' if model.spec == s else 'different'})")
        unknown = sorted(set(non_persistent_buffers(model)) - set(REBUILT_BUFFERS))
        if unknown:
            raise ValueError(f"MythosForCausalLM does not know how to rebuild the twin's non-persistent buffers "
                             f"{', '.join(unknown)} after from_pretrained; teach rebuild_buffers first")
        self.model = model
        self.post_init()

    @classmethod
    def from_twin(cls, model: mythos_torch.Mythos, n_loops: int | None = None) -> MythosForCausalLM:
        """Wrap a built torch twin (its weights are shared, not copied); n_loops: the default loop count."""
        if not isinstance(model, mythos_torch.Mythos):
            raise ValueError(f"from_twin needs a mythos_torch.Mythos model, got {type(model).__name__}")
        dtype = str(model.embed.weight.dtype).removeprefix("torch.")
        return cls(MythosConfig.from_spec(model.spec, dtype=dtype, n_loops=n_loops), model=model)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *model_args, **kwargs):
        """transformers' from_pretrained, then: every tensor of the file must have been loaded (missing, unexpected
        or misshapen tensors are a ValueError, not a warning) and the RoPE tables are recomputed."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True,
                                              **kwargs)
        problems = [f"{k}: missing from the checkpoint" for k in info.get("missing_keys", ())]
        problems += [f"{k}: unexpected in the checkpoint" for k in info.get("unexpected_keys", ())]
        problems += [f"{k}: shape mismatch {m}" for k, *m in info.get("mismatched_keys", ())]
        if problems:
            raise ValueError(f"{pretrained_model_name_or_path}: the weights do not match the spec in config.json:\n  "
                             + "\n  ".join(sorted(problems)))
        rebuild_buffers(model.model)
        return (model, info) if want_info else model

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate must not make a DynamicCache: forward makes a MythosCache on the first call

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def get_output_embeddings(self) -> None:
        return None  # the head is the embedding (tie_embeddings) or the twin's own `head`; nothing for HF to tie

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                past_key_values: Cache | None = None, cache: Cache | None = None,
                labels: torch.LongTensor | None = None, use_cache: bool | None = None,
                inputs_embeds: torch.Tensor | None = None, return_dict: bool | None = None,
                n_loops: int | None = None, **kwargs) -> MythosCausalLMOutput | tuple:
        """Logits of the twin for input_ids, with the cache and the left-padding mask.

        Args:
            input_ids: (B, T) token ids; with a cache, the tokens after the cached positions.
            attention_mask: (B, T) or (B, cached + T) 0/1, left padding (zeros first); None or all ones: no padding.
            past_key_values / cache: a MythosCache from an earlier call (either name; transformers 5.19 / 5.24), or
                an empty Cache that generate made (replaced by a MythosCache).
            labels: (B, T) ids; the loss is the mean cross-entropy of logits[:, :-1] against labels[:, 1:],
                positions labelled -100 left out (as transformers' causal LMs).
            use_cache: return a cache to continue from (default config.use_cache).
            n_loops: loop steps N (default config.n_loops, else recurrent.max_loop_iters); fixed for a cache.
        Returns:
            MythosCausalLMOutput(loss, logits (B, T, V), cache, loop_counts (B, T)).
        """
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds is not supported: Mythos embeds input_ids itself (pass input_ids)")
        if input_ids is None:
            raise ValueError("input_ids is required")
        num_items = kwargs.pop("num_items_in_batch", None)  # transformers' Trainer: the loss over a whole batch
        unknown = {k: v for k, v in kwargs.items() if v is not None and v is not False}
        if unknown:
            raise ValueError(f"MythosForCausalLM.forward does not take {', '.join(sorted(unknown))} (positions come "
                             "from attention_mask and the cache; hidden states and attentions are not returned)")
        if past_key_values is not None and cache is not None and past_key_values is not cache:
            raise ValueError("pass the cache once: past_key_values (transformers 5.19) or cache (5.24), not both")
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        N = self.config.loops if n_loops is None else n_loops
        if cache is not None and not isinstance(cache, MythosCache):
            if cache.get_seq_length() > 0:
                raise ValueError(f"a {type(cache).__name__} cannot hold Mythos' loop-step caches; continue from the "
                                 "MythosCache an earlier call returned")
            cache = None  # an empty cache from generate: ours replaces it
        if cache is None and use_cache:
            cache = MythosCache(self.model, N)
        ids = input_ids.to(self.model.embed.weight.device)
        mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.to(ids.device)
        padding = {} if mask is None else {"attention_mask": mask}  # all ones (or None): no padding
        if cache is None:
            out = self.model(ids, N, **padding)
        else:
            if cache.n_loops != N:
                raise ValueError(f"the cache was made for n_loops={cache.n_loops}, the call runs n_loops={N}")
            start = cache.seen
            kv = cache.reserve(ids.shape[0], ids.shape[1])
            out = self.model(ids, N, cache=kv, start_pos=start, **padding)
            cache.advance(ids.shape[1])
        loss = None if labels is None else causal_lm_loss(out.logits, labels.to(ids.device), num_items)
        result = MythosCausalLMOutput(loss=loss, logits=out.logits, loop_counts=out.loop_counts,
                                      **{CACHE_FIELD: cache if use_cache else None})
        return result if return_dict is not False else result.to_tuple()

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, *,
                        eval_results: dict | None = None, license: str = "mit", name: str | None = None,
                        **kwargs) -> list[str]:
        """Write the one directory that transformers, the torch twin and ``weights_bridge.load(dir, backend="jax")``
        all read (docs/huggingface.md): config.json (spec, dtype, n_loops, auto_map), model.safetensors (the
        project's file), generation_config.json, tokenizer.json + tokenizer_config.json (vocab_size >= 258),
        README.md (model card; eval_results: lm-eval's results JSON), and this package's three code files.

        Each file is written atomically; ``mythos export hf`` writes the whole directory atomically.
        Returns:
            The names of the files written.
        """
        if push_to_hub:
            raise ValueError("push_to_hub is not supported here: save, then huggingface_hub.upload_folder(folder_path"
                             "=dir, repo_id=...)")
        if not kwargs.pop("is_main_process", True):
            return []  # distributed saving: another process writes the directory
        kwargs.pop("max_shard_size", None)  # one file, never sharded
        if not kwargs.pop("safe_serialization", True):
            raise ValueError("safe_serialization=False is not supported: the weights are the project's safetensors "
                             "file")
        if kwargs:
            raise ValueError(f"save_pretrained does not take {', '.join(sorted(kwargs))}: the directory holds the "
                             "project's one safetensors file (weights_bridge format) with the model's own weights")
        out = Path(save_directory)
        if out.exists() and not out.is_dir():
            raise ValueError(f"save_directory {str(out)!r} is a file, not a directory")
        out.mkdir(parents=True, exist_ok=True)
        s, cfg = self.model.spec, self.config
        weights_bridge.save(self.model, out / WEIGHTS_NAME)
        d = cfg.to_diff_dict()
        d.update(auto_map=AUTO_MAP, architectures=[type(self).__name__], dtype=cfg.dtype_name)
        files = {"config.json": _to_json(d)}
        gen = GenerationConfig(**generation_config(s))
        files["generation_config.json"] = gen.to_json_string(use_diff=True)
        files.update(tokenizer_files(s))
        files[README_NAME] = model_card(s, cfg.dtype_name, name=name or out.resolve().name, n_loops=cfg.n_loops,
                                        eval_results=eval_results, license=license)
        here = Path(__file__).parent
        for code in CODE_FILES:
            files[code] = (here / code).read_text(encoding="utf-8")
        for fname, text in files.items():
            atomic_write(out / fname, text.encode("utf-8"))
        return [WEIGHTS_NAME, *files]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items: int | torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Mean cross-entropy of logits[:, :-1] against labels[:, 1:] over labels != -100 (sum / num_items when given),
    in float32 at least (float64 for a float64 model)."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have the shape of input_ids {tuple(logits.shape[:2])}, got "
                         f"{tuple(labels.shape)}")
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).to(acc)
    target = labels[:, 1:].reshape(-1).long()
    if num_items is None:
        return F.cross_entropy(shifted, target, ignore_index=-100)
    return F.cross_entropy(shifted, target, ignore_index=-100, reduction="sum") / num_items


def _to_json(d: dict) -> str:
    return json.dumps(d, indent=2, sort_keys=True) + "\n"
