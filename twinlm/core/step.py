"""The training step in two parts, composed into one pure function of (state, inputs) that adapters
compile whole:

    grads = grad_part(params, batch, dropout)          loss and gradients of the trainable parameters
    state = update_part(state, grads, lr, bc1, bc2)    global-norm clip + AdamW (core.optim)

Frozen parameters (trainable=False in the family's spec) get no gradient and no optimizer moments;
gradient accumulation, LoRA or a data-parallel all-reduce slot in between the two parts.

Data-parallel (`all_sum` given): each rank's loss is its share of the global loss (the task scales it,
see `twinlm.trainer.distributed.sharder`), so one sum over ranks gives the global loss and gradients exactly.
The loss, a stop flag and every gradient go through ONE all-reduce of one concatenated float32 vector,
inside the compiled step; the update then runs identically on every rank.

State is a flat dict: `param.<name>` for every parameter, `m.<name>`, `v.<name>` for trainable ones.
Inputs are the batch (a dict of arrays, the task's), the dropout masks and three host-computed
scalars (lr, 1 - b1^t, 1 - b2^t), passed as 0-d arrays so a compiled step never retraces. A step
whose gradients are not finite leaves the state unchanged.

Mixed precision (`dtype` bfloat16 or float16): the state keeps float32 master weights and moments (a
frozen weight may be stored in the dtype itself); inside the loss every parameter and dropout mask is cast
to the dtype, so the forward and backward run in it while the gradients arrive in float32 through the cast,
and the loss is float32 (`Backend.cross_entropy`). float16 adds dynamic loss scaling: the loss is multiplied
by `amp.scale` (state) before the backward and the gradients divided by it; a step whose gradients overflow
is the non-finite step that is skipped anyway, and it halves the scale; AMP_GROWTH good steps in a row
double it. The scale is state, so a checkpoint holds it and a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from twinlm.core import dropout, optim, quant
from twinlm.core.backend import Array, Backend
from twinlm.core.config import ModelConfig
from twinlm.core.dropout import expand as expand_dropout
from twinlm.core.spec import Spec

StepFn = Callable[..., tuple[tuple[Array, Array], dict[str, Array]]]
AMP_INIT_SCALE = 2.0 ** 15  # float16's first loss scale (PyTorch's GradScaler starts at 2^16)
AMP_GROWTH = 200  # good steps in a row before the scale doubles
# loss_fn(params, batch, dropout) -> scalar; params holds every parameter, frozen ones included.
LossFn = Callable[[dict[str, Array], dict[str, Array], dict[str, Array]], Array]


def init_state(params: dict[str, np.ndarray], spec: Spec | None = None) -> dict[str, np.ndarray]:
    """Fresh optimizer state (zero moments for trainable parameters) around numpy parameters."""
    state: dict[str, np.ndarray] = {}
    for name, value in params.items():
        state[f"param.{name}"] = value
        if spec is None or spec[name].trainable:
            state[f"m.{name}"] = np.zeros_like(value)
            state[f"v.{name}"] = np.zeros_like(value)
    return state


def state_shapes(spec: Spec) -> dict[str, tuple[int, ...]]:
    """The name and shape of every array `init_state` makes for `spec`."""
    return {k: v.shape for k, v in init_state({n: np.zeros(s.shape, np.float32) for n, s in spec.items()},
                                              spec).items()}


def params_of(state: dict[str, Array]) -> dict[str, Array]:
    return {k[len("param."):]: v for k, v in state.items() if k.startswith("param.")}


def cast_params(B: Backend, params: dict[str, Array], dtype: str) -> dict[str, Array]:
    """Float weights (and dropout masks) in compute dtype `dtype`; a quantized layer's words, scales and
    biases keep their format (`quantized_linear` computes in its input's dtype)."""
    if dtype == "float32":
        return params
    return {k: v if B.dtype_name(v) == dtype or k.endswith(quant.SUFFIXES) else B.astype(v, dtype)
            for k, v in params.items()}


def grad_part(B: Backend, spec: Spec, loss_fn: LossFn,
              dtype: str = "float32") -> Callable[..., tuple[Array, dict[str, Array]]]:
    """`(params, batch, dropout[, scale]) -> (loss * scale, grads)`, grads for the trainable parameters only,
    the forward and backward in `dtype` (see the module's docstring)."""
    def cast(xs: dict[str, Array]) -> dict[str, Array]:
        return cast_params(B, xs, dtype)

    def split_loss(trainable: dict[str, Array], frozen: dict[str, Array], batch: dict[str, Array],
                   drop: dict[str, Array], scale: Array | None) -> Array:
        loss = loss_fn(cast({**frozen, **trainable}), batch, cast(drop))
        # (0-d: tinygrad's from_numpy may hand a 0-d state array back as shape (1,))
        return loss if scale is None else loss * B.reshape(scale, ())

    value_and_grad = B.value_and_grad(split_loss)

    def grads(params: dict[str, Array], batch: dict[str, Array], drop: dict[str, Array],
              scale: Array | None = None) -> tuple[Array, dict[str, Array]]:
        trainable = {k: v for k, v in params.items() if spec[k].trainable}
        frozen = {k: v for k, v in params.items() if not spec[k].trainable}
        return value_and_grad(trainable, frozen, batch, drop, scale)

    return grads


def unscale(B: Backend, state: dict[str, Array], loss: Array,
            grads: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
    """The loss and gradients of a loss-scaled step divided by the scale (unchanged without one)."""
    if "amp.scale" not in state:
        return loss, grads
    inv = 1.0 / B.reshape(state["amp.scale"], ())
    return loss * inv, {k: g * inv for k, g in grads.items()}


def rescale(B: Backend, state: dict[str, Array], gnorm: Array, new: dict[str, Array]) -> dict[str, Array]:
    """float16's next loss scale: halved after an overflow (a non-finite gradient norm), doubled after
    AMP_GROWTH finite steps in a row."""
    if "amp.scale" not in state:
        return new
    ok = B.isfinite(gnorm)
    good = state["amp.good"] + 1.0
    grow = good >= AMP_GROWTH
    new = dict(new)
    new["amp.scale"] = B.where(ok, B.where(grow, state["amp.scale"] * 2.0, state["amp.scale"]),
                               state["amp.scale"] * 0.5)
    new["amp.good"] = B.where(ok, B.where(grow, good * 0.0, good), good * 0.0)
    return new


def update_part(B: Backend, spec: Spec,
                opt: optim.AdamWConfig) -> Callable[..., tuple[Array, dict[str, Array]]]:
    """`(state, grads, lr, bc1, bc2) -> (grad_norm, new_state)`: clip by the global norm, then AdamW
    with decay where the spec says so. Non-finite gradients keep the old state."""
    def update(state: dict[str, Array], grads: dict[str, Array], lr: Array, bc1: Array,
               bc2: Array) -> tuple[Array, dict[str, Array]]:
        gnorm = optim.global_norm(B, grads)
        ok = B.isfinite(gnorm)
        scale = B.minimum(opt.grad_clip / (gnorm + 1e-6), 1.0) if opt.grad_clip > 0 else None
        names = list(grads)
        # Every tensor in one call (one kernel where the adapter has one); never write non-finite values:
        # a bad step (ok False) keeps the old state.
        ps, ms, vs = B.adamw([state[f"param.{k}"] for k in names], [grads[k] for k in names],
                             [state[f"m.{k}"] for k in names], [state[f"v.{k}"] for k in names],
                             lr=lr, bc1=bc1, bc2=bc2, beta1=opt.beta1, beta2=opt.beta2, eps=opt.eps,
                             decay=[opt.weight_decay if spec[k].decay else 0.0 for k in names],
                             scale=scale, keep=ok)
        new = dict(state)
        for k, p, m, v in zip(names, ps, ms, vs, strict=True):
            new[f"param.{k}"], new[f"m.{k}"], new[f"v.{k}"] = p, m, v
        return gnorm, new

    return update


def make_train_step(B: Backend, spec: Spec, opt: optim.AdamWConfig, loss_fn: LossFn,
                    all_sum: Callable[[Array], Array] | None = None, dtype: str = "float32") -> StepFn:
    """`step(state, batch, dropout, lr, bc1, bc2) -> ((loss, grad_norm), new_state)`; with `all_sum`
    (a sum over ranks of a flat float32 vector), `step(..., bc2, flag) -> ((loss, grad_norm, flag_sum),
    new_state)`, where `flag` (0-d) is summed with the gradients: how ranks agree to stop together."""
    grads_of, update = grad_part(B, spec, loss_fn, dtype), update_part(B, spec, opt)

    def step(state: dict[str, Array], batch: dict[str, Array], dropout: dict[str, Array],
             lr: Array, bc1: Array, bc2: Array) -> tuple[tuple[Array, Array], dict[str, Array]]:
        loss, grads = grads_of(params_of(state), batch, expand_dropout(B, dropout), state.get("amp.scale"))
        loss, grads = unscale(B, state, loss, grads)
        gnorm, new = update(state, grads, lr, bc1, bc2)
        return (loss, gnorm), rescale(B, state, gnorm, new)

    if all_sum is None:
        return step

    def reduced_step(state: dict[str, Array], batch: dict[str, Array], dropout: dict[str, Array],
                     lr: Array, bc1: Array, bc2: Array,
                     flag: Array) -> tuple[tuple[Array, Array, Array], dict[str, Array]]:
        loss, grads = grads_of(params_of(state), batch, expand_dropout(B, dropout), state.get("amp.scale"))
        loss, grads = unscale(B, state, loss, grads)
        loss, flag, grads = all_sum_fused(B, all_sum, loss, flag, grads)
        gnorm, new = update(state, grads, lr, bc1, bc2)
        return (loss, gnorm, flag), rescale(B, state, gnorm, new)

    return reduced_step


def all_sum_fused(B: Backend, all_sum: Callable[[Array], Array], loss: Array, flag: Array,
                  grads: dict[str, Array]) -> tuple[Array, Array, dict[str, Array]]:
    """(loss, flag, grads) summed over ranks with one collective on one concatenated vector (one call,
    not one per tensor: each ring all-reduce has a fixed latency)."""
    names = list(grads)
    flat = B.concat([B.reshape(loss, (1,)), B.reshape(flag, (1,)),
                     *(B.reshape(grads[k], (-1,)) for k in names)], axis=0)
    total = all_sum(flat)
    out, at = {}, 2
    for k in names:
        shape = tuple(grads[k].shape)
        size = int(np.prod(shape))
        out[k] = B.reshape(total[at:at + size], shape)
        at += size
    return B.reshape(total[0:1], ()), B.reshape(total[1:2], ()), out


def drive(B: Backend, compiled: Any, cfg: ModelConfig, opt: optim.AdamWConfig, batch: dict[str, np.ndarray],
          it: int, seed: int, *, bias_correction: bool = True,
          shard: Callable[[dict[str, np.ndarray], dict[str, np.ndarray]], tuple[dict, dict]] | None = None,
          flag: float | None = None) -> tuple[float, ...]:
    """Run training iteration `it` (0-based) of a compiled `make_train_step` on the numpy `batch`: the host
    side every caller shares. Dropout masks come from (seed, it); with a leading micro-batch axis
    (A, b, ...) they are drawn for all A * b rows, then split, so accumulation drops what one big batch
    would. `bias_correction=False` is the parity suite's negative control. Returns (loss, grad_norm).

    Data-parallel: `shard(batch, masks)` takes this rank's rows of the GLOBAL batch and masks (drawn
    for every row, as one process would), and `flag` is passed to a step built with `all_sum`; then the
    result is (loss, grad_norm, flag summed over ranks). Batch arrays and masks go through
    `B.from_numpy_rows`, which splits rows across a backend's devices where it has several."""
    x = batch["x"]
    rows = x.shape[0] * x.shape[1] if x.ndim == 3 else x.shape[0]
    drop = dropout.keep_masks(cfg, rows, x.shape[-1], seed, it)  # bool: expanded on the device
    if x.ndim == 3:
        drop = {k: m.reshape(*x.shape[:2], *m.shape[1:]) for k, m in drop.items()}
    if shard is not None:
        batch, drop = shard(batch, drop)
    lr, bc1, bc2 = step_scalars(it, opt)
    if not bias_correction:
        bc1 = bc2 = np.asarray(1.0, dtype=np.float32)
    scalars = [B.from_numpy(v) for v in (lr, bc1, bc2)]
    if flag is not None:
        scalars.append(B.from_numpy(np.asarray(flag, dtype=np.float32)))
    axis = 1 if x.ndim == 3 else 0
    drop_in = {k: B.from_numpy_rows(m, axis) for k, m in drop.items()}
    if drop:  # the scales, replicated (0-d: not split across devices)
        drop_in |= {k: B.from_numpy(v) for k, v in dropout.scales(cfg).items()}
    outputs = compiled({k: B.from_numpy_rows(v, axis) for k, v in batch.items()}, drop_in, *scalars)
    return tuple(float(B.to_numpy(o)) for o in outputs)


def step_scalars(it: int, opt: optim.AdamWConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lr, bc1, bc2) for 0-based iteration `it`, as float32 0-d arrays."""
    bc1, bc2 = optim.bias_corrections(it + 1, opt)
    return tuple(np.asarray(v, dtype=np.float32) for v in (optim.lr_at(it, opt), bc1, bc2))  # type: ignore[return-value]
