"""Negative controls: one known bug each, injected on one side only (a backend mixin, a mask, an optimizer
setting, a change to the core graph's maths or to the batch); the suite must then fail. Controls for a
family's own pieces are declared in its module (`ABLATIONS` in core/models/).

The layer-library pieces of the 2024-25 families (core/layers.py, the decoder stack) are computed in the
core, once for every backend, so a bug in one of them is a wrong constant or a skipped step of the core
graph: their controls (`model_change`) recompute one side with that change, parameters unchanged. Where the
piece is a backend composite (soft-capped attention, the tanh GELU of GeGLU) the control is a backend mixin,
the bug a fused kernel would have. Either way the suite must then fail: proof that its model and batches
make the piece matter above the tolerances."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from twinlm.core import model
from twinlm.core.backend import LAYER_NORM_EPS, RMS_NORM_EPS, Array, Backend
from twinlm.core.config import ModelConfig
from twinlm.core.models import FAMILIES, attends, family


class TanhGelu:
    """GELU's tanh approximation (tinygrad's native default) instead of the pinned erf form."""

    def gelu(self: Any, x: Array) -> Array:
        c = math.sqrt(2.0 / math.pi)
        return 0.5 * x * (1.0 + self.tanh(c * (x + 0.044715 * (x * x * x))))


WRONG_LAYER_NORM_EPS = 1e-6


class WrongLayerNormEps:
    """LayerNorm with a framework default eps instead of the config's: 1e-6 for the pinned 1e-5, and
    PyTorch's 1e-5 for anything else (BERT's 1e-12)."""

    def layer_norm(self: Any, x: Array, weight: Array, bias: Array | None,
                   eps: float = LAYER_NORM_EPS) -> Array:
        wrong = WRONG_LAYER_NORM_EPS if eps == LAYER_NORM_EPS else LAYER_NORM_EPS
        return super().layer_norm(x, weight, bias, wrong)  # type: ignore[misc]


WRONG_RMS_NORM_EPS = 1e-6


class WrongRmsNormEps:
    """RMSNorm with eps 1e-6 (tinygrad's default) instead of the pinned 1e-5."""

    def rms_norm(self: Any, x: Array, weight: Array, eps: float = RMS_NORM_EPS) -> Array:
        return super().rms_norm(x, weight, WRONG_RMS_NORM_EPS)  # type: ignore[misc]


class InterleavedRope:
    """RoPE on interleaved pairs (x[2i], x[2i+1]) (Meta's original layout) instead of the half split."""

    def rope(self: Any, x: Array, cos: Array, sin: Array) -> Array:
        b, h, t, hs = x.shape
        pairs = self.reshape(x, (b, h, t, hs // 2, 2))
        x1, x2 = (self.reshape(pairs[..., i:i + 1], (b, h, t, hs // 2)) for i in (0, 1))
        return super().rope(self.concat([x1, x2], axis=-1), cos, sin)  # type: ignore[misc]


class TiledKV:
    """Grouped-query heads mapped to kv head h % Hkv (tiling) instead of h // n_rep."""

    def repeat_kv(self: Any, x: Array, n_rep: int) -> Array:
        return x if n_rep == 1 else self.concat([x] * n_rep, axis=1)

    # the models read grouped k, v through grouped_attention: here the tiled heads, repeated
    grouped_attention = Backend._attention_repeating_kv


class IgnorePadding:
    """Attention that drops a per-example (padding) mask: padded tokens are attended to."""

    def attention(self: Any, q: Array, k: Array, v: Array, mask: Array | None,
                  dropout: Array | None = None, softcap: float = 0.0) -> Array:
        if mask is not None and len(mask.shape) == 4:
            mask = None
        return super().attention(q, k, v, mask, dropout, softcap)  # type: ignore[misc]


class UnscaledLora:
    """LoRA adapters added without their alpha / rank scale."""

    def lora(self: Any, x: Array, a: Array, b: Array, scale: float) -> Array:
        return super().lora(x, a, b, 1.0)  # type: ignore[misc]


class SoftcapDropped:
    """Attention without its logit soft-cap (what a fused kernel with no soft-cap input computes)."""

    def attention(self: Any, q: Array, k: Array, v: Array, mask: Array | None,
                  dropout: Array | None = None, softcap: float = 0.0) -> Array:
        return super().attention(q, k, v, mask, dropout)  # type: ignore[misc]


class ErfGeluTanh:
    """GeGLU's gate through the exact erf GELU instead of the tanh approximation it is pinned to."""

    def gelu_tanh(self: Any, x: Array) -> Array:
        return self.gelu(x)


class QuantElementsReversed:
    """A quantized weight unpacked with each word's elements in the other order (high bits first)."""

    def dequantize(self: Any, qweight: Array, scales: Array, biases: Array, bits: int,
                   group_size: int) -> Array:
        w = super().dequantize(qweight, scales, biases, bits, group_size)  # type: ignore[misc]
        per = 32 // bits
        w3 = self.reshape(w, (w.shape[0], w.shape[1] // per, per))
        return self.reshape(self.concat([w3[..., j:j + 1] for j in reversed(range(per))], axis=-1), w.shape)


class QuantTakeNextRowScales:
    """A quantized embedding's rows dequantized with the next row's scales and biases (a lookup that takes
    its words and its scales at different ids)."""

    def quantized_take(self: Any, qweight: Array, scales: Array, biases: Array, ids: Array, bits: int,
                       group_size: int) -> Array:
        scales, biases = (self.concat([t[1:], t[:1]], axis=0) for t in (scales, biases))
        return super().quantized_take(qweight, scales, biases, ids, bits, group_size)  # type: ignore[misc]


def _unmasked(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Chat data with its loss mask dropped: every target counts, the prompt's and the padding's too."""
    return {**batch, "w": np.ones_like(batch["w"])}


def _mask_shifted(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The loss mask one position late: each turn's first assistant target is dropped, and the token after
    the turn (the next prompt's first, or padding) is learned."""
    w = np.zeros_like(batch["w"])
    w[:, 1:] = batch["w"][:, :-1]
    return {**batch, "w": w}


class LowPrecisionStats:
    """softmax, the norm statistics and the loss of a bfloat16/float16 input computed in that dtype instead
    of float32 (the reference bodies, so no fused kernel keeps float32 statistics on its own)."""

    def _float32(self: Any, x: Array) -> tuple[Array, str]:
        return x, self.dtype_name(x)  # no upcast (what `stats_float32 = False` does)

    def layer_norm(self: Any, x: Array, weight: Array, bias: Array | None,
                   eps: float = LAYER_NORM_EPS) -> Array:
        return Backend.layer_norm(self, x, weight, bias, eps)

    def rms_norm(self: Any, x: Array, weight: Array, eps: float = RMS_NORM_EPS) -> Array:
        return Backend.rms_norm(self, x, weight, eps)

    def attention(self: Any, q: Array, k: Array, v: Array, mask: Array | None,
                  dropout: Array | None = None, softcap: float = 0.0) -> Array:
        return Backend.attention(self, q, k, v, mask, dropout, softcap)

    def cross_entropy(self: Any, logits: Array, targets: Array, weights: Array | None = None) -> Array:
        return Backend.cross_entropy(self, logits, targets, weights)


def _sliding(c: ModelConfig) -> bool:
    """Whether some layer attends through a window shorter than the suite's sequences."""
    return any(c.sliding(i) for i in range(c.n_layer)) and c.sliding_window < c.block_size


def shifted_causal_mask(t_q: int, t_k: int) -> np.ndarray:
    """The causal mask shifted by one: each query also sees the next token (a leak)."""
    return np.arange(t_k)[None, :] <= np.arange(t_q)[:, None] + (t_k - t_q) + 1


@dataclass(frozen=True)
class Control:
    """One injected bug. Applied to one side only; the suite must then fail. `applies` says whether a
    config has the piece the bug touches (a tanh GELU cannot be caught in a SwiGLU model)."""

    name: str
    description: str
    mixin: type | None = None
    mask_fn: Callable[[int, int], np.ndarray] = model.causal_mask
    bias_correction: bool = True
    applies: Callable[[ModelConfig], bool] = lambda cfg: True
    model_change: Callable[[ModelConfig], dict[str, Any]] | None = None  # config changes, one side only
    skip_params: str | None = None  # weights named *<this> left out of one side's graph (a skipped add)
    batch_change: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None  # on masked batches
    ops_only: bool = False  # the bug is in a piece no model of the suite uses: only the op phases run
    needs_dtypes: bool = False  # caught only by the low-precision phase (a suite that runs it)

    @property
    def backend_free(self) -> bool:
        """No mixin: the primitives and fused kernels of the injected side are the clean side's."""
        return self.mixin is None


CONTROLS = (
    Control("tanh-gelu", "GELU by the tanh approximation", mixin=TanhGelu,
            applies=lambda c: c.activation == "gelu" and attends(c)),
    Control("no-bias-correction", "AdamW without bias correction (bc1 = bc2 = 1)", bias_correction=False),
    Control("layer-norm-eps", f"LayerNorm eps {WRONG_LAYER_NORM_EPS:g} instead of {LAYER_NORM_EPS:g} "
            f"({LAYER_NORM_EPS:g} instead of BERT's 1e-12)",
            mixin=WrongLayerNormEps, applies=lambda c: c.norm == "layernorm"),
    Control("shifted-mask", "causal mask shifted by one (sees the next token)", mask_fn=shifted_causal_mask,
            applies=lambda c: c.kind == "decoder" and attends(c)),
    Control("rms-norm-eps", f"RMSNorm eps {WRONG_RMS_NORM_EPS:g} instead of {RMS_NORM_EPS:g}",
            mixin=WrongRmsNormEps, applies=lambda c: c.norm == "rmsnorm"),
    Control("rope-interleaved", "RoPE on interleaved pairs instead of the half split", mixin=InterleavedRope,
            applies=lambda c: c.pos_encoding == "rope"),
    Control("gqa-tiled", "grouped-query heads mapped to the wrong kv head", mixin=TiledKV,
            applies=lambda c: 1 < c.n_kv_head < c.n_head),  # else every mapping is the same one
    Control("padding-ignored", "attention ignores the padding mask", mixin=IgnorePadding,
            applies=lambda c: c.kind == "encoder"),
    Control("lora-unscaled", "LoRA adapters without their alpha / rank scale", mixin=UnscaledLora,
            applies=lambda c: c.lora_rank > 0 and c.lora_scale != 1.0),
    # Quantized weights (core.quant): the suite's models are float, so the op cases of dequantize and
    # quantized_linear catch it; injected once, into the GPT suite (tests/test_quant.py checks whole models).
    Control("quant-element-order", "quantized words unpacked high bits first", mixin=QuantElementsReversed,
            applies=lambda c: c.arch == "gpt" and not c.lora_rank, ops_only=True),
    Control("quant-embedding-rows", "quantized embedding rows read with the next row's scales and biases",
            mixin=QuantTakeNextRowScales, applies=lambda c: c.arch == "gpt" and not c.lora_rank,
            ops_only=True),
    # The 2024-25 families' pieces (core/layers.py and the decoder stack; see the module docstring).
    Control("rope-scaling-skipped", "RoPE frequencies left unscaled (rope_type default)",
            model_change=lambda c: dict(rope_type="default"), applies=lambda c: c.rope_type != "default"),
    Control("llama3-original-context", "llama3 RoPE wavelengths measured against twice the original context",
            model_change=lambda c: dict(rope_original_positions=2 * c.rope_original_positions),
            applies=lambda c: c.rope_type == "llama3"),
    Control("local-rope-base", "sliding-window layers rotated by the global RoPE base and scaling",
            model_change=lambda c: dict(rope_local_theta=0.0), applies=lambda c: c.rope_local_theta > 0),
    Control("partial-rotary-whole-head", "RoPE over the whole head, not just its first rope_dim dimensions",
            model_change=lambda c: dict(rope_dim=0), applies=lambda c: 0 < c.rope_dim < c.head_dim),
    Control("qkv-bias-dropped", "q/k/v biases not added", skip_params=".attn.qkv.bias",
            applies=lambda c: c.qkv_bias and not c.bias),
    Control("head-size-scale", "attention scores scaled by (d_model / n_head)^-1/2, not by the head size "
            "or query_pre_attn_scalar", model_change=lambda c: dict(query_scale=float(c.d_model // c.n_head)),
            applies=lambda c: (c.query_scale or c.head_dim) != c.d_model // c.n_head),
    Control("qk-norm-skipped", "no per-head RMSNorm of q and k", model_change=lambda c: dict(qk_norm=False),
            applies=lambda c: c.qk_norm),
    Control("window-off-by-one", "sliding window one key wider",
            model_change=lambda c: dict(sliding_window=c.sliding_window + 1), applies=_sliding),
    Control("window-every-layer", "the per-layer pattern ignored: every layer slides",
            model_change=lambda c: dict(layer_types=()),
            applies=lambda c: _sliding(c) and "full_attention" in c.layer_types),
    Control("attn-softcap-dropped", "attention logits not soft-capped", mixin=SoftcapDropped,
            applies=lambda c: c.attn_softcap > 0),
    Control("final-softcap-dropped", "final logits not soft-capped",
            model_change=lambda c: dict(final_softcap=0.0), applies=lambda c: c.final_softcap > 0),
    Control("query-scale-ignored", "query_pre_attn_scalar ignored: scores scaled by the head size",
            model_change=lambda c: dict(query_scale=0.0),
            applies=lambda c: c.query_scale > 0 and c.query_scale != c.head_dim),
    Control("norm-offset-dropped", "RMSNorm gain w instead of Gemma's 1 + w",
            model_change=lambda c: dict(norm_offset=False), applies=lambda c: c.norm_offset),
    Control("embed-scale-skipped", "embeddings not scaled by sqrt(d_model)",
            model_change=lambda c: dict(embed_scale=False), applies=lambda c: c.embed_scale),
    Control("post-norms-skipped", "no norm after attention and after the MLP",
            model_change=lambda c: dict(post_norms=False), applies=lambda c: c.post_norms),
    Control("geglu-erf", "GeGLU's gate through the erf GELU, not the tanh form", mixin=ErfGeluTanh,
            applies=lambda c: c.activation in ("gelu_tanh", "geglu_tanh")),
    # Chat data (tasks/chat.py): the suite's masked batches (`parity_batch(masked=True)`).
    Control("loss-mask-ignored", "chat loss over every target, the prompt's and the padding's too",
            batch_change=_unmasked, applies=lambda c: c.kind == "decoder"),
    Control("loss-mask-shifted", "chat loss mask one position late", batch_change=_mask_shifted,
            applies=lambda c: c.kind == "decoder"),
    # Low precision (`--dtype`): the suite's dtype phase.
    Control("low-precision-stats", "softmax, norm statistics and loss kept in bfloat16/float16, not float32",
            mixin=LowPrecisionStats, needs_dtypes=True),
    # The families' own (core/models/*: ABLATIONS).
    *(Control(name, what, mixin=mixin, applies=lambda c, a=arch: c.arch == a)
      for arch in FAMILIES for name, what, mixin in getattr(family(arch), "ABLATIONS", {}).get(arch, ())),
)


def control_named(name: str) -> Control:
    return next(c for c in CONTROLS if c.name == name)
