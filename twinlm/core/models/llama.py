"""Llama-style decoders (Llama, SmolLM, TinyLlama, Qwen-like): pre-norm RMSNorm (eps 1e-5), rotary
positions in the half-split layout, SwiGLU feed-forward, no biases, grouped-query attention through
`n_kv_head`, tied or untied head. The graph is the shared decoder stack."""

from __future__ import annotations

from typing import Any

from twinlm.core.config import ModelConfig
from twinlm.core.models.decoder import *  # noqa: F403  (the shared decoder stack is the graph)

DEFAULTS = dict(bias=False, pos_encoding="rope", norm="rmsnorm", activation="swiglu", norm_eps=1e-5,
                type_vocab_size=0)
CHOICES: dict[str, tuple[str, ...]] = {}


def parity_overrides(cfg: ModelConfig) -> dict[str, Any]:
    """The parity suite's Llama: grouped-query attention (at least 2 kv heads of 2 queries each, so a wrong
    head mapping shows) and an untied head, so every option's code path runs."""
    n_head = max(4, cfg.n_head)
    return dict(n_head=n_head, n_kv_head=n_head // 2, tie_embeddings=False)
