"""The whole graph across backends: logits, loss and every gradient (`model_run`), causality and padding
invariance (`leakage_checks`), N AdamW steps exactly as the trainer runs them (`train_run`), and float64
finite differences of the core graph (`fd_gradient_checks`). A `Side` is one participant: a backend plus
the (possibly injected) settings: a mask, the optimizer's bias correction, a change to the model's maths
(`model_change`: a wrong constant or a skipped step of the core graph) or to the batch (`batch_change`:
e.g. the loss mask of chat data dropped)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from twinlm.core import layers, model, optim, step
from twinlm.core import spec as SP
from twinlm.core.backend import Array, Backend
from twinlm.core.config import ModelConfig
from twinlm.parity import checks as tol
from twinlm.parity.checks import Check, compare
from twinlm.parity.controls import Control
from twinlm.parity.ops import with_mixin

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class Side:
    """One participant in a comparison: a backend plus the (possibly injected) settings."""

    label: str
    backend: Backend
    mask_fn: Callable[[int, int], np.ndarray] = model.causal_mask
    bias_correction: bool = True
    # Config changes this side computes with (its parameters stay the suite's: a skipped piece's weights
    # get zero gradients), and a change to every batch it sees; both None when clean.
    model_change: Callable[[ModelConfig], dict[str, Any]] | None = None
    skip_params: str | None = None  # weights whose names end so are left out of this side's graph
    batch_change: Callable[[Batch], Batch] | None = None

    @classmethod
    def clean(cls, B: Backend) -> Side:
        return cls(B.name, B)

    @classmethod
    def injected(cls, B: Backend, control: Control) -> Side:
        backend = with_mixin(B, control.mixin, control.name.title().replace("-", "")) if control.mixin else B
        return cls(f"{B.name}+{control.name}", backend, control.mask_fn, control.bias_correction,
                   control.model_change, control.skip_params, control.batch_change)

    def config(self, cfg: ModelConfig) -> ModelConfig:
        """The model this side computes: the suite's, or the control's change of it."""
        return cfg.replace(**self.model_change(cfg)) if self.model_change else cfg

    def batch(self, batch: Batch) -> Batch:
        return self.batch_change(batch) if self.batch_change else batch


def suite_name(cfg: ModelConfig) -> str:
    return f"{cfg.arch}+lora" if cfg.lora_rank else cfg.arch


# ---- whole model --------------------------------------------------------------------------------


def parity_batch(cfg: ModelConfig, rng: np.random.Generator, batch: int, t: int,
                 masked: bool = False) -> Batch:
    """Random tokens: {"x", "y"} next tokens for a decoder; for an encoder, targets at ~30% of the
    real positions ("w") and rows of different lengths with the rest padding ("mask"). `masked`: chat data
    as `tasks.chat` batches it (`chat_batch`), loss weights "w" on the assistant's tokens only."""
    seq = rng.integers(0, cfg.vocab_size, (batch, t + 1)).astype(np.int32)
    out = {"x": seq[:, :-1], "y": seq[:, 1:]}
    if masked and cfg.kind == "decoder":
        return chat_batch(out, rng)
    if cfg.kind == "encoder":
        lengths = rng.integers(max(1, t // 2), t + 1, batch)
        lengths[0] = t
        real = np.arange(t)[None, :] < lengths[:, None]
        w = (rng.random((batch, t)) < 0.3) & real
        w[:, 0] = True
        out |= {"w": w.astype(np.float32), "mask": layers.padding_mask(lengths, t)}
    return out


def chat_batch(batch: Batch, rng: np.random.Generator) -> Batch:
    """`batch` shaped like `tasks.chat.encode_rows`' rows: one conversation per row, user and assistant
    turns in turn, then zero padding to the window (rows but the first end early); "w" is 1 on the
    targets of the assistant's turns only, 0 on the prompt's and the padding's (`--mask-prompt`'s loss)."""
    x, y = batch["x"].copy(), batch["y"].copy()
    n, t = x.shape
    w = np.zeros((n, t), np.float32)
    if t < 4:
        raise ValueError(f"a chat-style batch needs at least 4 positions, got {t}")
    for i in range(n):
        end = t if i == 0 or t < 8 else int(rng.integers(t // 2, t))
        cuts = np.sort(rng.choice(np.arange(1, end), size=3, replace=False))  # user | asst | user | asst
        w[i, cuts[0]:cuts[1]] = w[i, cuts[2]:end] = 1.0
        x[i, end:], y[i, end:] = 0, 0
    return {"x": x, "y": y, "w": w}


def _on(B: Backend, batch: Batch) -> dict[str, Array]:
    return {k: B.from_numpy(v) for k, v in batch.items()}


def compiled(B: Backend, fn: Callable[..., tuple[Array, ...]]) -> Callable[..., tuple[Array, ...]]:
    """`fn(*inputs) -> arrays` as one compiled graph without state (`B.compile_step`), the way training
    runs: MLX compiles it; tinygrad captures it once, replays it for new inputs of the same shapes and keeps
    it in twinlm's JIT cache, so repeated evaluations (and a second run of the suite) skip its codegen."""
    return B.compile_step(lambda state, *inputs: (fn(*inputs), state), {})


def side_logits(side: Side, cfg: ModelConfig, p: dict[str, Array], batch: dict[str, Array],
                drop: dict[str, Array] | None = None) -> Array:
    """LM logits the way training computes them: causal (with the side's mask) or over padding."""
    cfg = side.config(cfg)
    if side.skip_params:  # (layers add a bias wherever the parameter exists)
        p = {k: v for k, v in p.items() if not k.endswith(side.skip_params)}
    if cfg.kind == "decoder":
        return model.logits(side.backend, cfg, p, batch["x"], dropout=drop, mask_fn=side.mask_fn)
    return model.logits(side.backend, cfg, p, batch["x"], dropout=drop, mask=batch["mask"])


def side_loss(side: Side, cfg: ModelConfig, p: dict[str, Array], batch: dict[str, Array],
              drop: dict[str, Array] | None = None) -> Array:
    return side.backend.cross_entropy(side_logits(side, cfg, p, batch, drop), batch["y"], batch.get("w"))


@dataclass
class ModelRun:
    logits: np.ndarray
    loss: np.ndarray
    grads: dict[str, np.ndarray] | None


def model_run(side: Side, cfg: ModelConfig, params: dict[str, np.ndarray], batch: Batch) -> ModelRun:
    """Logits, loss and (where there is autograd) every parameter gradient, in one graph."""
    B = side.backend
    spec = model.param_spec(cfg)
    p = {k: B.from_numpy(v) for k, v in params.items()}
    trainable = {k: v for k, v in p.items() if spec[k].trainable} if B.supports_grad else {}
    frozen = {k: v for k, v in p.items() if k not in trainable}

    def run(t: dict[str, Array], f: dict[str, Array], b: dict[str, Array]) -> tuple[Array, ...]:
        captured: list[Array] = []

        def loss_fn(t: dict[str, Array], b: dict[str, Array]) -> Array:
            lg = side_logits(side, cfg, {**f, **t}, b)
            captured.append(lg)
            return B.cross_entropy(lg, b["y"], b.get("w"))

        if not B.supports_grad:
            loss = loss_fn(t, b)
            return captured[-1], loss
        loss, grads = B.value_and_grad(loss_fn)(t, b)
        return (captured[-1], loss, *(grads[k] for k in t))

    outputs = compiled(B, run)(trainable, frozen, _on(B, side.batch(batch)))
    logits, loss, *grads = (B.to_numpy(o) for o in outputs)
    return ModelRun(logits, loss, dict(zip(trainable, grads, strict=True)) if B.supports_grad else None)


def unit_scale_params(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Weights with unit-variance activations (`spec.unit_scale_params`). At GPT-2 init the GELU inputs
    are ~0.1, where the erf and tanh forms agree to 1e-7, so the model is also compared here, where
    activations reach the nonlinearities' curved region."""
    return SP.unit_scale_params(model.param_spec(cfg), seed)


def compare_model(group: str, got: ModelRun, want: ModelRun) -> list[Check]:
    f32 = np.float32
    checks = [compare(group, "logits", got.logits, want.logits, tol.LOGITS_TOL, dtype=f32),
              compare(group, "loss", got.loss, want.loss, tol.LOSS_TOL, dtype=f32)]
    if got.grads is not None and want.grads is not None:
        checks += [compare(group, f"grad {k}", g, want.grads[k], tol.MODEL_GRAD_TOL, dtype=f32)
                   for k, g in got.grads.items()]
    return checks


def leakage_checks(side: Side, cfg: ModelConfig, params: dict[str, np.ndarray], batch: Batch,
                   seed: int = 0, name: str | None = None) -> list[Check]:
    """Decoders: changing tokens after position t must leave logits at positions <= t exactly unchanged.
    Encoders: changing padded tokens must leave the logits of every real position exactly unchanged."""
    B = side.backend
    p = {k: B.from_numpy(v) for k, v in params.items()}
    forward = compiled(B, lambda p, b: (side_logits(side, cfg, p, b),))

    def logits_of(x: np.ndarray) -> np.ndarray:
        return B.to_numpy(forward(p, _on(B, {**batch, "x": x}))[0])

    x = batch["x"]
    base = logits_of(x)
    rng = np.random.default_rng(seed)
    name = name or suite_name(cfg)
    checks = []
    if cfg.kind == "encoder":
        real = batch["mask"][:, 0, 0, :]
        changed = np.where(real, x, (x + rng.integers(1, cfg.vocab_size, x.shape)) % cfg.vocab_size)
        got = logits_of(changed.astype(np.int32))
        return [compare(f"{name} padding {side.label}",
                        "logits of real positions with padded tokens "
                        "changed", got[real], base[real], tol.LEAK_TOL)]
    t_len = x.shape[1]
    for t in sorted({0, t_len // 2, t_len - 2}):
        changed = x.copy()
        shift = rng.integers(1, cfg.vocab_size, x[:, t + 1:].shape)  # every later token really changes
        changed[:, t + 1:] = (x[:, t + 1:] + shift) % cfg.vocab_size
        checks.append(compare(f"{name} causal {side.label}",
                              f"logits[:, :{t + 1}] with tokens {t + 1}.. changed",
                              logits_of(changed)[:, :t + 1], base[:, :t + 1], tol.LEAK_TOL))
    return checks


# ---- training -----------------------------------------------------------------------------------

@dataclass
class TrainRun:
    losses: np.ndarray
    params: dict[str, np.ndarray]


# AdamW's eps in the training comparison: above the float32 noise of a gradient element (backends differ by
# up to ~1e-6 where contributions cancel), so an element whose first gradient is ~0 (a cancellation, or an
# embedding row first seen mid-run) moves by lr * g / eps on both sides rather than by +-lr with the sign of
# its rounding noise: with the default 1e-8 such an element alone, one in ~1e5, made two correct backends
# differ by 2 lr. Real gradients (1e-3 and up) are still normalised as in training.
TRAIN_EPS = 1e-5


def train_opt(steps: int) -> optim.AdamWConfig:
    """Warm up in 2 steps and decay over the run, so every step moves the weights visibly."""
    return optim.AdamWConfig(lr=1e-3, min_lr=1e-4, warmup=2, max_iters=max(steps, 3), eps=TRAIN_EPS)


def train_batches(cfg: ModelConfig, batch: int, t: int, steps: int, seed: int,
                  masked: bool = False) -> list[Batch]:
    rng = np.random.default_rng([seed, 1])
    return [parity_batch(cfg, rng, batch, t, masked) for _ in range(steps)]


def train_run(side: Side, cfg: ModelConfig, params: dict[str, np.ndarray], batches: Sequence[Batch],
              opt: optim.AdamWConfig, seed: int) -> TrainRun:
    """N AdamW steps through `make_train_step` + `B.compile_step`, exactly as the trainer runs them;
    dropout masks from `core.dropout.masks`, so both sides drop the same units."""
    B = side.backend
    spec = model.param_spec(cfg)
    state = {k: B.from_numpy(v) for k, v in step.init_state(params, spec).items()}
    loss_fn = lambda p, b, drop: side_loss(side, cfg, p, b, drop)  # noqa: E731
    train_step = B.compile_step(step.make_train_step(B, spec, opt, loss_fn), state)
    losses = [step.drive(B, train_step, cfg, opt, side.batch(batch), it, seed,
                         bias_correction=side.bias_correction)[0] for it, batch in enumerate(batches)]
    return TrainRun(np.array(losses, dtype=np.float32),
                    {k: B.to_numpy(v) for k, v in step.params_of(train_step.state).items()})


def compare_train(group: str, got: TrainRun, want: TrainRun) -> list[Check]:
    f32 = np.float32
    n = len(want.losses)
    checks = [compare(group, f"loss at step {i + 1}", got.losses[i], want.losses[i], tol.TRAIN_LOSS_TOL,
                      dtype=f32) for i in range(n)]
    checks += [compare(group, f"{k} after {n} steps", v, want.params[k], tol.TRAIN_PARAM_TOL, dtype=f32)
               for k, v in got.params.items()]
    return checks


# ---- float64 finite differences of the core graph -----------------------------------------------

def fd_gradient_checks(B: Backend, cfg: ModelConfig, params: dict[str, np.ndarray], batch: Batch,
                       seed: int = 0, name: str | None = None) -> list[Check]:
    """In float64: for each trainable parameter tensor, the directional derivative g . d along a random
    unit direction d in that tensor against (L(p + h d) - L(p - h d)) / 2h; and the loss against the
    float64 numpy reference backend."""
    from twinlm.backends.numpy_ref import NumpyBackend

    side, spec = Side.clean(B), model.param_spec(cfg)
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    arrays = _on(B, batch)
    loss_of = compiled(B, lambda p, b: (side_loss(side, cfg, p, b),))  # one graph for every evaluation

    def loss_at(values: dict[str, np.ndarray]) -> float:
        return float(B.to_numpy(loss_of({k: B.from_numpy(v) for k, v in values.items()}, arrays)[0]))

    def value_and_grad(t: dict[str, Array], f: dict[str, Array], b: dict[str, Array]) -> tuple[Array, ...]:
        loss, grads = B.value_and_grad(lambda t, b: side_loss(side, cfg, {**f, **t}, b))(t, b)
        return (loss, *(grads[k] for k in t))

    trainable = {k: B.from_numpy(v) for k, v in p64.items() if spec[k].trainable}
    frozen = {k: B.from_numpy(v) for k, v in p64.items() if not spec[k].trainable}
    loss, *grad_list = compiled(B, value_and_grad)(trainable, frozen, arrays)
    grads = dict(zip(trainable, grad_list, strict=True))
    group = f"{name or suite_name(cfg)} {B.name} float64 finite differences"
    ref = NumpyBackend()
    ref_loss = side_loss(Side.clean(ref), cfg, p64, _on(ref, batch))
    checks = [compare(group, "loss vs numpy float64", B.to_numpy(loss), ref_loss, tol.FLOAT64_LOSS_TOL)]
    rng = np.random.default_rng(seed)
    for name in grads:
        value = p64[name]
        d = rng.standard_normal(value.shape)
        d /= np.linalg.norm(d)
        analytic = float(np.sum(B.to_numpy(grads[name]) * d))
        plus, minus = dict(p64), dict(p64)
        plus[name], minus[name] = value + tol.FD64_STEP * d, value - tol.FD64_STEP * d
        numeric = (loss_at(plus) - loss_at(minus)) / (2 * tol.FD64_STEP)
        checks.append(compare(group, f"grad {name} . d", np.float64(analytic), np.float64(numeric),
                              tol.FD64_TOL))
    return checks


# ---- low precision (`--dtype`) ------------------------------------------------------------------


def dtype_run(side: Side, cfg: ModelConfig, params: dict[str, np.ndarray], batch: Batch,
              dtype: str) -> tuple[ModelRun, str]:
    """(logits and loss of the model with its weights cast to `dtype`, the logits' dtype name), forward
    only, in one graph. The numpy reference gets the same rounded weights and computes in float64."""
    B = side.backend
    p = {k: B.astype(B.from_numpy(v), dtype) if v.dtype.kind == "f" else B.from_numpy(v)
         for k, v in params.items()}
    B.sync(*p.values())  # cast once, stored in the dtype (not folded into the graph's first use)

    def run(p: dict[str, Array], b: dict[str, Array]) -> tuple[Array, ...]:
        lg = side_logits(side, cfg, p, b)
        return lg, B.cross_entropy(lg, b["y"], b.get("w"))

    lg, loss = compiled(B, run)(p, _on(B, side.batch(batch)))
    kind = B.dtype_name(lg)
    return ModelRun(B.to_numpy(lg).astype(np.float64), B.to_numpy(loss).astype(np.float64), None), kind


def compare_dtype(group: str, got: tuple[ModelRun, str], want: tuple[ModelRun, str], dtype: str,
                  sides: tuple[Backend, Backend]) -> list[Check]:
    """Logits and loss of two sides in `dtype`, within `tol.dtype_tolerances` of it; a side with autograd
    must also have computed its logits in that dtype (the reference computes in float64)."""
    (g, g_kind), (w, w_kind) = got, want
    logits_tol, loss_tol = tol.dtype_tolerances(dtype, float(np.abs(w.logits).max()), float(np.abs(w.loss)))
    checks = [compare(group, "logits", g.logits, w.logits, logits_tol),
              compare(group, "loss", g.loss, w.loss, loss_tol)]
    for B, kind in zip(sides, (g_kind, w_kind), strict=True):
        if B.supports_grad and kind != dtype:
            checks.append(Check(group, f"{B.name} logits dtype", math.inf, math.inf, logits_tol, math.inf,
                                False, f"computed in {kind}, not {dtype}"))
    return checks
