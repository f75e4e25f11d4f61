"""What every architecture's link table and config translation share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twinlm.core.config import ModelConfig
from twinlm.core.errors import TwinlmError


class HFError(TwinlmError):
    """A Hugging Face folder twinlm cannot read or a run it cannot write as one."""


@dataclass(frozen=True)
class Link:
    twin: str  # the twinlm parameter
    hf: tuple[str, ...]  # the Hugging Face tensors, concatenated along the last axis
    transpose: bool = False  # the HF tensors are (out, in)
    sizes: tuple[int, ...] = ()  # the last-axis size of each HF part (several parts only)


def _get(hf: dict[str, Any], key: str, default: Any = None) -> Any:
    value = hf.get(key)
    return default if value is None else value


def _refuse_unless(hf: dict[str, Any], key: str, allowed: tuple[Any, ...], default: Any) -> None:
    value = _get(hf, key, default)
    if value not in allowed:
        raise HFError(
            f"config.json has {key} = {value!r}; twinlm implements only "
            f"{' or '.join(repr(a) for a in allowed)}, so it refuses this model rather than "
            "compute something else"
        )


def _activation(hf: dict[str, Any], key: str, default: str) -> str:
    act = _get(hf, key, default)
    mapped = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}.get(act)
    if mapped is None:
        raise HFError(
            f"config.json has {key} = {act!r}; twinlm implements gelu (exact erf) and the tanh "
            "form (gelu_new, gelu_pytorch_tanh)"
        )
    return mapped


def _hf_activation(cfg: ModelConfig) -> str:
    return {"gelu": "gelu", "gelu_tanh": "gelu_new"}[cfg.activation]  # type: ignore[index]
