"""The parity suite's models of the 2024-25 families' pieces and of chat data's masked loss: the "modern"
variant (every piece at once, on chat-style batches; in the default `twinlm parity`) and "gemma3" (linear
RoPE scaling; by --arch only), each piece with a negative control that the suite catches. The default
`twinlm parity` runs both variants' checks on mlx, tinygrad and numpy; here MLX against numpy keeps CI fast
(test_parity.py's CLI tests run the modern variant's clean checks and every control too)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import backend_or_skip

from twinlm import parity
from twinlm.core.config import ModelConfig
from twinlm.parity import Side
from twinlm.tasks.chat import chat_loss

# Each piece of the layer library the variants turn on, and the control that must catch it wrong.
PIECES = {
    "RoPE scaling, llama3": ("modern", "llama3-original-context"),
    "RoPE scaling, any (llama3 here)": ("modern", "rope-scaling-skipped"),
    "RoPE scaling, linear": ("gemma3", "rope-scaling-skipped"),
    "RoPE base per layer": ("modern", "local-rope-base"),
    "partial rotary": ("modern", "partial-rotary-whole-head"),
    "q/k/v bias": ("modern", "qkv-bias-dropped"),
    "explicit head size": ("modern", "head-size-scale"),
    "per-head q/k RMSNorm": ("modern", "qk-norm-skipped"),
    "sliding window": ("modern", "window-off-by-one"),
    "per-layer window pattern": ("modern", "window-every-layer"),
    "attention soft-cap": ("modern", "attn-softcap-dropped"),
    "final-logit soft-cap": ("modern", "final-softcap-dropped"),
    "query_pre_attn_scalar": ("modern", "query-scale-ignored"),
    "RMSNorm (1 + w)": ("modern", "norm-offset-dropped"),
    "sqrt(d) embedding scale": ("modern", "embed-scale-skipped"),
    "post-attention and post-MLP norms": ("modern", "post-norms-skipped"),
    "GeGLU (tanh GELU gate)": ("modern", "geglu-erf"),
    "assistant-only loss mask": ("modern", "loss-mask-ignored"),
    "assistant-only loss mask, alignment": ("modern", "loss-mask-shifted"),
}


def _suite(arch: str, **kw) -> parity.Suite:
    return parity.Suite.of([backend_or_skip("mlx"), backend_or_skip("numpy")], arch, "tiny", 32, steps=3,
                           batch=2, **kw)


@pytest.mark.parametrize("preset", ["tiny", "small", "baby"])
def test_the_modern_variant_turns_every_piece_on(preset: str) -> None:
    c = parity.arch_config("modern", preset)
    assert c.arch == "llama" and c.head_dim != c.d_model // c.n_head and 1 < c.n_kv_head < c.n_head
    assert 0 < c.rope_dim < c.head_dim
    assert c.qkv_bias and c.qk_norm and c.rope_type == "llama3" and c.rope_local_theta > 0
    assert {c.sliding(i) for i in range(c.n_layer)} == {True, False} and c.sliding_window < 8
    assert c.attn_softcap and c.final_softcap and c.query_scale not in (0, c.head_dim)
    assert c.norm_offset and c.embed_scale and c.post_norms and c.activation == "geglu_tanh"
    assert parity.arch_config("gemma3", preset).rope_type == "linear"
    assert parity.VARIANTS["modern"].masked and "modern" in parity.DEFAULT_ARCHS
    assert "gemma3" in parity.ARCHS and "gemma3" not in parity.DEFAULT_ARCHS  # CI's time: by --arch only


def test_every_piece_has_a_control_that_applies() -> None:
    applicable = {arch: {c.name for c in _suite(arch).controls()} for arch in ("modern", "gemma3")}
    for piece, (arch, control) in PIECES.items():
        assert control in applicable[arch], (piece, arch, control)
    # No control of a piece a model lacks: the plain Llama gets none of them, nor the mask controls.
    llama = {c.name for c in _suite("llama").controls()}
    assert not llama & {control for _, control in PIECES.values()}


@pytest.fixture(scope="module")
def gemma3() -> parity.Suite:
    return _suite("gemma3")


def test_gemma3_variant_passes_and_its_linear_rope_control_is_caught(gemma3) -> None:
    clean = gemma3.run(phases=("model", "causal"))
    assert clean.ok and len(clean.checks) == 10, [c.label for c in clean.failures]  # logits, loss, causality
    report = gemma3.run(parity.control_named("rope-scaling-skipped"), phases=("model",))
    failed = {c.group for c in report.failures}
    assert "gemma3 model (unit-scale weights) mlx+rope-scaling-skipped vs numpy" in failed, sorted(failed)


@pytest.mark.slow
def test_gemma3_variant_catches_every_control(gemma3) -> None:
    missed = [c.name for c in gemma3.controls() if gemma3.run(c).ok]
    assert not missed


# ---- chat data's masked loss ---------------------------------------------------------------------

def test_chat_batches_mask_the_prompt_and_the_padding() -> None:
    cfg = parity.arch_config("modern", "tiny", 32)
    batch = parity.parity_batch(cfg, np.random.default_rng(0), 4, 16, masked=True)
    w = batch["w"]
    assert w.shape == batch["x"].shape == (4, 16) and set(np.unique(w)) == {0.0, 1.0}
    assert (w[:, 0] == 0).all() and (w.sum(axis=1) > 0).all()  # a prompt first; a target in every row
    starts = (np.diff(w, axis=1) > 0).sum(axis=1)
    assert (starts == 2).all()  # two assistant turns per conversation
    for row, x in zip(w, batch["x"], strict=True):  # padding after the last turn: token 0, no loss
        end = np.flatnonzero(row)[-1] + 1
        assert (x[end:] == 0).all() and (batch["y"][end - 1:] is not None)
    assert (w.sum(axis=1) < 16).all()


@pytest.mark.parametrize("name", ["numpy", "mlx"])
def test_the_suites_masked_loss_is_the_chat_tasks_loss(name: str) -> None:
    """Parity compares exactly what `twinlm train` on chat data computes: tasks.chat's loss."""
    B = backend_or_skip(name)
    cfg = parity.arch_config("modern", "tiny", 32)
    batch = parity.parity_batch(cfg, np.random.default_rng(1), 2, 16, masked=True)
    params = parity.unit_scale_params(cfg, 0)
    p = {k: B.from_numpy(v) for k, v in params.items()}
    on = {k: B.from_numpy(v) for k, v in batch.items()}
    got = float(B.to_numpy(parity.side_loss(Side.clean(B), cfg, p, on)))
    assert got == pytest.approx(float(B.to_numpy(chat_loss(B, cfg, p, on))), abs=1e-6)
    # the mean over the weighted targets only, from float64 logits
    logits = np.asarray(B.to_numpy(parity.side_logits(Side.clean(B), cfg, p, on)), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch["y"][..., None], -1)[..., 0]
    assert got == pytest.approx(float((nll * batch["w"]).sum() / batch["w"].sum()), abs=2e-5)
    for control in ("loss-mask-ignored", "loss-mask-shifted"):  # each moves the loss, not the logits
        side = Side.injected(B, parity.control_named(control))
        bad = float(B.to_numpy(parity.side_loss(side, cfg, p, {k: B.from_numpy(v) for k, v in
                                                               side.batch(batch).items()})))
        assert abs(bad - got) > 100 * parity.LOSS_TOL.atol, control


def test_mask_controls_are_caught_against_the_reference() -> None:
    suite = _suite("modern")
    for name in ("loss-mask-ignored", "loss-mask-shifted"):
        report = suite.run(parity.control_named(name), phases=("model",))
        failed = {c.label for c in report.failures}
        assert f"modern model (init weights) mlx+{name} vs numpy: loss" in failed, sorted(failed)
        assert not any(c.name == "logits" for c in report.failures)  # only the loss and its gradients


def test_a_config_only_control_reruns_no_ops() -> None:
    suite = _suite("modern")
    report = suite.run(parity.control_named("embed-scale-skipped"), phases=("primitives", "fused", "model"))
    assert report.checks and not any(c.group.startswith(("ops", "fused")) for c in report.checks)
    assert not report.ok


def test_modern_variant_float64_model_has_the_pieces() -> None:
    suite = _suite("modern")
    assert isinstance(suite.fd_cfg, ModelConfig) and suite.fd_cfg.qk_norm and suite.fd_cfg.sliding_window
    assert suite.masked and suite.name == "modern"
    assert suite.dropout == 0.0 and _suite("llama").dropout > 0  # one training graph: tinygrad's costliest
