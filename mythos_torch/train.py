"""One optimizer step: total loss, global-norm clipping, AdamW with warmup + cosine, router-bias update.

The JAX twin (mythos_jax/train.py) computes the same step with optax; in float64 the two agree to
~1e-12 after 20 steps (tests/test_train.py). The choices both twins share:
- weight decay (decoupled, AdamW) on parameters with ndim >= 2 (matrices, embeddings, stacked
  experts, LoRA tables), none on norms, biases, injection vectors;
- clipping: g * min(1, max_norm / (||g|| + 1e-6)), ||g|| the L2 norm of the per-tensor norms
  (torch.nn.utils.clip_grad_norm_; the JAX twin writes this formula, optax's differs);
- the learning rate of step s (0-based) is lr * spec.training.lr_factor(cfg, s) (LambdaLR);
- every parameter takes every step, a gradient it did not get counting as zero (as optax);
- after the optimizer step, update_router_bias with the expert load of that step's forward.

A sharded model (sharding.shard) takes the same step: each rank its rows of the batch (sharding.shard_batch),
the loss terms over global denominators (losses.py), FSDP2 averaging the gradients, the gradient norm over
the whole (DTensor) gradients, the router bias moved by the expert load summed over the batch ranks; the
reported loss and parts are the ranks' average, the global values.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from spec.training import TrainConfig, lr_factor

from .losses import total_loss
from .model import Mythos
from .moe import MoE, expert_load, update_router_bias
from .sharding import Sharding, batch_group, full_tensor, local_tensor, reshard
from .weights import _to_numpy


def schedule(cfg: TrainConfig):
    """The LambdaLR multiplier of step s: spec.training.lr_factor (Python floats, as the reference)."""
    return lambda step: lr_factor(cfg, step)


class StepResult(NamedTuple):
    loss: float  # total loss of the batch, before the step
    parts: dict[str, float]  # ce, ponder, halting_entropy, (consistency), loops: mean loop count
    grad_norm: float  # global L2 norm of the gradients before clipping
    lr: float  # learning rate used by this step
    n_loops: int
    no_grad_steps: int


class Trainer:
    """A model, its AdamW optimizer and LambdaLR schedule, and the step counter."""

    def __init__(self, model: Mythos, cfg: TrainConfig):
        self.model, self.cfg, self.step = model, cfg, 0
        self.optimizer, self.scheduler, self.names = make_optimizer(model, cfg)


def make_optimizer(model: Mythos, cfg: TrainConfig
                   ) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR, list[str]]:
    """AdamW over two groups (decay: ndim >= 2; none: the rest), its LambdaLR schedule, and the manifest
    path of each optimizer parameter in group order."""
    if model.sharding is not None:  # the sharded parameters, not those a forward gathered
        reshard(model)
    named = list(model.named_parameters())
    decay = [(n, p) for n, p in named if p.ndim >= 2]
    plain = [(n, p) for n, p in named if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": [p for _, p in decay], "weight_decay": cfg.weight_decay},
         {"params": [p for _, p in plain], "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(cfg)), [n for n, _ in decay + plain]


def train_step(tr: Trainer, ids: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor,
               mask: np.ndarray | torch.Tensor, n_loops: int, no_grad_steps: int = 0) -> StepResult:
    """One optimizer step on a batch.

    Args:
        tr: the Trainer (its model, optimizer and step counter are updated).
        ids: (B, T) int token ids.
        targets: (B, T) int, the token each position should predict.
        mask: (B, T) bool, positions whose cross-entropy counts.
        n_loops: loop steps N of this batch (all N run: early_exit=False, as the JAX scan).
        no_grad_steps: the first k loop steps run without gradient (truncated backpropagation).
    Returns:
        StepResult with the loss and its parts before the step, the gradient norm and the learning rate.
    """
    model, cfg = tr.model, tr.cfg
    dev = model.embed.weight.device
    ids, targets = torch.as_tensor(ids, device=dev), torch.as_tensor(targets, device=dev)
    mask = torch.as_tensor(mask, device=dev)
    # no_grad_steps is passed only when used, so plain training runs on models without the keyword
    extra = {"no_grad_steps": no_grad_steps} if no_grad_steps else {}
    if model.spec.halting.mode == "ponder":  # PonderNet's loss reads every step's logits
        extra["step_logits"] = True
    out = model(ids, n_loops, early_exit=False, **extra)
    ranks = batch_group(model.sharding)  # None unless the batch is split over ranks
    loss, parts = total_loss(model.spec, out, targets, mask, group=ranks)
    tr.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in tr.optimizer.param_groups for p in group["params"]]
    for p in params:
        if p.grad is None:  # a parameter outside this step's graph still takes the step (decay, moments), as in optax
            p.grad = torch.zeros_like(p)
    norm = _global_norm(params) if model.sharding is None else _sharded_norm(params, tr.names, model.sharding)
    if cfg.grad_clip > 0:
        if model.sharding is None:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:  # clip_grad_norm_'s formula; its foreach kernels take no mix of DTensors on different meshes
            coef = min(1.0, cfg.grad_clip / (float(norm) + 1e-6))
            for p in params:
                p.grad.mul_(coef)
    lr = tr.optimizer.param_groups[0]["lr"]
    tr.optimizer.step()
    tr.scheduler.step()
    ffn = model.recurrent.block.ffn
    if isinstance(ffn, MoE):
        load = expert_load(out.traces.expert_idx, out.traces.running, ffn.n_experts)
        if ranks is not None:  # every rank moves the bias by the load of the whole batch
            dist.all_reduce(load, group=ranks)
        update_router_bias(ffn, load, model.spec.moe.bias_update_rate)
    tr.step += 1
    report = {"loss": loss.detach(), **parts}
    if ranks is not None:  # each rank's terms average to the global values (losses.py)
        values = torch.stack([v.to(torch.float64) for v in report.values()])
        dist.all_reduce(values, group=ranks)
        report = dict(zip(report, values / dist.get_world_size(ranks)))
    loss_value = report.pop("loss")
    return StepResult(float(loss_value), {k: float(v) for k, v in report.items()}, float(norm), float(lr), n_loops,
                      no_grad_steps)


def _global_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of the per-tensor gradient norms, as clip_grad_norm_ computes it (reported before clipping)."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))


def _sharded_norm(params: list[torch.Tensor], names: list[str], sh: Sharding) -> torch.Tensor:
    """_global_norm of a sharded model's gradients: each the norm of the whole tensor (DTensors reduce theirs;
    under ep the routed experts' squared norms are summed over the expert ranks), the same on every rank."""
    norms, experts = [], []
    for name, p in zip(names, params):
        n = torch.linalg.vector_norm(p.grad)
        n = n.full_tensor() if isinstance(n, DTensor) else n
        (experts if "ep" in sh.strategy and ".experts." in name else norms).append(n)
    if experts:  # this rank's experts only: sum the squares over the expert group
        sq = torch.stack(experts) ** 2
        dist.all_reduce(sq, group=sh.mesh.get_group("expert"))
        norms += list(sq.sqrt())
    return torch.linalg.vector_norm(torch.stack(norms))


def optimizer_arrays(tr: Trainer) -> dict[str, np.ndarray]:
    """The optimizer state as NumPy arrays, the same names and torch layout in both twins.

    "step": () int64 optimizer steps taken; "exp_avg/<path>", "exp_avg_sq/<path>": Adam's first and
    second moments of the parameter at manifest path <path> (absent before the first step), whole.
    A sharded model's state is gathered whole (a collective: every rank calls it; each gets the whole state).
    """
    out = {"step": np.asarray(tr.step, dtype=np.int64)}
    params = [p for group in tr.optimizer.param_groups for p in group["params"]]
    sh = tr.model.sharding
    for name, p in zip(tr.names, params):
        st = tr.optimizer.state.get(p)
        if st:
            out[f"exp_avg/{name}"] = _to_numpy(full_tensor(sh, name, st["exp_avg"].detach()))
            out[f"exp_avg_sq/{name}"] = _to_numpy(full_tensor(sh, name, st["exp_avg_sq"].detach()))
    return out


def load_optimizer_arrays(tr: Trainer, arrays: dict[str, np.ndarray]) -> None:
    """Restore the state written by optimizer_arrays (and the schedule position); a ValueError names every problem.

    A sharded model takes the whole arrays on every rank; each rank keeps its piece (no collective)."""
    step = int(np.asarray(arrays["step"]).reshape(())) if "step" in arrays else -1  # safetensors stores () as (1,)
    params = [p for group in tr.optimizer.param_groups for p in group["params"]]
    sh = tr.model.sharding
    want = {f"{kind}/{n}": _full_shape(sh, n, p) for n, p in zip(tr.names, params) for kind in ("exp_avg", "exp_avg_sq")}
    errors = [] if step >= 0 else ["missing 'step'"]
    if step > 0:
        errors += [f"missing {k}" for k in want if k not in arrays]
        errors += [f"{k}: shape {np.shape(arrays[k])}, expected {s}" for k, s in want.items()
                   if k in arrays and tuple(np.shape(arrays[k])) != s]
    errors += [f"unexpected {k}" for k in arrays if k != "step" and k not in want]
    if errors:
        raise ValueError("optimizer state does not fit this model: " + "; ".join(errors))
    tr.optimizer.state.clear()
    if step > 0:
        for name, p in zip(tr.names, params):
            # AdamW keeps the step as a tensor of the default float dtype (torch's _get_scalar_dtype)
            tr.optimizer.state[p] = {
                "step": torch.tensor(float(step), dtype=torch.get_default_dtype()),
                "exp_avg": local_tensor(sh, name, torch.from_numpy(np.array(arrays[f"exp_avg/{name}"])), p.detach()),
                "exp_avg_sq": local_tensor(sh, name, torch.from_numpy(np.array(arrays[f"exp_avg_sq/{name}"])),
                                           p.detach()),
            }
    # LambdaLR at step s sets lr = base_lr * lambda(s)
    tr.scheduler.last_epoch = step
    for group, base in zip(tr.optimizer.param_groups, tr.scheduler.base_lrs):
        group["lr"] = base * tr.scheduler.lr_lambdas[0](step)
    tr.step = step


def _full_shape(sh: Sharding | None, name: str, p: torch.Tensor) -> tuple[int, ...]:
    """The whole shape of a parameter: a DTensor's global shape; a routed expert stack under ep has E rows."""
    shape = tuple(p.shape)  # a DTensor's shape is its global shape
    if sh is not None and "ep" in sh.strategy and ".experts." in name:
        shape = (shape[0] * sh.mesh["expert"].size(), *shape[1:])
    return shape
