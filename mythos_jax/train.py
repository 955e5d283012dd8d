"""One optimizer step: total loss, global-norm clipping, AdamW with warmup + cosine, router-bias update.

The torch twin (mythos_torch/train.py) computes the same step with torch.optim.AdamW; in float64 the
two agree to ~1e-12 after 20 steps (tests/test_train.py). The choices both twins share:
- weight decay (decoupled, AdamW) on parameters with ndim >= 2 (matrices, embeddings, stacked
  experts, LoRA tables), none on norms, biases, injection vectors;
- clipping: g * min(1, max_norm / (||g|| + 1e-6)), ||g|| the L2 norm of the per-tensor norms
  (torch.nn.utils.clip_grad_norm_; optax.clip_by_global_norm divides by ||g|| without the 1e-6
  and leaves g unscaled below max_norm, hence `clip_by_global_norm` here);
- the learning rate of step s (0-based) is lr * spec.training.lr_factor(cfg, s) (the optax update
  count starts at 0, as torch's LambdaLR epoch);
- every parameter takes every step (optax: a zero gradient still decays and moves the moments);
- after the optimizer step, update_router_bias with the expert load of that step's forward.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from spec import Spec
from spec.training import TrainConfig, lr_factor

from .losses import total_loss
from .model import Mythos
from .moe import MoE, expert_load, update_router_bias
from .sharding import _place_state
from .weights import to_nnx, to_torch, torch_path


def schedule(cfg: TrainConfig):
    """The optax learning rate of update count s: lr * lr_factor(cfg, s), written in jnp (traced inside jit)."""
    W, lo = cfg.warmup_steps, cfg.min_lr_ratio
    span = max(1, cfg.steps - W)

    def lr(count: jax.Array) -> jax.Array:
        s = jnp.asarray(count).astype(jnp.result_type(float))  # float64 under x64, as the torch twin's Python floats
        warm = (s + 1) / max(W, 1)
        frac = jnp.minimum(1.0, (s - W) / span)
        cos = lo + (1.0 - lo) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        return cfg.lr * jnp.where(s < W, warm, cos)

    return lr


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_ as an optax transformation: g * min(1, max_norm / (||g|| + 1e-6))."""

    def update(updates: nnx.State, state: optax.EmptyState, params: nnx.State | None = None
               ) -> tuple[nnx.State, optax.EmptyState]:
        # torch multiplies by the clamped coefficient always (1.0 below max_norm): the same here
        coef = jnp.minimum(max_norm / (_global_norm(updates) + 1e-6), 1.0)
        return jax.tree.map(lambda g: g * coef.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class StepResult(NamedTuple):
    loss: float  # total loss of the batch, before the step
    parts: dict[str, float]  # ce, ponder, halting_entropy, (consistency), loops: mean loop count
    grad_norm: float  # global L2 norm of the gradients before clipping
    lr: float  # learning rate used by this step
    n_loops: int
    no_grad_steps: int


class Trainer:
    """A model, its optax AdamW (with the schedule inside) and state, and the step counter."""

    def __init__(self, model: Mythos, cfg: TrainConfig):
        self.model, self.cfg, self.step = model, cfg, 0
        self.tx = make_optimizer(cfg)
        self.graphdef, params, _ = nnx.split(model, nnx.Param, ...)
        self.opt_state = self.tx.init(params)
        if model.sharding is not None:  # a sharded model (shard it first): moments split like their parameters
            _, self.opt_state = _place_state(model.sharding, model.spec, params, self.opt_state, jax.device_put)


@functools.lru_cache(maxsize=None)
def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """chain(clip_by_global_norm, adamw with the schedule), one object per config, so that Trainers of
    equal configs share compiled steps (the transformation is a static argument of _step)."""
    adamw = optax.adamw(schedule(cfg), b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params))
    # identity keeps the state layout (clip, adamw) when clipping is off
    return optax.chain(clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(), adamw)


@functools.partial(jax.jit, static_argnums=(0, 1, 2), static_argnames=("n_loops", "no_grad_steps"))
def _step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, spec: Spec, params: nnx.State,
          rest: nnx.State, opt_state: optax.OptState, ids: jax.Array, targets: jax.Array, mask: jax.Array, *,
          n_loops: int, no_grad_steps: int) -> tuple:
    """The pure step: (new params, new optimizer state, loss, parts, gradient norm, expert load)."""

    def loss_fn(params: nnx.State) -> tuple[jax.Array, tuple]:
        model = nnx.merge(graphdef, params, rest)
        # no_grad_steps is passed only when used, so plain training runs on models without the keyword
        extra = {"no_grad_steps": no_grad_steps} if no_grad_steps else {}
        if spec.halting.mode == "ponder":  # PonderNet's loss reads every step's logits
            extra["step_logits"] = True
        out = model(ids, n_loops, early_exit=False, **extra)  # lax.scan: differentiable
        loss, parts = total_loss(spec, out, targets, mask)
        ffn = model.recurrent.block.ffn
        load = expert_load(out.traces.expert_idx, out.traces.running, ffn.n_experts) if isinstance(ffn, MoE) else None
        return loss, (parts, load)

    (loss, (parts, load)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    sharding = nnx.merge(graphdef, params, rest).sharding
    if sharding is not None:  # on a mesh the new parameters and moments keep the inputs' placement (no recompile)
        params, opt_state = _place_state(sharding, spec, params, opt_state, jax.lax.with_sharding_constraint)
    return params, opt_state, loss, parts, _global_norm(grads), load


def train_step(tr: Trainer, ids: np.ndarray | jax.Array, targets: np.ndarray | jax.Array,
               mask: np.ndarray | jax.Array, n_loops: int, no_grad_steps: int = 0) -> StepResult:
    """One optimizer step on a batch.

    Args:
        tr: the Trainer (its model, optimizer state and step counter are updated).
        ids: (B, T) int token ids.
        targets: (B, T) int, the token each position should predict.
        mask: (B, T) bool, positions whose cross-entropy counts.
        n_loops: loop steps N of this batch (all N run: early_exit=False, the lax.scan).
        no_grad_steps: the first k loop steps run without gradient (truncated backpropagation).
    Returns:
        StepResult with the loss and its parts before the step, the gradient norm and the learning rate.
    """
    _, params, rest = nnx.split(tr.model, nnx.Param, ...)
    ids = tr.model._check_ids(jnp.asarray(ids))
    params, tr.opt_state, loss, parts, norm, load = _step(
        tr.graphdef, tr.tx, tr.model.spec, params, rest, tr.opt_state, ids, jnp.asarray(targets), jnp.asarray(mask), n_loops=n_loops,
        no_grad_steps=no_grad_steps)
    nnx.update(tr.model, params)
    if load is not None:
        update_router_bias(tr.model.recurrent.block.ffn, load, tr.model.spec.moe.bias_update_rate)
    lr = tr.cfg.lr * lr_factor(tr.cfg, tr.step)  # the host value, for the report
    tr.step += 1
    return StepResult(float(loss), {k: float(v) for k, v in parts.items()}, float(norm), lr, n_loops, no_grad_steps)


def _global_norm(tree: nnx.State) -> jax.Array:
    """L2 norm of the per-tensor norms, as torch's clip_grad_norm_ computes it."""
    return jnp.linalg.norm(jnp.stack([jnp.linalg.norm(g.reshape(-1)) for g in jax.tree.leaves(tree)]))


def optimizer_arrays(tr: Trainer) -> dict[str, np.ndarray]:
    """The optimizer state as NumPy arrays, the same names and torch layout in both twins.

    "step": () int64 optimizer steps taken; "exp_avg/<path>", "exp_avg_sq/<path>": Adam's first and
    second moments of the parameter at manifest path <path> (absent before the first step).
    """
    out = {"step": np.asarray(tr.step, dtype=np.int64)}
    if tr.step > 0:
        adam = _adam_state(tr.opt_state)
        for kind, tree in (("exp_avg", adam.mu), ("exp_avg_sq", adam.nu)):
            for path, a in _flat(tree).items():
                out[f"{kind}/{path}"] = a
    return out


def load_optimizer_arrays(tr: Trainer, arrays: dict[str, np.ndarray]) -> None:
    """Restore the state written by optimizer_arrays (and the schedule position); a ValueError names every problem."""
    step = int(np.asarray(arrays["step"]).reshape(())) if "step" in arrays else -1  # safetensors stores () as (1,)
    adam = _adam_state(tr.opt_state)
    shapes = {p: a.shape for p, a in _flat(adam.mu).items()}
    want = {f"{kind}/{p}": s for p, s in shapes.items() for kind in ("exp_avg", "exp_avg_sq")}
    errors = [] if step >= 0 else ["missing 'step'"]
    if step > 0:
        errors += [f"missing {k}" for k in want if k not in arrays]
        errors += [f"{k}: shape {np.shape(arrays[k])}, expected {s}" for k, s in want.items()
                   if k in arrays and tuple(np.shape(arrays[k])) != s]
    errors += [f"unexpected {k}" for k in arrays if k != "step" and k not in want]
    if errors:
        raise ValueError("optimizer state does not fit this model: " + "; ".join(errors))
    zeros = step <= 0  # before the first step the moments are zero
    mu = _unflat(adam.mu, {p: None if zeros else arrays[f"exp_avg/{p}"] for p in shapes})
    nu = _unflat(adam.nu, {p: None if zeros else arrays[f"exp_avg_sq/{p}"] for p in shapes})
    count = jnp.asarray(max(step, 0), dtype=adam.count.dtype)
    clip, (_, decay, sched) = tr.opt_state
    tr.opt_state = (clip, (adam._replace(count=count, mu=mu, nu=nu), decay, sched._replace(count=count)))
    if tr.model.sharding is not None:  # restored onto a sharded model's mesh, split like the parameters
        params = nnx.state(tr.model, nnx.Param)
        _, tr.opt_state = _place_state(tr.model.sharding, tr.model.spec, params, tr.opt_state, jax.device_put)
    tr.step = max(step, 0)


def _adam_state(opt_state: optax.OptState) -> optax.ScaleByAdamState:
    """Adam's state inside chain(clip, adamw = chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate))."""
    return opt_state[1][0]


def _flat(tree: nnx.State) -> dict[str, np.ndarray]:
    """An nnx.State of parameter-shaped arrays as {manifest path: NumPy array in torch layout}."""
    out = {}
    for path, v in nnx.to_flat_state(tree):
        a = np.asarray(v.get_value() if isinstance(v, nnx.Variable) else v)
        name, kind = torch_path(tuple(str(p) for p in path))
        out[name] = to_torch(kind, a)
    return out


def _unflat(like: nnx.State, arrays: dict[str, np.ndarray | None]) -> nnx.State:
    """`like` with each leaf replaced by arrays[manifest path] (torch layout; None: zeros)."""
    flat = nnx.to_flat_state(like)
    new = []
    for path, v in flat:
        value = v.get_value() if isinstance(v, nnx.Variable) else v
        name, kind = torch_path(tuple(str(p) for p in path))
        a = arrays[name]
        a = jnp.zeros_like(value) if a is None else jnp.asarray(to_nnx(kind, a.astype(value.dtype)))
        new.append((path, v.replace(a) if isinstance(v, nnx.Variable) else a))
    return nnx.from_flat_state(new)
