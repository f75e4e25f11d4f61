"""Llama-style decoders (Llama, SmolLM, TinyLlama, Qwen-like): pre-norm RMSNorm (eps 1e-5), rotary
positions in the half-split layout, SwiGLU feed-forward, no biases, grouped-query attention through
`n_kv_head`, tied or untied head. The graph is the shared decoder stack. The pieces of the 2024-25 families
(Llama 3's RoPE scaling, Qwen2's q/k/v bias, Qwen3's head size and q/k norm, Mistral's and Gemma's sliding
windows, Gemma's norms, soft-caps and GeGLU) are options of this family; `modern_parity` and
`gemma3_parity` are the parity suite's models of them (its variants "modern" and "gemma3")."""

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


def _alternating(n_layer: int) -> tuple[str, ...]:
    """Sliding-window layers with a global one after each (Gemma 2's pattern; Gemma 3 has 5 local to 1)."""
    return tuple("full_attention" if i % 2 else "sliding_attention" for i in range(n_layer))


def modern_parity(cfg: ModelConfig) -> dict[str, Any]:
    """The parity suite's "modern" variant: every piece the 2024-25 families added, on at once, sized so
    each one changes the result at the suite's 8 to 32 positions (each has a negative control). The suite
    trains it on chat-style batches, loss only on the assistant's tokens (`--mask-prompt`)."""
    return dict(
        head_size=24,  # Qwen3, Gemma: not d_model / n_head (16 at the small preset, 8 at tiny)
        rope_dim=16,  # Phi-4-mini's partial rotary: 16 of the 24 dimensions rotated, 8 passed through
        qkv_bias=True,  # Qwen2
        qk_norm=True,  # Qwen3, Gemma 3: per-head RMSNorm of q and k before the rotation
        # Llama 3.1's scaling: with 16 rotated dimensions and 32 original positions, frequencies are kept,
        # ramped and divided by the factor (wavelengths 6.3, then 20, then 63 and up)
        rope_type="llama3", rope_factor=4.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
        rope_original_positions=32,
        sliding_window=5, layer_types=_alternating(cfg.n_layer),  # shorter than the float64 phase's 8 tokens
        rope_local_theta=1000.0,  # Gemma 3: the sliding layers' own (unscaled) base
        attn_softcap=2.0, final_softcap=3.0,  # Gemma 2 (50 and 30): small enough to bite at unit scale
        query_scale=12.0,  # Gemma's query_pre_attn_scalar, not the head size
        norm_offset=True, embed_scale=True, post_norms=True, activation="geglu_tanh",  # Gemma
    )


def gemma3_parity(cfg: ModelConfig) -> dict[str, Any]:
    """The parity suite's "gemma3" variant (run by `twinlm parity --arch gemma3`, not by default: CI's time):
    Gemma 3's layout, with the linear RoPE scaling of its larger sizes on the global layers."""
    return dict(
        head_size=24, qk_norm=True, query_scale=24.0, rope_theta=1e6, rope_type="linear", rope_factor=8.0,
        sliding_window=5, layer_types=_alternating(cfg.n_layer), rope_local_theta=1e4,
        norm_offset=True, embed_scale=True, post_norms=True, activation="geglu_tanh",
    )
