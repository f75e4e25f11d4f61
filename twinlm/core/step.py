"""The training step as one pure function of (state, inputs), which adapters compile whole.

State is a flat dict: `param.<name>`, `m.<name>`, `v.<name>`. Inputs are the batch, the dropout
masks and three host-computed scalars (lr, 1 - b1^t, 1 - b2^t), passed as 0-d arrays so a
compiled step never retraces. A step whose gradients are not finite leaves the state unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from twinlm.core import model, optim
from twinlm.core.backend import Array, Backend
from twinlm.core.config import ModelConfig

StepFn = Callable[..., tuple[tuple[Array, Array], dict[str, Array]]]


def init_state(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Fresh optimizer state (zero moments) around numpy parameters."""
    state: dict[str, np.ndarray] = {}
    for name, value in params.items():
        state[f"param.{name}"] = value
        state[f"m.{name}"] = np.zeros_like(value)
        state[f"v.{name}"] = np.zeros_like(value)
    return state


def params_of(state: dict[str, Array]) -> dict[str, Array]:
    return {k[len("param."):]: v for k, v in state.items() if k.startswith("param.")}


def make_train_step(B: Backend, cfg: ModelConfig, opt: optim.AdamWConfig,
                    loss_fn: Callable[..., Array] | None = None) -> StepFn:
    """`step(state, x, y, dropout, lr, bc1, bc2) -> ((loss, grad_norm), new_state)`."""
    loss_fn = loss_fn or (lambda p, x, y, drop: model.loss(B, cfg, p, x, y, dropout=drop))
    value_and_grad = B.value_and_grad(loss_fn)

    def step(state: dict[str, Array], x: Array, y: Array, dropout: dict[str, Array],
             lr: Array, bc1: Array, bc2: Array) -> tuple[tuple[Array, Array], dict[str, Array]]:
        params = params_of(state)
        loss, grads = value_and_grad(params, x, y, dropout)
        gnorm = optim.global_norm(B, grads)
        ok = B.isfinite(gnorm)
        if opt.grad_clip > 0:
            scale = B.minimum(opt.grad_clip / (gnorm + 1e-6), 1.0)
            grads = {k: g * scale for k, g in grads.items()}
        new: dict[str, Array] = {}
        for name, p in params.items():
            p2, m2, v2 = optim.adamw_update(
                B, p, grads[name], state[f"m.{name}"], state[f"v.{name}"], lr=lr, bc1=bc1, bc2=bc2,
                cfg=opt, decay=optim.decays(p.shape))
            # Never write non-finite values: a bad step keeps the old state.
            new[f"param.{name}"] = B.where(ok, p2, p)
            new[f"m.{name}"] = B.where(ok, m2, state[f"m.{name}"])
            new[f"v.{name}"] = B.where(ok, v2, state[f"v.{name}"])
        return (loss, gnorm), new

    return step


def step_scalars(it: int, opt: optim.AdamWConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lr, bc1, bc2) for 0-based iteration `it`, as float32 0-d arrays."""
    bc1, bc2 = optim.bias_corrections(it + 1, opt)
    return tuple(np.asarray(v, dtype=np.float32) for v in (optim.lr_at(it, opt), bc1, bc2))  # type: ignore[return-value]
