"""GPT (GPT-2 / nanoGPT): a pre-norm causal decoder with learned positions, LayerNorm (eps 1e-5),
exact-erf GELU, biases and a tied output head. The graph is the shared decoder stack."""

from __future__ import annotations

from twinlm.core.models.decoder import *  # noqa: F403  (the shared decoder stack is the graph)

DEFAULTS = dict(bias=True, pos_encoding="learned", norm="layernorm", activation="gelu", norm_eps=1e-5,
                type_vocab_size=0)
CHOICES: dict[str, tuple[str, ...]] = {}
