"""Model configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from twinlm.core.errors import ConfigError
from twinlm.core.models import FAMILIES, family

POS_ENCODINGS = ("learned", "sinusoidal", "rope", "none")
NORMS = ("layernorm", "rmsnorm", "none")  # none: identity (`twinlm experiment norm-residual`)
ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu", "geglu_tanh")  # geglu_tanh: gelu_tanh(gate) * up
ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")
# Layers LoRA can adapt, named within a block; short aliases that name one of them unambiguously.
LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
LORA_ALIASES = {"qkv": "attn.qkv", "fc": "mlp.fc", "all": LORA_TARGETS}
# Fields a family fills in when left None (see each family's DEFAULTS in core/models/).
FAMILY_FIELDS = ("bias", "pos_encoding", "norm", "activation", "norm_eps", "type_vocab_size")


@dataclass(frozen=True)
class ModelConfig:
    """One model of any registered family (`arch`). Fields left None take the family's default,
    so `ModelConfig(arch="llama")` is a Llama-style decoder and old GPT configs load unchanged."""

    vocab_size: int = 65
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: int = 0  # 0: 4 * d_model (SwiGLU: 8/3 * d_model rounded up to a multiple of 16)
    dropout: float = 0.0
    bias: bool | None = None
    tie_embeddings: bool = True
    pos_encoding: str | None = None  # "learned" | "sinusoidal" | "rope" | "none"
    arch: str = "gpt"
    n_kv_head: int = 0  # 0: n_head (grouped-query attention when smaller)
    norm: str | None = None  # "layernorm" | "rmsnorm" | "none"
    activation: str | None = None  # "gelu" (exact erf) | "gelu_tanh" | "swiglu"
    norm_eps: float | None = None
    rope_theta: float = 10000.0
    # RoPE frequency scaling (core.layers.rope_inv_freq): "default" (none), "linear" (every frequency /
    # factor) or "llama3" (Llama 3.1's: low frequencies / factor, high ones kept, a smooth ramp between).
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_positions: int = 0  # llama3 only: the pre-training context the wavelengths are measured by
    head_size: int = 0  # 0: d_model / n_head; else an explicit head size (Qwen3, Gemma)
    # > 0: RoPE rotates only each head's first rope_dim dimensions and the rest pass through unrotated
    # (partial_rotary_factor = rope_dim / head size, e.g. Phi-4-mini's 0.75); 0: the whole head
    rope_dim: int = 0
    qkv_bias: bool = False  # biases on q, k and v only (Qwen2), whatever `bias` says
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)
    sliding_window: int = 0  # > 0: a query sees only itself and the sliding_window - 1 keys before it ...
    layer_types: tuple[str, ...] = ()  # ... in the layers marked "sliding_attention" (() : every layer)
    rope_local_theta: float = 0.0  # > 0: the RoPE base of the sliding-window layers, unscaled (Gemma 3)
    # Gemma's pieces: RMSNorm gains stored as w in x * (1 + w); embeddings times sqrt(d_model); a norm on the
    # attention's and the MLP's outputs before each residual add; scores scaled by query_scale^-1/2 instead of
    # head_dim^-1/2 (query_pre_attn_scalar); final logits soft-capped to (-cap, cap) by cap * tanh(x / cap).
    norm_offset: bool = False
    embed_scale: bool = False
    post_norms: bool = False
    query_scale: float = 0.0
    final_softcap: float = 0.0
    attn_softcap: float = 0.0  # > 0: attention scores soft-capped the same way before the mask (Gemma 2)
    type_vocab_size: int | None = None  # BERT's token-type (segment) embeddings; 0: none
    n_classes: int = 0  # > 0: a classification head on the pooled representation
    lora_rank: int = 0  # > 0: low-rank adapters on `lora_targets`; every pretrained weight is frozen
    lora_alpha: float = 0.0  # adapter output scale alpha / rank; 0: 2 * rank
    lora_targets: tuple[str, ...] = ()  # () : all of LORA_TARGETS
    lora_dropout: float = 0.0  # dropout on each adapter's input
    residual: bool = True  # False: the decoder blocks drop their skip connections (x = f(norm(x)))
    # > 0: the linear layers' weights are stored quantized (core.quant: bits 4 or 8, per group of
    # quant_group_size inputs); norms, biases and learned position tables stay float
    quant_bits: int = 0
    quant_group_size: int = 0
    # True: the token embedding (which a tied head shares) and an untied LM head are quantized too; False
    # (a run quantized before this field existed, or `quantize --keep-embedding`): they stay float
    quant_embedding: bool = False

    def __post_init__(self) -> None:
        fam = family(self.arch)  # raises ConfigError for an unknown arch
        for name in FAMILY_FIELDS:
            if getattr(self, name) is None:
                object.__setattr__(self, name, fam.DEFAULTS[name])
        if self.n_kv_head == 0:
            object.__setattr__(self, "n_kv_head", self.n_head)
        if self.d_ff == 0:
            d_ff = 4 * self.d_model
            if self.activation in ("swiglu", "geglu_tanh"):  # a 4x GELU MLP's parameter count (Llama's rule)
                d_ff = -(-(8 * self.d_model // 3) // 16) * 16
            object.__setattr__(self, "d_ff", d_ff)
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "d_ff", "n_kv_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.head_size, int) or isinstance(self.head_size, bool) or self.head_size < 0:
            raise ConfigError(f"head_size must be a non-negative integer, got {self.head_size!r}")
        if not self.head_size and self.d_model % self.n_head:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        for name, allowed in (("pos_encoding", POS_ENCODINGS), ("norm", NORMS), ("activation", ACTIVATIONS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
            if getattr(self, name) not in fam.CHOICES.get(name, allowed):
                raise ConfigError(f"--arch {self.arch} does not take {name} {getattr(self, name)!r}; "
                                  f"choose from {', '.join(fam.CHOICES[name])}")
        if self.pos_encoding == "sinusoidal" and self.d_model % 2:
            raise ConfigError("sinusoidal positional encoding needs an even d_model")
        if self.pos_encoding == "rope" and self.head_dim % 2:
            raise ConfigError(f"rotary positions need an even head size, got {self.head_dim} "
                              f"(d_model {self.d_model} / n_head {self.n_head})")
        rd = self.rope_dim
        if not isinstance(rd, int) or isinstance(rd, bool) or rd < 0:
            raise ConfigError(f"rope_dim must be a non-negative integer (0: the whole head), got {rd!r}")
        if rd and (self.pos_encoding != "rope" or rd % 2 or rd > self.head_dim):
            raise ConfigError(f"rope_dim {rd} needs rotary positions and an even size up to the head size "
                              f"({self.head_dim})")
        if not (isinstance(self.norm_eps, (int, float)) and 0 < self.norm_eps < 1):
            raise ConfigError(f"norm_eps must be in (0, 1), got {self.norm_eps!r}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta!r}")
        self._check_rope_scaling()
        self._check_window()
        for name in ("rope_local_theta", "query_scale", "final_softcap", "attn_softcap"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
                raise ConfigError(f"{name} must be a non-negative number (0: off), got {value!r}")
        self._check_lora()
        if self.lora_rank and getattr(fam, "RECURRENT", False):
            raise ConfigError(f"LoRA adapts attention and MLP layers; --arch {self.arch} has none")
        if self.residual is not True and (self.residual is not False
                                          or False not in fam.CHOICES.get("residual", (True, False))):
            can = [a for a in FAMILIES if False in family(a).CHOICES.get("residual", (True, False))]
            raise ConfigError(f"residual must be true or false, and only {' and '.join(can)} can drop it; "
                              f"got {self.residual!r} for --arch {self.arch}")
        self._check_quant()
        for name in ("type_vocab_size", "n_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")

    def _check_rope_scaling(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope_type must be one of {', '.join(ROPE_TYPES)}, got {self.rope_type!r}")
        if self.rope_type == "default":
            return
        if self.pos_encoding != "rope":
            raise ConfigError(f"rope_type {self.rope_type!r} scales rotary positions; this model has "
                              f"{self.pos_encoding} positions")
        if not (isinstance(self.rope_factor, (int, float)) and self.rope_factor >= 1.0):
            raise ConfigError(f"rope_factor must be a number >= 1, got {self.rope_factor!r}")
        if self.rope_type == "llama3":
            if not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
                raise ConfigError("llama3 RoPE needs 0 < rope_low_freq_factor < rope_high_freq_factor, got "
                                  f"{self.rope_low_freq_factor} and {self.rope_high_freq_factor}")
            if not (isinstance(self.rope_original_positions, int) and self.rope_original_positions > 0):
                raise ConfigError("llama3 RoPE needs rope_original_positions > 0 (the pre-training context), "
                                  f"got {self.rope_original_positions!r}")

    def _check_window(self) -> None:
        w = self.sliding_window
        if not isinstance(w, int) or isinstance(w, bool) or w < 0:
            raise ConfigError(f"sliding_window must be a non-negative integer, got {w!r}")
        if self.layer_types:
            if len(self.layer_types) != self.n_layer or not set(self.layer_types) <= set(LAYER_TYPES):
                raise ConfigError(f"layer_types must name one of {', '.join(LAYER_TYPES)} for each of the "
                                  f"{self.n_layer} layers, got {list(self.layer_types)}")
            if "sliding_attention" in self.layer_types and not w:
                raise ConfigError("layer_types has sliding_attention layers but sliding_window is 0")
        if w and self.kind != "decoder":
            raise ConfigError(f"a sliding window is a causal decoder's; --arch {self.arch} is an {self.kind}")

    def sliding(self, layer: int) -> bool:
        """Whether `layer` attends through the sliding window."""
        return bool(self.sliding_window) and (not self.layer_types
                                              or self.layer_types[layer] == "sliding_attention")

    @property
    def rope_scaling(self) -> tuple[Any, ...]:
        """The RoPE scaling as a hashable tuple (core.layers.rope_inv_freq's argument); () for none."""
        if self.rope_type == "default":
            return ()
        if self.rope_type == "linear":
            return ("linear", float(self.rope_factor))
        return ("llama3", float(self.rope_factor), float(self.rope_low_freq_factor),
                float(self.rope_high_freq_factor), int(self.rope_original_positions))

    def _check_lora(self) -> None:
        r = self.lora_rank
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise ConfigError(f"lora_rank must be a non-negative integer, got {r!r}")
        if not r:
            if self.lora_targets or self.lora_alpha or self.lora_dropout:
                raise ConfigError("lora_alpha, lora_targets and lora_dropout need lora_rank > 0")
            return
        object.__setattr__(self, "lora_alpha", float(self.lora_alpha or 2 * r))
        if not self.lora_alpha > 0:
            raise ConfigError(f"lora_alpha must be positive, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        object.__setattr__(self, "lora_targets", lora_targets(self.lora_targets))

    def _check_quant(self) -> None:
        from twinlm.core.quant import BITS, GROUP_SIZES

        bits, g = self.quant_bits, self.quant_group_size
        if not isinstance(self.quant_embedding, bool):
            raise ConfigError(f"quant_embedding must be true or false, got {self.quant_embedding!r}")
        if not bits and not g:
            if self.quant_embedding:
                raise ConfigError("quant_embedding needs quant_bits and quant_group_size (a quantized model)")
            return
        if bits not in BITS or g not in GROUP_SIZES:
            raise ConfigError(f"quant_bits must be one of {', '.join(map(str, BITS))} and quant_group_size "
                              f"one of {', '.join(map(str, GROUP_SIZES))} (both 0: not quantized), got "
                              f"{bits!r} and {g!r}")
        if getattr(family(self.arch), "RECURRENT", False):
            raise ConfigError(f"quantization stores attention and MLP layers; --arch {self.arch} has none")

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    @property
    def head_dim(self) -> int:
        return self.head_size or self.d_model // self.n_head

    @property
    def rotary_dim(self) -> int:
        """How many of each head's dimensions RoPE rotates (the first ones)."""
        return self.rope_dim or self.head_dim

    @property
    def kind(self) -> str:
        """"decoder" (causal, next-token LM) or "encoder" (bidirectional, masked LM)."""
        return family(self.arch).KIND

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model config keys: {sorted(unknown)}")
        for key in ("lora_targets", "layer_types"):
            if isinstance(d.get(key), list):  # JSON has no tuples
                d = {**d, key: tuple(d[key])}
        return cls(**d)

    def replace(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)

    def without_lora(self) -> ModelConfig:
        return replace(self, lora_rank=0, lora_alpha=0.0, lora_targets=(), lora_dropout=0.0)

    def without_quant(self) -> ModelConfig:
        return replace(self, quant_bits=0, quant_group_size=0, quant_embedding=False)


def lora_targets(names: Any) -> tuple[str, ...]:
    """LoRA target names (a comma-separated string or a sequence; aliases resolved), in LORA_TARGETS order."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    chosen: set[str] = set()
    for name in names or ["all"]:
        found = LORA_ALIASES.get(name, name)
        found = (found,) if isinstance(found, str) else found
        if not set(found) <= set(LORA_TARGETS):
            hint = " (both projections are named proj: say attn.proj or mlp.proj)" if name == "proj" else ""
            raise ConfigError(f"unknown LoRA target {name!r}{hint}; choose from {', '.join(LORA_TARGETS)}, "
                              f"qkv, fc or all")
        chosen.update(found)
    return tuple(t for t in LORA_TARGETS if t in chosen)


# Named sizes. "baby" is nanoGPT's CPU baby GPT (4 layers, 4 heads, 128 wide, block 64).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_head=2, d_model=32, block_size=32),
    "small": dict(n_layer=2, n_head=4, d_model=64, block_size=32),
    "baby": dict(n_layer=4, n_head=4, d_model=128, block_size=64),
    "medium": dict(n_layer=6, n_head=6, d_model=384, block_size=256),
}


# Training settings that come with a preset, used where neither a flag nor the config file sets them
# (nanoGPT's: the CPU baby GPT's command line, and shakespeare_char's config for the 6x384 model).
PRESET_TRAINING: dict[str, dict[str, Any]] = {
    "baby": dict(batch_size=12, lr=1e-3, max_iters=2000),
    "medium": dict(batch_size=64, lr=1e-3, max_iters=5000),
}


def preset_training(name: str | None) -> dict[str, Any]:
    """The training defaults of preset `name` (empty for presets without any, or an unknown name)."""
    return dict(PRESET_TRAINING.get(name or "", {}))


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The config for a named preset, with field overrides (e.g. vocab_size)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
