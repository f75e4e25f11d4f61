"""Recurrent baselines: an LSTM (`--arch lstm`) and a plain Elman RNN (`--arch rnn`), next-token decoders
trained by the same trainer, tasks, checkpoints and parity suite as the transformers.

    tokens (N, T) -> wte -> n_layer x recurrent layer (x_t, state_{t-1} -> h_t) -> ln_f -> tied head

LSTM layer (PyTorch's gate order i, f, g, o; hidden size = d_model):
    z_t = x_t W_ih + h_{t-1} W_hh + b                         (N, 4C)
    i, f, o = sigmoid(z_i), sigmoid(z_f), sigmoid(z_o);  g = tanh(z_g)
    c_t = f * c_{t-1} + i * g;   h_t = o * tanh(c_t)          h_0 = c_0 = 0
RNN layer:  h_t = tanh(x_t W_ih + h_{t-1} W_hh + b)

x_t W_ih for every t is one matmul over the whole window (the only part that runs in parallel over
time); the recurrence is unrolled over the window in the graph, T small matmuls one after another. That
is the point of the baseline (see `twinlm experiment parallelism`), and it makes compile time grow with
T: tracing and compiling the unrolled step is measured there. Weights are N(0, 1/sqrt(C)) (unit
variance through each matmul, close to PyTorch's U(-1/sqrt(C), 1/sqrt(C))), biases zero. The state
(h, c) per layer plays the KV cache's part in generation: a continuation starts from it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from twinlm.core import layers as L
from twinlm.core import spec as S
from twinlm.core.backend import Array, Backend
from twinlm.core.config import ModelConfig
from twinlm.core.models.decoder import lm_logits, pooled  # noqa: F401  (the same head and pooling as a decoder)

KIND = "decoder"
RECURRENT = True  # no attention: attention-only options and controls do not apply
# Recurrent layers read no positions and use no feed-forward: those options are fixed.
DEFAULTS = dict(bias=True, pos_encoding="none", norm="layernorm", activation="gelu", norm_eps=1e-5,
                type_vocab_size=0)
CHOICES: dict[str, tuple] = {"pos_encoding": ("none",), "residual": (True,)}
# The parity suite unrolls the window in the graph, and tinygrad compiles every unrolled step's kernels
# (minutes for 16 steps here): 4 steps check the recurrence (state carried across 3 transitions, every
# gradient through it) and keep the suite's growth small.
PARITY_BLOCK = 4


def parity_overrides(cfg: ModelConfig) -> dict[str, Any]:
    return dict(block_size=min(PARITY_BLOCK, cfg.block_size))


class TanhGate:
    """A negative control: LSTM gates squashed by tanh instead of the sigmoid (gates in (-1, 1))."""

    def sigmoid(self: Any, x: Array) -> Array:
        return self.tanh(x)


# The parity suite's negative controls for this module's own pieces, per arch: (name, what, backend mixin).
ABLATIONS = {"lstm": (("lstm-tanh-gate", "LSTM gates through tanh instead of the sigmoid", TanhGate),)}
# Per layer (h, c) of shape (N, C); an RNN's c is unused and stays h.
State = list[tuple[Array, Array]]


def _gates(cfg: ModelConfig) -> int:
    return 4 if cfg.arch == "lstm" else 1


def param_spec(cfg: ModelConfig) -> S.Spec:
    C, G = cfg.d_model, _gates(cfg)
    std = 1.0 / math.sqrt(C)
    spec: S.Spec = {"wte.weight": S.embedding(cfg.vocab_size, C)}
    for i in range(cfg.n_layer):
        pre = f"blocks.{i}.{cfg.arch}"
        spec[f"{pre}.w_ih"] = S.weight(C, G * C, std)
        spec[f"{pre}.w_hh"] = S.weight(C, G * C, std)
        if cfg.bias:
            spec[f"{pre}.bias"] = S.bias(G * C)
    spec |= L.norm_spec(cfg, "ln_f")
    if not cfg.tie_embeddings:
        spec["head.weight"] = S.weight(C, cfg.vocab_size)
    return spec | L.classifier_spec(cfg)


def dropout_sites(cfg: ModelConfig, batch: int, t: int) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {"emb": (batch, t, cfg.d_model)}
    for i in range(cfg.n_layer):
        out[f"blocks.{i}.out"] = (batch, t, cfg.d_model)
    return out


def _cell(B: Backend, cfg: ModelConfig, z: Array, h: Array | None, c: Array | None,
          w_hh: Array) -> tuple[Array, Array]:
    """One time step: z = x_t W_ih + b (N, G C), the previous (h, c) or None (zero state) -> new (h, c)."""
    if h is not None:
        z = z + h @ w_hh
    if cfg.arch == "rnn":
        h = B.tanh(z)
        return h, h
    C = cfg.d_model
    i, f, g, o = (z[..., k * C:(k + 1) * C] for k in range(4))
    c_new = B.sigmoid(i) * B.tanh(g)
    if c is not None:
        c_new = B.sigmoid(f) * c + c_new
    return B.sigmoid(o) * B.tanh(c_new), c_new


def _layer(B: Backend, cfg: ModelConfig, p: L.Params, i: int, x: Array,
           state: tuple[Array, Array] | None) -> tuple[Array, tuple[Array, Array]]:
    """The recurrence of layer i over x (N, T, C), from `state` (or zeros): outputs (N, T, C), last state."""
    batch, t, C = x.shape
    pre = f"blocks.{i}.{cfg.arch}"
    z = x @ p[f"{pre}.w_ih"]  # (N, T, G C): the input projection of every step at once
    if cfg.bias:
        z = z + p[f"{pre}.bias"]
    h, c = state if state is not None else (None, None)
    outs = []
    for s in range(t):  # unrolled: each step needs the one before
        h, c = _cell(B, cfg, B.reshape(z[:, s:s + 1], (batch, z.shape[-1])), h, c, p[f"{pre}.w_hh"])
        outs.append(B.reshape(h, (batch, 1, C)))
    return (outs[0] if t == 1 else B.concat(outs, axis=1)), (h, c)


def hidden(B: Backend, cfg: ModelConfig, p: L.Params, idx: Array, *, dropout: dict[str, Array] | None = None,
           cache: State | None = None, mask: Array | None = None, mask_fn: Any = None,
           types: Array | None = None) -> tuple[Array, State]:
    """Final hidden states (N, T, C) and each layer's last (h, c). With `cache` (the state an earlier call
    returned), `idx` holds only the next tokens. `mask`, `mask_fn`: attention only, ignored (a recurrence
    is causal by construction, which the parity suite's leakage check verifies)."""
    if idx.shape[1] > cfg.block_size:
        raise ValueError(f"sequence length {idx.shape[1]} exceeds block_size {cfg.block_size}")
    drop = dropout or {}
    x = L.residual_dropout(B.take(p["wte.weight"], idx), drop, "emb")  # (N, T, C)
    new_state: State = []
    for i in range(cfg.n_layer):
        x, st = _layer(B, cfg, p, i, x, cache[i] if cache else None)
        x = L.residual_dropout(x, drop, f"blocks.{i}.out")
        new_state.append(st)
    return L.norm(B, cfg, p, "ln_f", x), new_state


def decode_cache_shapes(cfg: ModelConfig, batch: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Per layer the shapes of the fixed-shape decoding state (h, c) `decode_step` reads and returns."""
    return [((batch, cfg.d_model), (batch, cfg.d_model))] * cfg.n_layer


def decode_step(B: Backend, cfg: ModelConfig, p: L.Params, idx: Array, pos_ids: Array,
                write_mask: Array, attn_mask: Array, cache: State) -> tuple[Array, State]:
    """Logits (N, 1, V) of one new token `idx` (N, 1) from the state after the tokens before it. At
    position 0 (`attn_mask` sees only slot 0) the state restarts from zero, so one compiled graph of
    fixed shape serves every position, like the transformers' fixed KV cache (`decoder.decode_inputs`)."""
    if cfg.block_size > 1:
        keep = B.where(attn_mask[:, 1:2], 1.0, 0.0)  # (1, 1): 0 at position 0, else 1
    else:
        keep = B.from_numpy(np.zeros((1, 1), np.float32))
    state = [(h * keep, c * keep) for h, c in cache]
    h, new_state = hidden(B, cfg, p, idx, cache=state)
    return lm_logits(B, cfg, p, h), new_state
