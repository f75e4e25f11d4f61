"""Model configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from twinlm.core.errors import TwinlmError


class ConfigError(TwinlmError, ValueError):
    """A model configuration that cannot be built."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 65
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: int = 0  # 0 means 4 * d_model
    dropout: float = 0.0
    bias: bool = True
    tie_embeddings: bool = True
    pos_encoding: str = "learned"  # "learned" | "sinusoidal"

    def __post_init__(self) -> None:
        if self.d_ff == 0:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_head:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.pos_encoding not in ("learned", "sinusoidal"):
            raise ConfigError(f"pos_encoding must be 'learned' or 'sinusoidal', got {self.pos_encoding!r}")
        if self.pos_encoding == "sinusoidal" and self.d_model % 2:
            raise ConfigError("sinusoidal positional encoding needs an even d_model")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> ModelConfig:
        return replace(self, **changes)


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
