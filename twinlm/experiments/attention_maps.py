"""Attention probabilities of a model on given tokens, per layer and head, and what they say about each head:
mean attention distance (how far back it looks) and entropy (how spread out it is).

The maps come from the model's own forward pass: the backend's `attention` composite is swapped, on a
copy of the backend, for the reference body that also keeps softmax(q k^T / sqrt(hs)). Nothing else in
the graph changes, so the maps are the ones the model's logits were computed with.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from twinlm.core import model
from twinlm.core.backend import Array, Backend
from twinlm.core.config import ModelConfig
from twinlm.core.errors import TwinlmError
from twinlm.core.models import attends


class _RecordingAttention:
    """Backend mixin: the reference attention, recording each call's probabilities (N, H, Tq, Tk)."""

    maps: list[np.ndarray]

    # k and v repeated per query head (not its query axis folded), so a map is one query head's
    grouped_attention = Backend._attention_repeating_kv

    def attention(self: Any, q: Array, k: Array, v: Array, mask: Array | None,
                  dropout: Array | None = None, softcap: float = 0.0) -> Array:
        scores = (q @ self.transpose(k, (0, 1, 3, 2))) * (1.0 / math.sqrt(q.shape[-1]))
        if softcap:  # as Backend.attention: before the mask
            scores = self.tanh(scores * (1.0 / softcap)) * softcap
        if mask is not None:
            scores = self.where(mask, scores, -math.inf)
        att = self.softmax(scores, axis=-1)
        self.maps.append(self.to_numpy(att))
        return (att if dropout is None else att * dropout) @ v


def attention_maps(B: Backend, cfg: ModelConfig, params: dict[str, Any], ids: np.ndarray) -> np.ndarray:
    """Probabilities (n_layer, batch, H, T, T) of every layer and head for token ids (batch, T)."""
    from twinlm.parity import with_mixin

    if not attends(cfg):
        raise TwinlmError(f"an --arch {cfg.arch} model has no attention to show")
    rec = with_mixin(B, _RecordingAttention, "Recording")
    rec.maps = []
    p = {k: B.from_numpy(np.asarray(v)) if isinstance(v, np.ndarray) else v for k, v in params.items()}
    model.logits(rec, cfg, p, B.from_numpy(np.asarray(ids, dtype=np.int32)))
    return np.stack(rec.maps)


def head_stats(maps: np.ndarray) -> dict[str, np.ndarray]:
    """Per (layer, head): mean attention distance in tokens (sum_j p_ij |i - j|, averaged over queries and
    the batch) and mean entropy in nats (-sum_j p_ij log p_ij). Queries after the first few are used, so a
    causal model's first positions (which can only look at a handful of keys) do not dominate."""
    t = maps.shape[-1]
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    start = min(4, t - 1)
    dist = (maps * np.abs(i - j)).sum(-1)[..., start:]  # (L, B, H, Tq)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(maps > 0, maps * np.log(maps), 0.0).sum(-1)[..., start:]
    return {"mean_distance": dist.mean(axis=(1, 3)), "entropy": ent.mean(axis=(1, 3))}


def plot_maps(maps: np.ndarray, tokens: list[str], out: Path, title: str, footer: str) -> None:
    """A grid of images, one per (layer, head), of one example's probabilities (n_layer, H, T, T)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layer, n_head, t, _ = maps.shape
    fig, axes = plt.subplots(n_layer, n_head, figsize=(2.6 * n_head + 0.6, 2.6 * n_layer + 0.8), dpi=110,
                             squeeze=False)
    labels = [repr(c)[1:-1] for c in tokens]
    for li in range(n_layer):
        for h in range(n_head):
            ax = axes[li][h]
            im = ax.imshow(maps[li, h], cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_title(f"layer {li} head {h}", fontsize=8)
            ax.set_xticks(range(t), labels if t <= 40 else [""] * t, fontsize=5, rotation=90)
            ax.set_yticks(range(t), labels if t <= 40 else [""] * t, fontsize=5)
            if h == 0:
                ax.set_ylabel("query token", fontsize=7)
            if li == n_layer - 1:
                ax.set_xlabel("key token (attended to)", fontsize=7)
    fig.colorbar(im, ax=axes, shrink=0.6, label="attention probability")
    fig.suptitle(title, fontsize=10)
    fig.text(0.01, 0.005, footer, fontsize=7, color="0.4")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)
