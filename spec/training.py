"""Training rules both twins compute: TrainConfig, the learning-rate formula, the per-step loop plan.

Framework-neutral on purpose (NumPy and the standard library only, no files): both twins' train.py
read the same TrainConfig and draw the same loop counts for the same step.

Loop plans (TrainConfig.loop_plan; `loop_plan(cfg, spec, step, difficulty)` is a pure function of its
arguments, so both twins and a resumed run draw the same):

| loop_plan | n_loops of a batch | no_grad_steps | the batch's difficulty |
|---|---|---|---|
| `fixed` | spec.recurrent.max_loop_iters | n_loops - bptt (or 0) | drawn per row |
| `random` | U[loops_min, loops_max] | n_loops - bptt (or 0) | drawn per row |
| `difficulty` | d + U{0..loops_extra}, T(d) tied to the input (Fan et al. 2025) | n_loops - bptt (or 0) | ONE d per batch, U[low, high] |
| `progressive` | n + k: n ~ U{0..N-k} (N = max_loop_iters), k = progressive_k (DeepThinking, Bansal et al. 2022) | n | drawn per row |

`progressive_k` also combines with `fixed`, `random` and `difficulty` (N is then that plan's n_loops);
it replaces bptt (both choose the steps without gradient, so giving both is refused); a batch of N < k
steps takes the gradient of all N.

The optimizer math itself lives in each twin (mythos_torch/train.py, mythos_jax/train.py); the
optimizer-state file is mythos/checkpoints.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, Mapping, NamedTuple

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
    # fixed | random | difficulty | progressive (the table above); None: "fixed", or "random" when loops_min is set
    loop_plan: Literal["fixed", "random", "difficulty", "progressive"] | None = None
    loops_extra: int = 0  # loop_plan difficulty: n_loops = d + U{0..loops_extra}
    progressive_k: int | None = None  # the last k steps of a batch take the gradient, after U{0..N-k} without

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
        if self.loop_plan is None:  # today's behaviour (and configs written before loop_plan existed)
            object.__setattr__(self, "loop_plan", "fixed" if self.loops_min is None else "random")
        plan = self.loop_plan
        need(plan in LOOP_PLANS, f"loop_plan={plan!r} is not allowed; allowed: {', '.join(LOOP_PLANS)}")
        need(plan == "random" or self.loops_min is None,
             f"loops_min={self.loops_min}, loops_max={self.loops_max} draw the loop count of loop_plan 'random', "
             f"not of loop_plan {plan!r}")
        need(plan != "random" or self.loops_min is not None, "loop_plan 'random' needs loops_min and loops_max")
        need(isinstance(self.loops_extra, int) and self.loops_extra >= 0,
             f"loops_extra={self.loops_extra!r} must be an integer >= 0")
        need(plan == "difficulty" or self.loops_extra == 0,
             f"loops_extra={self.loops_extra} applies to loop_plan 'difficulty' only (this is {plan!r})")
        need(self.progressive_k is None or (isinstance(self.progressive_k, int) and self.progressive_k >= 1),
             f"progressive_k={self.progressive_k!r} must be an integer >= 1 (or None: off)")
        need(plan != "progressive" or self.progressive_k is not None, "loop_plan 'progressive' needs progressive_k")
        need(self.progressive_k is None or self.bptt is None,
             f"progressive_k={self.progressive_k} and bptt={self.bptt}: give one (both choose the steps without "
             "gradient)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"TrainConfig: unknown fields {unknown}; fields: {', '.join(sorted(names))}")
        return cls(**d)


LOOP_PLANS = ("fixed", "random", "difficulty", "progressive")


class LoopPlan(NamedTuple):
    """What one training batch runs: the loop steps, how many of them first run without gradient, and the
    batch's one difficulty (loop_plan 'difficulty'; None: each row draws its own from the run's range)."""
    n_loops: int
    no_grad_steps: int
    difficulty: int | None


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


def loop_plan(cfg: TrainConfig, s: Spec, step: int, difficulty: tuple[int, int] | None = None) -> LoopPlan:
    """The LoopPlan of optimizer step `step` (the table in the module docstring), the same in both twins and
    on resume: a pure function of its arguments.

    Args:
        cfg: the run's TrainConfig; s: its spec (max_loop_iters).
        step: the optimizer step (0-based).
        difficulty: the run's (low, high) training range; needed by loop_plan 'difficulty' only.
    Returns:
        LoopPlan(n_loops, no_grad_steps, difficulty): make_batch then takes (d, d) when difficulty is not None.
        Draws come from a generator seeded with (seed, step, 1), a stream of its own, independent of the data
        (stream 0); `fixed` and `random` draw exactly what they drew before loop_plan existed.
    """
    rng = np.random.default_rng([cfg.seed, step, 1])  # the trailing 1: not the data stream of the same step
    d = None
    if cfg.loop_plan == "random":
        n = int(rng.integers(cfg.loops_min, cfg.loops_max + 1))
    elif cfg.loop_plan == "difficulty":
        if difficulty is None:
            raise ValueError("loop_plan 'difficulty' needs the run's difficulty range (low, high)")
        lo, hi = difficulty
        d = int(rng.integers(lo, hi + 1))
        n = d + int(rng.integers(0, cfg.loops_extra + 1))
    else:  # fixed, progressive: the spec's loop count
        n = s.recurrent.max_loop_iters
    if cfg.progressive_k is not None:  # DeepThinking: U{0..N-k} steps without gradient, then k with it
        k = min(cfg.progressive_k, n)
        free = int(rng.integers(0, n - k + 1))
        return LoopPlan(free + k, free, d)
    return LoopPlan(n, 0 if cfg.bptt is None else max(0, n - cfg.bptt), d)
