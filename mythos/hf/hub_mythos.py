"""The files of a Mythos Hugging Face directory beside the weights: tokenizer, generation config, model card.

Framework-free (json, yaml, spec). Copied into every exported directory with configuration_mythos.py and
modeling_mythos.py (the `trust_remote_code` layout), so it never imports `mythos`.

    >>> files = tokenizer_files(s)      # {"tokenizer.json": ..., "tokenizer_config.json": ...}; {} when vocab < 258
    >>> text = model_card(s, "float32", name="tiny-258", eval_results=lm_eval_json)

The tokenizer is the project's byte tokenizer (mythos/tokenizer.py) written as a `tokenizers` file that
`AutoTokenizer.from_pretrained(dir)` reads with no custom code: a byte-level BPE without merges, so every
UTF-8 byte is one id equal to its value; BOS 256 first (the post-processor), EOS 257, pad = EOS; special
token text inside a prompt is encoded as its bytes (`split_special_tokens`), as ByteTokenizer does.
"""

from __future__ import annotations

import json
import math
import numbers
from typing import Mapping

import spec as spec_lib
import yaml

BOS_ID, EOS_ID, BYTE_VOCAB = 256, 257, 258  # mythos/tokenizer.py's ids (configuration_mythos has the same)
BOS, EOS = "<|bos|>", "<|eos|>"
LIBRARY_TAGS = ["mythos", "looped-transformer", "recurrent-depth", "adaptive-computation", "custom_code"]
README_NAME = "README.md"


# --------------------------------------------------------------------------- tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 bytes to printable characters: what the `ByteLevel` pre-tokenizer emits."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def tokenizer_json() -> dict:
    """The `tokenizers` file: ids 0..255 are the bytes, BOS and EOS special tokens, BOS prepended."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    special = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                "special": True} for i, c in ((BOS_ID, BOS), (EOS_ID, EOS))]
    bos = {"SpecialToken": {"id": BOS, "type_id": 0}}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": special,
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {BOS: {"id": BOS, "ids": [BOS_ID], "tokens": [BOS]}},
        },
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {c: b for b, c in bytes_to_unicode().items()}, "merges": []},
    }


def tokenizer_files(s: spec_lib.Spec) -> dict[str, str]:
    """tokenizer.json and tokenizer_config.json for a spec, or {} when its vocabulary is below 258 ids."""
    if s.vocab_size < BYTE_VOCAB:
        return {}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
        "add_bos_token": True, "add_eos_token": False,
        "split_special_tokens": True,  # "<|bos|>" typed in a prompt is 7 bytes, as in ByteTokenizer
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",  # decoder-only generation pads on the left
        "model_max_length": s.max_seq_len,
        "model_input_names": ["input_ids", "attention_mask"],
    }
    return {"tokenizer.json": _json(tokenizer_json()), "tokenizer_config.json": _json(config)}


def generation_config(s: spec_lib.Spec) -> dict:
    """generation_config.json's ids: BOS, EOS and pad (= EOS) when the vocabulary holds the byte tokenizer."""
    if s.vocab_size < BYTE_VOCAB:
        return {}
    return {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID}


def _json(obj: object) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


# --------------------------------------------------------------------------- model card


def spec_summary(s: spec_lib.Spec, dtype: str, n_loops: int | None = None) -> dict[str, object]:
    """What the model card says about the architecture: parameters, layers, loops, attention, ffn."""
    a, r, m = s.attention, s.recurrent, s.moe
    counts = spec_lib.count_params(s)
    if a.type == "gqa":
        attention = f"GQA, {a.n_heads} heads, {a.n_kv_heads} KV heads, head dim {s.head_dim}"
    else:
        attention = (f"MLA, {a.n_heads} heads, q rank {a.q_lora_rank}, kv rank {a.kv_lora_rank}, "
                     f"rope {a.qk_rope_head_dim} + nope {a.qk_nope_head_dim}, v {a.v_head_dim}")
    if r.ffn == "moe":
        ffn = (f"MoE, {m.n_experts} routed experts (top {m.top_k}), {m.n_shared_experts} shared, "
               f"expert dim {m.expert_dim}")
    else:
        ffn = f"dense SwiGLU, hidden {s.ffn_hidden}"
    extras = [name for name, on in (("cross-loop attention", r.cross_loop_attention.enabled),
                                    ("context compressor", r.compressor.enabled),
                                    ("memory gate", r.memory_gate.enabled), ("value head", s.value_head.enabled),
                                    ("straight-through halting", s.halting.straight_through)) if on]
    return {
        "parameters": counts["total"],
        "active_parameters": counts["active"],
        "dim": s.dim,
        "vocab_size": s.vocab_size,
        "max_seq_len": s.max_seq_len,
        "layers": f"{s.prelude_layers} prelude + 1 looped + {s.coda_layers} coda",
        "loops": f"up to {r.max_loop_iters} (ACT, threshold {s.halting.threshold}, remainder {s.halting.remainder})"
                 + ("" if n_loops is None else f"; this directory runs {n_loops}"),
        "attention": attention,
        "ffn": ffn,
        "hypothesised components": ", ".join(extras) or "none",
        "semantics": s.semantics,
        "dtype": dtype,
    }


def eval_metrics(eval_results: Mapping) -> list[dict[str, object]]:
    """lm-eval's results (its output JSON, or its "results" mapping) as rows {task, metric, filter, value, stderr}.

    Raises:
        ValueError: not lm-eval results (no task mapping of ``"metric,filter": number`` entries).
    """
    if not isinstance(eval_results, Mapping):
        raise ValueError(f"eval_results must be lm-eval's results (a mapping), got {type(eval_results).__name__}")
    tasks = eval_results.get("results", eval_results)
    if not isinstance(tasks, Mapping) or not tasks:
        raise ValueError("eval_results: expected lm-eval's output (a mapping with a non-empty 'results' mapping of "
                         "task -> {'metric,filter': value})")
    shots = eval_results.get("n-shot", {}) if isinstance(eval_results.get("n-shot", {}), Mapping) else {}
    rows = []
    for task, entries in tasks.items():
        if not isinstance(entries, Mapping):
            raise ValueError(f"eval_results: task {str(task)[:80]!r} must map 'metric,filter' to numbers, "
                             f"got {type(entries).__name__}")
        for key, value in entries.items():
            if key == "alias" or "_stderr," in str(key):
                continue
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
                continue  # lm-eval writes "N/A" and the like beside its numbers
            metric, _, filt = str(key).partition(",")
            stderr = entries.get(f"{metric}_stderr,{filt}")
            ok = isinstance(stderr, numbers.Real) and not isinstance(stderr, bool) and math.isfinite(stderr)
            rows.append({"task": str(task), "metric": metric, "filter": filt or "none", "value": float(value),
                         "stderr": float(stderr) if ok else None, "n_shot": shots.get(task)})
    if not rows:
        raise ValueError("eval_results: no numeric metric found (lm-eval writes 'acc,none': 0.5 under each task)")
    return rows


def model_index(name: str, rows: list[dict[str, object]]) -> list[dict]:
    """The card's `model-index` (the Hub's evaluation results), one dataset per lm-eval task."""
    results = []
    for task in dict.fromkeys(r["task"] for r in rows):
        metrics = [{"type": r["metric"], "value": r["value"], "name": f"{r['metric']} ({r['filter']})"}
                   for r in rows if r["task"] == task]
        results.append({"task": {"type": "text-generation"}, "dataset": {"name": task, "type": task},
                        "metrics": metrics})
    return [{"name": name, "results": results}]


def model_card(s: spec_lib.Spec, dtype: str, *, name: str, n_loops: int | None = None,
               eval_results: Mapping | None = None, license: str = "mit") -> str:
    """README.md of a directory: front matter (library_name, pipeline_tag, tags, license, the spec summary,
    model-index when eval_results are given) and a short body with the same facts and the three lines to load it."""
    summary = spec_summary(s, dtype, n_loops)
    rows = eval_metrics(eval_results) if eval_results is not None else []
    tags = LIBRARY_TAGS + [s.attention.type, "moe" if s.recurrent.ffn == "moe" else "dense"]
    front: dict[str, object] = {"library_name": "transformers", "pipeline_tag": "text-generation", "license": license,
                                "tags": tags, "mythos": summary}  # the whole spec is in config.json
    if rows:
        front["model-index"] = model_index(name, rows)
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", "", f"# {name}", "",
             "A Mythos recurrent-depth (looped) transformer: prelude blocks, one block looped with adaptive "
             "computation time (ACT), coda blocks. Built from one YAML spec (in `config.json` and in the weights' "
             "header); the PyTorch and JAX implementations read this directory and compute the same logits.", "",
             "| | |", "|---|---|"]
    lines += [f"| {k.replace('_', ' ')} | {f'{v:,}' if isinstance(v, int) else v} |" for k, v in summary.items()]
    lines += ["", "## Use", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "tok = AutoTokenizer.from_pretrained(path)",
              "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)  # pip install mythos[hf]",
              "```", "",
              "The same directory loads in either twin: `weights_bridge.load(path, backend=\"jax\")` "
              "(or `backend=\"torch\"`).", ""]
    if s.vocab_size < BYTE_VOCAB:
        lines += [f"No tokenizer: vocab_size={s.vocab_size} is below the {BYTE_VOCAB} ids of the byte tokenizer; "
                  "pass token ids.", ""]
    else:
        lines += ["Tokenizer: bytes. Ids 0..255 are the UTF-8 bytes, 256 is BOS (prepended), 257 is EOS and pad.", ""]
    if rows:
        lines += ["## Evaluation (lm-evaluation-harness)", "", "| task | metric | filter | value | stderr |",
                  "|---|---|---|---|---|"]
        for r in rows:
            stderr = "" if r["stderr"] is None else f"{r['stderr']:.4f}"
            lines.append(f"| {r['task']} | {r['metric']} | {r['filter']} | {r['value']:.4f} | {stderr} |")
        lines.append("")
    return "\n".join(lines)
