"""BERT (`BertForMaskedLM`, `BertModel`, `BertForSequenceClassification`)."""

from __future__ import annotations

from typing import Any

from twinlm.core.config import ModelConfig
from twinlm.hf.archs.common import HFError, Link, _activation, _get, _hf_activation, _refuse_unless


def bert_config(hf: dict[str, Any]) -> dict[str, Any]:
    _refuse_unless(hf, "position_embedding_type", ("absolute",), "absolute")
    _refuse_unless(hf, "is_decoder", (False,), False)
    _refuse_unless(hf, "add_cross_attention", (False,), False)
    arch = (hf.get("architectures") or ["BertModel"])[0]
    n_classes = 0
    if arch == "BertForSequenceClassification":
        n_classes = len(_get(hf, "id2label", {})) or int(_get(hf, "num_labels", 2))
        if (
            n_classes < 2
            or _get(hf, "problem_type", "single_label_classification") != "single_label_classification"
        ):
            raise HFError(
                "twinlm fine-tunes single-label classifiers with at least two labels; this "
                f"BertForSequenceClassification is {hf.get('problem_type') or 'a regression'} "
                f"with {n_classes} label(s)"
            )
    if arch == "BertForMaskedLM" and not _get(hf, "tie_word_embeddings", True):
        raise HFError(
            "config.json unties the masked-LM decoder from the word embeddings; twinlm's BERT ties them"
        )
    return dict(
        arch="bert",
        vocab_size=hf["vocab_size"],
        block_size=hf["max_position_embeddings"],
        n_layer=hf["num_hidden_layers"],
        n_head=hf["num_attention_heads"],
        d_model=hf["hidden_size"],
        d_ff=hf["intermediate_size"],
        activation=_activation(hf, "hidden_act", "gelu"),
        norm_eps=float(_get(hf, "layer_norm_eps", 1e-12)),
        type_vocab_size=int(_get(hf, "type_vocab_size", 2)),
        dropout=float(_get(hf, "hidden_dropout_prob", 0.0)),
        n_classes=n_classes,
    )


def bert_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    if cfg.pos_encoding != "learned" or not cfg.type_vocab_size:
        raise HFError(
            "Hugging Face BERT has learned positions and token types; this run's BERT has "
            f"{cfg.pos_encoding} positions and {cfg.type_vocab_size} token types"
        )
    return dict(
        model_type="bert",
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.block_size,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        hidden_act=_hf_activation(cfg),
        layer_norm_eps=cfg.norm_eps,
        type_vocab_size=cfg.type_vocab_size,
        hidden_dropout_prob=cfg.dropout,
        attention_probs_dropout_prob=cfg.dropout,
        position_embedding_type="absolute",
        tie_word_embeddings=True,
        is_decoder=False,
    )


def bert_links(cfg: ModelConfig, hf_arch: str) -> list[Link]:
    pre = "" if hf_arch == "BertModel" else "bert."
    e = f"{pre}embeddings"
    out = [
        Link("wte.weight", (f"{e}.word_embeddings.weight",)),
        Link("wpe.weight", (f"{e}.position_embeddings.weight",)),
        Link("tte.weight", (f"{e}.token_type_embeddings.weight",)),
        Link("emb_ln.weight", (f"{e}.LayerNorm.weight",)),
        Link("emb_ln.bias", (f"{e}.LayerNorm.bias",)),
    ]
    C = cfg.d_model
    for i in range(cfg.n_layer):
        h, b = f"{pre}encoder.layer.{i}", f"blocks.{i}"
        sa = f"{h}.attention.self"
        out += [
            Link(
                f"{b}.attn.qkv.weight",
                tuple(f"{sa}.{x}.weight" for x in ("query", "key", "value")),
                True,
                (C, C, C),
            ),
            Link(
                f"{b}.attn.qkv.bias",
                tuple(f"{sa}.{x}.bias" for x in ("query", "key", "value")),
                False,
                (C, C, C),
            ),
        ]
        for twin, ours, t in (
            ("attn.proj", "attention.output.dense", True),
            ("ln_1", "attention.output.LayerNorm", False),
            ("mlp.fc", "intermediate.dense", True),
            ("mlp.proj", "output.dense", True),
            ("ln_2", "output.LayerNorm", False),
        ):
            out += [
                Link(f"{b}.{twin}.weight", (f"{h}.{ours}.weight",), t),
                Link(f"{b}.{twin}.bias", (f"{h}.{ours}.bias",)),
            ]
    if hf_arch in ("BertModel", "BertForSequenceClassification"):
        out += [
            Link("pooler.weight", (f"{pre}pooler.dense.weight",), True),
            Link("pooler.bias", (f"{pre}pooler.dense.bias",)),
        ]
    if hf_arch == "BertForMaskedLM":
        t = "cls.predictions.transform"
        out += [
            Link("mlm.dense.weight", (f"{t}.dense.weight",), True),
            Link("mlm.dense.bias", (f"{t}.dense.bias",)),
            Link("mlm.ln.weight", (f"{t}.LayerNorm.weight",)),
            Link("mlm.ln.bias", (f"{t}.LayerNorm.bias",)),
            Link("mlm.bias", ("cls.predictions.bias",)),
        ]
    if hf_arch == "BertForSequenceClassification":
        out += [Link("cls.weight", ("classifier.weight",), True), Link("cls.bias", ("classifier.bias",))]
    return out
