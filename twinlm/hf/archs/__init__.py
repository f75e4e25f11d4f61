"""The Hugging Face architectures twinlm reads and writes (one module per model line: gpt2, llama, gemma,
bert; shared helpers in common), each as two small functions:

    config(hf: dict) -> dict         the ModelConfig fields of a `config.json` (refusing what twinlm lacks)
    links(cfg, hf_arch) -> [Link]     which Hugging Face tensors make each twinlm parameter

One link table serves both directions: import concatenates (and transposes) the Hugging Face tensors
into the twinlm parameter; export splits it back. twinlm stores every linear weight as (in, out) and
fuses q|k|v (and SwiGLU's gate|up) into one matrix; HF GPT-2's Conv1D is (in, out) already, `nn.Linear`
(Llama, BERT) is (out, in).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twinlm.core.config import ModelConfig
from twinlm.hf.archs.bert import bert_config, bert_hf_config, bert_links
from twinlm.hf.archs.common import HFError, Link
from twinlm.hf.archs.gemma import (
    gemma2_config,
    gemma2_hf_config,
    gemma3_config,
    gemma3_hf_config,
    gemma3_links,
)
from twinlm.hf.archs.gpt2 import gpt2_config, gpt2_hf_config, gpt2_links
from twinlm.hf.archs.llama import (
    llama_config,
    llama_hf_config,
    llama_links,
    mistral_config,
    phi3_config,
    phi3_links,
    qwen2_config,
    qwen3_config,
)

__all__ = ["ARCHS", "Arch", "HFError", "Link", "export_arch"]


@dataclass(frozen=True)
class Arch:
    model_type: str
    config: Callable[[dict[str, Any]], dict[str, Any]]
    hf_config: Callable[[ModelConfig], dict[str, Any]]
    links: Callable[[ModelConfig, str], list[Link]]
    ignored: tuple[str, ...] = ()  # tensor-name endings that carry no weights (buffers, tied copies)


ARCHS: dict[str, Arch] = {
    "GPT2LMHeadModel": Arch(
        "gpt2", gpt2_config, gpt2_hf_config, gpt2_links, (".attn.bias", ".attn.masked_bias")
    ),
    "LlamaForCausalLM": Arch("llama", llama_config, llama_hf_config, llama_links, ("rotary_emb.inv_freq",)),
    "Qwen2ForCausalLM": Arch("qwen2", qwen2_config, llama_hf_config, llama_links, ("rotary_emb.inv_freq",)),
    "Qwen3ForCausalLM": Arch("qwen3", qwen3_config, llama_hf_config, llama_links, ("rotary_emb.inv_freq",)),
    "Phi3ForCausalLM": Arch(
        "phi3", phi3_config, lambda c: llama_hf_config(c, "Phi3ForCausalLM"), phi3_links,
        ("rotary_emb.inv_freq",),
    ),
    "Gemma2ForCausalLM": Arch(
        "gemma2", gemma2_config, gemma2_hf_config, gemma3_links, ("rotary_emb.inv_freq",)
    ),
    "Gemma3ForCausalLM": Arch("gemma3_text", gemma3_config, gemma3_hf_config, gemma3_links,
                              ("rotary_emb.inv_freq", "rotary_emb_local.inv_freq")),
    "MistralForCausalLM": Arch(
        "mistral", mistral_config, lambda c: llama_hf_config(c, "MistralForCausalLM"), llama_links,
        ("rotary_emb.inv_freq",),
    ),
    "BertForMaskedLM": Arch(
        "bert",
        bert_config,
        bert_hf_config,
        bert_links,
        ("position_ids", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias"),
    ),
    "BertModel": Arch("bert", bert_config, bert_hf_config, bert_links, ("position_ids",)),
    "BertForSequenceClassification": Arch("bert", bert_config, bert_hf_config, bert_links, ("position_ids",)),
}


def export_arch(cfg: ModelConfig, imported_as: str | None) -> str:
    """The Hugging Face class a run exports as: the one it was imported from where that still fits."""
    if cfg.arch in ("gpt", "bert") and cfg.activation not in ("gelu", "gelu_tanh"):
        raise HFError(
            f"Hugging Face {cfg.arch.upper()} has a GELU feed-forward; this run's is {cfg.activation}"
        )
    if cfg.arch != "llama" and (cfg.qkv_bias or cfg.qk_norm or cfg.head_size or cfg.rope_type != "default"
                                or cfg.sliding_window or cfg.rope_dim):
        raise HFError(f"Hugging Face has no {cfg.arch} with q/k/v-only biases, q/k norms, an explicit head "
                      "size, RoPE scaling, partial rotary or a sliding window")
    if cfg.arch == "gpt":
        if (
            cfg.pos_encoding != "learned"
            or cfg.norm != "layernorm"
            or not cfg.bias
            or cfg.n_kv_head != cfg.n_head
        ):
            raise HFError(
                "GPT2LMHeadModel has learned positions, LayerNorm, biases and full multi-head "
                "attention; this run's GPT differs, so it has no GPT-2 form"
            )
        return "GPT2LMHeadModel"
    gemma = (cfg.norm_offset, cfg.embed_scale, cfg.post_norms, cfg.query_scale, cfg.final_softcap,
             cfg.rope_local_theta, cfg.attn_softcap, cfg.activation == "geglu_tanh")
    others = any(gemma) or cfg.qkv_bias or cfg.qk_norm or cfg.layer_types
    if cfg.arch == "llama" and cfg.rope_dim and others:
        raise HFError("this run rotates part of each head: twinlm exports that only as Phi3ForCausalLM, "
                      "which has no q/k/v biases, q/k norms, per-layer types or Gemma pieces")
    if cfg.arch == "llama" and any(gemma):
        if not (cfg.norm_offset and cfg.embed_scale and cfg.post_norms and cfg.activation == "geglu_tanh"
                and not cfg.qkv_bias and (cfg.qk_norm or not cfg.rope_local_theta)):
            raise HFError("this run has some of Gemma's pieces but not all, so it has no Gemma form")
        if cfg.qk_norm and cfg.attn_softcap:
            raise HFError(
                "this run has q/k norms (Gemma 3) and attention soft-capping (Gemma 2): neither class"
            )
        return "Gemma3ForCausalLM" if cfg.qk_norm else "Gemma2ForCausalLM"
    if cfg.arch == "llama":
        if cfg.pos_encoding != "rope" or cfg.norm != "rmsnorm" or cfg.activation != "swiglu" or cfg.bias:
            raise HFError(
                "LlamaForCausalLM has rotary positions, RMSNorm, SwiGLU and no biases; this run's "
                "model differs, so it has no Llama form"
            )
        if cfg.qkv_bias and cfg.qk_norm:
            raise HFError(
                "this run has both q/k/v biases (Qwen2) and q/k norms (Qwen3): no Hugging Face class has both"
            )
        if cfg.sliding_window and (cfg.qkv_bias or cfg.qk_norm or cfg.layer_types):
            raise HFError("this run has a sliding window with q/k/v biases, q/k norms or per-layer types: "
                          "twinlm exports a sliding window only as MistralForCausalLM (every layer)")
        phi3_fits = not (cfg.qkv_bias or cfg.qk_norm or cfg.layer_types)
        if (imported_as == "Phi3ForCausalLM" or cfg.rope_dim) and phi3_fits:
            return "Phi3ForCausalLM"
        if cfg.sliding_window or imported_as == "MistralForCausalLM":
            return "MistralForCausalLM"
        if cfg.qk_norm:
            return "Qwen3ForCausalLM"
        return "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"
    if cfg.arch == "bert":
        if cfg.n_classes:
            return "BertForSequenceClassification"
        return imported_as if imported_as in ("BertModel", "BertForMaskedLM") else "BertForMaskedLM"
    raise HFError(f"--arch {cfg.arch} has no Hugging Face form in twinlm")
