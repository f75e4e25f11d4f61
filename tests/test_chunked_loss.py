"""The chunked LM loss (`model.lm_loss` under `B.remat`, issue #21): the head and the cross-entropy run over
chunks of positions, each inside `B.checkpoint`, so a 128,256-wide vocabulary's logits are never all alive.
Chunked and unchunked give the same loss and gradients (float32 rounding) with and without 0/1 weights, on
a vocabulary and sequence that make several chunks and a ragged last one; a chunk dropped, or chunks
averaged instead of summed, is caught."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import backend_or_skip, run_cli

from twinlm.core import model, quant
from twinlm.core.config import ModelConfig
from twinlm.core.params import init_params

# LoRA over a tied head: only a frozen head is chunked (a trainable one stays unchunked, tested below)
CFG = ModelConfig(arch="llama", vocab_size=64, block_size=32, n_layer=2, n_head=2, d_model=32, lora_rank=4)
ROWS = 16  # positions per chunk in these tests: 2 x 25 = 50 positions -> chunks of 16, 16, 16 and 2
SHAPE = (2, 25)


def _with_checkpoint(B: Any, wrap: Callable | None) -> Any:
    """A copy of B with remat on whose `checkpoint` records each call's input and may alter a chunk's
    (2-D input: the loss's chunks; 3-D: the model's blocks) output: the controls."""
    calls: list[tuple[int, ...]] = []

    class Recording(type(B)):  # type: ignore[misc]
        def checkpoint(self, fn, params, x):
            calls.append(tuple(x.shape))
            out = super().checkpoint(fn, params, x)
            return wrap(out, x, len(calls)) if wrap is not None and len(x.shape) == 2 else out

    R = copy.copy(B)
    R.__class__ = Recording
    R.remat = True
    R.calls = calls
    return R


def _adapters(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(4)  # adapters that change the function (lora_b starts at zero)
    return params | {k: (rng.standard_normal(v.shape) * 0.1).astype(np.float32)
                     for k, v in params.items() if k.endswith("lora_b")}


def _qlora() -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """CFG as QLoRA: a 4-bit base with its tied embedding (so the head) quantized, float rank-4 adapters."""
    qcfg = CFG.replace(quant_bits=4, quant_group_size=32, quant_embedding=True)
    return qcfg, _adapters(quant.quantize_params(init_params(CFG, 0), model.param_spec(qcfg), 4, 32))


def _loss_and_grads(B: Any, weights: bool, qlora: bool) -> tuple[float, dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    x, y = (B.from_numpy(rng.integers(0, CFG.vocab_size, SHAPE).astype(np.int32)) for _ in range(2))
    w = None
    if weights:
        w_np = (rng.random(SHAPE) < 0.6).astype(np.float32)
        w_np.reshape(-1)[16:32] = 0.0  # a whole chunk without a weighted target
        w = B.from_numpy(w_np)
    cfg, params = _qlora() if qlora else (CFG, _adapters(init_params(CFG, 0)))
    p = {k: B.from_numpy(v) for k, v in params.items()}
    train = {k: v for k, v in p.items() if "lora" in k}  # the adapters train, through the hidden states
    loss, g = B.value_and_grad(lambda t: model.lm_loss(B, cfg, p | t, x, y, w))(train)
    return float(B.to_numpy(loss)), {k: B.to_numpy(v) for k, v in g.items()}


def _gap(B: Any, wrap: Callable | None, weights: bool, monkeypatch: pytest.MonkeyPatch,
         qlora: bool = False) -> tuple[float, Any]:
    """The largest difference, loss and every gradient, between the unchunked loss and the chunked one."""
    monkeypatch.setattr(model, "LOSS_CHUNK_BYTES", ROWS * CFG.vocab_size * 4)
    loss, grads = _loss_and_grads(B, weights, qlora)
    R = _with_checkpoint(B, wrap)
    loss_c, grads_c = _loss_and_grads(R, weights, qlora)
    gap = abs(loss_c - loss) / abs(loss)
    for k in grads:
        scale = max(float(np.abs(grads[k]).max()), 1e-3)
        gap = max(gap, float(np.abs(grads_c[k] - grads[k]).max()) / scale)
    return gap, R


TOL = 2e-5  # float32 summation order, relative to the loss and to each gradient's largest entry


@pytest.mark.parametrize("weights", [False, True], ids=["mean", "weighted"])
@pytest.mark.parametrize(("backend", "qlora"), [
    ("mlx", False), ("mlx", True),
    pytest.param("tinygrad", False, marks=pytest.mark.slow),  # ~15-60 s of tinygrad compiles; MLX checks fast
])
def test_chunked_loss_equals_the_unchunked_one(backend: str, qlora: bool, weights: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """On MLX the chunks are recomputing checkpoints (QLoRA: over the quantized tied head); tinygrad refuses
    --grad-checkpoint (its `checkpoint` is the plain call), but the chunked graph is core maths: right there
    too."""
    B = backend_or_skip(backend)
    gap, R = _gap(B, None, weights, monkeypatch, qlora)
    chunks = [s for s in R.calls if len(s) == 2]
    assert chunks == [(16, 32), (16, 32), (16, 32), (2, 32)], R.calls  # several chunks, a ragged last one
    assert gap < TOL, gap


@pytest.mark.parametrize(("control", "wrap"), [
    ("a chunk dropped", lambda out, x, i: out * 0.0 if x.shape[0] == 2 else out),
    ("chunks averaged, not summed", lambda out, x, i: out * (ROWS / x.shape[0])),
])
@pytest.mark.parametrize("weights", [False, True], ids=["mean", "weighted"])
def test_control_a_wrong_chunk_sum_is_caught(control: str, wrap: Callable, weights: bool,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    B = backend_or_skip("mlx")
    gap, _ = _gap(B, wrap, weights, monkeypatch)
    assert gap > 100 * TOL, (control, gap)


def test_chunk_size_follows_the_vocabulary() -> None:
    assert model.loss_chunk_rows(128_256) == 128  # Llama 3: 128 x 128,256 x 4 bytes = 63 MiB of logits
    assert model.loss_chunk_rows(49_152) == 256  # SmolLM2
    assert model.loss_chunk_rows(1 << 30) == 1
    for v in (65, 50_257, 151_936, 262_144):
        rows = model.loss_chunk_rows(v)
        assert rows * v * 4 <= model.LOSS_CHUNK_BYTES < 2 * rows * v * 4 and rows & (rows - 1) == 0


def test_without_remat_or_with_a_trainable_head_the_loss_is_the_unchunked_graph() -> None:
    """Bit-identical to the cross-entropy of the model's logits, as before the chunked loss existed; with
    remat on, a head that trains (full training) stays unchunked: no checkpoint of 2-D chunks."""
    B = backend_or_skip("mlx")
    rng = np.random.default_rng(2)
    x, y = (B.from_numpy(rng.integers(0, CFG.vocab_size, SHAPE).astype(np.int32)) for _ in range(2))
    full = ModelConfig(arch="llama", vocab_size=64, block_size=32, n_layer=2, n_head=2, d_model=32)
    p = {k: B.from_numpy(v) for k, v in init_params(full, 0).items()}
    want = B.to_numpy(B.cross_entropy(model.logits(B, full, p, x), y))
    assert B.to_numpy(model.lm_loss(B, full, p, x, y)) == want
    R = _with_checkpoint(B, None)
    assert B.to_numpy(model.lm_loss(R, full, p, x, y)) == want
    assert R.calls and all(len(s) == 3 for s in R.calls), R.calls  # the blocks only


def test_chunks_keep_the_logits_out_of_the_peak(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLX's peak memory of one backward pass (LoRA, remat on): a vocabulary of 8,192 over 512 positions is
    16 MiB of float32 logits per copy; in 16 chunks of 1 MiB the peak drops by more than one copy."""
    import mlx.core as mx

    B = backend_or_skip("mlx")
    cfg = ModelConfig(arch="llama", vocab_size=8192, block_size=256, n_layer=1, n_head=2, d_model=32,
                      lora_rank=4)
    rng = np.random.default_rng(3)
    x, y = (B.from_numpy(rng.integers(0, cfg.vocab_size, (2, 256)).astype(np.int32)) for _ in range(2))
    p = {k: B.from_numpy(v) for k, v in init_params(cfg, 0).items()}
    R = copy.copy(B)
    R.remat = True
    vg = B.value_and_grad(lambda t: model.lm_loss(R, cfg, p | t, x, y))
    peaks, losses = {}, {}
    for chunk_bytes in (1 << 30, 1 << 20):
        monkeypatch.setattr(model, "LOSS_CHUNK_BYTES", chunk_bytes)
        mx.eval(p, x, y)
        mx.clear_cache()
        mx.reset_peak_memory()
        loss, g = vg({k: v for k, v in p.items() if "lora" in k})
        mx.eval(loss, g)
        peaks[chunk_bytes], losses[chunk_bytes] = mx.get_peak_memory(), float(loss)
    assert losses[1 << 20] == pytest.approx(losses[1 << 30], rel=1e-6)
    assert peaks[1 << 30] - peaks[1 << 20] > 16 << 20, peaks


def test_lora_with_grad_checkpoint_and_chunks_matches_the_run_without(tmp_path: Path, capsys,
                                                                       monkeypatch) -> None:
    """End to end: LoRA training and evaluation with a chunked loss (a char vocabulary in chunks of 8)."""
    backend_or_skip("mlx")
    monkeypatch.setattr(model, "LOSS_CHUNK_BYTES", 8 * 4 * 40)
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"line {i} of the little corpus\n" for i in range(200)))
    common = ["--backend", "mlx", "--data", str(corpus), "--block-size", "16", "--batch-size", "4",
              "--max-iters", "3", "--eval-every", "3", "--eval-iters", "1", "--log-every", "1"]
    code, _, err = run_cli(["train", *common, "--arch", "llama", "--preset", "tiny", "--tokenizer", "char",
                            "--out", str(tmp_path / "base")], capsys, monkeypatch)
    assert code == 0, err
    losses = {}
    for flag in ([], ["--grad-checkpoint"]):
        out = tmp_path / ("gc" if flag else "plain")
        code, _, err = run_cli(["train", *common, "--init-from", str(tmp_path / "base"), "--lora-rank", "4",
                                "--out", str(out), *flag], capsys, monkeypatch)
        assert code == 0, err
        rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
        losses[bool(flag)] = [r["loss"] for r in rows if r["event"] == "train"] + \
            [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(losses[True]) == 4
    np.testing.assert_allclose(losses[True], losses[False], rtol=2e-6, atol=0)
