"""Llama-style decoders (Llama, SmolLM, TinyLlama, Qwen-like): pre-norm RMSNorm (eps 1e-5), rotary
positions in the half-split layout, SwiGLU feed-forward, no biases, grouped-query attention through
`n_kv_head`, tied or untied head. The graph is the shared decoder stack."""

from __future__ import annotations

from twinlm.core.models.decoder import *  # noqa: F403  (the shared decoder stack is the graph)

DEFAULTS = dict(bias=False, pos_encoding="rope", norm="rmsnorm", activation="swiglu", norm_eps=1e-5,
                type_vocab_size=0)
CHOICES: dict[str, tuple[str, ...]] = {}
