"""The model of any family, behind one API: the family is chosen by `cfg.arch` (see `core.models`).

    logits(B, cfg, p, idx)   next-token logits (decoders) or masked-token logits (encoders), (N, T, V)
    forward(...)             logits and the KV cache, for incremental generation (decoders)
    classify(...)            class logits (N, n_classes) of a model with a classification head
    loss(...)                mean cross-entropy of the LM head against targets
    lm_loss(...)             the same with optional 0/1 weights: every LM loss (next token, chat, masked
                             token, evaluation) is built here, chunked under `B.remat`
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from twinlm.core.backend import Array, Backend
from twinlm.core.config import ModelConfig
from twinlm.core.layers import causal_mask, padding_mask, sinusoidal_table  # noqa: F401  (re-exported)
from twinlm.core.models import family
from twinlm.core.models.decoder import KVCache, decode_inputs, decode_masks  # noqa: F401  (re-exported)
from twinlm.core.quant import SUFFIXES as QUANTIZED
from twinlm.core.spec import Spec, frozen_except


def param_spec(cfg: ModelConfig) -> Spec:
    """The family's spec; with LoRA, only the adapters and a task head (what the pretrained model lacks,
    or did not train) stay trainable."""
    spec = family(cfg.arch).param_spec(cfg)
    if not cfg.lora_rank:
        return spec
    return frozen_except(spec, new_parameters(cfg.without_lora(), spec))


def new_parameters(pretrained: ModelConfig, spec: Spec) -> list[str]:
    """The names in `spec` that a model of config `pretrained` without a task head does not train:
    adapters, the classification head (and BERT's pooler, untrained without one)."""
    base = family(pretrained.arch).param_spec(pretrained.replace(n_classes=0))
    # A quantized layer's tensors are frozen in the base too, but for good: they never train (QLoRA).
    return [k for k in spec if k not in base or not base[k].trainable and not k.endswith(QUANTIZED)]


def check_token_ids(ids: np.ndarray, vocab_size: int) -> None:
    """Out-of-range ids give a silent zero row on both frameworks, so refuse them here."""
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")


def forward(B: Backend, cfg: ModelConfig, p: dict[str, Array], idx: Array,
            **kw: Any) -> tuple[Array, KVCache]:
    """LM logits (N, T, V) for token ids `idx` (N, T), and the updated KV cache (decoders)."""
    fam = family(cfg.arch)
    h, cache = fam.hidden(B, cfg, p, idx, **kw)
    return fam.lm_logits(B, cfg, p, h), cache


def logits(B: Backend, cfg: ModelConfig, p: dict[str, Array], idx: Array, **kw: Any) -> Array:
    return forward(B, cfg, p, idx, **kw)[0]


def classify(B: Backend, cfg: ModelConfig, p: dict[str, Array], idx: Array, pool: Array, **kw: Any) -> Array:
    """Class logits (N, n_classes): the family's pooled representation (at the one-hot `pool`) through
    the classification head."""
    from twinlm.core.layers import classify as head

    fam = family(cfg.arch)
    h, _ = fam.hidden(B, cfg, p, idx, **kw)
    return head(B, cfg, p, fam.pooled(B, cfg, p, h, pool))


def decode_cache_shapes(cfg: ModelConfig, batch: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Per layer, the shapes of the two arrays of `decode_step`'s fixed-shape cache (decoders)."""
    return family(cfg.arch).decode_cache_shapes(cfg, batch)


def decode_step(B: Backend, cfg: ModelConfig, p: dict[str, Array], *args: Any) -> tuple[Array, KVCache]:
    fam = family(cfg.arch)
    if fam.KIND != "decoder":
        raise ValueError(f"--arch {cfg.arch} is an encoder: it does not generate text")
    return fam.decode_step(B, cfg, p, *args)


# Under `train --grad-checkpoint` (`B.remat`) the LM head and its cross-entropy run over chunks of
# positions, each chunk inside `B.checkpoint`, so only one chunk's logits (and their log-softmax and gradient)
# are alive at a time, in the forward and in the backward that recomputes them: at the 1B shape (V = 128,256)
# one float32 copy of the logits of batch 4 x 256 is 525 MB. A chunk holds the largest power of two of
# positions whose float32 logits fit LOSS_CHUNK_BYTES (128 positions, 63 MiB, at V = 128,256): a few percent
# of a 1B QLoRA run's memory, yet big enough that each chunk's head matmul stays one efficient GEMM. Without
# remat chunks would save nothing (autodiff keeps every chunk's logits for the backward): unchunked.
LOSS_CHUNK_BYTES = 64 << 20


def loss_chunk_rows(vocab_size: int) -> int:
    """Positions per chunk of the chunked LM loss: the largest power of two whose float32 logits (rows x
    vocab_size x 4 bytes) fit LOSS_CHUNK_BYTES, at least 1."""
    rows = max(1, LOSS_CHUNK_BYTES // (4 * vocab_size))
    return 1 << (rows.bit_length() - 1)


def lm_loss(B: Backend, cfg: ModelConfig, p: dict[str, Array], idx: Array, targets: Array,
            weights: Array | None = None, *, dropout: dict[str, Array] | None = None, **kw: Any) -> Array:
    """Mean cross-entropy (`Backend.cross_entropy`) of the LM head's logits for `idx` (N, T) against
    `targets` (N, T); with 0/1 `weights` (N, T) the mean over positions of weight 1. With `B.remat` on, a
    family that names its head's parameters (HEAD_PARAMS), with that head frozen, computes it in chunks of
    positions (see LOSS_CHUNK_BYTES): (sum over chunks of the chunk's nll sum) / count, equal within float
    rounding."""
    fam = family(cfg.arch)
    h, _ = fam.hidden(B, cfg, p, idx, dropout=dropout, **kw)  # (N, T, C)
    head = getattr(fam, "HEAD_PARAMS", None)
    rows = loss_chunk_rows(cfg.vocab_size)
    n = math.prod(targets.shape)
    # The head's weights are the checkpoints' explicit inputs (the targets and weights, which have no
    # gradient, are closed over). Only a frozen head is chunked (LoRA, QLoRA): a trainable one would get a
    # (V, C) weight gradient per chunk, which MLX keeps side by side until summed (measured: the peak grew
    # with the number of chunks), 1 GB each at the 1B shape.
    hp = {k: v for k, v in p.items() if head and k.startswith(head)}
    spec = param_spec(cfg) if B.remat and head and n > rows else {}
    if not spec or any(spec[k].trainable for k in hp if k in spec):
        return B.cross_entropy(fam.lm_logits(B, cfg, p, h), targets, weights)
    h = B.reshape(h, (n, h.shape[-1]))  # (N*T, C): chunks of positions across the batch's rows
    t = B.reshape(targets, (n,))
    w = None if weights is None else B.reshape(weights, (n,))
    total = None
    for a in range(0, n, rows):
        b = min(a + rows, n)
        t_c, w_c = t[a:b], None if w is None else w[a:b]

        def chunk(hp: dict[str, Array], x: Array, t_c: Array = t_c, w_c: Array | None = w_c,
                  size: int = b - a) -> Array:
            # the chunk's nll sum: its mean (the one cross-entropy) times the count that mean divided by
            mean = B.cross_entropy(fam.lm_logits(B, cfg, hp, x), t_c, w_c)
            return mean * size if w_c is None else mean * B.maximum(B.sum(w_c), 1.0)
        # Chained: each chunk's input waits for the running total (+ 0 * total, exact for a finite total;
        # a non-finite one makes the loss non-finite anyway). Without the link MLX schedules every chunk's
        # recomputation in the backward side by side (measured: 4 chunks of 4 MiB peaked as high as one
        # unchunked pass); with it the backward runs them one after another, last chunk first.
        x = h[a:b] if total is None else h[a:b] + 0.0 * total
        part = B.checkpoint(chunk, hp, x)
        total = part if total is None else total + part
    return total / (n if w is None else B.maximum(B.sum(w), 1.0))


def loss(B: Backend, cfg: ModelConfig, p: dict[str, Array], idx: Array, targets: Array,
         dropout: dict[str, Array] | None = None) -> Array:
    """Mean cross-entropy of the LM head's logits against `targets` (next tokens for a decoder)."""
    return lm_loss(B, cfg, p, idx, targets, dropout=dropout)


def lm_loss_fn(B: Backend, cfg: ModelConfig, **kw: Any) -> Any:
    """`loss_fn(params, batch, dropout)` of next-token training on batches {"x", "y"} (see core.step)."""
    def loss_fn(p: dict[str, Array], batch: dict[str, Array], drop: dict[str, Array]) -> Array:
        return lm_loss(B, cfg, p, batch["x"], batch["y"], dropout=drop, **kw)
    return loss_fn
