"""Mythos in PyTorch: the recurrent-depth ("looped") transformer of ARCHITECTURE.md, built from a spec.

    >>> import spec, mythos_torch as mt
    >>> model = mt.build(spec.preset("tiny"), seed=0, dtype="float64")
    >>> out = model(ids)                       # ModelOutput(logits, loop_counts, halted, n_steps, traces, cache)
    >>> seq = model.generate(ids, 32)          # KV-cache decoding: the prompt and 32 greedy tokens

Shape legend for every comment in this package:
    B batch, T tokens in this call, S key positions, D model width, H heads, K per-head width,
    N loop steps of this call, E routed experts (k of them chosen per token).
"""

from .attention import GQAttention, MLAttention, causal_attention
from .block import Block
from .cache import KVCache
from .components import ContextCompressor, CrossLoopAttention, MemoryGate
from .experts import Experts
from .generate import sample_next
from .layers import RMSNorm, SwiGLU, apply_rope, rms_norm
from .losses import consistency, cross_entropy, halting_entropy, ponder_cost, total_loss
from .model import ModelOutput, Mythos, Traces, build, forward
from .moe import MoE, expert_load, route, update_router_bias
from .paged import PagedPool, PagedView, build_block_tables, check_tables, paged_forward
from .precision import set_parity_precision
from .recurrent import ACT, HaltMLP, LoRA, LTIInjection, RecurrentBlock, act_step, add_loop_embedding
from .sharding import Sharding, make_mesh, shard, shard_batch
from .train import StepResult, Trainer, load_optimizer_arrays, optimizer_arrays, train_step
from .weights import dump_arrays, load_arrays

__all__ = [
    "rms_norm", "RMSNorm", "apply_rope", "SwiGLU",
    "causal_attention", "GQAttention", "MLAttention",
    "KVCache",
    "Experts",
    "route", "MoE", "expert_load", "update_router_bias",
    "CrossLoopAttention", "ContextCompressor", "MemoryGate",
    "Block",
    "add_loop_embedding", "LoRA", "LTIInjection", "HaltMLP", "ACT", "act_step", "RecurrentBlock",
    "Traces", "ModelOutput", "Mythos", "build", "forward",
    "sample_next",
    "load_arrays", "dump_arrays",
    "cross_entropy", "ponder_cost", "halting_entropy", "consistency", "total_loss",
    "StepResult", "Trainer", "train_step", "optimizer_arrays", "load_optimizer_arrays",
    "set_parity_precision",
    "make_mesh", "shard", "shard_batch", "Sharding",
    "PagedPool", "PagedView", "paged_forward", "check_tables", "build_block_tables",
]
