"""Tiny random Hugging Face models of every architecture twinlm imports, built with `transformers` and
saved to a local folder with a tokenizer trained on generated text: nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

TEXT = "".join(
    f"the {w} sat on the {v} mat and said {w}{v}.\n"
    for w in ("cat", "dog", "owl", "fox", "bee")
    for v in ("red", "big", "odd", "wet")
)
VOCAB = 300
ARCHITECTURES = (
    "GPT2LMHeadModel",
    "LlamaForCausalLM",
    "BertForMaskedLM",
    "BertModel",
    "BertForSequenceClassification",
)


def byte_bpe(vocab: int = VOCAB):  # GPT-2 / Llama style: byte-level BPE
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TEXT], trainer=trainer)
    return tok


def wordpiece(vocab: int = 120):  # BERT style
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab, show_progress=False, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    )
    tok.train_from_iterator([TEXT], trainer=trainer)
    return tok


def build(
    architecture: str, folder: Path, *, seed: int = 0, init: float = 0.2, tied: bool | None = None,
    positions: int = 64,
) -> Path:
    """Save a tiny random `architecture` with its tokenizer in `folder`; weights N(0, init) so logits are
    far apart (greedy decoding then never hinges on a near tie)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    if architecture in ("GPT2LMHeadModel", "LlamaForCausalLM"):
        lib = byte_bpe()
        fast = tf.PreTrainedTokenizerFast(tokenizer_object=lib, bos_token="<s>", eos_token="</s>")
        n = lib.get_vocab_size()
        if architecture == "GPT2LMHeadModel":
            cfg = tf.GPT2Config(
                n_layer=2,
                n_head=2,
                n_embd=32,
                n_positions=positions,
                vocab_size=n,
                initializer_range=init,
                bos_token_id=0,
                eos_token_id=1,
                tie_word_embeddings=True if tied is None else tied,
            )
        else:
            cfg = tf.LlamaConfig(
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                hidden_size=32,
                intermediate_size=48,
                vocab_size=n,
                max_position_embeddings=positions,
                rope_theta=500.0,
                rms_norm_eps=1e-5,
                initializer_range=init,
                bos_token_id=0,
                eos_token_id=1,
                tie_word_embeddings=False if tied is None else tied,
            )
    else:
        lib = wordpiece()
        fast = tf.PreTrainedTokenizerFast(
            tokenizer_object=lib,
            pad_token="[PAD]",
            unk_token="[UNK]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
        )
        cfg = tf.BertConfig(
            num_hidden_layers=2,
            num_attention_heads=2,
            hidden_size=32,
            intermediate_size=64,
            vocab_size=lib.get_vocab_size(),
            max_position_embeddings=positions,
            initializer_range=init,
            num_labels=3,
            id2label={0: "neg", 1: "neu", 2: "pos"},
            label2id={"neg": 0, "neu": 1, "pos": 2},
        )
    model = getattr(tf, architecture)(cfg).eval()
    with torch.no_grad():  # transformers zeroes biases and sets norm gains to 1: make every weight matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                p.add_(torch.randn_like(p) * 0.1)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = 1
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return Path(folder)


# ---- the modern families: each real model's config.json with its sizes shrunk -------------------------
# Every field but the sizes is the real file's (ids of special tokens are the tiny tokenizer's). Widths are
# 64 with 4 heads; RoPE's pre-training context is 16 positions so a 48-token test runs well past it.
SHRUNK = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1)
MODERN: dict[str, tuple[str, dict]] = {
    "Llama-3.2-1B": ("LlamaForCausalLM", dict(
        attention_bias=False, attention_dropout=0.0, head_dim=16, hidden_act="silu", mlp_bias=False,
        pretraining_tp=1, rms_norm_eps=1e-05, rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling=dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                          original_max_position_embeddings=16, rope_type="llama3"))),
    "Qwen2.5-0.5B": ("Qwen2ForCausalLM", dict(
        attention_dropout=0.0, hidden_act="silu", max_window_layers=24, rms_norm_eps=1e-06,
        rope_theta=1000000.0, sliding_window=32768, tie_word_embeddings=True, use_mrope=False,
        use_sliding_window=False)),
    "Qwen3-0.6B": ("Qwen3ForCausalLM", dict(
        attention_bias=False, attention_dropout=0.0, head_dim=32, hidden_act="silu", max_window_layers=28,
        rms_norm_eps=1e-06, rope_scaling=None, rope_theta=1000000, sliding_window=None,
        tie_word_embeddings=True, use_sliding_window=False)),
    # v0.1's 4096-token window, shrunk below the test sequences (v0.3 has none: the plain Llama path).
    "Mistral-7B-v0.1": ("MistralForCausalLM", dict(
        hidden_act="silu", rms_norm_eps=1e-05, rope_theta=10000.0, sliding_window=8,
        tie_word_embeddings=False)),
    # Phi-3-mini-4k: fused qkv_proj and gate_up_proj, full multi-head attention, a 2047-token window (here 7).
    "Phi-3-mini-4k": ("Phi3ForCausalLM", dict(
        attention_bias=False, attention_dropout=0.0, embd_pdrop=0.0, hidden_act="silu", num_key_value_heads=4,
        original_max_position_embeddings=64, pad_token_id=1, resid_pdrop=0.0, rms_norm_eps=1e-05,
        rope_scaling=None, rope_theta=10000.0, sliding_window=7, tie_word_embeddings=False)),
    # Phi-4-mini: Phi3ForCausalLM rotating 3/4 of each head (partial_rotary_factor 0.75: 12 of 16 here);
    # its longrope scaling, which twinlm refuses by name, is left out (the default RoPE, as Phi-3-mini-4k).
    "Phi-4-mini": ("Phi3ForCausalLM", dict(
        attention_bias=False, attention_dropout=0.0, embd_pdrop=0.0, hidden_act="silu", num_key_value_heads=2,
        original_max_position_embeddings=64, pad_token_id=1, partial_rotary_factor=0.75, resid_pdrop=0.0,
        rms_norm_eps=1e-05, rope_scaling=None, rope_theta=10000.0, sliding_window=None,
        tie_word_embeddings=True)),
    # Gemma-3-270M: head_dim 256 over 4 heads and 1 kv head, query_pre_attn_scalar 256, 5 sliding-window
    # layers (window 512, RoPE base 1e4) to 1 global (1e6); here one of each and a window of 8.
    "Gemma-3-270M": ("Gemma3ForCausalLM", dict(
        attention_bias=False, attention_dropout=0.0, attn_logit_softcapping=None,
        final_logit_softcapping=None,
        head_dim=32, hidden_activation="gelu_pytorch_tanh", num_key_value_heads=1, pad_token_id=1,
        query_pre_attn_scalar=256, rms_norm_eps=1e-06, rope_local_base_freq=10000.0, rope_theta=1000000.0,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        use_bidirectional_attention=False, tie_word_embeddings=True)),
    # Gemma-2-2B: head_dim 256, query_pre_attn_scalar 256, every other layer a 4096 window, attention scores
    # soft-capped at 50 and final logits at 30 (here caps 2 and 5 so they bind on tiny random weights).
    "Gemma-2-2B": ("Gemma2ForCausalLM", dict(
        attention_bias=False, attention_dropout=0.0, attn_logit_softcapping=2.0, final_logit_softcapping=5.0,
        head_dim=32, hidden_activation="gelu_pytorch_tanh", num_key_value_heads=2, pad_token_id=1,
        query_pre_attn_scalar=256, rms_norm_eps=1e-06, rope_theta=10000.0, sliding_window=8,
        tie_word_embeddings=True)),
}


def build_modern(name: str, folder: Path, *, seed: int = 0, init: float = 0.2,
                 eos_token_id: int | list[int] | None = None, **changes) -> Path:
    """Save a tiny random `MODERN[name]` model (config fields overridden by `changes`) with the byte-level
    tokenizer in `folder`; `eos_token_id` goes into generation_config.json (Llama 3.x and Qwen2.5 list
    several)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    architecture, fields = MODERN[name]
    lib = byte_bpe()
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=lib, bos_token="<s>", eos_token="</s>")
    config_class = getattr(tf, {"Gemma3ForCausalLM": "Gemma3TextConfig"}.get(
        architecture, architecture.replace("ForCausalLM", "Config")))
    cfg = config_class(**{**SHRUNK, **fields, "vocab_size": lib.get_vocab_size(), "initializer_range": init,
                          **changes})
    model = getattr(tf, architecture)(cfg).eval()
    with torch.no_grad():  # biases start at zero and norm gains at one: make every weight matter
        for pname, p in model.named_parameters():
            if pname.endswith("bias") or "norm" in pname.lower():
                p.add_(torch.randn_like(p) * 0.1)
    model.generation_config.pad_token_id = 1
    if eos_token_id is not None:
        model.generation_config.eos_token_id = eos_token_id
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return Path(folder)
