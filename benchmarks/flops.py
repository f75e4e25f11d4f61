"""Model FLOPs per token, counted the way nanoGPT/PaLM count them for MFU.

Training costs 3x the forward matmul FLOPs (forward, plus two matmuls per weight in backward):
6 * N_matmul per token (4 for a frozen weight: its input gradient, but no weight gradient), plus
attention 12 * n_layer * (n_head * head_dim) * T (q k^T and att v, forward and backward, counted over the
full T x T square as PaLM's appendix does), T the positions a step trains on: the training window, which a
fine-tune may set shorter than the model's context. Elementwise work, norms and the embedding gather are
not counted: MFU measures useful matmul work against the GEMM peak.
"""

from __future__ import annotations

import math

from twinlm.core.config import ModelConfig
from twinlm.core.model import param_spec


def matmul_params(cfg: ModelConfig, trainable: bool | None = None) -> int:
    """Weights that take part in a matmul, from the family's spec (only the trainable or frozen ones
    when `trainable` says which); a tied output head is the embedding. A quantized layer counts as the float
    weight it stores (its packed words multiply activations just the same)."""
    spec = param_spec(cfg.without_quant())
    n = sum(math.prod(s.shape) for s in spec.values() if s.matmul and trainable in (None, s.trainable))
    tied = cfg.tie_embeddings and trainable in (None, spec["wte.weight"].trainable)
    return n + (cfg.d_model * cfg.vocab_size if tied else 0)


def train_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> int:
    """Forward + backward FLOPs per token at sequence length `seq_len` (the training window; default
    block_size). The attention width is n_head * head_dim (not d_model where head_dim is explicit)."""
    t = cfg.block_size if seq_len is None else seq_len
    width = cfg.n_head * cfg.head_dim
    return 6 * matmul_params(cfg, True) + 4 * matmul_params(cfg, False) + 12 * cfg.n_layer * width * t


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the measured peak FLOP/s."""
    return flops_per_token * tokens_per_s / peak_flops if peak_flops > 0 else float("nan")
