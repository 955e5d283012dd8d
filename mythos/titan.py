"""torchtitan's trainer on the torch twin (docs/scaling.md "torchtitan"): the model spec torchtitan asks for.

    >>> from mythos.titan import model_spec
    >>> ms = model_spec("tiny", dtype="float64")   # torchtitan ModelSpec(name="mythos", ...)
    >>> model = ms.model.build()                   # MythosModel: mythos_torch.build(spec, seed) at .model
    >>> logits = model(tokens)                     # (B, T, V): what torchtitan's loss reads

torchtitan finds a model through a config registry: `--module M --config F` imports module M (a dotted path)
and calls its function F, which returns a `Trainer.Config`. The registry is the user's: a few lines calling
trainer_config (model_spec, the project's optimizer, schedule and loss) with their dataloader and tokenizer:

    torchrun --nproc-per-node 2 -m torchtitan.train --module my_registry --config mythos_run \\
        --parallelism.data_parallel_shard_degree 2

What torchtitan's trainer calls, and what answers here:
- `model_spec.model.build()` under `torch.device("meta")`: MythosModel (the twin's structure only);
- `verify_module_protocol()`: overridden (the twin's submodules are plain nn.Modules, see there);
- `get_nparams_and_flops(model, seq_len)`: spec.count_params and 3 x spec.flops_per_token (forward + backward);
- `parallelize_fn(model, parallel_dims=...)`: parallelize_mythos, parallel_dims -> mythos_torch.shard;
- `model.to_empty(...)`, then `init_weights()`: init_states, the project's init (spec.init_arrays(seed)) or a
  Mythos weights file, placed into whatever shards parallelize_mythos made;
- `model(tokens)` -> logits; `loss_fn(logits, labels, global_valid_tokens)`: MythosLoss (the cross-entropy in
  the model's acc dtype) or torchtitan's CrossEntropyLoss (float32);
- `post_optimizer_build_fn(optimizers, model_parts, parallel_dims)`: register_router_bias_hook, the router
  bias moved after each optimizer step by the step's expert load, all-reduced over the batch ranks;
- `state_dict_adapter(model_config, hf_assets_path)`: MythosStateDictAdapter, torchtitan's names <-> the
  project's safetensors names (its `initial_load_in_hf` reads a Mythos weights file directly).

torchtitan 0.3.0 is imported here only (tests/titan/install.sh builds a venv for it); nothing else in the
project imports this module.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

try:
    from torchtitan.components.loss import IGNORE_INDEX, BaseLoss
    from torchtitan.components.optimizer import LRSchedulersContainer, OptimizersContainer, ParamGroupConfig
    from torchtitan.distributed.parallel_dims import ParallelDims
    from torchtitan.protocols.model import BaseModel
    from torchtitan.protocols.model_spec import ModelSpec
    from torchtitan.protocols.state_dict_adapter import StateDictAdapter
except ImportError as e:  # pragma: no cover - the project's own venv has no torchtitan
    raise ImportError(f"mythos.titan needs torchtitan 0.3.0 ({e}); build its venv with tests/titan/install.sh "
                      "(docs/scaling.md, section torchtitan)") from e

import mythos_torch as mt
import spec as spec_lib
import weights_bridge as wb
from mythos_torch import sharding as tsharding
from spec.sharding import mesh_size
from spec.training import TrainConfig, lr_factor
from weights_bridge import distributed as wdist
from weights_bridge.backends import to_numpy
from weights_bridge.fileformat import dtype_name

PREFIX = "model."  # MythosModel holds the twin at .model: torchtitan's names are "model." + manifest path
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def load_spec(source: str) -> spec_lib.Spec:
    """The spec of a Config's `spec` field: a preset name, a YAML path or YAML text (spec.load)."""
    if not isinstance(source, str) or not source:
        raise ValueError(f"MythosModel.Config.spec={source!r} must be a preset name "
                         f"({', '.join(spec_lib.preset_names())}), a YAML path or YAML text")
    return spec_lib.load(source)


class MythosModel(BaseModel):
    """The torch twin (mythos_torch.Mythos at `.model`) as a torchtitan model: forward(tokens) -> logits."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseModel.Config):
        spec: str = "tiny"  # a preset name, a YAML path or YAML text (spec.load; spec.dump gives the text)
        seed: int = 0  # init_states: spec.init_arrays(spec, seed), the project's deterministic init
        dtype: str = "float32"  # "float32" | "float64" | "bfloat16": the parameters' dtype
        n_loops: int | None = None  # loop steps of every forward; None: recurrent.max_loop_iters
        weights: str | None = None  # a Mythos weights file for init_states instead of the seed's init

        def update_from_config(self, *, config: Any, **kwargs: Any) -> None:
            """Check torchtitan's job config against the spec: seq_len, the parallelisms the twin has, and a loss
            torchtitan can compute (its loss reads the logits alone: no ponder cost, halting entropy, consistency)."""
            s = load_spec(self.spec)
            extra = {k: v for k, v in dataclasses.asdict(s.loss).items() if v}
            if extra:
                raise ValueError(f"spec loss {', '.join(f'{k}={v}' for k, v in extra.items())}: torchtitan's loss is "
                                 "the cross-entropy of the logits alone; set them to 0 for torchtitan (or train with "
                                 "mythos train, whose loss adds them)")
            training = getattr(config, "training", None)
            if training is not None and training.seq_len > s.max_seq_len:
                raise ValueError(f"training.seq_len={training.seq_len} exceeds the spec's max_seq_len={s.max_seq_len}")
            parallelism = getattr(config, "parallelism", None)
            if parallelism is not None:
                _unsupported(parallelism.pipeline_parallel_degree, parallelism.context_parallel_degree)

        def get_nparams_and_flops(self, model: nn.Module, seq_len: int) -> tuple[int, int]:
            """(parameters, training FLOPs per token): spec.count_params' total, 3 x spec.flops_per_token (the
            forward at n_loops, twice that for the backward), torchtitan's convention for MFU."""
            s = load_spec(self.spec)
            flops = spec_lib.flops_per_token(s, seq_len, self.n_loops)["total"]
            return spec_lib.count_params(s)["total"], int(3 * flops)

    def __init__(self, config: Config):
        super().__init__()
        if config.dtype not in DTYPES:
            raise ValueError(f"MythosModel.Config.dtype={config.dtype!r} is not supported; choose one of "
                             f"{', '.join(DTYPES)}")
        if isinstance(config.seed, bool) or not isinstance(config.seed, int) or config.seed < 0:
            raise ValueError(f"MythosModel.Config.seed={config.seed!r} must be an integer >= 0")
        n = config.n_loops
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"MythosModel.Config.n_loops={n!r} must be an integer >= 1 or None "
                             "(recurrent.max_loop_iters)")
        self.config = config
        s = load_spec(config.spec)
        # torchtitan's trainer builds under torch.device("meta") and fills the weights in init_states after
        # to_empty; built anywhere else the model holds the project's init (or the weights file) at once
        if torch.empty(()).device.type == "meta":
            self.model = mt.Mythos(s, dtype=DTYPES[config.dtype])
        else:
            self.model = _reference(config, s)
        self.expert_load: torch.Tensor | None = None  # (E,) int64 tokens per expert since the last optimizer step
        self.loop_counts: torch.Tensor | None = None  # (B, T) int32 of the last forward, detached

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                attention_masks: object | None = None, **kwargs: object) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, V), as torchtitan's trainer calls it (its loss reads the logits).

        Training (model.train()) runs all n_loops steps (early_exit off, as mythos_torch.train_step) and counts
        the expert load for the router bias; eval stops once no position of any batch shard runs.
        """
        extra = {"positions": positions, "attention_masks": attention_masks, **kwargs}
        given = sorted(k for k, v in extra.items() if v is not None)
        if given:
            raise ValueError(f"MythosModel.forward: {', '.join(given)} is not supported: the twin runs whole causal "
                             "sequences from position 0 (no document masks or packed positions); use a dataloader "
                             "without them")
        out = self.model(tokens, self.config.n_loops, early_exit=not self.training)
        self.loop_counts = out.loop_counts.detach()
        ffn = self.model.recurrent.block.ffn
        if self.training and isinstance(ffn, mt.MoE):
            load = mt.expert_load(out.traces.expert_idx, out.traces.running, ffn.n_experts).to(torch.int64)
            self.expert_load = load if self.expert_load is None else self.expert_load + load
        n = _batch_ranks(self.model)
        if n > 1 and torch.is_grad_enabled():
            # torchtitan's loss is this rank's sum over the global token count, and its gradients are meant to
            # be summed over the batch ranks; mythos_torch.shard averages them (its losses are scaled for that)
            return _ScaleGrad.apply(out.logits, n)
        return out.logits

    def init_states(self, *, buffer_device: torch.device | None = None) -> None:
        """The project's initial weights in every shard: mythos_torch.build(spec, seed) (or the weights file of
        config.weights), each parameter and buffer (RoPE tables, router bias) copied into this rank's piece.

        No collective: every rank builds the whole reference model on the host (spec.init_arrays draws every
        tensor in manifest order from one generator), so this takes the model's size in host memory per rank.
        """
        del buffer_device  # the buffers stay where to_empty put them
        _assign(self.model, _reference(self.config, self.model.spec))

    def verify_module_protocol(self) -> None:
        """The twin's submodules are plain nn.Modules, on purpose: the twins import no torchtitan (the project's
        layers go one way: spec <- twins <- ... <- mythos), and what the protocol gives torchtitan's own models
        per module is replaced here as a whole: param_init by spec.init_arrays (one generator in manifest
        order, which no per-module initialiser reproduces) and sharding_config by the rule table of
        spec.sharding (parallelize_mythos). Checked instead: the wrapped model is a mythos_torch Mythos."""
        if not isinstance(self.model, mt.Mythos):
            raise RuntimeError(f"MythosModel.model must be a mythos_torch.Mythos, got {type(self.model).__name__}")

    @torch.no_grad()
    def update_router_bias(self) -> None:
        """b += gamma * sign(mean(load) - load) with the expert load counted since the last call, summed over the
        batch ranks (the same update on every rank); nothing for a dense loop FFN or before any forward."""
        ffn = self.model.recurrent.block.ffn
        load, self.expert_load = self.expert_load, None
        if not isinstance(ffn, mt.MoE) or load is None:
            return
        group = tsharding.batch_group(self.model.sharding)
        if group is not None:
            dist.all_reduce(load, group=group)
        mt.update_router_bias(ffn, load, self.model.spec.moe.bias_update_rate)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by n (the batch ranks)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, n: int) -> torch.Tensor:
        ctx.n = n
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.n, None


def _batch_ranks(model: mt.Mythos) -> int:
    """The ranks holding different rows of the batch (1: unsharded or tensor parallel only)."""
    group = tsharding.batch_group(model.sharding)
    return 1 if group is None else dist.get_world_size(group)


def _reference(config: MythosModel.Config, s: spec_lib.Spec) -> mt.Mythos:
    """The whole model on the host: the weights file of config.weights, else mythos_torch.build(spec, seed)."""
    if config.weights is None:
        return mt.build(s, seed=config.seed, dtype=config.dtype)
    ref = wb.load(config.weights, backend="torch", dtype=config.dtype)
    if ref.spec != s:
        raise ValueError(f"MythosModel.Config.weights={config.weights!r} holds a model of another spec than "
                         f"MythosModel.Config.spec={config.spec[:60]!r} (give the file's spec: spec.dump of "
                         "weights_bridge.read_spec)")
    return ref


def _assign(model: mt.Mythos, ref: mt.Mythos) -> None:
    """Copy every parameter and buffer of the whole model `ref` into `model`, each into this rank's piece of it
    (mythos_torch.sharding.local_tensor: DTensor shards, an expert-parallel rank's experts); no collective."""
    src = dict(ref.named_parameters())
    src.update(ref.named_buffers())
    sh = model.sharding
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name not in src:
                raise ValueError(f"init_states: {name!r} of the model is not in the reference model")
            t.copy_(tsharding.local_tensor(sh, name, src[name].detach(), t))


# --------------------------------------------------------------------------- parallelize_fn


def _unsupported(pp: int, cp: int) -> None:
    if pp > 1:
        raise ValueError(f"pipeline_parallel_degree={pp}: the adapter has no pipelining (the recurrent loop is "
                         "one stage); use 1")
    if cp > 1:
        raise ValueError(f"context_parallel_degree={cp}: the twin has no context parallelism (ACT halts per "
                         "position over whole sequences); use 1")


def mesh_for(parallel_dims: ParallelDims) -> tuple[dict[str, int], str]:
    """torchtitan's degrees as the project's mesh and strategy: dp_shard -> fsdp and dp_replicate -> dp on
    `data`, tp -> tp on `model`, ep -> ep on `expert` (torchtitan borrows the ep ranks from the data-parallel
    ones: data = dp / ep). Axes in order data, expert, model (model innermost: tp's traffic inside a node).

    Raises:
        ValueError: pipeline or context parallelism, HSDP (dp_replicate and dp_shard both > 1), or an ep degree
            that does not divide the data-parallel degree.
    """
    pd = parallel_dims
    _unsupported(pd.pp, pd.cp)
    if pd.dp_replicate > 1 and pd.dp_shard > 1:
        raise ValueError(f"data_parallel_replicate_degree={pd.dp_replicate} with data_parallel_shard_degree="
                         f"{pd.dp_shard}: HSDP is not a Mythos strategy (dp and fsdp both use the data axis); "
                         "set one of them to 1")
    dp = pd.dp_replicate * pd.dp_shard
    if dp % pd.ep:
        raise ValueError(f"expert_parallel_degree={pd.ep} must divide the data-parallel degree {dp} "
                         "(torchtitan takes the ep ranks from the data-parallel ones)")
    mesh: dict[str, int] = {}
    names: list[str] = []
    if dp // pd.ep > 1:
        mesh["data"] = dp // pd.ep
        names.append("fsdp" if pd.dp_shard > 1 else "dp")
    if pd.ep > 1:
        mesh["expert"] = pd.ep
        names.append("ep")
    if pd.tp > 1:
        mesh["model"] = pd.tp
        names.append("tp")
    if mesh and mesh_size(mesh) != pd.world_size:  # pragma: no cover - ParallelDims checks the product itself
        raise ValueError(f"the mesh {mesh} does not hold world_size={pd.world_size} ranks")
    return mesh, "+".join(names)


def parallelize_mythos(model: MythosModel, *, parallel_dims: ParallelDims, training: Any = None,
                       parallelism: Any = None, compile_config: Any = None, ac_config: Any = None,
                       dump_folder: str = "", **kwargs: Any) -> MythosModel:
    """ModelSpec.parallelize_fn: the project's rule table through mythos_torch.shard on a DeviceMesh made from
    torchtitan's degrees (mesh_for), e.g. dp_shard=2 -> mesh data=2, strategy fsdp.

    Args:
        model: the MythosModel torchtitan built (on the meta device, or materialised).
        parallel_dims: torchtitan's ParallelDims (dp_replicate, dp_shard, tp, ep; pp and cp must be 1).
        training: given (torchtitan's Trainer passes its TrainingConfig), tp and ep are refused: its gradient
            clipping cannot take their parameters. None (the pieces used by hand): every strategy.
        parallelism, dump_folder: unused (FSDP keeps the model dtype: mixed_precision_param does not apply).
        compile_config: torch.compile of the model is refused (enable=False, or components without "model").
        ac_config: not applied: torchtitan's policies wrap `model.layers`; the spec's recurrent.checkpoint is
            the twin's activation checkpointing (each loop step recomputed in the backward).
    Returns:
        The model, its twin sharded (model.model.sharding set); unchanged on one rank.
    """
    del parallelism, ac_config, dump_folder, kwargs
    if compile_config is not None and compile_config.enable and "model" in compile_config.components:
        raise ValueError("compile.enable with 'model' in compile.components: the adapter does not torch.compile "
                         "the twin (its loop has data-dependent exits); drop 'model' from compile.components")
    mesh, strategy = mesh_for(parallel_dims)
    if not mesh:
        return model
    if training is not None and {"tp", "ep"} & set(strategy.split("+")):
        # torchtitan's Trainer clips with dist_utils.clip_grad_norm_: one foreach norm over every parameter, which
        # refuses plain tensors beside DTensors (tp splits only the attention and SwiGLU projections) and, with
        # ep, asserts every parameter is a DTensor on an "ep" mesh (the twin keeps plain local expert stacks)
        raise ValueError(f"strategy {strategy} (tensor_parallel_degree={parallel_dims.tp}, expert_parallel_degree="
                         f"{parallel_dims.ep}) cannot go through torchtitan's Trainer: its gradient clipping takes "
                         "no mix of plain and DTensor parameters; use data_parallel_shard_degree or "
                         "data_parallel_replicate_degree alone here, or `mythos train --backend torch --mesh ...` for "
                         "tp and ep (docs/scaling.md, torchtitan)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tsharding.shard(model.model, tsharding.make_mesh(mesh, device_type=device), strategy)
    return model


def register_router_bias_hook(optimizers: OptimizersContainer, model_parts: list[nn.Module],
                              parallel_dims: ParallelDims | None = None) -> None:
    """ModelSpec.post_optimizer_build_fn: after every optimizer step, each MythosModel's update_router_bias (the
    twin's aux-loss-free balancing: mythos_torch.train_step does the same after its step)."""
    models = [m for m in model_parts if isinstance(m, MythosModel)]

    def hook(*args: object, **kwargs: object) -> None:
        for m in models:
            m.update_router_bias()

    optimizers.register_step_post_hook(hook)


# --------------------------------------------------------------------------- loss, optimizer, schedule


def _cross_entropy_sum(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropy over labels != IGNORE_INDEX, in the acc dtype (float64 for a float64 model)."""
    acc = torch.float64 if pred.dtype == torch.float64 else torch.float32
    return F.cross_entropy(pred.flatten(0, 1).to(acc), labels.flatten(0, 1).long(), reduction="sum",
                           ignore_index=IGNORE_INDEX)


class MythosLoss(BaseLoss):
    """torchtitan's loss contract (this rank's sum over global_valid_tokens) with the cross-entropy in the model's
    acc dtype, as mythos_torch.cross_entropy: torchtitan's CrossEntropyLoss casts the logits to float32."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseLoss.Config):
        pass

    def __init__(self, config: Config, *, compile_config: Any = None):
        self.fn = _cross_entropy_sum
        self._maybe_compile(compile_config)


def optimizer_config(spec_source: str, cfg: TrainConfig | None = None, *,
                     implementation: str = "for-loop") -> OptimizersContainer.Config:
    """torchtitan's optimizer config for mythos_torch.Trainer's AdamW: weight decay on the tensors with ndim >= 2,
    none on the rest (two parameter groups named by manifest path), cfg's lr, betas and eps.

    Args:
        spec_source: the spec (MythosModel.Config.spec).
        cfg: lr, beta1, beta2, eps, weight_decay (None: TrainConfig()).
        implementation: torchtitan's "for-loop" (torch.optim.AdamW's default on the host, as the project),
            "foreach" or "fused" (CUDA).
    """
    cfg = TrainConfig() if cfg is None else cfg
    params = [p for p in spec_lib.manifest(load_spec(spec_source)) if p.kind != "buffer"]

    def pattern(paths: list[str]) -> str:
        return "^" + re.escape(PREFIX) + "(" + "|".join(re.escape(p) for p in paths) + ")$"

    kw = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    groups = [ParamGroupConfig(pattern=pattern([p.path for p in params if len(p.shape) >= 2]), optimizer_name="AdamW",
                               optimizer_kwargs={**kw, "weight_decay": cfg.weight_decay}),
              ParamGroupConfig(pattern=pattern([p.path for p in params if len(p.shape) < 2]), optimizer_name="AdamW",
                               optimizer_kwargs={**kw, "weight_decay": 0.0})]
    return OptimizersContainer.Config(param_groups=groups, implementation=implementation)


class MythosLRSchedule(LRSchedulersContainer):
    """The project's schedule (spec.training.lr_factor: linear warmup, cosine to min_lr_ratio) for torchtitan."""

    @dataclass(kw_only=True, slots=True)
    class Config(LRSchedulersContainer.Config):
        min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio (warmup_steps: the parent's field)

        def build(self, *, optimizers: OptimizersContainer, training_steps: int) -> LRSchedulersContainer:
            cfg = TrainConfig(steps=training_steps, warmup_steps=self.warmup_steps, min_lr_ratio=self.min_lr_ratio)
            return MythosLRSchedule(optimizers, functools.partial(lr_factor, cfg))


# --------------------------------------------------------------------------- state dicts and files


class MythosStateDictAdapter(StateDictAdapter):
    """torchtitan's names ("model." + manifest path) <-> the Mythos weights file's (the manifest paths).

    With torchtitan's `checkpoint.initial_load_in_hf` and `hf_assets_path` a directory holding a Mythos weights
    file (model.safetensors), torchtitan reads that file straight into the (sharded) model through to_hf, its
    HuggingFaceStorageReader and from_hf. Its `last_save_in_hf` export holds the same names without the
    project's metadata: from_hf_checkpoint turns it into a Mythos weights file.
    """

    def __init__(self, model_config: MythosModel.Config, hf_assets_path: str | None):
        super().__init__(model_config, hf_assets_path)
        self.spec = load_spec(model_config.spec)
        self.shapes = {p.path: tuple(p.shape) for p in spec_lib.manifest(self.spec)}

    def to_hf(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """{"model.<path>": tensor} -> {"<path>": tensor}; a ValueError names every key or shape that does not fit."""
        out, errors = {}, []
        for k, v in state_dict.items():
            path = k.removeprefix(PREFIX)
            if not k.startswith(PREFIX) or path not in self.shapes:
                errors.append(f"unexpected key {k!r}")
            elif tuple(v.shape) != self.shapes[path]:
                hint = (" (an expert-parallel rank holds only its own experts: save it with "
                        "mythos.titan.save_weights(model, path))") if ".experts." in path else ""
                errors.append(f"{k}: shape {tuple(v.shape)}, the spec's {self.shapes[path]}{hint}")
            else:
                out[path] = v
        errors += [f"missing key {PREFIX + p!r}" for p in self.shapes if PREFIX + p not in state_dict]
        _raise(errors, "MythosStateDictAdapter.to_hf")
        return out

    def from_hf(self, hf_state_dict: dict[str, Any]) -> dict[str, Any]:
        """{"<path>": tensor} -> {"model.<path>": tensor}; a ValueError names every missing or unexpected name."""
        errors = [f"unexpected key {k!r}" for k in hf_state_dict if k not in self.shapes]
        errors += [f"missing key {p!r}" for p in self.shapes if p not in hf_state_dict]
        _raise(errors, "MythosStateDictAdapter.from_hf")
        return {PREFIX + k: v for k, v in hf_state_dict.items()}


def _raise(errors: list[str], who: str) -> None:
    if errors:
        raise ValueError(f"{who}: {len(errors)} problem(s):\n  " + "\n  ".join(errors))


def save_state_dict(state_dict: Mapping[str, torch.Tensor], spec_source: str, path: str | os.PathLike) -> Path:
    """Write a torchtitan state dict of MythosModel (DTensor shards or whole tensors) as a Mythos weights file.

    Collective when it holds DTensors: every rank calls it (each DTensor gathered in manifest order); rank 0
    writes. An expert-parallel model's local experts cannot be told apart from whole ones here: save_weights.
    Returns:
        The path written, on every rank.
    """
    s = load_spec(spec_source)
    hf = MythosStateDictAdapter(MythosModel.Config(spec=spec_source), None).to_hf(dict(state_dict))
    arrays = {}
    for p in spec_lib.manifest(s):
        t = hf[p.path]
        arrays[p.path] = to_numpy(t.full_tensor() if isinstance(t, DTensor) else t)  # gathered over its mesh
    dtype = dtype_name(arrays["embed.weight"])
    wdist.on_rank0(lambda: wb.write_file(path, s, arrays, dtype))
    return Path(path)


def load_state_dict(path: str | os.PathLike) -> tuple[spec_lib.Spec, dict[str, torch.Tensor]]:
    """(spec, torchtitan state dict {"model.<path>": whole CPU tensor in the file's dtype}) of a Mythos weights
    file, every checksum verified (weights_bridge.load)."""
    ref = wb.load(path, backend="torch")
    return ref.spec, {PREFIX + k: v for k, v in ref.state_dict().items()}


def save_weights(model: MythosModel, path: str | os.PathLike) -> Path:
    """A MythosModel, sharded or not, as a Mythos weights file: weights_bridge.save of its twin (every rank calls
    it; the shards, expert-parallel ones included, are gathered and rank 0 writes)."""
    return wb.save(model.model, path)


def load_weights(model: MythosModel, path: str | os.PathLike) -> None:
    """A Mythos weights file of the model's spec into a MythosModel, sharded or not (each rank its pieces)."""
    ref = wb.load(path, backend="torch", dtype=model.config.dtype)
    if ref.spec != model.model.spec:
        raise ValueError(f"load_weights: {path} holds a model of another spec than this MythosModel's")
    _assign(model.model, ref)


def from_hf_checkpoint(directory: str | os.PathLike, spec_source: str, out: str | os.PathLike) -> Path:
    """torchtitan's HF-format export (`checkpoint.last_save_in_hf`: safetensors named by manifest path, no Mythos
    metadata) of a MythosModel as one Mythos weights file, checked against the spec before writing."""
    from safetensors.torch import load_file

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise ValueError(f"from_hf_checkpoint: {directory} holds no .safetensors file")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    MythosStateDictAdapter(MythosModel.Config(spec=spec_source), None).from_hf(tensors)  # names every stray tensor
    arrays = {k: to_numpy(v) for k, v in tensors.items()}
    return wb.write_file(out, load_spec(spec_source), arrays, dtype_name(arrays["embed.weight"]))


# --------------------------------------------------------------------------- the model spec


def model_spec(spec_source: str = "tiny", *, seed: int = 0, dtype: str = "float32", n_loops: int | None = None,
               weights: str | None = None, flavor: str | None = None) -> ModelSpec:
    """torchtitan's ModelSpec of the twin.

    Args:
        spec_source: a preset name, a YAML path or YAML text (spec.load).
        seed, dtype, n_loops, weights: MythosModel.Config's fields.
        flavor: torchtitan's flavor label; None: the preset name, else "custom".
    Returns:
        ModelSpec(name="mythos", flavor, model=MythosModel.Config(...), parallelize_fn=parallelize_mythos,
        pipelining_fn=None, post_optimizer_build_fn=register_router_bias_hook,
        state_dict_adapter=MythosStateDictAdapter).
    """
    load_spec(spec_source)  # a bad spec fails here, not inside torchtitan's trainer
    if flavor is None:
        flavor = spec_source if spec_source in spec_lib.preset_names() else "custom"
    return ModelSpec(name="mythos", flavor=flavor,
                     model=MythosModel.Config(spec=spec_source, seed=seed, dtype=dtype, n_loops=n_loops,
                                              weights=weights),
                     parallelize_fn=parallelize_mythos, pipelining_fn=None,
                     post_optimizer_build_fn=register_router_bias_hook, state_dict_adapter=MythosStateDictAdapter)


def trainer_config(spec_source: str = "tiny", cfg: TrainConfig | None = None, *, seq_len: int = 64,
                   local_batch_size: int = 8, **fields: Any) -> Any:
    """A torchtitan Trainer.Config around model_spec with the project's optimizer, schedule and loss; `fields`
    (tokenizer, dataloader, hf_assets_path, parallelism, checkpoint, ...) are passed on. For a config registry:

        def mythos_run() -> Trainer.Config:          # --module my_registry --config mythos_run
            return trainer_config(MY_SPEC_YAML, TrainConfig(steps=1000), dataloader=..., tokenizer=...)

    Imports torchtitan.trainer (its full install: torchdata, datasets, tokenizers, ...).
    """
    from torchtitan.config import TrainingConfig
    from torchtitan.trainer import Trainer

    cfg = TrainConfig() if cfg is None else cfg
    training = TrainingConfig(local_batch_size=local_batch_size, seq_len=seq_len, steps=cfg.steps,
                              max_norm=cfg.grad_clip if cfg.grad_clip > 0 else float("inf"),
                              mixed_precision_param="float32")
    return Trainer.Config(model_spec=model_spec(spec_source, seed=cfg.seed, dtype=cfg.dtype),
                          loss=MythosLoss.Config(), optimizer=optimizer_config(spec_source, cfg),
                          lr_scheduler=MythosLRSchedule.Config(warmup_steps=cfg.warmup_steps,
                                                               min_lr_ratio=cfg.min_lr_ratio),
                          training=training, activation_checkpoint=None, **fields)
