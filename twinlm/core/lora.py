"""LoRA (low-rank adaptation) outside the graph: folding trained adapters into the weights they adapt.

In the graph (`core.layers.linear`), an adapted layer computes x W + b + (dropout(x) a) b' * alpha / r with
W frozen, a (in, r) ~ N(0, 1/in) and b' (r, out) = 0 at the start, so the adapted model starts exactly as
the pretrained one. Merging gives a plain model that computes the same function without the adapters.
"""

from __future__ import annotations

import numpy as np

from twinlm.core import quant
from twinlm.core.config import ModelConfig
from twinlm.core.dtypes import as_float32
from twinlm.core.models import family

SUFFIXES = (".lora_a", ".lora_b")


def merged(cfg: ModelConfig, params: dict[str, np.ndarray]) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """(config without LoRA, params with W + alpha / r * a @ b in place of each adapted W), in float64
    then rounded once to float32 (the adapted weights of a bfloat16/float16 base included). A quantized model
    (QLoRA's base) comes out dequantized, all float32."""
    if cfg.quant_bits:
        spec = family(cfg.arch).param_spec(cfg)
        params = quant.dequantize_params(params, spec, cfg.quant_bits, cfg.quant_group_size)
        cfg = cfg.without_quant()
    if not cfg.lora_rank:
        return cfg, params
    out = {k: v for k, v in params.items() if not k.endswith(SUFFIXES)}
    for name in params:
        if name.endswith(".lora_a"):
            layer = name[:-len(".lora_a")]
            a, b = (as_float32(params[k]).astype(np.float64) for k in (name, f"{layer}.lora_b"))
            w = as_float32(params[f"{layer}.weight"])
            out[f"{layer}.weight"] = (w + cfg.lora_scale * (a @ b)).astype(np.float32)
    return cfg.without_lora(), out
