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

from twinlm.core import model
from twinlm.core.config import ModelConfig
from twinlm.core.params import init_params

# tied head: the embedding's gradient comes from the blocks' input and from every chunk of the head
CFG = ModelConfig(arch="llama", vocab_size=64, block_size=32, n_layer=2, n_head=2, d_model=32)
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


def _loss_and_grads(B: Any, weights: bool) -> tuple[float, dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    x, y = (B.from_numpy(rng.integers(0, CFG.vocab_size, SHAPE).astype(np.int32)) for _ in range(2))
    w = None
    if weights:
        w_np = (rng.random(SHAPE) < 0.6).astype(np.float32)
        w_np.reshape(-1)[16:32] = 0.0  # a whole chunk without a weighted target
        w = B.from_numpy(w_np)
    p = {k: B.from_numpy(v) for k, v in init_params(CFG, 0).items()}
    loss, g = B.value_and_grad(lambda p: model.lm_loss(B, CFG, p, x, y, w))(p)
    return float(B.to_numpy(loss)), {k: B.to_numpy(v) for k, v in g.items()}


def _gap(B: Any, wrap: Callable | None, weights: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[float, Any]:
    """The largest difference, loss and every gradient, between the unchunked loss and the chunked one."""
    monkeypatch.setattr(model, "LOSS_CHUNK_BYTES", ROWS * CFG.vocab_size * 4)
    loss, grads = _loss_and_grads(B, weights)
    R = _with_checkpoint(B, wrap)
    loss_c, grads_c = _loss_and_grads(R, weights)
    gap = abs(loss_c - loss) / abs(loss)
    for k in grads:
        scale = max(float(np.abs(grads[k]).max()), 1e-3)
        gap = max(gap, float(np.abs(grads_c[k] - grads[k]).max()) / scale)
    return gap, R


TOL = 2e-5  # float32 summation order, relative to the loss and to each gradient's largest entry


@pytest.mark.parametrize("weights", [False, True], ids=["mean", "weighted"])
@pytest.mark.parametrize("backend", ["mlx", "tinygrad"])
def test_chunked_loss_equals_the_unchunked_one(backend: str, weights: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """On MLX the chunks are recomputing checkpoints; tinygrad refuses --grad-checkpoint (its `checkpoint`
    is the plain call), but the chunked graph is core maths and must be right there too."""
    B = backend_or_skip(backend)
    gap, R = _gap(B, None, weights, monkeypatch)
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


def test_without_remat_the_loss_is_the_unchunked_graph() -> None:
    """Bit-identical to the cross-entropy of the model's logits, as before the chunked loss existed."""
    B = backend_or_skip("mlx")
    rng = np.random.default_rng(2)
    x, y = (B.from_numpy(rng.integers(0, CFG.vocab_size, SHAPE).astype(np.int32)) for _ in range(2))
    p = {k: B.from_numpy(v) for k, v in init_params(CFG, 0).items()}
    want = B.to_numpy(B.cross_entropy(model.logits(B, CFG, p, x), y))
    assert B.to_numpy(model.lm_loss(B, CFG, p, x, y)) == want


def test_train_with_grad_checkpoint_and_chunks_matches_the_run_without(tmp_path: Path, capsys,
                                                                        monkeypatch) -> None:
    """End to end: train and evaluate with a chunked loss (a char vocabulary in chunks of 8 positions)."""
    backend_or_skip("mlx")
    monkeypatch.setattr(model, "LOSS_CHUNK_BYTES", 8 * 4 * 40)
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"line {i} of the little corpus\n" for i in range(200)))
    losses = {}
    for flag in ([], ["--grad-checkpoint"]):
        out = tmp_path / ("gc" if flag else "plain")
        args = ["train", "--backend", "mlx", "--data", str(corpus), "--out", str(out), "--arch", "llama",
                "--preset", "tiny", "--block-size", "16", "--batch-size", "4", "--max-iters", "3",
                "--eval-every", "3", "--eval-iters", "1", "--log-every", "1", "--tokenizer", "char", *flag]
        code, _, err = run_cli(args, capsys, monkeypatch)
        assert code == 0, err
        rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
        losses[bool(flag)] = [r["loss"] for r in rows if r["event"] == "train"] + \
            [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(losses[True]) == 4
    np.testing.assert_allclose(losses[True], losses[False], rtol=2e-6, atol=0)
