"""PyTorch eager reference of the same graph and optimizer, written the way a PyTorch user would.

Same architecture as `twinlm.core.model` (pre-norm blocks, exact-erf GELU, LayerNorm eps 1e-5,
tied embeddings, learned positions), the same numpy initialisation, and the same AdamW (bias
corrected, decoupled decay on ndim >= 2 tensors, global-norm clipping, warmup + cosine schedule).
PyTorch's own fused paths are used where a user would use them (`scaled_dot_product_attention`,
`F.layer_norm`, `F.gelu`, `torch.optim.AdamW`), so the ratio twinlm / PyTorch is against a fair,
idiomatic baseline. Needs the optional `[bench]` extra (torch==2.13.0); never used by tests.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from twinlm.core import optim
from twinlm.core.config import ModelConfig
from twinlm.core.model import param_spec


def _linear(p: dict[str, torch.Tensor], name: str, t: torch.Tensor, scale: float = 0.0) -> torch.Tensor:
    """x @ W + b (W stored (in, out), as twinlm stores it), plus a LoRA adapter's (x @ A) @ B * scale."""
    w, b = p[f"{name}.weight"], p[f"{name}.bias"]
    flat = t.reshape(-1, t.shape[-1])
    out = torch.addmm(b, flat, w)
    if f"{name}.lora_a" in p:
        out = out + (flat @ p[f"{name}.lora_a"]) @ p[f"{name}.lora_b"] * scale
    return out.reshape(*t.shape[:-1], w.shape[1])


def _norm(p: dict[str, torch.Tensor], name: str, t: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(t, (t.shape[-1],), p[f"{name}.weight"], p[f"{name}.bias"], 1e-5)


def forward_loss(cfg: ModelConfig, p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                 training: bool = True) -> torch.Tensor:
    """Mean next-token cross-entropy of targets `y` (B, T) given tokens `x` (B, T)."""
    B, T = x.shape
    C, H = cfg.d_model, cfg.n_head
    drop = cfg.dropout if training else 0.0
    s = cfg.lora_scale
    gelu = "tanh" if cfg.activation == "gelu_tanh" else "none"
    h = F.dropout(p["wte.weight"][x] + p["wpe.weight"][:T], drop, training)  # (B, T, C)
    for i in range(cfg.n_layer):
        pre = f"blocks.{i}"
        qkv = _linear(p, f"{pre}.attn.qkv", _norm(p, f"{pre}.ln_1", h), s)
        q, k, v = qkv.view(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4)  # each (B, H, T, hs)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        a = a.transpose(1, 2).reshape(B, T, C)
        h = h + F.dropout(_linear(p, f"{pre}.attn.proj", a, s), drop, training)
        fc = _linear(p, f"{pre}.mlp.fc", _norm(p, f"{pre}.ln_2", h), s)
        m = _linear(p, f"{pre}.mlp.proj", F.gelu(fc, approximate=gelu), s)
        h = h + F.dropout(m, drop, training)
    h = _norm(p, "ln_f", h)
    logits = h @ p["wte.weight"].T  # (B, T, V)
    return F.cross_entropy(logits.view(-1, cfg.vocab_size), y.reshape(-1))


class TorchTrainer:
    """`trainer.step(x, y, it) -> loss`: forward, backward, clip, AdamW, like twinlm's compiled step."""

    def __init__(self, cfg: ModelConfig, opt: optim.AdamWConfig, params: dict[str, np.ndarray]) -> None:
        if cfg.arch != "gpt" or not (cfg.bias and cfg.tie_embeddings and cfg.pos_encoding == "learned"):
            raise ValueError("the PyTorch reference is GPT with biases, tied embeddings, learned positions")
        self.cfg, self.opt = cfg, opt
        spec = param_spec(cfg)  # the same decay and frozen (LoRA) choices as twinlm's AdamW
        self.params = {k: torch.tensor(v, requires_grad=spec[k].trainable) for k, v in params.items()}
        trained = {k: t for k, t in self.params.items() if spec[k].trainable}
        decay = [t for k, t in trained.items() if spec[k].decay]
        no_decay = [t for k, t in trained.items() if not spec[k].decay]
        self.trained = list(trained.values())
        self.adamw = torch.optim.AdamW([{"params": decay, "weight_decay": opt.weight_decay},
                                        {"params": no_decay, "weight_decay": 0.0}],
                                       lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps)

    def step(self, x: np.ndarray, y: np.ndarray, it: int) -> float:
        loss = forward_loss(self.cfg, self.params, torch.from_numpy(x).long(), torch.from_numpy(y).long())
        self.adamw.zero_grad(set_to_none=True)
        loss.backward()
        if self.opt.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.trained, self.opt.grad_clip)
        for group in self.adamw.param_groups:
            group["lr"] = optim.lr_at(it, self.opt)
        self.adamw.step()
        return float(loss.detach())

    def eval_loss(self, x: np.ndarray, y: np.ndarray) -> float:
        with torch.no_grad():
            return float(forward_loss(self.cfg, self.params, torch.from_numpy(x).long(),
                                      torch.from_numpy(y).long(), training=False))
