"""AdamW with decoupled weight decay, global-norm clipping and a warmup + cosine schedule.

For each parameter p with gradient g at step t (1-based), after clipping g by the global norm:

    m_t = b1 * m_{t-1} + (1 - b1) * g
    v_t = b2 * v_{t-1} + (1 - b2) * g^2
    m_hat = m_t / (1 - b1^t)          (bias correction; always on)
    v_hat = v_t / (1 - b2^t)
    p_t = p_{t-1} * (1 - lr_t * wd) - lr_t * m_hat / (sqrt(v_hat) + eps)

wd applies where the family's parameter spec says (core.spec): matrices and embeddings, not biases or
norm gains.
Native optimizers are never used: MLX's AdamW skips bias correction by default.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from twinlm.core.backend import Array, Backend


@dataclass(frozen=True)
class AdamWConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 100
    max_iters: int = 5000  # cosine decays to min_lr here; constant after
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_at(it: int, cfg: AdamWConfig) -> float:
    """Learning rate for iteration `it` (0-based): linear warmup to lr, cosine decay to min_lr."""
    if it < cfg.warmup:
        return cfg.lr * (it + 1) / cfg.warmup
    if it >= cfg.max_iters:
        return cfg.min_lr
    span = max(1, cfg.max_iters - cfg.warmup)
    ratio = (it - cfg.warmup) / span
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def bias_corrections(t: int, cfg: AdamWConfig) -> tuple[float, float]:
    """(1 - b1^t, 1 - b2^t) for 1-based step t, computed on the host in float64."""
    return 1.0 - cfg.beta1 ** t, 1.0 - cfg.beta2 ** t


def global_norm(B: Backend, grads: dict[str, Array]) -> Array:
    return B.sqrt(B.sum_squares(list(grads.values())))


def adamw_update(B: Backend, p: Array, g: Array, m: Array, v: Array, *, lr: Array | float,
                 bc1: Array | float, bc2: Array | float, cfg: AdamWConfig,
                 decay: bool) -> tuple[Array, Array, Array]:
    """One AdamW update of a single tensor; returns (p, m, v). See the module docstring; the expressions are
    `Backend.adamw`'s (every tensor of a step in one call: `core.step.update_part`)."""
    ps, ms, vs = B.adamw([p], [g], [m], [v], lr=lr, bc1=bc1, bc2=bc2, beta1=cfg.beta1, beta2=cfg.beta2,
                         eps=cfg.eps, decay=[cfg.weight_decay if decay else 0.0])
    return ps[0], ms[0], vs[0]
