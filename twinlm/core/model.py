"""The model of any family, behind one API: the family is chosen by `cfg.arch` (see `core.models`).

    logits(B, cfg, p, idx)   next-token logits (decoders) or masked-token logits (encoders), (N, T, V)
    forward(...)             logits and the KV cache, for incremental generation (decoders)
    classify(...)            class logits (N, n_classes) of a model with a classification head
    loss(...)                mean cross-entropy of the LM head against targets
"""

from __future__ import annotations

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


def loss(B: Backend, cfg: ModelConfig, p: dict[str, Array], idx: Array, targets: Array,
         dropout: dict[str, Array] | None = None) -> Array:
    """Mean cross-entropy of the LM head's logits against `targets` (next tokens for a decoder)."""
    return B.cross_entropy(logits(B, cfg, p, idx, dropout=dropout), targets)


def lm_loss_fn(B: Backend, cfg: ModelConfig, **kw: Any) -> Any:
    """`loss_fn(params, batch, dropout)` of next-token training on batches {"x", "y"} (see core.step)."""
    def loss_fn(p: dict[str, Array], batch: dict[str, Array], drop: dict[str, Array]) -> Array:
        return B.cross_entropy(logits(B, cfg, p, batch["x"], dropout=drop, **kw), batch["y"])
    return loss_fn
