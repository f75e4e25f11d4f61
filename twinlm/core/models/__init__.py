"""The model families. A family is one module exporting:

    KIND          "decoder" (causal, next-token LM) or "encoder" (bidirectional, masked LM)
    DEFAULTS      values for the config fields it leaves to the family (see config.FAMILY_FIELDS)
    CHOICES       per option (pos_encoding, norm, activation, residual), the values the family accepts
                  (missing: all)
    param_spec(cfg) -> Spec                       every parameter: shape, init, decay, trainable
    hidden(B, cfg, p, idx, *, dropout, cache, mask, mask_fn, types) -> (h (N, T, C), cache)
    lm_logits(B, cfg, p, h) -> (N, T, V)          the language-model head (next token or masked token)
    pooled(B, cfg, p, h, pool) -> (N, C)          the representation a classification head reads
    dropout_sites(cfg, batch, t) -> {site: shape}
    decode_step(...)                               decoders only: one token through a fixed-shape cache
    decode_cache_shapes(cfg, batch)                decoders only: per layer, the shapes of that cache
    RECURRENT     optional, True for a family without attention (attention-only checks do not apply)
    BLOCK_CHECKPOINTS  optional, True when `hidden` runs each block through `B.checkpoint` (so `train
                  --grad-checkpoint` can recompute it in the backward pass)
    HEAD_PARAMS   optional, the name prefixes of the parameters `lm_logits` reads: with it, under
                  --grad-checkpoint the LM loss runs the head in checkpointed chunks (`model.lm_loss`)
    parity_overrides(cfg) -> dict                  optional: the parity suite's model of the family (config
                                                   changes to the preset `cfg`, so every code path runs)
    ABLATIONS     optional, {arch: ((name, description, backend mixin), ...)}: negative controls for the
                  family's own pieces, which the parity suite must catch

and a line in FAMILIES below. A variant the parity suite checks beside the families (a family's model with
more options on, e.g. llama's `modern_parity`) is a function of the family's parity config in its module
plus a line in `twinlm.parity.suite.VARIANTS`; the layer-library pieces' controls live in
`twinlm.parity.controls`.

In graph code `B` is always the backend; shapes are written with N (batch), T (positions), C (width),
H / Hkv (query / key-value heads), hs (head size) and V (vocabulary).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from twinlm.core.errors import ConfigError

FAMILIES = {
    "gpt": "twinlm.core.models.gpt",
    "llama": "twinlm.core.models.llama",
    "bert": "twinlm.core.models.bert",
    "lstm": "twinlm.core.models.lstm",
    "rnn": "twinlm.core.models.lstm",  # the same module: a plain tanh RNN cell instead of the LSTM's
}


def family(arch: str) -> ModuleType:
    if arch not in FAMILIES:
        raise ConfigError(f"unknown arch {arch!r}; choose from {', '.join(FAMILIES)}")
    return importlib.import_module(FAMILIES[arch])


def attends(cfg: Any) -> bool:
    """Whether `cfg`'s family has attention (and so a mask, heads and an MLP); the recurrent ones do not."""
    return not getattr(family(cfg.arch), "RECURRENT", False)
