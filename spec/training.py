"""Training rules both twins compute: TrainConfig, the learning-rate formula, the per-step loop plan.

Framework-neutral on purpose (NumPy and the standard library only, no files): both twins' train.py
read the same TrainConfig and draw the same loop counts for the same step. The optimizer math itself
lives in each twin (mythos_torch/train.py, mythos_jax/train.py); the optimizer-state file is
mythos/checkpoints.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from .schema import Spec


@dataclass(frozen=True)
class TrainConfig:
    """One training run: AdamW with linear warmup then cosine decay, global-norm clipping, loop plan."""
    steps: int = 1000  # optimizer steps of the whole run (the cosine reaches min_lr at the end)
    batch_size: int = 32
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50  # step s < warmup_steps uses lr * (s + 1) / warmup_steps
    weight_decay: float = 0.1  # decoupled (AdamW), on tensors with ndim >= 2 only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global L2 norm of the gradients (torch's clip_grad_norm_ formula); 0: off
    loops_min: int | None = None  # loop count per batch drawn uniformly in [loops_min, loops_max];
    loops_max: int | None = None  # both None: spec.recurrent.max_loop_iters every step
    bptt: int | None = None  # backpropagate through the last `bptt` loop steps only (None: all of them)
    seed: int = 0  # seed of the weights, the data and the loop draws
    dtype: str = "float32"

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig: {msg}")

        need(self.steps >= 1, f"steps={self.steps} must be >= 1")
        need(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        need(self.lr > 0, f"lr={self.lr} must be > 0")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        need(self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0")
        need(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"beta1={self.beta1}, beta2={self.beta2} must lie in [0, 1)")
        need(self.eps > 0, f"eps={self.eps} must be > 0")
        need(self.grad_clip >= 0, f"grad_clip={self.grad_clip} must be >= 0 (0 turns clipping off)")
        need((self.loops_min is None) == (self.loops_max is None),
             f"loops_min={self.loops_min} and loops_max={self.loops_max}: give both or neither")
        if self.loops_min is not None:
            need(1 <= self.loops_min <= self.loops_max,
                 f"loops_min={self.loops_min}, loops_max={self.loops_max} must satisfy 1 <= loops_min <= loops_max")
        need(self.bptt is None or self.bptt >= 1, f"bptt={self.bptt} must be >= 1 (or None: all steps)")
        need(self.dtype in ("float32", "float64", "bfloat16"),
             f"dtype={self.dtype!r} is not allowed; allowed: float32, float64, bfloat16")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"TrainConfig: unknown fields {unknown}; fields: {', '.join(sorted(names))}")
        return cls(**d)


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Learning-rate multiplier of optimizer step `step` (0-based): linear warmup, then cosine to min_lr_ratio.

    The reference formula; each twin writes it in its own framework (torch LambdaLR, an optax
    schedule of the update count) and the tests compare both against this one.
    """
    import math

    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * frac))


def loop_plan(cfg: TrainConfig, s: Spec, step: int) -> tuple[int, int]:
    """(n_loops, no_grad_steps) of optimizer step `step`, the same in both twins and on resume.

    n_loops: spec.recurrent.max_loop_iters, or drawn uniformly from [loops_min, loops_max] by a
    generator seeded with (seed, step) (recurrent-depth training draws a depth per batch).
    no_grad_steps: the first n_loops - bptt steps run without gradient (truncated backpropagation).
    """
    if cfg.loops_min is None:
        n = s.recurrent.max_loop_iters
    else:
        # a stream of its own (the trailing 1), independent of the data stream of the same step
        n = int(np.random.default_rng([cfg.seed, step, 1]).integers(cfg.loops_min, cfg.loops_max + 1))
    k = 0 if cfg.bptt is None else max(0, n - cfg.bptt)
    return n, k
